"""Retention at a site (real S3, stand-in session): with ``keep_rounds`` k, a site deletes
its own update of round r-k once it has sent round r's, logs the deletion beside the
upload, and never answers a redelivered task of a deleted round with later weights."""

from __future__ import annotations

import pytest

from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.adapters.weights_codec import encode_weights
from fednnunet.cli.egress import audit, read_egress_log, status_is_ok
from fednnunet.keys import global_bucket, global_weights_key, site_bucket
from fednnunet.messages import ExperimentOptions, SiteTask
from fednnunet.site.service import SiteService
from tests.support.standin import StandInBackend, build_state

pytestmark = pytest.mark.integration


def _update_rounds(store: ArtifactStore, bucket: str, exp: str) -> set[int]:
    keys = store.list_keys(bucket, f"{exp}/train/")
    return {int(k.split("/")[2][1:]) for k in keys if k.endswith("/update.safetensors")}


def _site(stack, unique_id, tmp_path, egress_log=None, **settings_update):
    """A site (stand-in session) with its bucket: settings, store, service, experiment id,
    global bucket, site bucket."""
    site = unique_id("rt")
    settings = stack.model_copy(update={"site_id": site, "dataset_id": 7} | settings_update)
    store = ArtifactStore(settings, egress_log=str(egress_log) if egress_log else None)
    gbucket = global_bucket(settings.bucket_prefix)
    sbucket = site_bucket(settings.bucket_prefix, site)
    store.ensure_bucket(gbucket)
    store.ensure_bucket(sbucket)
    backend = StandInBackend(settings, model="tiny", workdir=tmp_path / "w")
    return (
        settings,
        store,
        SiteService(settings, store, backend=backend),
        unique_id("exp-rt-"),
        gbucket,
        sbucket,
    )


def test_a_site_keeps_only_its_last_k_updates_and_skips_a_deleted_rounds_task(
    stack, unique_id, tmp_path
):
    log = tmp_path / "egress.jsonl"
    settings, store, svc, exp, gbucket, sbucket = _site(stack, unique_id, tmp_path, log)
    site = settings.site_id
    options = ExperimentOptions(configuration="2d", rounds=6, device="cpu", keep_rounds=2)
    globals_put = []

    def task(round_: int) -> SiteTask:
        ref = None
        if round_ > 1:  # the coordinator's global of the previous round
            key = global_weights_key(exp, round_ - 1)
            ref = store.stat(gbucket, key) or store.put_bytes(
                gbucket, key, encode_weights(build_state("tiny", 100 + round_))
            )
            globals_put.append(key)
        return SiteTask(
            experiment_id=exp, site_id=site, phase="train", round=round_, options=options,
            global_weights=ref,
        )  # fmt: skip

    kept_after = {}
    for r in range(1, 5):
        report = svc.handle(task(r))
        assert report.ok, report.error
        kept_after[r] = _update_rounds(store, sbucket, exp)
    # Independent of the product's rule: round r keeps rounds r-1 and r (k = 2).
    assert kept_after == {1: {1}, 2: {1, 2}, 3: {2, 3}, 4: {3, 4}}

    # The egress audit shows rounds 1-2 as deleted by this site, rounds 3-4 verified.
    rows = audit(read_egress_log(log, exp), store)
    updates = {int(r["key"].split("/")[2][1:]): r["status"] for r in rows
               if r["kind"] == "weights_update"}  # fmt: skip
    assert set(updates) == {1, 2, 3, 4}
    assert all(updates[r].startswith("deleted by this site (keep_rounds 2") for r in (1, 2))
    assert updates[3] == updates[4] == "verified"
    assert all(status_is_ok(r["status"]) for r in rows)

    # The coordinator deleted round 2's global too; round 2's task is delivered again.
    # It must not send this site's round-4 weights as round 2's update.
    store.client.remove_object(gbucket, global_weights_key(exp, 2))
    stale = svc.handle(task(2))
    assert not stale.ok and "stale task skipped" in (stale.error or ""), stale.error
    assert _update_rounds(store, sbucket, exp) == {3, 4}
    # A site without that checkpoint (a new machine) gets it too, its input global (1)
    # still there (say, the best): a later round's global shows the round closed.
    fresh = SiteService(
        settings, store, backend=StandInBackend(settings, model="tiny", workdir=tmp_path / "w2")
    )
    stale = fresh.handle(task(2))
    assert not stale.ok and "already closed" in (stale.error or ""), stale.error
    assert _update_rounds(store, sbucket, exp) == {3, 4}

    # keep_rounds 0: nothing is deleted.
    options = options.model_copy(update={"keep_rounds": 0})
    assert svc.handle(task(5)).ok
    assert _update_rounds(store, sbucket, exp) == {3, 4, 5}

    for key in store.list_keys(sbucket, ""):
        store.client.remove_object(sbucket, key)
    store.client.remove_bucket(sbucket)
    for key in set(globals_put):
        store.client.remove_object(gbucket, key)


def test_one_kept_round_is_refused_as_unsafe_and_async_refuses_a_window() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="at least 2"):
        ExperimentOptions(keep_rounds=1)
    with pytest.raises(ValidationError, match="only applies to mode: sync"):
        ExperimentOptions(mode="async", keep_rounds=3)
    assert ExperimentOptions().kept_rounds == 3
    assert ExperimentOptions(mode="async").kept_rounds is None
    assert ExperimentOptions(keep_rounds=0).kept_rounds is None


def test_a_site_whose_policy_keeps_its_updates_deletes_none(stack, unique_id, tmp_path):
    """``keep_own_updates: true`` in the site policy: the spec's window does not reach
    into this site's bucket (its own audit trail stays whole)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("keep_own_updates: true\n")
    settings, store, svc, exp, gbucket, sbucket = _site(
        stack, unique_id, tmp_path, site_policy=str(policy)
    )
    site = settings.site_id
    options = ExperimentOptions(configuration="2d", rounds=4, device="cpu", keep_rounds=2)
    ref = None
    for r in range(1, 5):
        task = SiteTask(experiment_id=exp, site_id=site, phase="train", round=r,
                        options=options, global_weights=ref)  # fmt: skip
        assert svc.handle(task).ok
        data = encode_weights(build_state("tiny", 200 + r))
        ref = store.put_bytes(gbucket, global_weights_key(exp, r), data)
    assert _update_rounds(store, sbucket, exp) == {1, 2, 3, 4}
    for key in store.list_keys(sbucket, ""):
        store.client.remove_object(sbucket, key)
    store.client.remove_bucket(sbucket)
    for key in store.list_keys(gbucket, f"{exp}/"):
        store.client.remove_object(gbucket, key)
