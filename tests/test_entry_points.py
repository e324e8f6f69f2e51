"""The source checkout's worker entries start the same commands as the installed CLI,
and the installed package holds the product only (no top-level ``workers``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("entry", "option"),
    [("workers.site_worker", "--dataset-id"), ("workers.coordinator_worker", "--tick")],
)
def test_worker_entries_run_the_cli_commands(entry: str, option: str) -> None:
    out = subprocess.run(  # noqa: S603 - own interpreter, fixed argv
        [sys.executable, "-m", entry, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert option in out.stdout and f"python -m {entry}" in out.stdout


def test_the_package_installs_fednnunet_only() -> None:
    found = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert found["packages"]["find"]["include"] == ["fednnunet*"]
