"""One-machine simulation: a coordinator and one worker per site as child processes.

Each child runs in its own process group so that stopping it also stops the
nnU-Net data-augmentation workers it started. CPU threads and augmentation
workers are budgeted per site so simulated sites do not oversubscribe the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fednnunet.adapters.broker import START_TASK, declare_topology, send_control
from fednnunet.adapters.redis_state import RedisState
from fednnunet.core.state_machine import TERMINAL, ExperimentState
from fednnunet.errors import FedError
from fednnunet.settings import Settings, get_settings
from fednnunet.spec import ExperimentSpec


def submit(settings: Settings, spec: ExperimentSpec) -> ExperimentSpec:
    """Queue a start request for the coordinator (JSON over the broker).

    A ``pretrained_weights`` checkpoint on this machine is converted to safetensors and
    uploaded as round 0's global first (the coordinator never reads a pickle).
    """
    if spec.pretrained_weights and spec.initial_weights is None:
        spec = spec.model_copy(update={"initial_weights": upload_initial_weights(settings, spec)})
    send_control(settings, START_TASK, [spec.model_dump(mode="json")])
    return spec


def upload_initial_weights(settings: Settings, spec: ExperimentSpec):  # noqa: ANN201
    from fednnunet.adapters.s3_store import ArtifactStore
    from fednnunet.adapters.weights_codec import encode_weights
    from fednnunet.keys import global_bucket, initial_weights_key
    from fednnunet.nnunet.pretrained import checkpoint_weights

    weights = checkpoint_weights(Path(spec.pretrained_weights or ""))
    store = ArtifactStore(settings)
    bucket = global_bucket(settings.bucket_prefix)
    store.ensure_bucket(bucket)
    data = encode_weights(weights, {"source": Path(spec.pretrained_weights or "").name})
    return store.put_bytes(bucket, initial_weights_key(spec.experiment_id), data, "initial")


def wait_for(
    settings: Settings, experiment_id: str, timeout_s: float, on_update=None, poll_s: float = 1.0
) -> ExperimentState:
    redis = RedisState.from_settings(settings)
    deadline = time.monotonic() + timeout_s
    while True:
        state = redis.load(experiment_id)
        if on_update is not None and state is not None:
            on_update(state, redis)
        if state is not None and state.phase in TERMINAL:
            return redis.load(experiment_id, with_history=True) or state
        if time.monotonic() > deadline:
            raise FedError(
                f"experiment {experiment_id} did not finish within {timeout_s:.0f}s "
                f"(phase {state.phase if state else 'not started'})"
            )
        time.sleep(poll_s)


def background_child_args() -> dict[str, Any]:
    """``Popen`` arguments for a child in a process group of its own (stopped as one, no
    terminal Ctrl-C, no terminal input: a background group that read it would be stopped)
    but in the caller's session: Linux's autogroups give each session an equal CPU share
    whatever its nice values, so in separate sessions every niced background thread of a
    site (cache writes, late hashing) or of the coordinator (pictures, the next fold)
    would compete at full weight with the other sites' work."""
    if sys.version_info >= (3, 11):
        group: dict[str, Any] = {"process_group": 0}
    else:  # Python 3.10 has no process_group
        group = {"preexec_fn": os.setpgrp}  # noqa: PLW1509
    return {"stdin": subprocess.DEVNULL, **group}


class LocalFederation:
    """Context manager running the coordinator and site workers on this machine."""

    def __init__(
        self,
        sites: Mapping[str, int],
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cpus: int | None = None,
        tick_s: float = 1.0,
        with_coordinator: bool = True,
        site_envs: Mapping[str, Mapping[str, str]] | None = None,
        coordinator_env: Mapping[str, str] | None = None,
    ) -> None:
        """``site_envs``/``coordinator_env``: per-process overrides, e.g. each site's own
        broker user and S3 identity (as at real hospitals)."""
        self.sites = dict(sites)
        self.site_envs = {s: dict(e) for s, e in (site_envs or {}).items()}
        self.coordinator_env = dict(coordinator_env or {})
        self.log_dir = Path(log_dir)
        self.env = dict(os.environ) | dict(env or {})
        self.cpus = cpus or os.cpu_count() or 1
        self.tick_s = tick_s
        self.with_coordinator = with_coordinator
        self.procs: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(  # noqa: S603 - own interpreter, argv list, no shell
            [sys.executable, "-m", "fednnunet.cli.main", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            **background_child_args(),
        )
        self.procs[name] = proc
        return proc

    def site_env(self, site: str) -> dict[str, str]:
        threads = max(1, self.cpus // max(1, len(self.sites)))
        env = dict(self.env)
        env.update(
            {
                "FEDNNUNET_SITE_ID": site,
                "FEDNNUNET_DATASET_ID": str(self.sites[site]),
                "FEDNNUNET_TORCH_THREADS": env.get("FEDNNUNET_TORCH_THREADS", str(threads)),
                "FEDNNUNET_DA_PROCESSES": env.get("FEDNNUNET_DA_PROCESSES", "0"),
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", str(threads)),
                "nnUNet_compile": "f",
            }
        )
        env.update(self.site_envs.get(site, {}))
        return env

    def start_site(self, site: str) -> subprocess.Popen:
        return self._spawn(
            f"site-{site}",
            ["worker", "--site", site, "--dataset-id", str(self.sites[site])],
            self.site_env(site),
        )

    def start_coordinator(self, name: str = "coordinator") -> subprocess.Popen:
        return self._spawn(
            name, ["coordinator", "--tick", str(self.tick_s)], self.env | self.coordinator_env
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def __enter__(self) -> LocalFederation:
        self.started_at = time.time()
        # Site workers never declare queues (least privilege): declare them first.
        declare_topology(
            get_settings(**_settings_env(self.env | self.coordinator_env)), list(self.sites)
        )
        if self.with_coordinator:
            self.start_coordinator()
        for site in self.sites:
            self.start_site(site)
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop every child at once (SIGTERM, then SIGKILL after a grace period)."""
        live = [p for p in self.procs.values() if p.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for proc in self.procs.values():  # nnU-Net children left in the groups
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Return once every site worker has sent an idle heartbeat since we started it.

        Needs the coordinator (it records the beats). Benchmarks use it so that worker
        start-up (imports) is not counted as federation time.
        """
        redis = RedisState.from_settings(get_settings(**_settings_env(self.env)))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            idle = redis.idle_since()
            if all(idle.get(site, 0.0) >= self.started_at for site in self.sites):
                return
            time.sleep(0.5)
        raise FedError(f"site workers not ready within {timeout_s:.0f}s")

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise FedError(f"{name} exited with code {proc.returncode}; log tail:\n{tail}")


def _settings_env(env: Mapping[str, str]) -> dict[str, str]:
    """The broker and Redis URLs the children will use (they read FEDNNUNET_* from env)."""
    names = {
        "FEDNNUNET_BROKER_URL": "broker_url",
        "FEDNNUNET_REDIS_URL": "redis_url",
        "FEDNNUNET_REDIS_NAMESPACE": "redis_namespace",
    }
    return {field: env[var] for var, field in names.items() if env.get(var)}
