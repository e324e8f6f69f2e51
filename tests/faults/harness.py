"""Harness for the fault tests: an isolated federation on the real services.

Each test gets its own RabbitMQ virtual host, its own Redis database and its own
bucket prefix, so that killing connections, flushing Redis or starting a second
coordinator cannot touch other people's runs on the shared servers (and their
coordinators cannot pick up ours: every coordinator consumes queue
``coordinator`` and ticks every experiment of its Redis database).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
import torch

from fednnunet.adapters.redis_state import RedisState
from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.adapters.weights_codec import decode_weights, encode_weights
from fednnunet.cli.simulate import LocalFederation, submit
from fednnunet.core.state_machine import TERMINAL, ExperimentState
from fednnunet.errors import FedError
from fednnunet.keys import GLOBAL_SITE, artifact_key, global_bucket, site_bucket
from fednnunet.phases import Phase
from fednnunet.settings import Settings
from fednnunet.spec import ExperimentSpec, parse_spec
from tests.support.fedavg_oracle import fedavg_oracle
from tests.support.redis_db import claim_empty_db
from tests.support.standin import BACKEND as STANDIN_BACKEND
from tests.support.standin import StandInSession
from tests.support.weed import WeedServer, admin_identities

CLAIM_KEY = "fednnunet-faults:claim"
REDIS_DBS = range(15, 7, -1)  # databases a fault test may claim (only when empty)


# ---------------------------------------------------------------- shared servers
def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    out = subprocess.run(  # noqa: S603 - broker admin tool, fixed argv
        ["rabbitmqctl", "-q", *args],  # noqa: S607 - rabbitmqctl from PATH
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,  # noqa: S607 - broker admin tool, fixed argv
    )
    return out.stdout


def rabbit_env(key: str) -> str:
    """The Erlang term of ``application:get_env(rabbit, key)``, e.g. ``{ok,1800000}``."""
    return rabbitmqctl("eval", f"application:get_env(rabbit, {key}).").strip()


def set_rabbit_env(key: str, value: str) -> None:
    """Set (value is an Erlang term) or, for ``undefined``, unset a rabbit app env key."""
    if value == "undefined":
        rabbitmqctl("eval", f"application:unset_env(rabbit, {key}).")
    else:
        term = value[len("{ok,") : -1] if value.startswith("{ok,") else value
        rabbitmqctl("eval", f"application:set_env(rabbit, {key}, {term}).")


def queue_consumers(vhost: str) -> dict[str, int]:
    out = rabbitmqctl("list_queues", "-p", vhost, "name", "consumers")
    result = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[1].strip().isdigit():
            result[parts[0]] = int(parts[1])
    return result


def claim_redis_db(url: str, token: str) -> int:
    """An empty Redis database for this test alone (marked so nobody else claims it)."""
    return claim_empty_db(url.rsplit("/", 1)[0], REDIS_DBS, token, CLAIM_KEY)


@dataclass
class Isolated:
    """One test's private corner of the shared RabbitMQ, Redis and S3."""

    token: str
    vhost: str
    redis_db: int
    settings: Settings
    env: dict[str, str]
    tmp: Path

    @property
    def redis(self) -> RedisState:
        return RedisState.from_settings(self.settings)

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.settings, retry_total_s=30)

    def with_env(self, **overrides: str) -> dict[str, str]:
        return self.env | overrides


def open_isolated(base: Settings, token: str, tmp: Path, **settings_overrides) -> Isolated:
    tmp.mkdir(parents=True, exist_ok=True)
    vhost = f"fednnunet-flt-{token}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    db = claim_redis_db(base.redis_url, token)
    broker = urlunsplit(urlsplit(base.broker_url)._replace(path="/" + vhost))
    settings = base.model_copy(
        update={
            "broker_url": broker,
            "redis_url": base.redis_url.rsplit("/", 1)[0] + f"/{db}",
            "bucket_prefix": f"flt{token}",
            **settings_overrides,
        }
    )
    env = {
        "FEDNNUNET_S3_ACCESS_KEY": settings.s3_access_key,
        "FEDNNUNET_S3_SECRET_KEY": settings.s3_secret_key,
        "FEDNNUNET_BROKER_URL": settings.broker_url,
        "FEDNNUNET_REDIS_URL": settings.redis_url,
        "FEDNNUNET_S3_ENDPOINT": settings.s3_endpoint,
        "FEDNNUNET_BUCKET_PREFIX": settings.bucket_prefix,
        "FEDNNUNET_SITE_BACKEND": STANDIN_BACKEND,
        "FEDNNUNET_STANDIN_MODEL": "tiny",
        "FEDNNUNET_STANDIN_DIR": str(tmp / "standin"),
        "FEDNNUNET_STANDIN_SLEEP_S": "2",
        "FEDNNUNET_HEARTBEAT_INTERVAL_S": "1",
        "FEDNNUNET_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "nnUNet_raw": str(tmp),
        "nnUNet_preprocessed": str(tmp),
        "nnUNet_results": str(tmp),
    }
    return Isolated(token, vhost, db, settings, env, tmp)


