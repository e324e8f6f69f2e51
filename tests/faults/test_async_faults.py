"""Async federation (FedBuff) under faults: each update is applied exactly once.

Real RabbitMQ, Redis and S3; stand-in trainer with nnU-Net's 2d network (31 MB), so
applying a buffer takes long enough to be killed in the middle.
"""

from __future__ import annotations

import time

import pytest
import redis

from fednnunet.adapters.broker import SITE_TASKS, make_celery, site_task_queue
from fednnunet.adapters.weights_codec import decode_weights
from fednnunet.core.state_machine import ExperimentState
from fednnunet.keys import global_bucket, site_bucket
from fednnunet.messages import SiteTask
from tests.faults.harness import Federation, drive, make_spec, record
from tests.support.fedbuff_oracle import fedbuff_oracle, first_version_oracle

pytestmark = pytest.mark.integration


def check_versions_exactly_once(iso, state: ExperimentState, sites: list[str]) -> None:
    """Every (site, epoch) update is inside at most one version, the versions add up to
    the target, and every version is the FedBuff step (independent oracle) of its updates."""
    assert state.phase == "done", state.error
    prog = state.asynchronous
    keys = [(u["site"], u["epoch"]) for r in state.history for u in r.updates]
    assert len(keys) == len(set(keys)), keys
    assert prog.consumed_epochs == prog.target_epochs == len(keys)
    assert [r.round for r in state.history] == list(range(1, prog.version + 1))
    store = iso.store()
    exp = state.experiment_id
    gbucket = global_bucket(iso.settings.bucket_prefix)
    prefix = f"{exp}/train/"
    objects = [k for k in store.list_keys(gbucket, prefix) if k.endswith("weights.safetensors")]
    assert len(objects) == prog.version, objects  # one object per version, none extra
    globals_: dict[int, dict] = {}
    for record_ in state.history:
        got = decode_weights(store.get_bytes(record_.global_weights))
        updates = []
        for u in record_.updates:
            ref = store.stat(
                site_bucket(iso.settings.bucket_prefix, u["site"]),
                f"{exp}/train/r{u['epoch']:05d}/{u['site']}/update.safetensors",
            )
            w = decode_weights(store.get_bytes(ref))
            base = globals_.get(u["base_version"], globals_.get(record_.round - 1))
            tau = record_.round - 1 - u["base_version"]
            updates.append((w, base, tau, record_.num_cases[u["site"]]))
        if record_.round == 1:
            want = first_version_oracle([(w, n) for w, _, _, n in updates], list(got))
        else:
            want = fedbuff_oracle(globals_[record_.round - 1], updates, 0.5, 1.0)
        for k, v in want.items():
            assert (got[k].double() - v.double()).abs().max() <= 1e-5, (record_.round, k)
        globals_[record_.round] = got


def test_async_redelivered_tasks_and_coordinator_sigkill_mid_apply(iso, unique_id):
    sites = {unique_id("s"): ds for ds in (11, 12, 13)}
    first = list(sites)[0]
    spec = make_spec(
        unique_id("exp-"),
        list(sites),
        mode="async",
        rounds=2,
        buffer_size=2,
        heartbeat_timeout_s=30,
    )
    env = iso.with_env(FEDNNUNET_STANDIN_MODEL="nnunet2d", FEDNNUNET_STANDIN_SLEEP_S="1")
    lock_key = iso.redis._k(spec.experiment_id, "lock")
    r = redis.Redis.from_url(iso.settings.redis_url)
    client = make_celery(iso.settings, "client")
    seen: dict[str, object] = {}

    def faults(state) -> None:
        if state is None or state.phase != "train" or state.asynchronous is None:
            return
        prog = state.asynchronous
        if "sent" not in seen and prog.site_epoch.get(first) == 1:
            # The site's epoch-1 task delivered twice more (a redelivery).
            task = SiteTask(
                experiment_id=spec.experiment_id,
                site_id=first,
                phase="train",
                round=1,
                attempt=1,
                options=state.options,
                base_version=0,
                progress=0.0,
            )
            for _ in range(2):
                client.send_task(
                    SITE_TASKS["train"],
                    args=[task.model_dump(mode="json")],
                    queue=site_task_queue(first),
                )
            seen["sent"] = time.monotonic()
        if (
            "killed" not in seen
            and prog.version >= 1
            and r.exists(lock_key)
            and (len(prog.buffer) >= prog.buffer_size - 1)
        ):
            fed.kill("coordinator")
            seen["killed"] = time.monotonic()
            seen["version_at_kill"] = prog.version
            fed.start_coordinator("coordinator2")

    with Federation(sites, iso.tmp / "logs", env=env) as fed:
        fed.wait_ready(iso.vhost, ["coordinator", *(f"site.{s}" for s in sites)])
        run = drive(iso, fed, spec, on_poll=faults, poll_s=0.02, timeout_s=300)
    assert "sent" in seen and "killed" in seen
    assert run.state.ignored_reports >= 2  # the redelivered epoch's reports
    check_versions_exactly_once(iso, run.state, list(sites))
    record("async: redelivery + coordinator SIGKILL mid-apply", run)
