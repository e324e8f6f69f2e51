"""The coordinator deletes a global that left the window only once the pass that made it
unneeded has saved (real Redis and S3): a pass that fails after closing the round (here
the broker refuses the next tasks) deletes nothing, since the state that survives it may
still need the global (e.g. as the best one); the sweep at the end catches up."""

from __future__ import annotations

import time

import pytest

from fednnunet.adapters.weights_codec import encode_weights
from fednnunet.core import state_machine as sm
from fednnunet.keys import global_bucket, global_weights_key, site_artifact_key, site_bucket
from fednnunet.messages import ExperimentOptions
from tests.coordinator import test_fold_on_arrival as fold
from tests.coordinator.test_fold_on_arrival import CASES, SITES, _coordinator, _report, _update

pytestmark = pytest.mark.integration
s3, fold_ns = fold.s3, fold.fold_ns  # the fixtures: buckets and a Redis namespace of their own


def _round3_with_updates(settings, redis, tmp_path, exp):
    """A coordinator with ``exp`` (keep_rounds 2) in round 3, globals 1-2 in S3, and the
    reports of three round-3 updates."""
    coordinator = _coordinator(settings, redis, tmp_path / exp)
    store, bucket = coordinator.store, global_bucket(settings.bucket_prefix)
    now = time.time()
    options = ExperimentOptions(configuration="2d", method="asym", rounds=4, keep_rounds=2)
    state = sm.new_experiment(exp, list(SITES[:3]), options, now)
    sm.apply_plans_checked(state, now)
    state.declared_cases = {s: CASES[s] for s in SITES[:3]}
    for r in (1, 2):
        ref = store.put_bytes(bucket, global_weights_key(exp, r), encode_weights(_update(10 + r)))
        sm.apply_aggregated(state, sm.RoundRecord(round=r, participants=list(SITES[:3]),
                                                  global_weights=ref), now)  # fmt: skip
    state.history_in_s3 = 2  # as if their records were written (not what this is about)
    assert redis.create(state)
    reports = []
    for i, site in enumerate(SITES[:3]):
        key = site_artifact_key(exp, "train", 3, site)
        data = encode_weights(_update(20 + i))
        ref = store.put_bytes(site_bucket(settings.bucket_prefix, site), key, data)
        reports.append(_report(exp, site, 3, ref))
    return coordinator, reports, store, bucket


def _stored_globals(store, bucket, exp) -> set[int]:
    keys = store.list_keys(bucket, f"{exp}/train/")
    return {int(k.split("/")[2][1:]) for k in keys if k.endswith("/weights.safetensors")}


def test_a_saved_pass_deletes_the_global_that_left_the_window(fold_ns, unique_id, tmp_path):
    settings, redis = fold_ns
    exp = unique_id("ret-saved-")
    coordinator, reports, store, bucket = _round3_with_updates(settings, redis, tmp_path, exp)
    for report in reports:
        coordinator.on_report(report)
    assert redis.load(exp).rounds_closed == 3
    deadline = time.monotonic() + 10
    while _stored_globals(store, bucket, exp) != {2, 3}:
        assert time.monotonic() < deadline, _stored_globals(store, bucket, exp)
        time.sleep(0.1)


def test_a_pass_that_fails_after_closing_the_round_deletes_nothing(fold_ns, unique_id, tmp_path):
    settings, redis = fold_ns
    exp = unique_id("ret-failed-")
    coordinator, reports, store, bucket = _round3_with_updates(settings, redis, tmp_path, exp)

    def refuse(task) -> None:
        if task.round == 4:
            raise ConnectionError("broker gone")

    coordinator.send_task = refuse
    for report in reports[:2]:
        coordinator.on_report(report)
    with pytest.raises(ConnectionError):
        coordinator.on_report(reports[2])
    assert redis.load(exp).rounds_closed == 3  # the closed round itself was kept
    coordinator._retention.submit(lambda: None).result(timeout=40)  # the queue has drained
    assert _stored_globals(store, bucket, exp) == {1, 2, 3}
