"""The state and the S3 journal stay small however many rounds; the history is one
Redis hash entry and one S3 object per round, and comes back after Redis loses it
(real Redis and S3)."""

from __future__ import annotations

import json
import time

import pytest

from fednnunet.adapters.redis_state import RedisState
from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.coordinator.service import Coordinator
from fednnunet.core import state_machine as sm
from fednnunet.keys import HISTORY, JOURNAL, coordinator_bucket, global_bucket
from fednnunet.messages import ArtifactRef, ExperimentOptions

pytestmark = pytest.mark.integration


def _record(round_: int, bucket: str) -> sm.RoundRecord:
    ref = ArtifactRef(bucket=bucket, key=f"e/train/r{round_:05d}/global/w", sha256="0" * 64, size=9)
    return sm.RoundRecord(
        round=round_,
        participants=["a", "b"],
        global_weights=ref,
        metrics={s: {"train_loss": 1.0 / round_, "train_s": 3.0} for s in ("a", "b")},
        num_cases={"a": 4, "b": 5},
        opened_at=1000.0 + round_,
        closed_at=1001.0 + round_,
    )


@pytest.fixture
def journaled(stack, unique_id):
    settings = stack.model_copy(update={"bucket_prefix": unique_id("fedtest-j")})
    store = ArtifactStore(settings)
    buckets = [global_bucket(settings.bucket_prefix), coordinator_bucket(settings.bucket_prefix)]
    for bucket in buckets:
        store.ensure_bucket(bucket)
    redis = RedisState(settings.redis_url, namespace=unique_id("fedtest-ns"))
    coordinator = Coordinator(settings, redis, store, send_task=lambda task: None)
    yield coordinator
    from minio.deleteobjects import DeleteObject

    for bucket in buckets:
        keys = [DeleteObject(k) for k in store.list_keys(bucket, "")]
        list(store.client.remove_objects(bucket, keys))
        store.client.remove_bucket(bucket)
    for key in redis.r.scan_iter(f"{redis.ns}:*"):
        redis.r.delete(key)


def _snapshot_sizes(coordinator: Coordinator, exp: str) -> list[int]:
    store, bucket = coordinator.store, coordinator.private_bucket
    refs = [store.stat(bucket, k) for k in store.list_keys(bucket, f"{exp}/{JOURNAL}/")]
    return [r.size for r in refs if r is not None]


def _close_rounds(coordinator: Coordinator, state: sm.ExperimentState, upto: int) -> None:
    """Close rounds as the coordinator does: apply, then one save (S3 record, Redis, journal)."""
    bucket = coordinator.global_bucket
    while state.rounds_closed < upto:
        closed_before = state.rounds_closed
        record = _record(state.rounds_closed + 1, bucket)
        record.opened_at = state.phase_opened_at
        sm.apply_aggregated(state, record, record.closed_at)
        coordinator._save(state, journal=True, fence=None, closed_before=closed_before)


def _train_state(exp: str, rounds: int) -> sm.ExperimentState:
    options = ExperimentOptions(method="asym", rounds=rounds, quorum=2)
    state = sm.new_experiment(exp, ["a", "b"], options, time.time())
    sm.apply_plans_checked(state, time.time())
    return state


def test_snapshots_do_not_grow_with_rounds_and_recovery_restores_history(journaled):
    coordinator = journaled
    state = _train_state("exp-j", 80)
    bucket = coordinator.private_bucket
    _close_rounds(coordinator, state, 1)
    first = _snapshot_sizes(coordinator, "exp-j")
    _close_rounds(coordinator, state, 60)
    sizes = _snapshot_sizes(coordinator, "exp-j")
    assert len(sizes) == 60 and max(sizes) < 4096, sizes
    assert abs(sizes[-1] - first[0]) < 64, "a snapshot must not carry the history"
    records = coordinator.store.list_keys(bucket, f"exp-j/{HISTORY}/")
    assert len(records) == 60  # one object per closed round, each written once
    expected = [
        _record(r, coordinator.global_bucket).model_dump(exclude={"opened_at", "closed_at"})
        for r in range(1, 61)
    ]

    coordinator.redis.r.delete(
        coordinator.redis._k("exp-j", "state"), coordinator.redis._k("exp-j", "history")
    )  # Redis lost it
    assert coordinator.recover_from_journal() == ["exp-j"]
    restored = coordinator.redis.load("exp-j", with_history=True)
    assert restored is not None
    assert restored.round == 61 and restored.rounds_closed == 60
    got = [r.model_dump(exclude={"opened_at", "closed_at"}) for r in restored.history]
    assert got == expected


def test_state_stays_bounded_and_history_is_one_entry_per_round(journaled):
    """The state document is the same size at round 2 and round 200; the history is a
    Redis hash with one entry per closed round, read back incrementally."""
    coordinator = journaled
    redis = coordinator.redis
    state = _train_state("exp-b", 200)
    _close_rounds(coordinator, state, 2)
    small = redis.r.strlen(redis._k("exp-b", "state"))
    _close_rounds(coordinator, state, 200)
    large = redis.r.strlen(redis._k("exp-b", "state"))
    assert abs(large - small) < 64, (small, large)
    assert redis.r.hlen(redis._k("exp-b", "history")) == 200
    assert [r.round for r in redis.history("exp-b", 197, 200)] == [198, 199, 200]
    assert redis.history("exp-b", 200, 200) == []
    loaded = redis.load("exp-b")
    assert loaded.history == [] and loaded.rounds_closed == 200
    assert loaded.last_round is not None and loaded.last_round.round == 200
    assert "history" not in json.loads(redis.r.get(redis._k("exp-b", "state")))


def test_restarted_coordinator_touches_no_past_round(journaled):
    """A new coordinator process (Redis intact) closes round 41 with one S3 record write:
    it neither lists, stats nor reads the 40 records before it."""
    coordinator = journaled
    state = _train_state("exp-r", 50)
    _close_rounds(coordinator, state, 40)
    restarted = Coordinator(
        coordinator.settings, coordinator.redis, coordinator.store, send_task=lambda task: None
    )
    touched: list[str] = []
    store = restarted.store
    for name in ("stat", "list_keys", "get_bytes", "put_bytes"):
        original = getattr(store, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            key = args[1] if _name in ("stat", "list_keys", "put_bytes") else args[0].key
            touched.append(key)
            return _original(*args, **kwargs)

        setattr(store, name, spy)
    try:
        loaded = restarted.redis.load("exp-r")
        _close_rounds(restarted, loaded, 41)
    finally:
        for name in ("stat", "list_keys", "get_bytes", "put_bytes"):
            delattr(store, name)
    history_keys = [k for k in touched if f"/{HISTORY}/" in k]
    assert history_keys and all("/r00041/" in k for k in history_keys), history_keys
    assert not any(k.endswith("/") for k in touched), "no listing"


def test_snapshot_counting_more_rounds_than_s3_holds_is_refused(journaled):
    coordinator = journaled
    state = _train_state("exp-k", 5)
    _close_rounds(coordinator, state, 2)
    store, bucket = coordinator.store, coordinator.private_bucket
    store.client.remove_object(bucket, store.list_keys(bucket, f"exp-k/{HISTORY}/")[-1])
    coordinator.redis.r.delete(coordinator.redis._k("exp-k", "state"))
    with pytest.raises(Exception, match="counts 2 rounds but S3 holds 1"):
        coordinator._load("exp-k")
