"""The S3 journal stays small however many rounds, and brings the whole history back
(real Redis and S3)."""

from __future__ import annotations

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


def test_snapshots_do_not_grow_with_rounds_and_recovery_restores_history(journaled):
    coordinator = journaled
    state = sm.new_experiment(
        "exp-j", ["a", "b"], ExperimentOptions(method="asym", rounds=60, quorum=2), time.time()
    )
    bucket = coordinator.private_bucket
    for closed in (1, 60):  # journal after round 1, then after round 60
        state.history = [_record(r, coordinator.global_bucket) for r in range(1, closed + 1)]
        state.round, state.seq = closed + 1, state.seq + 1
        coordinator._journal(state)

    sizes = _snapshot_sizes(coordinator, "exp-j")
    assert len(sizes) == 2 and max(sizes) < 4096, sizes
    assert abs(sizes[1] - sizes[0]) < 64, "a snapshot must not carry the history"
    records = coordinator.store.list_keys(bucket, f"exp-j/{HISTORY}/")
    assert len(records) == 60  # one object per closed round, each written once

    coordinator.redis.r.delete(coordinator.redis._k("exp-j", "state"))  # Redis lost it
    assert coordinator.recover_from_journal() == ["exp-j"]
    restored = coordinator.redis.load("exp-j")
    assert restored is not None
    assert restored.round == 61
    assert [r.model_dump() for r in restored.history] == [r.model_dump() for r in state.history]


def test_snapshot_counting_more_rounds_than_s3_holds_is_refused(journaled):
    coordinator = journaled
    state = sm.new_experiment(
        "exp-k", ["a", "b"], ExperimentOptions(method="asym", rounds=5, quorum=2), time.time()
    )
    state.history = [_record(r, coordinator.global_bucket) for r in (1, 2)]
    state.round, state.seq = 3, 1
    coordinator._journal(state)
    store, bucket = coordinator.store, coordinator.private_bucket
    store.client.remove_object(bucket, store.list_keys(bucket, f"exp-k/{HISTORY}/")[-1])
    coordinator.redis.r.delete(coordinator.redis._k("exp-k", "state"))
    with pytest.raises(Exception, match="counts 2 rounds but S3 holds 1"):
        coordinator._load("exp-k")
