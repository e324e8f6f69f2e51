"""B2: per-round overhead and bytes on the wire, fednnunet vs Flower vs the S3 floor, same run.

Both systems federate 3 sites whose "training" is the stand-in session (sleeps
S seconds, nudges the weights) on nnU-Net's real 2d and 3d_fullres networks (each
model with its own S3 floor and Flower run, in the same benchmark run):

* fednnunet: the real stack — coordinator and 3 site workers as processes
  (``LocalFederation``), RabbitMQ, Redis, S3 — AsymFedAvg, N rounds. Round wall
  time is ``closed_at - opened_at`` of each ``RoundRecord``; bytes are the S3
  object sizes a site moves per round (its update up, the previous global down).
* Flower (flwr 1.x legacy gRPC API, loopback): server with FedAvg and 3 client
  processes exchanging the *whole* ``state_dict()`` (aliased keys included) as
  one list of arrays, the way a Flower-based federated nnU-Net does. Round wall
  time runs from ``configure_fit`` to the end of ``aggregate_fit``; bytes are
  the serialized parameter payloads.

Overhead per round = round wall time − S. Round 1 includes worker warm-up in
both systems, so the summary uses the median of rounds ≥ 2.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import BenchResult, Target, purge_s3

REPO = Path(__file__).resolve().parents[1]
# nnU-Net's 2d network and its default 3d_fullres network (PlainConvUNet, 6 stages,
# 32..320 features: 124.8 MB unique), built offline by the stand-in.
MODELS = {"nnunet2d": "2d", "nnunet3d": "3d_fullres"}
# Rounds per fednnunet experiment, experiments per run, floor samples per floor set (one
# set before each experiment and one after the last): see run_model.
FULL_ROUNDS = {"nnunet2d": 9, "nnunet3d": 12}
EXPERIMENTS = {"nnunet2d": 3, "nnunet3d": 1}
FLOOR_REPEATS = {"nnunet2d": 4, "nnunet3d": 4}
NUM_SITES = 3
COLUMNS = [
    "system",
    "round",
    "wall s",
    "overhead s",
    "site pull s",
    "site push s",
    "net CPU s",
    "S3 server CPU s",
    "MB/site up+down",
    "bytes × unique",
    "server peak MB",
    "site peak MB",
]
HEADER_ALLOWANCE = 64 * 1024  # a safetensors header (names, shapes, alias map) per object


# ----------------------------------------------------------------- memory watch
def rss_mb(pid: int) -> float:
    """Resident memory of a process (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PeakWatch:
    """Largest RSS per named process, and (time, total CPU s) samples of all of them.

    CPU seconds per round are far less sensitive than wall time to the other
    load on a shared 2-core machine.
    """

    def __init__(self) -> None:
        self.peak: dict[str, float] = {}
        self.cpu_samples: list[tuple[float, float]] = []
        self._last_cpu: dict[str, float] = {}

    def sample(self, procs: dict[str, int]) -> None:
        for name, pid in procs.items():
            self.peak[name] = max(self.peak.get(name, 0.0), rss_mb(pid))
            cpu = cpu_s(pid)
            if cpu > 0:
                self._last_cpu[name] = cpu  # a finished process keeps its last reading
        self.cpu_samples.append((time.time(), sum(self._last_cpu.values())))

    def cpu_between(self, t0: float, t1: float) -> float:
        """CPU seconds used by the watched processes between two wall-clock times."""
        import numpy as np

        if len(self.cpu_samples) < 2:
            return float("nan")
        ts, cs = zip(*self.cpu_samples, strict=True)
        return float(np.interp(t1, ts, cs) - np.interp(t0, ts, cs))


# ----------------------------------------------------------------- the S3 server
def s3_server_pid() -> int | None:
    """The local SeaweedFS started by deploy/local/stack.sh (its CPU is part of a round)."""
    stack = Path(os.environ.get("FEDNNUNET_STACK_DIR", REPO / ".stack"))
    try:
        pid = int((stack / "weed.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def _floor_client(settings):  # noqa: ANN001, ANN202
    """A bare minio client. urllib3 sends a request body under the *connect* timeout;
    on a loaded machine a 125 MB PUT can stall longer than 5 s, so the floor's clients
    wait as long for a send as for a read (a timed-out floor measures nothing)."""
    import urllib3
    from minio import Minio

    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=120.0, read=120.0), retries=False, maxsize=16
    )
    return Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=settings.s3_secure,
        region=settings.s3_region,
        http_client=http,
    )


