"""Shared fixtures: tiny synthetic nnU-Net raw datasets (3 sites + their pooled union)."""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

# The tests run on the local development stack (well-known credentials, one broker user
# for every process); the adversarial tests switch it off for the coordinator they test.
os.environ.setdefault("FEDNNUNET_DEVELOPMENT", "true")

import pytest

from bench.pooled import make_pooled_dataset
from fednnunet.nnunet.demo_data import make_demo_federation
from tests.support.private_stack import (
    STATE_DIR,
    SessionServices,
    delete_namespace,
    ensure_s3,
    rabbitmqctl_usable,
)

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
SERVICES = SessionServices.new()  # this session's vhost and Redis namespace names


def pytest_report_header(config) -> list[str]:
    where = "own vhost" if rabbitmqctl_usable() else "configured broker URL (no rabbitmqctl)"
    return [
        f"test services: Redis namespace {SERVICES.namespace}; RabbitMQ: {where}; "
        f"S3: own server from {STATE_DIR} (python -m tests.support.private_stack down stops it)"
    ]


@pytest.fixture(scope="session", autouse=True)
def isolated_redis_namespace():
    """Every test and every process it starts uses the session's own Redis namespace.

    Autouse and cheap (an environment variable), so no test can write experiments into
    the user's namespace; its keys are deleted at the end of the session.
    """
    from fednnunet.settings import get_settings

    mp = pytest.MonkeyPatch()
    mp.setenv("FEDNNUNET_REDIS_NAMESPACE", SERVICES.namespace)
    try:
        yield SERVICES.namespace
    finally:
        mp.undo()
        with contextlib.suppress(Exception):  # Redis down: then nothing was written
            delete_namespace(get_settings().redis_url, SERVICES.namespace)


@pytest.fixture(scope="session")
def stack(isolated_redis_namespace):
    """RabbitMQ and Redis (the machine's services) and an S3 server of the suite's own.

    The S3 server, vhost and namespace are this session's (``tests/support/private_stack``),
    exported as FEDNNUNET_* so that worker and coordinator sub-processes use them too;
    another clone's stack on port 8333 and its experiments are left alone.
    """
    from fednnunet.settings import get_settings

    base = get_settings()
    SERVICES.s3_endpoint = ensure_s3(base.s3_access_key, base.s3_secret_key, base.bucket_prefix)
    SERVICES.open_vhost()
    for note in SERVICES.notes:
        warnings.warn(note, stacklevel=1)  # shown in pytest's warnings summary
    mp = pytest.MonkeyPatch()
    for key, value in SERVICES.env(base.broker_url).items():
        mp.setenv(key, value)
    try:
        yield get_settings()
    finally:
        mp.undo()
        SERVICES.close(base.redis_url)


@pytest.fixture
def unique_id():
    import secrets

    def make(prefix: str = "t") -> str:
        return f"{prefix}{secrets.token_hex(3)}"

    return make
