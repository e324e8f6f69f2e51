"""Faults injected into the real services (RabbitMQ, Redis, S3, worker processes).

Every test runs the coordinator and the site workers as separate processes with the
stand-in trainer (deterministic weights, controlled duration) and checks that the
experiment finishes, that no update is lost or counted twice, and, where the fault
is transparent, that the final global weights are those (up to float rounding) of an
undisturbed run with the same seed.
"""

from __future__ import annotations

import re
import signal
import time

import pytest
import redis
import torch

from fednnunet.adapters.broker import SITE_TASKS, make_celery, site_task_queue
from fednnunet.adapters.weights_codec import decode_weights
from fednnunet.cli.simulate import submit
from fednnunet.core.state_machine import TERMINAL
from fednnunet.keys import global_bucket, site_bucket
from fednnunet.messages import SiteTask
from fednnunet.settings import get_settings
from tests.faults.harness import (
    Federation,
    PrivateS3,
    Run,
    assert_same_weights,
    check_history,
    count_lines,
    drive,
    load_update,
    make_spec,
    queue_consumers,
    rabbit_env,
    rabbitmqctl,
    record,
    reference_weights,
    set_rabbit_env,
    update_key,
    wait_until,
)
from tests.support.weed import free_port_block

pytestmark = pytest.mark.integration

DATASETS = (11, 12, 13)


def _sites(unique_id) -> dict[str, int]:
    return {unique_id("s"): ds for ds in DATASETS}


def test_undisturbed_run_matches_the_in_process_reference(iso, unique_id):
    sites = _sites(unique_id)
    spec = make_spec(unique_id("exp-"), list(sites))
    with Federation(sites, iso.tmp / "logs", env=iso.env) as fed:
        fed.wait_ready(iso.vhost, ["coordinator", *(f"site.{s}" for s in sites)])
        run = drive(iso, fed, spec)
    final = check_history(iso, run.state, list(sites))
    assert all(sorted(r.participants) == sorted(sites) for r in run.state.history)
    assert run.state.ignored_reports == 0
    assert_same_weights(final, reference_weights(spec, sites, [list(sites)] * spec.rounds))
    record("none (baseline)", run)


def _queues(sites) -> list[str]:
    return ["coordinator", *(f"site.{s}" for s in sites)]


def _in_round(state, round_: int, sites, status: str = "running") -> bool:
    return (
        state is not None
        and state.phase == "train"
        and state.round == round_
        and all(state.sites_status[s].state == status for s in sites)
    )


def test_site_worker_sigkilled_mid_round_is_redispatched_and_resumes(iso, unique_id):
    sites = _sites(unique_id)
    victim = list(sites)[1]
    spec = make_spec(unique_id("exp-"), list(sites))
    store = iso.store()
    seen: dict[str, object] = {}

    def kill_victim_mid_round_2(state) -> None:
        if "killed" in seen or not _in_round(state, 2, [victim]):
            return
        fed.kill(f"site-{victim}")
        # The kill must land inside train_round, before the update was uploaded.
        seen["update_before_kill"] = store.stat(
            site_bucket(iso.settings.bucket_prefix, victim),
            update_key(spec.experiment_id, 2, victim),
        )
        seen["killed"] = time.monotonic()
        fed.start_site(victim)

    with Federation(sites, iso.tmp / "logs", env=iso.env) as fed:
        fed.wait_ready(iso.vhost, _queues(sites))
        run = drive(iso, fed, spec, on_poll=kill_victim_mid_round_2)
        log = fed.log(f"site-{victim}")
    assert "killed" in seen and seen["update_before_kill"] is None
    final = check_history(iso, run.state, list(sites))
    assert all(sorted(r.participants) == sorted(sites) for r in run.state.history)
    # The killed task was acked on receipt, so the broker did not hand it back; the
    # coordinator re-dispatched it after the heartbeat timeout, to the restarted worker.
    assert count_lines(log, f"train round 2 of {spec.experiment_id} (attempt 1)") == 1
    assert count_lines(log, f"train round 2 of {spec.experiment_id} (attempt 2)") == 1
    # Same weights as without the fault: the site resumed from its round-1 checkpoint
    # (a restart from scratch would replay epoch 1 and give different weights).
    assert_same_weights(final, reference_weights(spec, sites, [list(sites)] * spec.rounds))
    record("site worker SIGKILL mid-round", run)