def s3_floor(model: str, repeats: int = 5) -> dict:
    """The object traffic of one round with bare S3 calls, no fednnunet: its critical path.

    3 sites PUT their update at once; the coordinator GETs the 3 updates and PUTs the
    global; the 3 sites GET it at once. Each stage waits for the one before, as in a
    round. No verification, no (de)serialization, no messages: what a design that moves
    each update and each global once through this S3 server with the stock minio client
    pays per round (that client hashes each PUT body for its signature).
    """
    import io
    from concurrent.futures import ThreadPoolExecutor

    from fednnunet.adapters.s3_store import SINGLE_PUT_BYTES, ArtifactStore
    from fednnunet.adapters.weights_codec import encode_weights
    from fednnunet.keys import global_bucket
    from fednnunet.settings import get_settings
    from tests.support.standin import build_state

    settings = get_settings()
    data = encode_weights(build_state(model, 0))
    clients = [_floor_client(settings) for _ in range(NUM_SITES + 1)]
    bucket = global_bucket(settings.bucket_prefix)
    prefix = f"b2-floor-{secrets.token_hex(3)}/"
    stages: dict[str, list[float]] = {"site PUTs": [], "coord GETs": [], "global PUT": [],
                                      "site GETs": []}  # fmt: skip

    def put(client, key: str) -> None:
        client.put_object(bucket, key, io.BytesIO(data), len(data), part_size=SINGLE_PUT_BYTES)

    def get(client, key: str) -> None:
        resp = client.get_object(bucket, key)
        try:
            resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        stages[name].append(time.perf_counter() - t0)

    with ThreadPoolExecutor(NUM_SITES) as pool:
        for r in range(repeats):
            ups = [f"{prefix}r{r}/site{i}" for i in range(NUM_SITES)]
            glob = f"{prefix}r{r}/global"
            timed("site PUTs", lambda ups=ups: list(pool.map(put, clients, ups)))
            timed("coord GETs", lambda ups=ups: [get(clients[-1], k) for k in ups])
            timed("global PUT", lambda glob=glob: put(clients[-1], glob))
            timed("site GETs", lambda glob=glob: list(pool.map(get, clients, [glob] * NUM_SITES)))
    purge_s3(ArtifactStore(settings), bucket, prefix)
    return _floor_summary(stages)


def _floor_summary(stages: dict[str, list[float]]) -> dict:
    medians = {k: statistics.median(v) for k, v in stages.items()}
    return {"stages_s": medians, "round_s": sum(medians.values()), "samples": stages}


def interleaved_floor(sets: list[dict]) -> dict:
    """The floor measured in sets taken before, between and after the fednnunet
    experiments it is compared with (this machine's speed drifts within a run): stage
    medians over every set's samples; each set's own round in ``sets_s``."""
    pooled = {k: [x for one in sets for x in one["samples"][k]] for k in sets[0]["samples"]}
    return _floor_summary(pooled) | {"sets_s": [one["round_s"] for one in sets]}


