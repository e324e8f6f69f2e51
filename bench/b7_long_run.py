"""B7: a long run costs the same per round at round 1000 as at round 10.

The real stack (RabbitMQ, Redis, S3, 3 site worker processes with the stand-in
session: tiny model, no sleep) runs one experiment of R rounds (1000; ``--quick``: 50).
The coordinator runs in its own process started from here, with counters around it
(nothing in the product changes):

* time per report: wall time of each ``Coordinator.on_report`` call (the last report of
  a round includes closing it: aggregation, global PUT, round record, journal);
* Redis bytes written per round: bytes the coordinator sent to Redis from inside the
  round's ``on_report`` calls (state saves, lock, fence, the round's history entry);
* the coordinator's RSS, sampled over the run;
* a restart: at round 0.9 R the coordinator is SIGKILLed and a new one started; its S3
  requests on the round records of earlier rounds are counted (the target: none).

Rounds 1..10 are compared with rounds R-9..R (medians per report, means per round).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import BenchResult, Target, purge_s3
from fednnunet.core.retention import DEFAULT_KEEP_ROUNDS

REPO = Path(__file__).resolve().parents[1]
NUM_SITES = 3
WINDOW = 10
COLUMNS = [
    "rounds",
    "ms per report (median)",
    "ms per report (p90)",
    "ms closing report (median)",
    "Redis KB per round",
    "coordinator RSS MB",
]


# ----------------------------------------------------------------- the measured coordinator
def coordinator_main(stats_path: str, tick_s: float) -> None:
    """Subprocess: the coordinator worker, with counters written to ``stats_path``."""
    import redis.connection

    from fednnunet.adapters.s3_store import ArtifactStore
    from fednnunet.coordinator.service import Coordinator
    from fednnunet.keys import HISTORY
    from fednnunet.settings import get_settings
    from fednnunet.workers.coordinator_worker import run_coordinator

    out = open(stats_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - process-long
    out_lock = threading.Lock()
    local = threading.local()

    def emit(entry: dict) -> None:
        with out_lock:
            out.write(json.dumps(entry) + "\n")

    send = redis.connection.Connection.send_packed_command

    def counted_send(self, command, check_health=True):  # noqa: ANN001, ANN202
        n = (
            len(command)
            if isinstance(command, (bytes, bytearray, memoryview))
            else sum(len(c) for c in command)
        )
        local.redis_bytes = getattr(local, "redis_bytes", 0) + n
        return send(self, command, check_health)

    redis.connection.Connection.send_packed_command = counted_send

    history_dir = f"/{HISTORY}/"

    def watch_history(name: str, key_of) -> None:  # noqa: ANN001
        original = getattr(ArtifactStore, name)

        def wrapped(self, *args, **kwargs):  # noqa: ANN001, ANN202
            key = key_of(*args, **kwargs)
            if history_dir in key:
                emit({"kind": "s3-history", "op": name, "key": key})
            return original(self, *args, **kwargs)

        setattr(ArtifactStore, name, wrapped)

    watch_history("stat", lambda bucket, key, *a, **k: key)
    watch_history("list_keys", lambda bucket, prefix, *a, **k: prefix)
    watch_history("get_bytes", lambda ref, *a, **k: ref.key)
    watch_history("put_bytes", lambda bucket, key, *a, **k: key)

    on_report = Coordinator.on_report

    def timed_on_report(self, report, sender=None):  # noqa: ANN001, ANN202
        before = getattr(local, "redis_bytes", 0)
        t0 = time.perf_counter()
        try:
            return on_report(self, report, sender)
        finally:
            emit(
                {
                    "kind": "report",
                    "phase": report.phase,
                    "round": report.round,
                    "site": report.site_id,
                    "s": time.perf_counter() - t0,
                    "redis_bytes": getattr(local, "redis_bytes", 0) - before,
                    "time": time.time(),
                }
            )

    Coordinator.on_report = timed_on_report
    emit({"kind": "started", "pid": os.getpid(), "time": time.time()})
    run_coordinator(get_settings(), tick_s=tick_s, loglevel="WARNING")


# ----------------------------------------------------------------- the driver
def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _spawn_coordinator(fed, name: str, stats: Path, env: dict, tick_s: float):  # noqa: ANN001
    from fednnunet.cli.simulate import background_child_args

    log = open(fed.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(  # noqa: S603 - own interpreter, argv list, no shell
        [sys.executable, "-m", "bench.b7_long_run", "--coordinator", str(stats), str(tick_s)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        **background_child_args(),  # one autogroup with the rest of the federation
    )
    fed.procs[name] = proc  # checked for life and stopped with the federation
    return proc


def run_long(rounds: int, restart_at: int | None, workdir: Path, tick_s: float = 1.0) -> dict:
    from fednnunet.adapters.redis_state import RedisState
    from fednnunet.adapters.s3_store import ArtifactStore
    from fednnunet.cli.simulate import LocalFederation, submit
    from fednnunet.core.state_machine import TERMINAL
    from fednnunet.keys import global_bucket, site_bucket
    from fednnunet.settings import get_settings
    from fednnunet.spec import parse_spec

    settings = get_settings()
    tag = secrets.token_hex(3)
    sites = {f"b7-s{i}": 80 + i for i in range(NUM_SITES)}
    spec = parse_spec(
        {
            "experiment_id": f"b7-{tag}",
            "sites": list(sites),
            "method": "asym",
            "rounds": rounds,
            "local_epochs": 1,
            "configuration": "2d",
            "device": "cpu",
            "heartbeat_timeout_s": 120,
        }
    )
    env = {
        "FEDNNUNET_SITE_BACKEND": "tests.support.standin:StandInBackend",
        "FEDNNUNET_STANDIN_MODEL": "tiny",
        "FEDNNUNET_STANDIN_SLEEP_S": "0",
        "FEDNNUNET_STANDIN_DIR": str(workdir / "standin"),
        "nnUNet_raw": str(workdir),
        "nnUNet_preprocessed": str(workdir),
        "nnUNet_results": str(workdir),
    }
    stats = [workdir / "coordinator-1.jsonl", workdir / "coordinator-2.jsonl"]
    redis = RedisState.from_settings(settings)
    rss: list[tuple[float, int, float]] = []  # (time, round, MB) of the first coordinator
    rss_after: list[tuple[float, int, float]] = []
    restart: dict = {}
    store = ArtifactStore(settings)
    stored: dict[str, dict] = {}  # S3 use after round WINDOW and at the end
    with LocalFederation(sites, workdir / "logs", env=env, with_coordinator=False) as fed:
        child_env = fed.env | env
        coord = _spawn_coordinator(fed, "coordinator", stats[0], child_env, tick_s)
        fed.wait_ready()
        t0 = time.time()
        submit(settings, spec)
        deadline = time.monotonic() + 600 + rounds * 30
        while True:
            fed.check_alive()
            state = redis.load(spec.experiment_id)
            rnd = state.round if state is not None else 0
            (rss_after if restart else rss).append((time.time(), rnd, _rss_mb(coord.pid)))
            if state is not None and state.phase in TERMINAL:
                break
            if "early" not in stored and state is not None and state.rounds_closed >= WINDOW:
                stored["early"] = _s3_use(store, settings, sites, spec.experiment_id)
                stored["early"]["rounds_closed"] = state.rounds_closed
            if restart_at and not restart and state is not None and rnd >= restart_at:
                os.killpg(coord.pid, signal.SIGKILL)
                coord.wait(timeout=20)
                del fed.procs["coordinator"]
                restart = {"round": rnd, "killed_at": time.time()}
                coord = _spawn_coordinator(fed, "coordinator-2", stats[1], child_env, tick_s)
            if time.monotonic() > deadline:
                raise RuntimeError(f"B7 run stuck at round {rnd}")
            time.sleep(0.5)
        wall = time.time() - t0
    if state.phase != "done":
        raise RuntimeError(f"B7 run ended in {state.phase}: {state.error}")
    time.sleep(2)  # the end-of-training sweep runs after the pass that finished
    stored["end"] = _s3_use(store, settings, sites, spec.experiment_id)
    stored["end"]["rounds_closed"] = state.rounds_closed
    try:
        entries = [json.loads(line) for path in stats if path.exists() for line in path.open()]
    finally:
        prefix = spec.experiment_id + "/"
        for site in sites:
            purge_s3(store, site_bucket(settings.bucket_prefix, site), prefix)
        purge_s3(store, global_bucket(settings.bucket_prefix), prefix)
        for key in redis.r.scan_iter(f"{redis.ns}:exp:{spec.experiment_id}:*"):
            redis.r.delete(key)
        redis.r.srem(f"{redis.ns}:experiments", spec.experiment_id)
    second = [json.loads(line) for line in stats[1].open()] if stats[1].exists() else []
    if restart:
        touched = sorted(
            {_round_of(e["key"]) for e in second if e["kind"] == "s3-history"} - {None}
        )
        restart["past_rounds_touched"] = [r for r in touched if r < restart["round"]]
        restart["history_requests"] = sum(e["kind"] == "s3-history" for e in second)
    return {
        "rounds": rounds,
        "wall_s": wall,
        "reports": [e for e in entries if e["kind"] == "report" and e["phase"] == "train"],
        "rss": rss,
        "rss_after_restart": rss_after,
        "restart": restart,
        "experiment_id": spec.experiment_id,
        "s3_stored": stored,
    }


def _s3_use(store, settings, sites, experiment_id: str) -> dict:  # noqa: ANN001
    """Objects and bytes the experiment holds in S3: weights (updates and globals) apart
    from the small JSON records (site reports, round records, journal snapshots)."""
    from fednnunet.keys import coordinator_bucket, global_bucket, site_bucket

    buckets = [site_bucket(settings.bucket_prefix, s) for s in sites]
    buckets += [global_bucket(settings.bucket_prefix), coordinator_bucket(settings.bucket_prefix)]
    use = {"weights_objects": 0, "weights_bytes": 0, "records_objects": 0, "records_bytes": 0}
    for bucket in buckets:
        for obj in store.client.list_objects(bucket, prefix=experiment_id + "/", recursive=True):
            kind = "weights" if obj.object_name.endswith(".safetensors") else "records"
            use[f"{kind}_objects"] += 1
            use[f"{kind}_bytes"] += int(obj.size or 0)
    return use


def _round_of(key: str) -> int | None:
    for part in key.split("/"):
        if len(part) == 6 and part[0] == "r" and part[1:].isdigit():
            return int(part[1:])
    return None


def _window(reports: list[dict], first: int, last: int) -> dict:
    chosen = [r for r in reports if first <= r["round"] <= last]
    per_round: dict[int, list[dict]] = {}
    for r in chosen:
        per_round.setdefault(r["round"], []).append(r)
    closing = [max(rs, key=lambda r: r["time"])["s"] for rs in per_round.values()]
    times = sorted(r["s"] for r in chosen)
    return {
        "ms_per_report": 1000 * statistics.median(times),
        "ms_per_report_p90": 1000 * times[int(0.9 * (len(times) - 1))],
        "ms_closing_report": 1000 * statistics.median(closing),
        "redis_kb_per_round": statistics.mean(
            sum(r["redis_bytes"] for r in rs) / 1024 for rs in per_round.values()
        ),
        "rounds_seen": len(per_round),
    }


def _rss_at(samples: list[tuple[float, int, float]], first: int, last: int) -> float:
    values = [mb for _, rnd, mb in samples if first <= rnd <= last and mb > 0]
    return statistics.median(values) if values else float("nan")


def run(quick: bool = False, rounds: int | None = None) -> BenchResult:
    rounds = rounds or (50 if quick else 1000)
    restart_at = rounds * 9 // 10
    with tempfile.TemporaryDirectory(prefix="fednnunet-b7-") as tmp:
        res = run_long(rounds, restart_at, Path(tmp))
    # The restart's first report is excluded: it is a new process warming up.
    early = _window(res["reports"], 1, WINDOW)
    late = _window(res["reports"], rounds - WINDOW + 1, rounds)
    rss_early = _rss_at(res["rss"], 1, WINDOW)
    rss_late = _rss_at(res["rss"], restart_at - WINDOW, restart_at)
    rss_peak = max((mb for _, _, mb in res["rss"]), default=float("nan"))
    rows = [
        [f"1–{WINDOW}", early["ms_per_report"], early["ms_per_report_p90"],
         early["ms_closing_report"], early["redis_kb_per_round"], rss_early],
        [f"{rounds - WINDOW + 1}–{rounds}", late["ms_per_report"], late["ms_per_report_p90"],
         late["ms_closing_report"], late["redis_kb_per_round"],
         _rss_at(res["rss_after_restart"], rounds - WINDOW + 1, rounds)],
    ]  # fmt: skip
    time_ratio = late["ms_per_report"] / early["ms_per_report"]
    bytes_ratio = late["redis_kb_per_round"] / early["redis_kb_per_round"]
    restart = res["restart"]
    s3_early, s3_end = res["s3_stored"]["early"], res["s3_stored"]["end"]
    # Each of the last `keep` rounds: one update per site and one global; plus the best.
    keep = DEFAULT_KEEP_ROUNDS
    bound_end = keep * (NUM_SITES + 1) + 1
    bound_flight = (keep + 1) * (NUM_SITES + 1) + 1  # the new round's, before the deletes
    return BenchResult(
        name="b7",
        title=f"B7 long run: {rounds} rounds, {NUM_SITES} sites, stand-in (tiny model, no sleep), "
        "real RabbitMQ/Redis/S3",
        columns=COLUMNS,
        rows=rows,
        targets=[
            Target(
                "time per report",
                f"rounds {rounds - WINDOW + 1}–{rounds} within 10 % of rounds 1–{WINDOW}",
                f"{late['ms_per_report']:.1f} ms vs {early['ms_per_report']:.1f} ms "
                f"({time_ratio:.2f} ×)",
                time_ratio <= 1.10,
            ),
            Target(
                "Redis bytes per round",
                f"rounds {rounds - WINDOW + 1}–{rounds} within 10 % of rounds 1–{WINDOW}",
                f"{late['redis_kb_per_round']:.1f} KB vs {early['redis_kb_per_round']:.1f} KB "
                f"({bytes_ratio:.2f} ×)",
                bytes_ratio <= 1.10,
            ),
            Target(
                "coordinator RSS",
                "flat: ≤ +50 MB over the run",
                f"{rss_early:.0f} MB at rounds 1–{WINDOW}, {rss_late:.0f} MB before the "
                f"restart (round {restart_at}), peak {rss_peak:.0f} MB",
                rss_late - rss_early <= 50,
            ),
            Target(
                "restart",
                f"a coordinator restarted at round {restart_at} reads no past round",
                f"restarted at round {restart.get('round')}: S3 requests on round records "
                f"{restart.get('history_requests')}, of rounds before the restart "
                f"{len(restart.get('past_rounds_touched', []))}",
                bool(restart) and not restart.get("past_rounds_touched"),
            ),
            Target(
                "S3 weights stored",
                f"bounded by the window (keep_rounds {keep}): at most {bound_end} objects at "
                f"the end, {bound_flight} while a round is in flight (the round-"
                f"{s3_early['rounds_closed']} sample)",
                f"{s3_end['weights_objects']} objects ({s3_end['weights_bytes'] / 1024:.0f} KB) "
                f"at the end, {s3_early['weights_objects']} "
                f"({s3_early['weights_bytes'] / 1024:.0f} KB) at round "
                f"{s3_early['rounds_closed']}; JSON records {s3_early['records_objects']} -> "
                f"{s3_end['records_objects']} objects, {s3_early['records_bytes'] / 1024:.0f}"
                f" -> {s3_end['records_bytes'] / 1024:.0f} KB (they grow with the rounds)",
                s3_end["weights_objects"] <= bound_end
                and s3_early["weights_objects"] <= bound_flight,
            ),
        ],
        notes=[
            f"whole run {res['wall_s']:.0f} s ({res['wall_s'] / rounds:.2f} s per round, "
            "restart included)",
            "ms per report: wall time of Coordinator.on_report in the coordinator process "
            "(fetch+verify, screening and folding the update, lock, state load/save; the "
            "closing report also aggregates, uploads the global, the round record and the "
            "journal snapshot and dispatches the next round)",
            "Redis KB per round: bytes the coordinator sent to Redis inside the round's "
            "on_report calls (heartbeats/progress written by the coordinator's consumer "
            "thread are per site and time, not per round, and not counted)",
            f"the last window's RSS is the restarted coordinator's (started at round "
            f"{restart.get('round')})",
            "shared 2-core machine: absolute times are upper bounds; the ratio is what counts",
        ],
        raw={k: v for k, v in res.items() if k != "reports"}
        | {"early": early, "late": late, "reports": res["reports"]},
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--coordinator"]:
        coordinator_main(sys.argv[2], float(sys.argv[3]))
    else:
        from bench.common import print_result, write_json

        args = [a for a in sys.argv[1:] if not a.startswith("--")]
        result = run(quick="--quick" in sys.argv, rounds=int(args[0]) if args else None)
        print_result(result)
        write_json(result)
