"""Aggregation off the critical path: each update is screened and folded into the running
FedAvg as its report arrives (real Redis and S3). The folded global equals the
case-weighted mean computed here independently; an update screened out late (median-norm
outlier) leaves the right result; a coordinator killed mid-round is replaced by one that
writes the very same global object."""

from __future__ import annotations

import time

import pytest
import torch

from fednnunet.adapters.redis_state import RedisState
from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.adapters.weights_codec import decode_weights, encode_weights, read_header
from fednnunet.coordinator.aggregator import RoundFold, aggregate_round
from fednnunet.coordinator.service import Coordinator
from fednnunet.core import state_machine as sm
from fednnunet.keys import coordinator_bucket, global_bucket, site_artifact_key, site_bucket
from fednnunet.messages import ArtifactRef, ExperimentOptions, SiteReport

pytestmark = pytest.mark.integration
SITES = ("a", "b", "c", "d")
CASES = {"a": 3, "b": 5, "c": 7, "d": 2}


def _update(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 4, 3, 3, generator=gen) * scale,
        "conv.bias": torch.randn(8, generator=gen) * scale,
        "steps": torch.tensor([seed], dtype=torch.int64),
    }


def _independent_mean(updates: dict[str, dict], cases: dict[str, int]) -> dict[str, torch.Tensor]:
    """sum_i n_i x_i / sum_i n_i in float64, layer by layer (not the product's code)."""
    total = sum(cases[s] for s in updates)
    out = {}
    for name in ("conv.weight", "conv.bias"):
        acc = torch.zeros_like(next(iter(updates.values()))[name], dtype=torch.float64)
        for site, tensors in updates.items():
            acc += tensors[name].double() * cases[site]
        out[name] = acc / total
    return out


def _report(exp: str, site: str, round_: int, ref: ArtifactRef) -> SiteReport:
    return SiteReport(
        experiment_id=exp,
        site_id=site,
        phase="train",
        round=round_,
        ok=True,
        artifact=ref,
        num_cases=CASES[site],
    )


@pytest.fixture
def s3(stack, unique_id, tmp_path):
    settings = stack.model_copy(update={"bucket_prefix": unique_id("fedtest-fold")})
    store = ArtifactStore(settings, cache_dir=tmp_path / "cache", retry_total_s=5)
    buckets = [global_bucket(settings.bucket_prefix), coordinator_bucket(settings.bucket_prefix)]
    buckets += [site_bucket(settings.bucket_prefix, s) for s in SITES]
    for bucket in buckets:
        store.ensure_bucket(bucket)
    yield settings, store
    from minio.deleteobjects import DeleteObject

    for bucket in buckets:
        keys = [DeleteObject(k) for k in store.list_keys(bucket, "")]
        list(store.client.remove_objects(bucket, keys))
        store.client.remove_bucket(bucket)


@pytest.fixture
def fold_ns(s3, unique_id):
    """The s3 fixture's settings with a Redis namespace of their own, and its Redis;
    the namespace's keys are dropped afterwards."""
    settings, _ = s3
    settings = settings.model_copy(update={"redis_namespace": unique_id("fedtest-fold-ns")})
    redis = RedisState(settings.redis_url, namespace=settings.redis_namespace)
    yield settings, redis
    for key in redis.r.scan_iter(f"{redis.ns}:*"):
        redis.r.delete(key)


def test_fold_on_arrival_equals_the_case_weighted_mean_and_drops_a_late_outlier(s3):
    settings, store = s3
    bucket = global_bucket(settings.bucket_prefix)
    previous = store.put_bytes(bucket, "f/global1", encode_weights(_update(0, 100.0)), cache=True)
    updates = {s: _update(i + 1) for i, s in enumerate("abc")}
    # d: within 100x the previous global's norm (passes on arrival), but more than 100x
    # the round's median: only the last check, over all norms, refuses it.
    updates_d = _update(9, 500.0)
    refs = {s: store.put_bytes(bucket, f"f/{s}", encode_weights(t)) for s, t in updates.items()}
    refs["d"] = store.put_bytes(bucket, "f/d", encode_weights(updates_d))
    reports = [_report("f", s, 2, refs[s]) for s in SITES]

    fold = RoundFold(store, previous, exact=True)
    for i in range(1, len(reports) + 1):  # as the reports arrive: d is folded too
        fold.fold(store, [(r, CASES[r.site_id]) for r in reports[:i]])
    assert fold.folded_sites == list(SITES)

    result = aggregate_round(
        store, reports, bucket, "f/global2", previous, cases=CASES, min_participants=2, fold=fold
    )
    assert result.participants == ["a", "b", "c"]
    assert set(result.quarantined) == {"d"} and "median" in result.quarantined["d"]
    assert fold.folded_sites == ["a", "b", "c"]  # rebuilt without d, in the same order
    merged = decode_weights(store.get_bytes(result.global_weights))
    expected = _independent_mean(updates, CASES)
    for name, value in expected.items():
        assert merged[name].dtype == torch.float32
        assert torch.allclose(merged[name].double(), value, rtol=1e-6, atol=1e-6), name
    assert torch.equal(merged["steps"], updates["a"]["steps"])  # counters: the first's
    assert result.weights == pytest.approx({s: CASES[s] / 15 for s in "abc"})

    # The batch path (no fold) over the same reports in the same order: the same global.
    batch = aggregate_round(
        store, reports, bucket, "f/global2-batch", previous, cases=CASES, min_participants=2
    )
    _assert_same_global(store, batch.global_weights, result.global_weights)