# ----------------------------------------------------------------- fednnunet
def _wait_ready(fed, log_dir: Path, names: list[str], timeout_s: float = 120.0) -> None:
    """Wait until every Celery worker logged 'ready' (so round 1 is not all start-up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fed.check_alive()
        logs = [(log_dir / f"{n}.log") for n in names]
        if all(p.exists() and "ready." in p.read_text(errors="replace") for p in logs):
            return
        time.sleep(0.5)
    raise TimeoutError(f"workers not ready after {timeout_s:.0f}s: see {log_dir}")


def run_ours(
    model: str,
    sleep_s: float,
    rounds: int,
    workdir: Path,
    experiments: int = 1,
    between: Callable[[], None] | None = None,
) -> dict:
    """``experiments`` fednnunet experiments of ``rounds`` rounds, one after the other on
    the same running workers; ``between`` runs while they are idle between two (the
    floor's samples, so that both are measured through the same minutes)."""
    from fednnunet.adapters.s3_store import ArtifactStore
    from fednnunet.cli.simulate import LocalFederation, submit, wait_for
    from fednnunet.keys import global_bucket, site_bucket
    from fednnunet.settings import get_settings
    from fednnunet.spec import parse_spec

    settings = get_settings()
    store = ArtifactStore(settings)
    tag = secrets.token_hex(3)
    # Fixed site ids: their buckets are reused (the local S3 server has finite volumes).
    sites = {f"b2-s{i}": 70 + i for i in range(NUM_SITES)}
    env = {
        "FEDNNUNET_SITE_BACKEND": "tests.support.standin:StandInBackend",
        "FEDNNUNET_STANDIN_MODEL": model,
        "FEDNNUNET_STANDIN_SLEEP_S": str(sleep_s),
        "FEDNNUNET_STANDIN_DIR": str(workdir / "standin"),
        "nnUNet_raw": str(workdir),
        "nnUNet_preprocessed": str(workdir),
        "nnUNet_results": str(workdir),
    }
    log_dir = workdir / "logs"
    watch, s3_watch = PeakWatch(), PeakWatch()
    s3_pid = s3_server_pid()
    experiment_ids = [f"b2-{tag}-{index}" for index in range(experiments)]
    collected: list[dict] = []
    with LocalFederation(sites, log_dir, env=env) as fed:
        _wait_ready(fed, log_dir, ["coordinator", *(f"site-{s}" for s in sites)])

        def on_update(*_: object) -> None:
            fed.check_alive()
            watch.sample({name: p.pid for name, p in fed.procs.items()})
            if s3_pid is not None:
                s3_watch.sample({"s3": s3_pid})

        for index, experiment_id in enumerate(experiment_ids):
            if index and between is not None:
                time.sleep(2.0)  # the last experiment's deferred writes and sweeps
                between()
            spec = parse_spec(
                {
                    "experiment_id": experiment_id,
                    "sites": list(sites),
                    "method": "asym",
                    "rounds": rounds,
                    "local_epochs": 1,
                    "configuration": MODELS[model],
                    "device": "cpu",
                    "heartbeat_timeout_s": 120,
                }
            )
            submit(settings, spec)
            timeout = 120 + rounds * (sleep_s + 60)
            state = wait_for(settings, spec.experiment_id, timeout, on_update, poll_s=0.5)
            if state.phase != "done":
                raise RuntimeError(f"fednnunet run ended in {state.phase}: {state.error}")
            try:
                collected.append(_collect(state, spec, sites, sleep_s, workdir, index))
            finally:
                prefix = spec.experiment_id + "/"
                for site in sites:
                    purge_s3(store, site_bucket(settings.bucket_prefix, site), prefix)
                purge_s3(store, global_bucket(settings.bucket_prefix), prefix)
    rounds_out = [r for one in collected for r in one]
    for r in rounds_out:
        opened, closed = r.pop("opened_at"), r.pop("closed_at")
        r["cpu_s"] = watch.cpu_between(opened, closed)
        r["s3_cpu_s"] = s3_watch.cpu_between(opened, closed)
    return {
        "rounds": rounds_out,
        "experiment_ids": experiment_ids,
        "peak_rss_mb": {
            "server": watch.peak.get("coordinator", 0.0),
            "site_max": max(v for k, v in watch.peak.items() if k.startswith("site-")),
        },
    }


def _uploaded_update_bytes(workdir: Path, experiment_id: str, site: str) -> dict[int, int]:
    """Round -> bytes of the update the site sent, from its egress log (the objects are
    gone from S3 by then: only the last ``keep_rounds`` rounds stay)."""
    from fednnunet.cli.egress import read_egress_log
    from fednnunet.keys import parse_artifact_key

    log = workdir / f"fednnunet_egress_{site}.jsonl"  # nnUNet_results=workdir
    out = {}
    for e in read_egress_log(log, experiment_id):
        parts = parse_artifact_key(e["key"])
        if e.get("kind") == "weights_update" and parts is not None:
            out[parts.round] = int(e["bytes"])
    return out


def _collect(state, spec, sites, sleep_s: float, workdir: Path, experiment: int) -> list[dict]:
    """One experiment's rounds (CPU is filled in from the watches by the caller)."""
    sent = {s: _uploaded_update_bytes(workdir, spec.experiment_id, s) for s in sites}
    out = []
    prev_global = 0
    for rec in state.history:
        ups = [sent[site].get(rec.round, 0) for site in sites]
        wall = rec.closed_at - rec.opened_at
        out.append(
            {
                "experiment": experiment,
                "round": rec.round,
                "wall_s": wall,
                "overhead_s": wall - sleep_s,
                "opened_at": rec.opened_at,
                "closed_at": rec.closed_at,
                "aggregation_s": rec.aggregation_s,
                "site_steps_s": {
                    step: statistics.median(
                        rec.metrics.get(site, {}).get(step, float("nan")) for site in sites
                    )
                    for step in ("pull_s", "train_s", "push_s")
                },
                "up_bytes_per_site": statistics.mean(ups),
                "down_bytes_per_site": prev_global,
            }
        )
        prev_global = rec.global_weights.size if rec.global_weights else 0
    return out


# ----------------------------------------------------------------- Flower
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state_arrays(model: str, seed: int) -> tuple[list[str], list]:
    from tests.support.standin import build_state

    state = build_state(model, seed)
    return list(state), [t.detach().cpu().numpy() for t in state.values()]


def flower_server(model: str, port: int, rounds: int, out_json: str) -> None:
    """Subprocess: Flower server, FedAvg over the full state dict, timing every round."""
    import flwr as fl
    from flwr.common import ndarrays_to_parameters

    timings: dict[int, dict] = {}

    def payload(params) -> int:
        return sum(len(t) for t in params.tensors)

    class TimedFedAvg(fl.server.strategy.FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            timings[server_round] = {"t0": time.time(), "down_bytes_per_site": payload(parameters)}
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            ups = [payload(fit_res.parameters) for _, fit_res in results]
            agg = super().aggregate_fit(server_round, results, failures)
            timings[server_round].update(
                t1=time.time(), up_bytes_per_site=statistics.mean(ups) if ups else 0
            )
            Path(out_json).write_text(json.dumps(timings))  # partial results survive a kill
            return agg

    _, arrays = _state_arrays(model, 0)
    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=NUM_SITES,
        min_evaluate_clients=0,
        min_available_clients=NUM_SITES,
        initial_parameters=ndarrays_to_parameters(arrays),
    )
    del arrays
    fl.server.start_server(
        server_address=f"127.0.0.1:{port}",
        config=fl.server.ServerConfig(num_rounds=rounds),
        strategy=strategy,
    )


def flower_client(model: str, port: int, index: int, sleep_s: float, workdir: str) -> None:
    """Subprocess: a Flower NumPyClient around the same stand-in session."""
    import flwr as fl
    import torch

    from fednnunet.messages import ExperimentOptions
    from tests.support.standin import StandInSession

    options = ExperimentOptions(configuration="2d", fold=0)
    session = StandInSession(
        70 + index, options, model=model, sleep_s=sleep_s, workdir=Path(workdir) / str(index)
    )
    keys = list(session.state_dict())

    class Client(fl.client.NumPyClient):
        def get_parameters(self, config):
            return [t.detach().cpu().numpy() for t in session.state_dict().values()]

        def fit(self, parameters, config):
            arrays = zip(keys, parameters, strict=True)
            session.load_global({k: torch.from_numpy(a) for k, a in arrays})
            session.train_epochs(1)
            return self.get_parameters(config), session.num_training_cases(), {}

    fl.client.start_client(
        server_address=f"127.0.0.1:{port}",
        client=Client().to_client(),
        max_retries=60,
        max_wait_time=120,
    )


def run_flower(
    model: str, sleep_s: float, rounds: int, workdir: Path, server_cap_mb: float | None = None
) -> dict:
    port = _free_port()
    out_json = workdir / "flower.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", GRPC_VERBOSITY="ERROR")
    logs = workdir / "flower-logs"
    logs.mkdir(parents=True, exist_ok=True)

    from fednnunet.cli.simulate import background_child_args

    def spawn(name: str, *args: str) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        return subprocess.Popen(  # noqa: S603 - own interpreter, argv list, no shell
            [sys.executable, "-m", "bench.b2_round_overhead", *args],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            **background_child_args(),  # one autogroup with the rest of the federation
        )

    server = spawn("server", "--flower-server", model, str(port), str(rounds), str(out_json))
    clients = [
        spawn(f"client{i}", "--flower-client", model, str(port), str(i), str(sleep_s), str(workdir))
        for i in range(NUM_SITES)
    ]
    if server_cap_mb is None:
        server_cap_mb = min(12000.0, mem_available_mb() - 4000)
    watch = PeakWatch()
    pids = {"server": server.pid, **{f"client{i}": c.pid for i, c in enumerate(clients)}}
    aborted = None
    deadline = time.monotonic() + 120 + rounds * (sleep_s + 120)
    try:
        while server.poll() is None:
            watch.sample(pids)
            # Flower holds whole messages several times over: do not let it push other
            # people's processes on this shared machine into the OOM killer.
            if watch.peak.get("server", 0) > server_cap_mb:
                aborted = f"stopped: server RSS over {server_cap_mb:.0f} MB"
                break
            if mem_available_mb() < 2500:
                aborted = "stopped: machine below 2.5 GB available memory"
                break
            if time.monotonic() > deadline:
                aborted = "stopped: timeout"
                break
            time.sleep(0.2)
        if server.returncode not in (None, 0):
            aborted = f"server exited with code {server.returncode}"
    finally:
        for proc in [server, *clients]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    if not out_json.exists():  # no round finished: reported as such, the run goes on
        tail = (logs / "server.log").read_text(errors="replace")[-300:]
        aborted = f"{aborted or 'no round finished'}; server log tail: {' '.join(tail.split())}"
    timings = json.loads(out_json.read_text()) if out_json.exists() else {}
    out = []
    for r in sorted(timings, key=int):
        t = timings[r]
        wall = t["t1"] - t["t0"]
        out.append(
            {
                "round": int(r),
                "wall_s": wall,
                "overhead_s": wall - sleep_s,
                "cpu_s": watch.cpu_between(t["t0"], t["t1"]),
                "up_bytes_per_site": t["up_bytes_per_site"],
                "down_bytes_per_site": t["down_bytes_per_site"],
            }
        )
    return {
        "rounds": out,
        "aborted": aborted,
        "peak_rss_mb": {
            "server": watch.peak.get("server", 0.0),
            "site_max": max(
                (v for k, v in watch.peak.items() if k.startswith("client")), default=0.0
            ),
        },
    }