def test_coordinator_sigkilled_mid_round_is_replaced(iso, unique_id):
    sites = _sites(unique_id)
    spec = make_spec(unique_id("exp-"), list(sites))
    seen: dict[str, float] = {}

    def kill_coordinator_mid_round_2(state) -> None:
        if "killed" not in seen and _in_round(state, 2, sites):
            fed.kill("coordinator")
            seen["killed"] = time.monotonic()
        elif "restarted" not in seen and time.monotonic() - seen.get("killed", 1e18) > 3:
            # Reports of round 2 pile up in the coordinator queue meanwhile.
            fed.start_coordinator("coordinator2")
            seen["restarted"] = time.monotonic()

    with Federation(sites, iso.tmp / "logs", env=iso.env) as fed:
        fed.wait_ready(iso.vhost, _queues(sites))
        run = drive(iso, fed, spec, on_poll=kill_coordinator_mid_round_2)
        log2 = fed.log("coordinator2")
    assert "restarted" in seen
    assert "site_report" in log2  # the new coordinator took over the round
    final = check_history(iso, run.state, list(sites))
    assert all(sorted(r.participants) == sorted(sites) for r in run.state.history)
    assert_same_weights(final, reference_weights(spec, sites, [list(sites)] * spec.rounds))
    record("coordinator SIGKILL mid-round", run)


def test_coordinator_sigkilled_mid_aggregation_is_replaced(iso, unique_id):
    """Killed while holding the experiment lock, aggregating nnU-Net-size (31 MB) updates."""
    sites = _sites(unique_id)
    spec = make_spec(unique_id("exp-"), list(sites), rounds=1)
    env = iso.with_env(FEDNNUNET_STANDIN_MODEL="nnunet2d")
    lock_key = iso.redis._k(spec.experiment_id, "lock")  # in the session's namespace
    r = redis.Redis.from_url(iso.settings.redis_url)
    seen: dict[str, object] = {}

    def kill_coordinator_aggregating_round_1(state) -> None:
        if "killed" in seen or state is None or state.phase != "train" or state.round != 1:
            return
        done = sum(st.state == "done" for st in state.sites_status.values())
        if done >= len(sites) - 1 and r.exists(lock_key):
            fed.kill("coordinator")
            seen["killed"] = time.monotonic()
            seen["lock_left_behind"] = bool(r.exists(lock_key))
            fed.start_coordinator("coordinator2")

    with Federation(sites, iso.tmp / "logs", env=env) as fed:
        fed.wait_ready(iso.vhost, _queues(sites))
        run = drive(iso, fed, spec, on_poll=kill_coordinator_aggregating_round_1, poll_s=0.02)
    assert "killed" in seen
    final = check_history(iso, run.state, list(sites))
    assert all(sorted(r.participants) == sorted(sites) for r in run.state.history)
    want = reference_weights(spec, sites, [list(sites)] * spec.rounds, model="nnunet2d")
    assert_same_weights(final, want)
    record("coordinator SIGKILL mid-aggregation", run, lock_held=seen["lock_left_behind"])


