"""One private consortium (vhost, users, Redis database, S3) and federation per module."""

from __future__ import annotations

import shutil

import pytest

from fednnunet.settings import get_settings
from tests.adversarial.harness import close_consortium, honest_federation, open_consortium


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("the adversarial tests need rabbitmqctl (per-site broker users)")
    c = open_consortium(get_settings(), tmp_path_factory.mktemp("consortium"))
    try:
        with honest_federation(c) as fed:
            c.federation = fed  # type: ignore[attr-defined]
            yield c
    finally:
        close_consortium(c)
