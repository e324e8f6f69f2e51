"""`fednnunet doctor` prints a pass/fail table with a fix for each failure."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fednnunet.cli.main import app

pytestmark = pytest.mark.integration


def test_doctor_passes_on_a_healthy_site(stack, tmp_path):
    (tmp_path / "raw" / "Dataset901_X").mkdir(parents=True)
    for sub in ("pre", "res"):
        (tmp_path / sub).mkdir()
    env = {
        "nnUNet_raw": str(tmp_path / "raw"),
        "nnUNet_preprocessed": str(tmp_path / "pre"),
        "nnUNet_results": str(tmp_path / "res"),
        "FEDNNUNET_DATASET_ID": "901",
        "COLUMNS": "200",
    }
    result = CliRunner().invoke(app, ["doctor"], env=env)
    assert result.exit_code == 0, result.output
    assert result.output.count("│ pass ") == 9 and "FAIL" not in result.output


def test_doctor_names_each_failure_and_its_fix(tmp_path):
    env = {
        "nnUNet_raw": "",
        "nnUNet_preprocessed": str(tmp_path / "missing"),
        "nnUNet_results": str(tmp_path),
        "FEDNNUNET_DATASET_ID": "",
        "COLUMNS": "250",
    }
    result = CliRunner().invoke(
        app,
        ["doctor", "--s3-endpoint", "127.0.0.1:1", "--redis-url", "redis://127.0.0.1:1/0"],
        env=env,
    )
    assert result.exit_code == 1
    out = result.output
    for needle in (
        "S3",
        "fednnunet stack up",
        "Redis",
        "nnUNet_raw is not set",
        "is not a directory",
        "export nnUNet_raw",
    ):
        assert needle in out, needle
    assert out.count("FAIL") == 4  # S3, Redis, nnUNet_raw, nnUNet_preprocessed


def test_bad_setting_value_is_one_line():
    result = CliRunner().invoke(app, ["doctor"], env={"FEDNNUNET_DATASET_ID": "abc"})
    assert result.exit_code == 2
    assert "invalid setting(s): FEDNNUNET_DATASET_ID" in result.output