def test_two_coordinators_aggregate_every_round_exactly_once(iso, unique_id):
    sites = _sites(unique_id)
    spec = make_spec(unique_id("exp-"), list(sites))
    with Federation(sites, iso.tmp / "logs", env=iso.env) as fed:
        fed.start_coordinator("coordinator2")
        fed.wait_ready(iso.vhost, _queues(sites))
        wait_until(lambda: queue_consumers(iso.vhost).get("coordinator", 0) == 2, 60, "2nd")
        run = drive(iso, fed, spec)
        logs = [fed.log("coordinator"), fed.log("coordinator2")]
    # Both really took part (reports are spread over the two consumers) ...
    assert all(count_lines(log, "fednnunet.coordinator.site_report[") >= 1 for log in logs)
    # ... and every round was closed once: one history entry and one global object each.
    final = check_history(iso, run.state, list(sites))
    assert all(sorted(r.participants) == sorted(sites) for r in run.state.history)
    assert_same_weights(final, reference_weights(spec, sites, [list(sites)] * spec.rounds))
    record("two coordinators at once", run)


def test_broker_connections_closed_mid_round_everyone_reconnects(iso, unique_id):
    """Closing every connection of the vhost is what clients see of a broker restart."""
    sites = _sites(unique_id)
    spec = make_spec(unique_id("exp-"), list(sites))
    seen: dict[str, float] = {}

    def close_connections_in_round_2(state) -> None:
        if "closed" not in seen and _in_round(state, 2, sites):
            seen["n"] = len(_connections(iso.vhost))
            rabbitmqctl("close_all_connections", "--vhost", iso.vhost, "fault test")
            seen["closed"] = time.monotonic()

    with Federation(sites, iso.tmp / "logs", env=iso.env) as fed:
        fed.wait_ready(iso.vhost, _queues(sites))
        run = drive(iso, fed, spec, on_poll=close_connections_in_round_2)
        # Everyone is back: the coordinator and every site consume their queues again.
        fed.wait_ready(iso.vhost, _queues(sites), timeout_s=30)
        logs = {n: fed.log(n) for n in fed.procs}
    assert "closed" in seen and seen["n"] >= 2 * len(sites) + 2
    assert any("Connection to broker lost" in log for log in logs.values())
    final = check_history(iso, run.state, list(sites))
    assert all(sorted(r.participants) == sorted(sites) for r in run.state.history)
    assert_same_weights(final, reference_weights(spec, sites, [list(sites)] * spec.rounds))
    record("RabbitMQ connections closed mid-round", run)


def _connections(vhost: str) -> list[str]:
    return [
        line
        for line in rabbitmqctl("list_connections", "-p", vhost, "name").splitlines()
        if "->" in line
    ]


def test_redis_flushed_mid_round_state_comes_back_from_the_s3_journal(iso, unique_id):
    sites = _sites(unique_id)
    spec = make_spec(unique_id("exp-"), list(sites))
    seen: dict[str, float] = {}

    def flush_redis_in_round_2(state) -> None:
        if "flushed" not in seen and _in_round(state, 2, sites):
            redis.Redis.from_url(iso.settings.redis_url).flushdb()  # this test's own db
            seen["flushed"] = time.monotonic()

    with Federation(sites, iso.tmp / "logs", env=iso.env) as fed:
        fed.wait_ready(iso.vhost, _queues(sites))
        run = drive(iso, fed, spec, on_poll=flush_redis_in_round_2)
        log = fed.log("coordinator")
    assert "flushed" in seen
    assert f"restored experiment {spec.experiment_id} from the S3 journal" in log or (
        "from the S3 journal" in log
    )
    final = check_history(iso, run.state, list(sites))
    assert all(sorted(r.participants) == sorted(sites) for r in run.state.history)
    assert_same_weights(final, reference_weights(spec, sites, [list(sites)] * spec.rounds))
    record("Redis FLUSHDB mid-round", run)