def _assert_same_global(store: ArtifactStore, one: ArtifactRef, other: ArtifactRef) -> None:
    """Bit for bit the same tensors and metadata (safetensors orders its metadata map
    differently from one encoding to the next, so the object hashes may differ)."""
    first, second = (decode_weights(store.get_bytes(ref)) for ref in (one, other))
    assert first.keys() == second.keys()
    for name, value in first.items():
        assert value.dtype == second[name].dtype and torch.equal(value, second[name]), name
    headers = [read_header(store.get_file(ref)) for ref in (one, other)]
    assert headers[0].metadata == headers[1].metadata


def _round2_state(exp: str, global_ref: ArtifactRef) -> sm.ExperimentState:
    now = time.time()
    options = ExperimentOptions(configuration="2d", method="asym", rounds=3, quorum=3)
    state = sm.new_experiment(exp, list(SITES[:3]), options, now)
    sm.apply_plans_checked(state, now)
    state.declared_cases = {s: CASES[s] for s in SITES[:3]}
    record = sm.RoundRecord(round=1, participants=list(SITES[:3]), global_weights=global_ref)
    sm.apply_aggregated(state, record, now)
    return state


def _run_round(settings, store_dir, exp: str, crash_after: int | None) -> ArtifactRef:
    """Round 2 of ``exp``: reports a, b, c arrive; with ``crash_after`` the coordinator
    that took the first reports is dropped (killed) and a new one takes the rest."""
    redis = RedisState(settings.redis_url, namespace=settings.redis_namespace)
    first, reports = _round2_with_updates(settings, redis, store_dir, exp)
    active = first
    for i, report in enumerate(reports):
        if crash_after is not None and i == crash_after:
            assert first._folds[exp].folded_sites == [r.site_id for r in reports[:i]]
            # A new process: no fold, empty cache.
            active = _coordinator(settings, redis, store_dir / f"{exp}-2")
        elif i == len(reports) - 1:
            # Before the last report the others are folded already: only the last
            # update, finalisation and the global PUT remain.
            assert active._folds[exp].folded_sites == [r.site_id for r in reports[:i]]
        active.on_report(report)
    state = redis.load(exp)
    assert state.round == 3 and state.rounds_closed == 2, (state.phase, state.error)
    assert state.last_round.participants == list(SITES[:3])
    return state.global_weights


def test_a_coordinator_killed_mid_round_is_replaced_with_the_same_global(
    s3, fold_ns, unique_id, tmp_path
):
    _, store = s3
    settings, _ = fold_ns
    whole = _run_round(settings, tmp_path, unique_id("fold-whole-"), crash_after=None)
    crashed = _run_round(settings, tmp_path, unique_id("fold-crash-"), crash_after=2)
    _assert_same_global(store, crashed, whole)  # bit for bit the same global
    merged = decode_weights(store.get_bytes(crashed))
    expected = _independent_mean(_updates_abc(), CASES)
    for name, value in expected.items():
        assert torch.allclose(merged[name].double(), value, rtol=1e-6, atol=1e-6), name