# ----------------------------------------------------------------- benchmark
def standin_compute_cpu_s(model: str, repeats: int = 3) -> float:
    """CPU seconds of one stand-in 'epoch' (weight nudging) alone: not federation overhead."""
    import torch

    from fednnunet.messages import ExperimentOptions
    from tests.support.standin import StandInSession

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the site workers run it (1 thread each)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            session = StandInSession(
                1,
                ExperimentOptions(configuration="2d", fold=0),
                model=model,
                sleep_s=0.0,
                workdir=Path(tmp),
            )
            samples = []
            for _ in range(repeats):
                c0 = time.process_time()
                session.train_epochs(1)
                samples.append(time.process_time() - c0)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(samples)


def _steady(rounds: list[dict], key: str) -> float:
    later = [r[key] for r in rounds if r["round"] >= 2] or [r[key] for r in rounds]
    return statistics.median(later)


def run_model(model: str, quick: bool, sleep_s: float) -> dict:
    """One model: the S3 floor, fednnunet and Flower in the same run; rows and summary."""
    from fednnunet.core.tensors import unique_nbytes
    from tests.support.standin import build_state

    # 12 rounds at least: the S3 server's volume growth stalls a PUT now and then (up to
    # 1 s) and the first rounds after the workers start run slower (0.2-1 s, seen in 3
    # runs of 8 rounds); the median of 11 is not moved by two or three of them. The 2d
    # model is compared with an additive target of 0.15 s while single 2d rounds vary by
    # +-0.1 s on this machine: 24 counted rounds and 16 floor samples. And this machine's
    # speed drifts by up to 0.3 s a floor round within a run (a floor set before the
    # systems and one after differed that much): so the 2d rounds run as three
    # experiments on the same workers, with a floor set before, between and after them.
    rounds = 3 if quick else FULL_ROUNDS[model]
    experiments = min(2, EXPERIMENTS[model]) if quick else EXPERIMENTS[model]
    unique = unique_nbytes(build_state(model, 0))
    compute_cpu = standin_compute_cpu_s(model)
    repeats = 2 if quick else FLOOR_REPEATS[model]
    # Unmeasured: a fresh S3 data folder grows its first volumes on the first writes (the
    # floor measured first was 1.3-1.4 x the floor measured after the systems ran).
    s3_floor(model, 2)
    floor_sets = [s3_floor(model, repeats)]
    with tempfile.TemporaryDirectory(prefix="fednnunet-b2-") as tmp:
        ours = run_ours(
            model, sleep_s, rounds, Path(tmp) / "ours", experiments,
            between=lambda: floor_sets.append(s3_floor(model, repeats)),
        )  # fmt: skip
        floor_sets.append(s3_floor(model, repeats))
        flower = run_flower(model, sleep_s, max(2, min(4, rounds - 1)), Path(tmp) / "flower")
    floor = interleaved_floor(floor_sets)
    config = MODELS[model]
    rows, summary = [], {}
    for name, res in (("fednnunet", ours), ("flower", flower)):
        for r in res["rounds"]:
            r["net_cpu_s"] = r["cpu_s"] - NUM_SITES * compute_cpu
            r["bytes_per_site"] = r["up_bytes_per_site"] + r["down_bytes_per_site"]
            steps = r.get("site_steps_s", {})
            rows.append(
                [
                    config,
                    name,
                    f"{r['experiment'] + 1}/{r['round']}"
                    if "experiment" in r and experiments > 1
                    else r["round"],
                    r["wall_s"],
                    r["overhead_s"],
                    steps.get("pull_s", ""),
                    steps.get("push_s", ""),
                    r["net_cpu_s"],
                    r.get("s3_cpu_s", ""),
                    r["bytes_per_site"] / 1e6,
                    r["bytes_per_site"] / unique,
                    res["peak_rss_mb"]["server"],
                    res["peak_rss_mb"]["site_max"],
                ]
            )
        if not res["rounds"]:
            summary[name] = {k: float("nan") for k in ("overhead_s", "net_cpu_s", "bytes_per_site")}
            continue
        summary[name] = {
            k: _steady(res["rounds"], k) for k in ("overhead_s", "net_cpu_s", "bytes_per_site")
        }
        if name == "fednnunet":
            summary[name]["s3_cpu_s"] = _steady(res["rounds"], "s3_cpu_s")
        s_ = summary[name]
        rows.append(
            [
                config,
                f"{name} median",
                "r≥2" if any(r["round"] >= 2 for r in res["rounds"]) else "r1",
                "",
                s_["overhead_s"],
                "",
                "",
                s_["net_cpu_s"],
                s_.get("s3_cpu_s", ""),
                "",
                s_["bytes_per_site"] / unique,
                "",
                "",
            ]
        )
    fl = floor["stages_s"]
    rows.append(
        [config, "S3 floor", "", floor["round_s"], floor["round_s"], fl["site GETs"],
         fl["site PUTs"], "", "", 2 * unique / 1e6, 2.0, "", ""]
    )  # fmt: skip
    return {
        "model": model,
        "configuration": config,
        "rows": rows,
        "summary": summary,
        "unique_bytes": unique,
        "compute_cpu_s": compute_cpu,
        "s3_floor": floor,
        "fednnunet": ours,
        "flower": flower,
    }


