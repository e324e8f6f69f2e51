"""Shared fixtures: tiny synthetic nnU-Net raw datasets (3 sites + their pooled union)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The tests run on the local development stack (well-known credentials, one broker user
# for every process); the adversarial tests switch it off for the coordinator they test.
os.environ.setdefault("FEDNNUNET_DEVELOPMENT", "true")

import pytest

from bench.pooled import make_pooled_dataset
from fednnunet.nnunet.demo_data import make_demo_federation

DEMO_SITE_IDS = (901, 902, 903)
DEMO_POOLED_ID = 910


@dataclass(frozen=True)
class DemoFederation:
    raw_root: Path
    site_ids: tuple[int, ...]
    site_folders: list[Path]
    pooled_id: int
    pooled_folder: Path


@pytest.fixture(scope="session")
def demo_federation(tmp_path_factory) -> DemoFederation:
    """3 demo sites (8 cases each, differing spacing/intensity) plus the pooled dataset.

    Read-only for tests: write nnU-Net outputs to your own nnUNet_preprocessed folder.
    """
    raw = tmp_path_factory.mktemp("nnUNet_raw")
    folders = make_demo_federation(raw, DEMO_SITE_IDS, num_cases=8, seed=0)
    pooled = make_pooled_dataset(raw, DEMO_SITE_IDS, DEMO_POOLED_ID)
    return DemoFederation(raw, DEMO_SITE_IDS, folders, DEMO_POOLED_ID, pooled)


# ---------------------------------------------------------------- real services
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def stack():
    """RabbitMQ and Redis (already running on the machine) and the local S3 server.

    ``deploy/local/stack.sh up`` is idempotent: it starts SeaweedFS only if needed.
    """
    import subprocess

    from fednnunet.settings import get_settings

    subprocess.run(
        ["bash", str(REPO_ROOT / "deploy" / "local" / "stack.sh"), "up"],
        check=True,
        capture_output=True,
    )
    return get_settings()


@pytest.fixture
def unique_id():
    import secrets

    def make(prefix: str = "t") -> str:
        return f"{prefix}{secrets.token_hex(3)}"

    return make
