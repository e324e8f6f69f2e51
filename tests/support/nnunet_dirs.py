"""nnU-Net's three folders under one root, for tests that run nnU-Net in subprocesses."""

from __future__ import annotations

from pathlib import Path


def make_nnunet_dirs(root: Path) -> dict[str, str]:
    """Create raw/preprocessed/results folders under ``root``; return nnU-Net's variables."""
    env = {}
    for var, sub in (
        ("nnUNet_raw", "raw"),
        ("nnUNet_preprocessed", "pre"),
        ("nnUNet_results", "results"),
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(root / sub)
    return env
