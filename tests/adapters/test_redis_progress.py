"""Progress in Redis on the real server: a heartbeat does not erase the training position."""

from __future__ import annotations

import pytest

from fednnunet.adapters.redis_state import RedisState
from fednnunet.messages import ProgressEvent

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_state(stack, unique_id):
    state = RedisState(stack.redis_url, namespace=f"{stack.redis_namespace}-{unique_id('p')}")
    yield state
    keys = list(state.r.scan_iter(f"{state.ns}:*"))
    if keys:
        state.r.delete(*keys)


def _event(kind: str, **fields) -> ProgressEvent:
    return ProgressEvent(experiment_id="e1", site_id="901", kind=kind, phase="train", **fields)


def test_heartbeat_keeps_the_last_iteration_of_the_same_round(redis_state):
    redis_state.record_progress(_event("progress", round=2, epoch=1, iteration=7, of_iterations=9))
    redis_state.record_progress(_event("heartbeat", round=2), received=123.0)
    got = redis_state.progress("e1")["901"]
    assert got["kind"] == "heartbeat" and got["received"] == 123.0  # the coordinator's view
    assert (got["epoch"], got["iteration"], got["of_iterations"]) == (1, 7, 9)


def test_position_of_an_earlier_round_is_not_shown(redis_state):
    redis_state.record_progress(_event("progress", round=2, epoch=1, iteration=9, of_iterations=9))
    redis_state.record_progress(_event("heartbeat", round=3))
    got = redis_state.progress("e1")["901"]
    assert got["round"] == 3 and got["iteration"] is None
