"""Fixtures of the fault tests: an isolated corner of the shared services per test.

RabbitMQ and Redis are the machine's shared servers (a private vhost and an empty
database per test); S3 is a SeaweedFS server of the fault session's own, so that a
colleague's ``stack.sh down`` cannot fail these tests, and test 6 can stop its own.
"""

from __future__ import annotations

import shutil

import pytest

from fednnunet.settings import get_settings
from tests.faults.harness import PrivateS3, close_isolated, open_isolated
from tests.support.weed import free_port_block


def _need_tools() -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("fault tests need rabbitmqctl (vhosts, closing connections)")


@pytest.fixture(scope="session")
def fault_s3(tmp_path_factory):
    _need_tools()
    base = get_settings()
    s3 = PrivateS3(
        tmp_path_factory.mktemp("fault-s3"),
        free_port_block(),
        base.s3_access_key,
        base.s3_secret_key,
    )
    s3.start()
    try:
        yield s3
    finally:
        s3.stop()


@pytest.fixture
def isolate(unique_id, tmp_path, fault_s3):
    """Factory of isolated environments (on the session's S3 unless told another)."""
    opened = []

    def make(s3: PrivateS3 | None = None):
        iso = open_isolated(
            get_settings(),
            unique_id(""),
            tmp_path / f"iso{len(opened)}",
            s3_endpoint=(s3 or fault_s3).endpoint,
        )
        opened.append(iso)
        return iso

    try:
        yield make
    finally:
        for iso in opened:
            close_isolated(iso)


@pytest.fixture
def iso(isolate):
    """A private vhost, Redis database and bucket prefix; removed afterwards."""
    return isolate()
