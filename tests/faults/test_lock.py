"""The per-experiment Redis lock: held while its owner lives, freed soon after it dies."""

from __future__ import annotations

import time

import pytest

from fednnunet.adapters.redis_state import RedisState

pytestmark = pytest.mark.integration


def test_lock_outlives_its_ttl_while_held_and_expires_after_its_owner_dies(iso):
    state = RedisState.from_settings(iso.settings)
    key = state._k("lock-test", "lock")  # in the session's Redis namespace
    with state.locked("lock-test", timeout_s=1.5):
        time.sleep(3.0)  # twice the TTL: the renewer keeps it
        assert state.r.exists(key)
        assert 0 < state.r.pttl(key) <= 1500
    assert not state.r.exists(key)
    # An owner that vanished without releasing (SIGKILL): the next one waits one TTL.
    dead = state.r.lock(key, timeout=1.5)
    assert dead.acquire(blocking=False)
    t0 = time.monotonic()
    with state.locked("lock-test", timeout_s=1.5, wait_s=10):
        waited = time.monotonic() - t0
    assert 0.5 < waited < 3.0