def test_retention_through_a_redis_flush_loses_nothing_and_keeps_only_the_window(iso, unique_id):
    """``keep_rounds: 2``, Redis flushed mid-round 3 (the state comes back from the S3
    journal) after round 1's objects were deleted: the run ends with the weights of an
    undisturbed run, and S3 holds each site's updates and the globals of rounds 3-4 and
    the best round only."""
    sites = _sites(unique_id)
    spec = make_spec(unique_id("exp-"), list(sites), rounds=4, keep_rounds=2)
    seen: dict[str, float] = {}

    def flush_redis_in_round_3(state) -> None:
        if "flushed" not in seen and _in_round(state, 3, sites):
            redis.Redis.from_url(iso.settings.redis_url).flushdb()
            seen["flushed"] = time.monotonic()

    with Federation(sites, iso.tmp / "logs", env=iso.env) as fed:
        fed.wait_ready(iso.vhost, _queues(sites))
        run = drive(iso, fed, spec, on_poll=flush_redis_in_round_3)
        time.sleep(2)  # the end sweep runs after the pass that finished
    assert "flushed" in seen
    assert run.state.phase == "done", run.state.error
    assert [r.round for r in run.state.history] == [1, 2, 3, 4]
    final = decode_weights(iso.store().get_bytes(run.state.global_weights))
    assert_same_weights(final, reference_weights(spec, sites, [list(sites)] * spec.rounds))
    store, exp = iso.store(), spec.experiment_id

    def rounds_of(bucket: str, name: str) -> set[int]:
        keys = store.list_keys(bucket, f"{exp}/train/")
        return {int(k.split("/")[2][1:]) for k in keys if k.endswith("/" + name)}

    prefix = iso.settings.bucket_prefix
    assert rounds_of(global_bucket(prefix), "weights.safetensors") == {
        3,
        4,
        run.state.best_global_round,
    }
    for site in sites:
        assert rounds_of(site_bucket(prefix, site), "update.safetensors") == {3, 4}
    record("Redis FLUSHDB mid-round, keep_rounds 2", run)


def test_task_longer_than_consumer_timeout_is_neither_killed_nor_redelivered(iso, unique_id):
    """A 20 s round under a 5 s consumer_timeout (real rounds last minutes to hours)."""
    sites = {unique_id("s"): 11}
    spec = make_spec(unique_id("exp-"), list(sites), rounds=1, heartbeat_timeout_s=60)
    site = next(iter(sites))
    env = iso.with_env(FEDNNUNET_STANDIN_SLEEP_S="20")
    old = {k: rabbit_env(k) for k in ("consumer_timeout", "channel_tick_interval")}
    try:
        # consumer_timeout is read when a channel opens, the tick that enforces it at
        # every tick: shorten both, open our channels, then restore consumer_timeout
        # at once so that only channels opened in these few seconds get 5 s.
        set_rabbit_env("channel_tick_interval", "1000")
        set_rabbit_env("consumer_timeout", "5000")
        with Federation(sites, iso.tmp / "logs", env=env) as fed:
            fed.wait_ready(iso.vhost, _queues(sites))
            probe = _late_ack_probe(iso)
            set_rabbit_env("consumer_timeout", old["consumer_timeout"])
            run = drive(iso, fed, spec)
            log = fed.log(f"site-{site}")
            probe_closed = _probe_closed(probe)
    finally:
        for key, value in old.items():
            set_rabbit_env(key, value)
    # Control: a consumer that holds a message unacked is killed by the broker.
    assert probe_closed, "consumer_timeout was not enforced: the test proves nothing"
    check_history(iso, run.state, list(sites))
    assert count_lines(log, "Task fednnunet.site.train_round[") == 2  # received, succeeded
    assert count_lines(log, f"train round 1 of {spec.experiment_id}") == 1
    took = [float(m) for m in re.findall(r"train_round\[[^]]+\] succeeded in ([0-9.]+)s", log)]
    assert took and took[0] >= 20
    assert "PRECONDITION_FAILED" not in log and "Couldn't ack" not in log
    assert run.state.ignored_reports == 0
    record("site task 20 s > consumer_timeout 5 s", run, task_s=round(took[0], 1))