def close_isolated(iso: Isolated) -> None:
    try:
        rabbitmqctl("delete_vhost", iso.vhost)
    finally:
        redis.Redis.from_url(iso.settings.redis_url).flushdb()


# ---------------------------------------------------------------- processes
class Federation(LocalFederation):
    """LocalFederation with per-site environment overrides and intentional kills tracked."""

    def __init__(
        self,
        sites: Mapping[str, int],
        log_dir: Path,
        env: Mapping[str, str],
        site_env: Mapping[str, Mapping[str, str]] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(sites, log_dir, env=env, **kwargs)
        self.overrides = {s: dict(v) for s, v in (site_env or {}).items()}
        self.killed: set[str] = set()

    def site_env(self, site: str) -> dict[str, str]:
        return super().site_env(site) | self.overrides.get(site, {})

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        if sig == signal.SIGKILL:
            self.killed.add(name)
        super().kill(name, sig)

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.killed.discard(name)
        return super()._spawn(name, args, env)

    def signal_group(self, name: str, sig: int) -> None:
        os.killpg(self.procs[name].pid, sig)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs_tail(self, chars: int = 1500) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)[-chars:]}" for n in self.procs)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if name not in self.killed and proc.poll() is not None:
                raise FedError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-2000:]}")

    def wait_ready(self, vhost: str, queues: list[str], timeout_s: float = 90) -> None:
        """Until every queue has a consumer (workers connected and subscribed)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            consumers = queue_consumers(vhost)
            if all(consumers.get(q, 0) >= 1 for q in queues):
                return
            if time.monotonic() > deadline:
                raise FedError(f"workers not ready: {consumers}\n{self.logs_tail()}")
            time.sleep(1.0)


# ---------------------------------------------------------------- experiments
def make_spec(experiment_id: str, sites: list[str], **overrides) -> ExperimentSpec:
    data = {
        "experiment_id": experiment_id,
        "sites": sites,
        "method": "asym",
        "rounds": 3,
        "configuration": "2d",
        "device": "cpu",
        "heartbeat_timeout_s": 6,
    }
    return parse_spec(data | overrides)


@dataclass
class Run:
    state: ExperimentState
    wall_s: float
    events: dict[str, float] = field(default_factory=dict)


def drive(
    iso: Isolated,
    fed: Federation,
    spec: ExperimentSpec,
    timeout_s: float = 150,
    on_poll: Callable[[ExperimentState | None], None] | None = None,
    poll_s: float = 0.1,
) -> Run:
    """Submit ``spec`` and poll its state (calling ``on_poll``) until it ends."""
    redis_state = iso.redis
    t0 = time.monotonic()
    submit(iso.settings, spec)
    while True:
        state = redis_state.load(spec.experiment_id)
        if on_poll is not None:
            on_poll(state)
        if state is not None and state.phase in TERMINAL:
            full = redis_state.load(spec.experiment_id, with_history=True)
            return Run(full or state, time.monotonic() - t0)
        fed.check_alive()
        if time.monotonic() - t0 > timeout_s:
            phase = state.phase if state else "not started"
            raise FedError(f"{spec.experiment_id} stuck in {phase}\n{fed.logs_tail()}")
        time.sleep(poll_s)


def wait_until(pred: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.1) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise FedError(f"timed out waiting for {what}")
        time.sleep(poll_s)
    return time.monotonic()


# ---------------------------------------------------------------- checks
def update_key(experiment_id: str, round_: int, site: str) -> str:
    return artifact_key(experiment_id, Phase.TRAIN, round_, site, "update.safetensors")


def global_key(experiment_id: str, round_: int) -> str:
    return artifact_key(experiment_id, Phase.TRAIN, round_, GLOBAL_SITE, "weights.safetensors")


def load_update(store: ArtifactStore, prefix: str, exp: str, round_: int, site: str) -> dict:
    ref = store.stat(site_bucket(prefix, site), update_key(exp, round_, site))
    assert ref is not None, f"no update of {site} for round {round_}"
    return decode_weights(store.get_bytes(ref))


def check_history(
    iso: Isolated, state: ExperimentState, sites: list[str]
) -> dict[str, torch.Tensor]:
    """No round lost or repeated, no update lost or counted twice; returns the final weights.

    Every round appears once; its participants are distinct sites of the experiment;
    its global object is the only one of that round and equals the case-weighted
    FedAvg (atol 1e-6; computed by the independent ``fedavg_oracle``) of exactly its
    participants' updates in S3.
    """
    assert state.phase == "done", state.error
    assert [r.round for r in state.history] == list(range(1, state.options.rounds + 1))
    store = iso.store()
    gbucket = global_bucket(iso.settings.bucket_prefix)
    exp = state.experiment_id
    weights: dict[str, torch.Tensor] = {}
    for record in state.history:
        assert len(set(record.participants)) == len(record.participants), record.participants
        assert set(record.participants) <= set(sites)
        assert not set(record.participants) & set(record.late)
        objs = store.list_keys(gbucket, f"{exp}/{Phase.TRAIN}/r{record.round:05d}/")
        assert objs == [global_key(exp, record.round)], objs
        ordered = [s for s in sites if s in record.participants]
        updates = [
            (
                load_update(store, iso.settings.bucket_prefix, exp, record.round, s),
                float(record.num_cases[s]),
            )
            for s in ordered
        ]
        expected = fedavg_oracle(updates)
        weights = decode_weights(store.get_bytes(record.global_weights))
        assert weights.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.allclose(weights[k], v, rtol=0, atol=1e-6), (record.round, k)
    assert state.global_weights == state.history[-1].global_weights
    return weights


def reference_weights(
    spec: ExperimentSpec,
    datasets: Mapping[str, int],
    participants: list[list[str]],
    model: str = "tiny",
) -> dict[str, torch.Tensor]:
    """Final global weights of an undisturbed run, computed in-process.

    The stand-in trainer is deterministic per (dataset, seed, epoch); every site trains
    every round (a late site too) and the global of round r averages ``participants[r-1]``
    in the experiment's site order, with the independent ``fedavg_oracle`` (so the
    product's own averaging is not its own reference).
    """
    with tempfile.TemporaryDirectory(prefix="fednnunet-ref-") as tmp:
        sessions = {
            s: StandInSession(
                ds,
                spec.options(),
                model=model,
                run_id=spec.experiment_id,
                workdir=Path(tmp) / s,
            )
            for s, ds in datasets.items()
        }
        global_: dict[str, torch.Tensor] | None = None
        for round_ in range(1, spec.rounds + 1):
            updates = {}
            for site in spec.sites:
                session = sessions[site]
                if global_ is not None:
                    session.load_global(decode_weights(encode_weights(global_)))
                session.train_epochs(spec.local_epochs)
                updates[site] = {k: v.clone() for k, v in session.state_dict().items()}
            global_ = fedavg_oracle(
                [
                    (updates[s], float(sessions[s].num_training_cases()))
                    for s in spec.sites
                    if s in participants[round_ - 1]
                ]
            )
        assert global_ is not None
        return global_


# The reference's globals come from float64 numpy, the coordinator's from float32
# torch: the same mean up to rounding, which a few rounds of training keep tiny.
REFERENCE_ATOL = 1e-5


def assert_same_weights(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    """Equal up to float rounding (a lost or double-counted update is far larger)."""
    assert got.keys() == want.keys()
    for k in want:
        diff = (got[k].double() - want[k].double()).abs().max().item() if got[k].numel() else 0.0
        assert diff <= REFERENCE_ATOL, (k, diff)


def count_lines(text: str, needle: str) -> int:
    return sum(needle in line for line in text.splitlines())


# ---------------------------------------------------------------- measurements
def record(fault: str, run: Run | None, **extra) -> None:
    """Append a measurement to $FEDNNUNET_FAULTS_REPORT (JSON lines), if set."""
    path = os.environ.get("FEDNNUNET_FAULTS_REPORT")
    if not path:
        return
    row = {"fault": fault, "wall_s": round(run.wall_s, 2) if run else None, **extra}
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def rm_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- a private S3 server
class PrivateS3(WeedServer):
    """A SeaweedFS ``weed mini`` of our own, on its own ports and data directory.

    Stopping it makes S3 unreachable for this test only; restarting it on the same
    directory brings the same objects back.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int,
        access_key: str,
        secret_key: str,
        identities: dict | None = None,
    ) -> None:
        """``identities``: the full identity set (default: the admin alone)."""
        super().__init__(
            data_dir,
            identities or admin_identities(access_key, secret_key),
            port=port,
            stop_grace_s=20,
            # Every bucket is a collection with volumes of its own, and each test makes
            # five (global, coordinator, 3 sites): without these, a session-long server
            # runs out of volumes ("No writable volumes and no free volumes left").
            extra_args=("-master.volumeSizeLimitMB=256", "-volume.max=4000"),
        )

    def answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise FedError(f"weed exited:\n{(self.dir / 'weed.log').read_text()[-2000:]}")
        return super().answers()