def test_the_next_rounds_reference_is_the_kept_global_neither_read_nor_hashed_again(
    s3, monkeypatch
):
    """A coordinator builds the next round's fold from the global bytes it kept when it
    published them (hashed once, while encoding): no S3 read, no second sha256 pass.
    Without kept bytes (a restarted coordinator) they are fetched and verified."""
    import hashlib

    from fednnunet.adapters.weights_codec import encode_weights_sha256

    settings, store = s3
    data, sha = encode_weights_sha256(_update(1))
    ref = store.put_bytes(global_bucket(settings.bucket_prefix), "g/r1", data, sha256=sha)
    real_sha256, hashed, reads = hashlib.sha256, [], []

    def counting_sha256(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        hashed.append(len(args[0]) if args else 0)
        return real_sha256(*args, **kwargs)

    real_get = store.get_bytes
    monkeypatch.setattr(hashlib, "sha256", counting_sha256)
    monkeypatch.setattr(store, "get_bytes", lambda *a, **k: reads.append(a) or real_get(*a, **k))
    kept = RoundFold(store, ref, exact=True, encoded=data)
    assert reads == [] and max(hashed, default=0) < len(data)
    fetched = RoundFold(store, ref, exact=True)  # nothing kept: read from S3, verified
    assert len(reads) == 1
    assert kept.names == fetched.names and kept.reference_norm == fetched.reference_norm


def test_a_global_stored_by_a_coordinator_that_died_is_the_round_and_no_stat_precedes_a_put(
    s3, fold_ns, unique_id, tmp_path, monkeypatch
):
    """The round's global is written once with a conditional PUT, with no stat before it
    (one request fewer on the round's critical path). A coordinator that died between its
    PUT and its state save left a global of other bytes (here: sites a and b only): the
    next coordinator's write is refused and it adopts the stored object and its
    participants, never overwriting it."""
    from fednnunet.adapters.weights_codec import encode_weights_sha256
    from fednnunet.keys import global_weights_key

    _, store = s3
    settings, redis = fold_ns
    bucket = global_bucket(settings.bucket_prefix)
    updates = _updates_abc()

    # The normal round: nothing asks S3 about the round's global before writing it.
    exp = unique_id("fold-nostat-")
    coordinator, reports = _round2_with_updates(settings, redis, tmp_path, exp)
    asked: list[str] = []
    real_stat = coordinator.store.stat

    def stat(bucket_: str, key: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        asked.append(key)
        return real_stat(bucket_, key, *args, **kwargs)

    monkeypatch.setattr(coordinator.store, "stat", stat)
    for report in reports:
        coordinator.on_report(report)
    state = redis.load(exp)
    assert state.rounds_closed == 2 and state.last_round.participants == list("abc")
    assert global_weights_key(exp, 2) not in asked

    # A dead coordinator's global (a and b only) is there before the last report.
    exp = unique_id("fold-dead-")
    coordinator, reports = _round2_with_updates(settings, redis, tmp_path, exp)
    total = CASES["a"] + CASES["b"]
    partial = {
        n: (updates["a"][n] * CASES["a"] + updates["b"][n] * CASES["b"]) / total
        for n in ("conv.weight", "conv.bias")
    } | {"steps": updates["a"]["steps"]}
    data, sha = encode_weights_sha256(partial, {"participants": "a,b", "aggregation": "fedavg"})
    stored = store.put_bytes(bucket, global_weights_key(exp, 2), data, sha256=sha)
    for report in reports:
        coordinator.on_report(report)
    state = redis.load(exp)
    assert state.rounds_closed == 2, (state.phase, state.error)
    assert state.global_weights == stored  # adopted, not rewritten
    assert store.get_bytes(stored) == data
    assert state.last_round.participants == ["a", "b"]


def _updates_abc() -> dict[str, dict[str, torch.Tensor]]:
    return {s: _update(i + 1) for i, s in enumerate("abc")}


def _coordinator(settings, redis: RedisState, cache_dir) -> Coordinator:
    """A coordinator process of its own: its own store and cache, nothing dispatched."""
    store = ArtifactStore(settings, cache_dir=cache_dir, retry_total_s=5)
    return Coordinator(settings, redis, store, send_task=lambda task: None, render_plots=False)


def _round2_with_updates(
    settings, redis: RedisState, store_dir, exp: str
) -> tuple[Coordinator, list[SiteReport]]:
    """A coordinator with ``exp`` in round 2, and the reports of the updates of
    :func:`_updates_abc`, uploaded."""
    bucket = global_bucket(settings.bucket_prefix)
    coordinator = _coordinator(settings, redis, store_dir / f"{exp}-1")
    cstore = coordinator.store
    g1 = cstore.put_bytes(bucket, f"{exp}/train/r00001/global/weights.safetensors",
                          encode_weights(_update(0, 10.0)))  # fmt: skip
    assert redis.create(_round2_state(exp, g1))
    reports = []
    for site, tensors in _updates_abc().items():
        key = site_artifact_key(exp, "train", 2, site)
        ref = cstore.put_bytes(site_bucket(settings.bucket_prefix, site), key,
                               encode_weights(tensors))  # fmt: skip
        reports.append(_report(exp, site, 2, ref))
    return coordinator, reports


def test_a_sync_round_is_journaled_when_it_closes_not_per_report(s3, fold_ns, unique_id, tmp_path):
    """A report that moves nothing (no phase, no round, no give-up) writes no snapshot:
    a state restored from the round's opening snapshot asks the sites again and each
    answers from its stored update. The pass that closes the round and dispatches the
    next writes one (the journal stays off the upload window)."""
    from fednnunet.keys import JOURNAL

    _, store = s3
    settings, redis = fold_ns
    exp = unique_id("fold-journal-")
    coordinator, reports = _round2_with_updates(settings, redis, tmp_path, exp)
    bucket = coordinator.private_bucket

    def snapshots() -> list[str]:
        return store.list_keys(bucket, f"{exp}/{JOURNAL}/")

    counts = []
    for report in reports:
        coordinator.on_report(report)
        counts.append(len(snapshots()))
    assert counts == [0, 0, 1]
    state = redis.load(exp)
    assert (state.round, state.rounds_closed) == (3, 2)
    (key,) = snapshots()
    journaled = sm.ExperimentState.model_validate(store.get_json(store.stat(bucket, key)))
    assert journaled.round == 3 and journaled.rounds_closed == 2


def test_the_progress_picture_is_drawn_by_the_pass_that_closes_a_round(
    fold_ns, unique_id, tmp_path, monkeypatch
):
    """Even with no interval between pictures, a report that moves nothing draws none
    (the drawing thread would hold the GIL the report threads need mid-upload); the pass
    that closed the round, while the sites train, draws one."""
    settings, redis = fold_ns
    exp = unique_id("fold-plot-")
    coordinator, reports = _round2_with_updates(settings, redis, tmp_path, exp)
    coordinator.render_plots, coordinator.plot_every_s = True, 0.0
    drawn: list[int] = []
    monkeypatch.setattr(
        coordinator._plots, "submit", lambda fn, state: drawn.append(state.rounds_closed)
    )
    counts = []
    for report in reports:
        coordinator.on_report(report)
        counts.append(len(drawn))
    assert counts == [0, 0, 1] and drawn == [2]


def _watch_fold_builds(monkeypatch, events: list[str]) -> None:
    """Record in ``events`` when the next round's fold starts being built."""
    import fednnunet.coordinator.service as service

    real = service.RoundFold

    def recorded(*args, **kwargs):
        events.append("build")
        return real(*args, **kwargs)

    monkeypatch.setattr(service, "RoundFold", recorded)


def _round2_watching_builds(fold_ns, unique_id, tmp_path, monkeypatch, name: str):
    """:func:`_round2_with_updates` for a new experiment, with its fold builds recorded:
    (coordinator, reports, redis, experiment id, events)."""
    settings, redis = fold_ns
    exp = unique_id(name)
    coordinator, reports = _round2_with_updates(settings, redis, tmp_path, exp)
    events: list[str] = []
    _watch_fold_builds(monkeypatch, events)
    return coordinator, reports, redis, exp, events


def test_the_next_rounds_fold_is_built_after_the_pass_that_closed_the_round(
    fold_ns, unique_id, tmp_path, monkeypatch
):
    """The niced builder thread starts only once the closing pass has sent the next
    round's tasks and saved the state (started at once, it shared the GIL with them);
    the fold it builds is the next round's."""
    coordinator, reports, redis, exp, events = _round2_watching_builds(
        fold_ns, unique_id, tmp_path, monkeypatch, "fold-after-pass-"
    )

    def send(task) -> None:
        time.sleep(0.05)  # time enough for a builder that did not wait to start
        events.append(f"sent {task.site_id} r{task.round}")

    coordinator.send_task = send
    real_save = coordinator._save
    coordinator._save = lambda *a, **kw: (real_save(*a, **kw), events.append("saved"))[0]
    for report in reports:
        coordinator.on_report(report)
    future = coordinator._folds[exp]
    fold = future.result(timeout=10)
    assert events[-1] == "build", events
    assert events[:-1][-4:] == ["sent a r3", "sent b r3", "sent c r3", "saved"], events
    assert fold.previous == redis.load(exp).global_weights


def test_a_pass_that_fails_after_closing_the_round_does_not_hold_the_builder(
    fold_ns, unique_id, tmp_path, monkeypatch
):
    """A pass that raises (here: the broker refuses the next round's tasks) still lets
    the builder go: the closed round is saved and the next round's fold is built."""
    coordinator, reports, redis, exp, events = _round2_watching_builds(
        fold_ns, unique_id, tmp_path, monkeypatch, "fold-failed-pass-"
    )

    def refuse(task) -> None:
        if task.round == 3:
            raise ConnectionError("broker gone")

    coordinator.send_task = refuse
    for report in reports[:2]:
        coordinator.on_report(report)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        coordinator.on_report(reports[2])
    fold = coordinator._folds[exp].result(timeout=10)
    assert time.monotonic() - t0 < 5  # not the 30 s wait for a pass that never ends
    state = redis.load(exp)
    assert (state.round, state.rounds_closed) == (3, 2)
    # Round 2's fold was built by the first report; round 3's after the failed pass.
    assert events == ["build", "build"] and fold.previous == state.global_weights