def _late_ack_probe(iso):
    import pika

    from fednnunet.adapters.broker import _pika_params

    conn = pika.BlockingConnection(_pika_params(iso.settings))
    ch = conn.channel()
    ch.queue_declare("fault-probe", auto_delete=True)
    ch.basic_publish("", "fault-probe", b"x")
    ch.basic_consume("fault-probe", lambda *_: None, auto_ack=False)
    conn.process_data_events(time_limit=0.5)
    return conn, ch


def _probe_closed(probe) -> bool:
    import pika

    conn, ch = probe
    try:
        conn.process_data_events(time_limit=0.2)
    except pika.exceptions.ChannelClosedByBroker as exc:
        return exc.reply_code == 406
    finally:
        if conn.is_open:
            conn.close()
    return ch.is_closed


def test_s3_unreachable_for_30_s_mid_round_uploads_retry(isolate, unique_id, tmp_path):
    """This test's own S3 server is stopped for 30 s while the sites train round 2."""
    base = get_settings()
    s3 = PrivateS3(tmp_path / "own-s3", free_port_block(), base.s3_access_key, base.s3_secret_key)
    s3.start()
    try:
        iso = isolate(s3)
        sites = _sites(unique_id)
        spec = make_spec(unique_id("exp-"), list(sites))
        seen: dict[str, float] = {}

        def s3_down_30_s_from_round_2(state) -> None:
            now = time.monotonic()
            if "stopped" not in seen and _in_round(state, 2, sites):
                s3.stop()
                seen["stopped"] = now
            elif "restarted" not in seen and now - seen.get("stopped", now) >= 30:
                s3.start()  # same data directory: same objects
                seen["restarted"] = time.monotonic()

        with Federation(sites, iso.tmp / "logs", env=iso.env) as fed:
            fed.wait_ready(iso.vhost, _queues(sites))
            run = drive(iso, fed, spec, on_poll=s3_down_30_s_from_round_2)
            logs = "".join(fed.log(f"site-{s}") for s in sites) + fed.log("coordinator")
        assert "restarted" in seen
        assert "retrying in" in logs  # the outage was felt, and ridden out
        final = check_history(iso, run.state, list(sites))
        assert all(sorted(r.participants) == sorted(sites) for r in run.state.history)
        assert_same_weights(final, reference_weights(spec, sites, [list(sites)] * spec.rounds))
        record("S3 down 30 s mid-round", run)
    finally:
        s3.stop()


def test_slow_site_misses_the_deadline_its_late_update_is_ignored_and_it_rejoins(iso, unique_id):
    """Quorum 2 of 3: one site is frozen (SIGSTOP) through round 1's deadline."""
    sites = _sites(unique_id)
    slow = list(sites)[2]
    spec = make_spec(
        unique_id("exp-"), list(sites), quorum=2, round_deadline_s=8, heartbeat_timeout_s=60
    )
    seen: dict[str, float] = {}

    def freeze_slow_site_through_round_1(state) -> None:
        if "stopped" not in seen and _in_round(state, 1, [slow]):
            fed.signal_group(f"site-{slow}", signal.SIGSTOP)
            seen["stopped"] = time.monotonic()
        elif "stopped" in seen and "resumed" not in seen and state.round >= 2:
            fed.signal_group(f"site-{slow}", signal.SIGCONT)
            seen["resumed"] = time.monotonic()

    with Federation(sites, iso.tmp / "logs", env=iso.env) as fed:
        fed.wait_ready(iso.vhost, _queues(sites))
        try:
            run = drive(iso, fed, spec, on_poll=freeze_slow_site_through_round_1)
        finally:
            fed.signal_group(f"site-{slow}", signal.SIGCONT)
    history = run.state.history
    final = check_history(iso, run.state, list(sites))
    # Round 1 closed at the deadline without the slow site ...
    assert sorted(history[0].participants) == sorted(s for s in sites if s != slow)
    assert history[0].late == [slow]
    # ... which finished round 1 anyway: its update is in S3 but was not averaged
    # (check_history: the global is the FedAvg of the participants only).
    load_update(iso.store(), iso.settings.bucket_prefix, spec.experiment_id, 1, slow)
    assert run.state.ignored_reports >= 1
    # It rejoined: a participant of a later round.
    assert any(slow in r.participants for r in history[1:])
    participants = [r.participants for r in history]
    assert_same_weights(final, reference_weights(spec, sites, participants))
    record("slow site (quorum 2/3, deadline 8 s)", run, participants=participants)


