"""A site never downloads the same global weights twice (real S3, stand-in session)."""

from __future__ import annotations

import shutil

import pytest

from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.adapters.weights_codec import encode_weights
from fednnunet.keys import GLOBAL_SITE, artifact_key, global_bucket, site_bucket
from fednnunet.messages import ExperimentOptions, SiteTask
from fednnunet.phases import Phase
from fednnunet.site.service import SiteService
from tests.support.standin import StandInBackend, build_state

pytestmark = pytest.mark.integration


def _service(settings, store, workdir) -> SiteService:
    backend = StandInBackend(settings, model="tiny", workdir=workdir)
    return SiteService(settings, store, backend=backend)


def _site_with_a_global(stack, unique_id, cache_dir):
    """A site's settings and store, its bucket, and a round-2 task with a global in S3."""
    site = unique_id("gc")
    settings = stack.model_copy(update={"site_id": site, "dataset_id": 7})
    store = ArtifactStore(settings, cache_dir=cache_dir)
    exp = unique_id("exp-gc-")
    gbucket, sbucket = (
        global_bucket(settings.bucket_prefix),
        site_bucket(settings.bucket_prefix, site),
    )
    store.ensure_bucket(gbucket)
    store.ensure_bucket(sbucket)
    global_key = artifact_key(exp, Phase.TRAIN, 1, GLOBAL_SITE, "weights.safetensors")
    ref = store.put_bytes(gbucket, global_key, encode_weights(build_state("tiny", 99)))
    task = SiteTask(
        experiment_id=exp,
        site_id=site,
        phase="train",
        round=2,
        options=ExperimentOptions(configuration="2d", fold=0, rounds=3, device="cpu"),
        global_weights=ref,
    )
    return settings, store, task, (gbucket, sbucket, exp, global_key, ref)


def _remove(store: ArtifactStore, sbucket: str, gbucket: str, *global_keys: str) -> None:
    """The site's bucket and the named globals."""
    for key in store.list_keys(sbucket, ""):
        store.client.remove_object(sbucket, key)
    store.client.remove_bucket(sbucket)
    for key in global_keys:
        store.client.remove_object(gbucket, key)


def test_restarted_site_retrains_from_its_cached_global_without_downloading(
    stack, unique_id, tmp_path
):
    settings, store, task, where = _site_with_a_global(stack, unique_id, tmp_path / "cache")
    gbucket, sbucket, exp, global_key, ref = where

    first = _service(settings, store, tmp_path / "w1").handle(task)
    assert first.ok, first.error
    assert first.metrics["layers_loaded"] == 4.0
    assert store.cache_path(ref).is_file()

    # The worker died before its upload and before its checkpoint; the global is
    # gone from S3 too: the restarted worker must retrain from its verified copy.
    for key in store.list_keys(sbucket, f"{exp}/"):
        store.client.remove_object(sbucket, key)
    store.client.remove_object(gbucket, global_key)
    shutil.rmtree(tmp_path / "w1")
    again = _service(settings, store, tmp_path / "w1").handle(task)
    assert again.ok, again.error
    assert again.metrics["layers_loaded"] == 4.0
    assert again.artifact is not None and again.artifact.sha256 == first.artifact.sha256

    # The next round's global replaces it in the cache (one per experiment).
    key3 = artifact_key(exp, Phase.TRAIN, 2, GLOBAL_SITE, "weights.safetensors")
    ref3 = store.put_bytes(gbucket, key3, encode_weights(build_state("tiny", 98)))
    svc = _service(settings, store, tmp_path / "w1")
    assert svc.handle(task.model_copy(update={"round": 3, "global_weights": ref3})).ok
    assert store.cache_path(ref3).is_file()
    assert not store.cache_path(ref).exists()
    _remove(store, sbucket, gbucket, key3)


def test_a_site_whose_cache_folder_does_not_exist_yet_trains(stack, unique_id, tmp_path):
    """The global's cached copy is written in the background, maybe after the site has
    recorded which global it holds: the record must not need the copy's folder."""
    cache_dir = tmp_path / "not-yet" / "cache"
    settings, store, task, where = _site_with_a_global(stack, unique_id, cache_dir)
    gbucket, sbucket, _, global_key, _ = where
    store._seed_cache = lambda ref, write: None  # the background write has not run
    report = _service(settings, store, tmp_path / "w").handle(task)
    assert report.ok, report.error
    assert report.metrics["layers_loaded"] == 4.0
    _remove(store, sbucket, gbucket, global_key)


def test_a_task_for_a_closed_round_is_skipped_though_its_global_was_being_read(
    stack, unique_id, tmp_path
):
    """The global's download starts with the task, before the site knows whether the
    round is still open: a stale task (its round's global exists) still trains nothing
    and uploads nothing, and the site handles the next task normally."""
    from fednnunet.keys import global_weights_key

    settings, store, task, where = _site_with_a_global(stack, unique_id, tmp_path / "cache")
    gbucket, sbucket, exp, global_key, _ = where
    closed = global_weights_key(exp, task.round)  # round 2 already aggregated
    store.put_bytes(gbucket, closed, encode_weights(build_state("tiny", 97)))
    svc = _service(settings, store, tmp_path / "w")
    stale = svc.handle(task)
    assert not stale.ok and "already closed" in (stale.error or "")
    assert store.list_keys(sbucket, f"{exp}/") == []  # no update, no record
    store.client.remove_object(gbucket, closed)
    fresh = svc.handle(task)  # the same round, open again: trains from its global
    assert fresh.ok, fresh.error
    assert fresh.metrics["layers_loaded"] == 4.0
    _remove(store, sbucket, gbucket, global_key)


def test_a_global_swapped_in_s3_trains_nothing_that_leaves_and_the_retry_is_honest(
    stack, unique_id, tmp_path
):
    """Someone with write access to the global bucket replaces the global with other
    weights of the same size after the coordinator published it. The site hashes the
    global while it trains: it must send no update, cache nothing, report a retryable
    failure, and, once the published bytes are back, train exactly what a site that
    never saw the swap trains (the session that trained from the wrong bytes is gone)."""
    import io

    settings, store, task, where = _site_with_a_global(stack, unique_id, tmp_path / "cache")
    gbucket, sbucket, exp, global_key, ref = where
    published = store.get_bytes(ref)
    swapped = encode_weights(build_state("tiny", 12345))
    assert len(swapped) == len(published) and swapped != published

    def put_raw(data: bytes) -> None:  # a plain overwrite: no write-once, no sha metadata
        store.client.put_object(gbucket, global_key, io.BytesIO(data), len(data))

    put_raw(swapped)
    svc = _service(settings, store, tmp_path / "attacked")
    refused = svc.handle(task)
    assert not refused.ok and refused.retryable
    assert "nothing trained from it was sent" in (refused.error or "")
    assert store.list_keys(sbucket, f"{exp}/") == []  # no update, no record
    assert not store.cache_path(ref).exists()

    put_raw(bytes(published))
    retried = svc.handle(task)
    assert retried.ok, retried.error
    for key in store.list_keys(sbucket, f"{exp}/"):  # the honest site writes the same keys
        store.client.remove_object(sbucket, key)
    honest = _service(settings, ArtifactStore(settings), tmp_path / "honest").handle(task)
    assert honest.ok, honest.error
    assert retried.artifact is not None and honest.artifact is not None
    assert retried.artifact.sha256 == honest.artifact.sha256
    _remove(store, sbucket, gbucket, global_key)