def run(
    quick: bool = False, sleep_s: float = 5.0, models: tuple[str, ...] = tuple(MODELS)
) -> BenchResult:
    results, targets, notes = [], [], []
    for model in models:
        try:
            results.append(run_model(model, quick, sleep_s))
        except Exception as exc:  # noqa: BLE001 - one model's failure must not lose the other's
            targets.append(Target(f"run {MODELS[model]}", "completes", _one_line(exc), False))
    rows = [row for res in results for row in res["rows"]]
    for res in results:
        config, unique, floor = res["configuration"], res["unique_bytes"], res["s3_floor"]
        ours, fl_sum = res["summary"]["fednnunet"], res["summary"]["flower"]
        o_ours, o_fl = ours["overhead_s"], fl_sum["overhead_s"]
        floor_s = floor["round_s"]
        if config == "2d":
            goal, limit = "≤ S3 floor + 0.15 s", floor_s + 0.15
        else:
            goal, limit = "≤ 1.1 × S3 floor", 1.1 * floor_s
        ratio = o_ours / o_fl if o_fl > 0 else float("inf")
        cpu_ratio = (
            ours["net_cpu_s"] / fl_sum["net_cpu_s"] if fl_sum["net_cpu_s"] > 0 else float("inf")
        )
        targets += [
            Target(
                f"overhead {config}",
                goal,
                f"{o_ours:.2f} s vs floor {floor_s:.2f} s (+{o_ours - floor_s:.2f} s, "
                f"{o_ours / floor_s:.2f} ×)",
                o_ours <= limit,
            ),
            Target(
                f"vs Flower {config}",
                "≤ 1/5 of Flower's overhead",
                f"wall {ratio:.2f} ×, net CPU {cpu_ratio:.2f} × Flower's",
                ratio <= 0.2,
            ),
            Target(
                f"bytes {config}",
                "≤ 2 × unique model bytes per site per round (+ safetensors headers)",
                f"{ours['bytes_per_site'] / unique:.4f} × "
                f"(Flower {fl_sum['bytes_per_site'] / unique:.2f} ×)",
                ours["bytes_per_site"] <= 2 * unique + 2 * HEADER_ALLOWANCE,
            ),
        ]
        st = floor["stages_s"]
        notes += [
            f"{config} ({unique / 1e6:.1f} MB unique): Flower "
            f"{res['flower'].get('aborted') or 'completed'}; stand-in nudging "
            f"{res['compute_cpu_s']:.2f} CPU s per site-round (measured alone, subtracted "
            f"from net CPU); S3 floor stages: 3 site PUTs at once {st['site PUTs']:.2f} s, "
            f"coordinator GETs {st['coord GETs']:.2f} s, global PUT {st['global PUT']:.2f} s, "
            f"3 site GETs {st['site GETs']:.2f} s (medians of "
            f"{len(floor['samples']['site PUTs'])} in {len(floor['sets_s'])} sets, taken "
            f"before, between and after the fednnunet experiments: "
            f"{', '.join(f'{x:.2f}' for x in floor['sets_s'])} s; Flower ran after them)",
        ]
    notes += [
        "overhead = round wall − S; medians over rounds ≥ 2 (round 1 has no global to pull "
        "in fednnunet and includes warm-up)",
        "fednnunet overhead includes the site's encoding + sha256 + upload (its resume "
        "checkpoint, report record and copy of the global are written after its report), "
        "the coordinator's download and verification, screening and folding (as each "
        "report arrives, in memory), finalisation, encoding + sha256 and upload of the "
        "global, and the next round's download + load at each site (its sha256 runs while "
        "the site trains; nothing trained from the global leaves before it matches)",
        "S3 floor: the same objects moved with the stock minio client's put_object and "
        "get_object and nothing else, stage after stage as in a round. The stock "
        "put_object hashes each body again for its request signature (sha256 over http); "
        "fednnunet signs its uploads with the sha256 it computed while encoding, so its "
        "upload stages can be below the floor's by that hash (about 76 ms per 125 MB here)",
        "shared 2-core machine under other engineers' load: times are upper bounds",
    ]
    return BenchResult(
        name="b2",
        title=f"B2 round overhead and bytes: 3 sites, nnU-Net "
        f"{' and '.join(r['configuration'] for r in results)}, stand-in sleeps {sleep_s:g} s",
        columns=["config", *COLUMNS],
        rows=rows,
        targets=targets,
        notes=notes,
        raw={res["configuration"]: res for res in results} | {"sleep_s": sleep_s},
    )


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