def test_same_task_delivered_twice_is_a_no_op(iso, unique_id):
    sites = _sites(unique_id)
    site = list(sites)[0]
    spec = make_spec(unique_id("exp-"), list(sites))
    client = make_celery(iso.settings, "client")
    seen: dict[str, float] = {}

    def duplicate_round_1_task(state) -> None:
        if "sent" in seen or not _in_round(state, 1, [site]):
            return
        task = SiteTask(
            experiment_id=spec.experiment_id,
            site_id=site,
            phase="train",
            round=1,
            attempt=state.sites_status[site].attempt,
            options=state.options,
        )
        for _ in range(2):  # the coordinator's delivery + these two
            client.send_task(
                SITE_TASKS["train"],
                args=[task.model_dump(mode="json")],
                queue=site_task_queue(site),
            )
        seen["sent"] = time.monotonic()

    with Federation(sites, iso.tmp / "logs", env=iso.env) as fed:
        fed.wait_ready(iso.vhost, _queues(sites))
        run = drive(iso, fed, spec, on_poll=duplicate_round_1_task)
        log = fed.log(f"site-{site}")
    assert count_lines(log, f"train round 1 of {spec.experiment_id} (attempt 1)") == 3
    # One object per artifact, one participant entry, two reports ignored.
    prefix = f"{spec.experiment_id}/train/r00001/{site}/"
    keys = iso.store().list_keys(site_bucket(iso.settings.bucket_prefix, site), prefix)
    assert sorted(keys) == [prefix + "report.json", prefix + "update.safetensors"]
    assert run.state.ignored_reports == 2
    final = check_history(iso, run.state, list(sites))
    assert run.state.history[0].participants.count(site) == 1
    # Trained once: a second training would have advanced the site's epoch.
    assert_same_weights(final, reference_weights(spec, sites, [list(sites)] * spec.rounds))
    record("same task delivered 3x", run)


def test_ten_experiments_at_once_share_the_sites_without_cross_talk(iso, unique_id):
    sites = _sites(unique_id)
    specs = [make_spec(unique_id("exp-"), list(sites), rounds=2, seed=1000 + i) for i in range(10)]
    env = iso.with_env(FEDNNUNET_STANDIN_SLEEP_S="0.5")
    redis_state = iso.redis
    with Federation(sites, iso.tmp / "logs", env=env) as fed:
        fed.wait_ready(iso.vhost, _queues(sites))
        t0 = time.monotonic()
        for spec in specs:
            submit(iso.settings, spec)

        def all_ended() -> bool:
            fed.check_alive()
            states = [redis_state.load(s.experiment_id) for s in specs]
            return all(st is not None and st.phase in TERMINAL for st in states)

        wait_until(all_ended, 240, "10 experiments", poll_s=0.5)
        wall = time.monotonic() - t0
    finals = []
    for spec in specs:
        state = redis_state.load(spec.experiment_id, with_history=True)
        final = check_history(iso, state, list(sites))
        assert all(sorted(r.participants) == sorted(sites) for r in state.history)
        # Each experiment's result is its own federation's (seeds differ per experiment).
        assert_same_weights(final, reference_weights(spec, sites, [list(sites)] * spec.rounds))
        finals.append(final)
    assert not torch.equal(finals[0]["0.weight"], finals[1]["0.weight"])
    record("10 experiments at once", Run(state, wall), experiments=len(specs))
