"""The seed-compatible simulation command, as a user types it (real nnU-Net, real services)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fednnunet.nnunet.demo_data import make_demo_federation
from fednnunet.nnunet.planning import plans_sha256

pytestmark = [pytest.mark.integration, pytest.mark.nnunet]


def test_run_plan_and_preprocess_gives_every_site_one_plan(stack, tmp_path):
    env = dict(os.environ)
    for var, sub in (
        ("nnUNet_raw", "raw"),
        ("nnUNet_preprocessed", "pre"),
        ("nnUNet_results", "res"),
    ):
        (tmp_path / sub).mkdir()
        env[var] = str(tmp_path / sub)
    # Dataset ids no other test uses: in simulation the site id is the dataset id.
    make_demo_federation(tmp_path / "raw", [931, 932], num_cases=4, seed=5)
    proc = subprocess.run(  # noqa: S603 - own interpreter, argv list, no shell
        [
            sys.executable,
            "-m",
            "fednnunet.cli.main",
            "run",
            "plan_and_preprocess",
            "931 932",
            "2d",
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "phase done" in proc.stdout
    hashes = set()
    for ds in (931, 932):
        (folder,) = Path(env["nnUNet_preprocessed"]).glob(f"Dataset{ds}_*")
        plans = json.loads((folder / "nnUNetPlans.json").read_text())
        hashes.add(plans_sha256(plans))
        assert (folder / "nnUNetPlans_2d").is_dir()  # preprocessed data is there
    assert len(hashes) == 1


def test_run_rejects_bad_arguments(tmp_path):
    env = dict(
        os.environ,
        nnUNet_raw=str(tmp_path),
        nnUNet_preprocessed=str(tmp_path),
        nnUNet_results=str(tmp_path),
    )
    for args, msg in (
        (["run", "bogus", "901", "2d"], "unknown command 'bogus'"),
        (["run", "train", "901 x", "2d"], "dataset ids must be integers"),
        (["run", "extract_fingerprint", "901", "2d", "--method", "asym"], "no federated"),
        (["run", "train", "901", "2d", "0", "--frobnicate"], "--frobnicate"),
    ):
        proc = subprocess.run(  # noqa: S603 - own interpreter, argv list, no shell
            [sys.executable, "-m", "fednnunet.cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert msg in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