# ----------------------------------------------------------------- the round's close alone
def closing_path(model: str, repeats: int = 3) -> dict:
    """What remains after the last report, measured on its own (real S3, no broker):
    *batch* = screen and average all 3 updates, encode and PUT the global (before
    fold-on-arrival); *folded* = screen and fold the last update into the running sum
    (the first two were folded as they arrived), finalise, encode and PUT."""
    from fednnunet.adapters.s3_store import ArtifactStore
    from fednnunet.adapters.weights_codec import encode_weights
    from fednnunet.coordinator.aggregator import RoundFold, aggregate_round
    from fednnunet.keys import global_bucket
    from fednnunet.messages import SiteReport
    from fednnunet.settings import get_settings
    from tests.support.standin import build_state

    settings = get_settings()
    bucket = global_bucket(settings.bucket_prefix)
    prefix = f"b2-close-{secrets.token_hex(3)}/"
    cases = {f"s{i}": 4 + i for i in range(NUM_SITES)}
    samples: dict[str, list[float]] = {"batch": [], "folded": []}
    with tempfile.TemporaryDirectory(prefix="fednnunet-b2close-") as tmp:
        store = ArtifactStore(settings, cache_dir=Path(tmp) / "cache")
        previous = store.put_bytes(
            bucket, prefix + "global0", encode_weights(build_state(model, 0)), cache=True
        )
        reports = []
        for i, site in enumerate(cases):
            ref = store.put_bytes(
                bucket, f"{prefix}{site}", encode_weights(build_state(model, i + 1))
            )
            store.get_file(ref)  # downloaded and verified on arrival in both designs
            reports.append(
                SiteReport(experiment_id="b2", site_id=site, phase="train", round=2, ok=True,
                           artifact=ref, num_cases=cases[site])
            )  # fmt: skip
        for r in range(repeats):
            t0 = time.perf_counter()
            aggregate_round(store, reports, bucket, f"{prefix}batch{r}", previous, cases=cases)
            samples["batch"].append(time.perf_counter() - t0)
            fold = RoundFold(store, previous, exact=False)  # at the round's first report
            for i in range(NUM_SITES - 1):  # as the first reports arrive
                fold.screen(store, reports[i])
                fold.fold(store, [(x, cases[x.site_id]) for x in reports[: i + 1]])
            t0 = time.perf_counter()
            fold.screen(store, reports[-1])
            aggregate_round(
                store, reports, bucket, f"{prefix}folded{r}", previous, cases=cases, fold=fold
            )
            samples["folded"].append(time.perf_counter() - t0)
        purge_s3(store, bucket, prefix)
    return {k: statistics.median(v) for k, v in samples.items()} | {"samples": samples}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--flower-server"]:
        flower_server(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1:2] == ["--flower-client"]:
        flower_client(
            sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
        )
    else:
        from bench.common import print_result, write_json

        chosen = tuple(m for m in MODELS if m in sys.argv[1:]) or tuple(MODELS)
        if "--closing" in sys.argv:
            for model in chosen:
                out = closing_path(model)
                print(f"{MODELS[model]}: after the last report, batch {out['batch']:.3f} s, "
                      f"folded {out['folded']:.3f} s")  # fmt: skip
        else:
            res = run(quick="--quick" in sys.argv, models=chosen)
            print_result(res)
            write_json(res)
