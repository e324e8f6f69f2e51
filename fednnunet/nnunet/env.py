"""nnU-Net reads its settings from environment variables at each use; set them briefly."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def temporary_env(**values: str | Path | None) -> Iterator[None]:
    """Set environment variables (None: leave alone) for the duration, then restore them.

    Not thread-safe: the process environment is global.
    """
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
