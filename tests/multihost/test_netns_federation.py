"""The federation across hosts: coordinator and two sites in separate network namespaces.

Each process has its own network stack and reaches the central services only over
its veth link (see ``netlab.py``); a site has no route to Redis at all. Midway, one
site's link is pulled: the open round must close on quorum without it (the site is
recorded late), and once the link is back the site must take part again.
Uses the stand-in trainer (no nnU-Net compute), real RabbitMQ, Redis and S3.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from fednnunet.adapters.redis_state import RedisState
from fednnunet.cli.simulate import LocalFederation, submit
from fednnunet.core.state_machine import TERMINAL, ExperimentState
from fednnunet.deploy.provisioning import site_s3_credentials
from fednnunet.settings import Settings, get_settings
from fednnunet.spec import parse_spec
from tests.multihost.netlab import NetLab, PrivateWeed, TcpForwarder, unavailable_reason
from tests.support.redis_db import claim_empty_db
from tests.support.standin import BACKEND as STANDIN_BACKEND

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS_CLAIM_KEY = "fednnunet-multihost:claim"
REDIS_DBS = range(1, 8)  # fault tests claim 15..8; both only take an empty database
ROUND_DEADLINE_S = 8.0


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, check=True, timeout=60)  # noqa: S603, S607 - broker admin tool, fixed argv


def _claim_redis_db(token: str) -> int:
    return claim_empty_db("redis://127.0.0.1:6379", REDIS_DBS, token, REDIS_CLAIM_KEY)


@dataclass
class Lab:
    net: NetLab
    sites: list[str]
    env: dict[str, str]  # what every process gets (coordinator's view)
    site_env: dict[str, dict[str, str]]  # per-site overrides (own S3 keys, no Redis)
    operator: Settings  # the test itself, on the central host (loopback)
    tmp: Path
    cleanup_errors: list[str] = field(default_factory=list)


@pytest.fixture
def lab(tmp_path, unique_id):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"multi-host test: {reason}")
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("multi-host test: needs rabbitmqctl for a private RabbitMQ vhost")
    base = get_settings()
    token = unique_id("mh")
    sites = [f"{token}-a", f"{token}-b"]
    vhost = f"fednnunet-{token}"
    db: int | None = None
    net = NetLab()
    forwarders: list[TcpForwarder] = []
    weed: PrivateWeed | None = None
    set_up = False
    try:
        # Private corners of the shared services: another test's coordinator must
        # neither consume our queues nor tick our experiments (and vice versa).
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        db = _claim_redis_db(token)

        net.open()
        net.add_host("coord", 10, [net.central, net.redis_addr])
        net.add_host("a", 11, [net.central])
        net.add_host("b", 12, [net.central])
        forwarders.append(TcpForwarder((net.central, 5672), ("127.0.0.1", 5672)).start())
        forwarders.append(TcpForwarder((net.redis_addr, 6379), ("127.0.0.1", 6379)).start())
        weed = PrivateWeed(
            tmp_path / "s3", net.central, (base.s3_access_key, base.s3_secret_key), sites
        )
        weed.start()

        env = {
            "FEDNNUNET_BROKER_URL": f"amqp://guest:guest@{net.central}:5672/{vhost}",
            "FEDNNUNET_REDIS_URL": f"redis://{net.redis_addr}:6379/{db}",
            "FEDNNUNET_S3_ENDPOINT": weed.endpoint,
            "FEDNNUNET_S3_ACCESS_KEY": base.s3_access_key,
            "FEDNNUNET_S3_SECRET_KEY": base.s3_secret_key,
            "FEDNNUNET_SITE_BACKEND": STANDIN_BACKEND,
            "FEDNNUNET_STANDIN_SLEEP_S": "1",
            "FEDNNUNET_STANDIN_DIR": str(tmp_path / "standin"),
            "FEDNNUNET_HEARTBEAT_INTERVAL_S": "2",
            "nnUNet_raw": str(tmp_path),
            "nnUNet_preprocessed": str(tmp_path),
            "nnUNet_results": str(tmp_path),
            "HOME": str(tmp_path / "home"),  # coordinator cache, per test
            "PYTHONPATH": str(REPO_ROOT),
        }
        site_env = {}
        for site in sites:
            access, secret = site_s3_credentials(site)
            site_env[site] = {
                "FEDNNUNET_S3_ACCESS_KEY": access,
                "FEDNNUNET_S3_SECRET_KEY": secret,
                "FEDNNUNET_REDIS_URL": "redis://redis.invalid:6379/0",  # a site needs none
            }
        operator = get_settings(
            broker_url=f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
            redis_url=f"redis://127.0.0.1:6379/{db}",
            s3_endpoint=weed.endpoint,
        )
        yield Lab(net, sites, env, site_env, operator, tmp_path)
        set_up = True
    finally:
        # Runs even when setup or the test failed; only a clean run also checks the cleanup.
        for fwd in forwarders:
            fwd.stop()
        if weed is not None:
            weed.stop()
        errors = net.close()
        res = subprocess.run(  # noqa: S603 - broker admin tool, fixed argv
            ["rabbitmqctl", "-q", "delete_vhost", vhost],  # noqa: S607 - rabbitmqctl from PATH
            capture_output=True,
            text=True,
            timeout=60,  # noqa: S607 - broker admin tool, fixed argv
        )
        if res.returncode != 0:
            errors.append(f"delete_vhost {vhost}: {res.stderr.strip()}")
        if db is not None:
            redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()
        if set_up:
            assert not errors, f"lab cleanup failed: {errors}"


class NetnsFederation(LocalFederation):
    """LocalFederation whose processes each start inside their own namespace."""

    def __init__(
        self,
        lab: Lab,
        hosts: Mapping[str, str],
        log_dir: Path,
    ) -> None:
        super().__init__(
            {s: i for i, s in enumerate(lab.sites, 1)}, log_dir, env=lab.env, tick_s=0.5
        )
        self.lab, self.hosts = lab, dict(hosts)

    def site_env(self, site: str) -> dict[str, str]:
        return super().site_env(site) | self.lab.site_env[site]

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        argv = [sys.executable, "-m", "fednnunet.cli.main", *args]
        proc = subprocess.Popen(  # noqa: S603 - own interpreter, argv list, no shell
            self.lab.net.exec_argv(self.hosts[name], argv),
            env=env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # `ip netns exec` execs: the group is the process's
        )
        self.procs[name] = proc
        return proc

    def __exit__(self, *exc: object) -> None:
        # Stop all at once (Celery's warm shutdown takes seconds each), then the stragglers.
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        super().__exit__(*exc)  # SIGKILLs whatever is left

    def logs_tail(self, chars: int = 2500) -> str:
        out = []
        for name in self.procs:
            path = self.log_dir / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            out.append(f"--- {name}\n{text[-chars:]}")
        return "\n".join(out)


def _late_round(state: ExperimentState, site: str):
    return next((r for r in state.history if site in r.late), None)


def test_site_link_cut_misses_rounds_then_rejoins(lab):
    a, b = lab.sites
    net = lab.net
    # The premise: every process reaches only what its links allow.
    seen_b = net.probe("b", [(net.central, 5672), (net.redis_addr, 6379), ("127.0.0.1", 5672)])
    assert seen_b[f"{net.central}:5672"] == "ok", seen_b
    assert "unreachable" in seen_b[f"{net.redis_addr}:6379"], seen_b  # sites: no Redis route
    assert "refused" in seen_b["127.0.0.1:5672"].lower(), seen_b  # own loopback: no broker
    seen_c = net.probe("coord", [(net.redis_addr, 6379)])
    assert seen_c[f"{net.redis_addr}:6379"] == "ok", seen_c

    spec = parse_spec(
        {
            "experiment_id": f"exp-{secrets.token_hex(4)}",
            "sites": lab.sites,
            "method": "asym",
            "rounds": 6,
            "quorum": 1,
            "round_deadline_s": ROUND_DEADLINE_S,
            "heartbeat_timeout_s": 10,
            "configuration": "2d",
            "device": "cpu",
        }
    )
    hosts = {"coordinator": "coord", f"site-{a}": "a", f"site-{b}": "b"}
    redis_state = RedisState.from_settings(lab.operator)
    events: dict[str, float] = {}
    t0 = time.monotonic()
    with NetnsFederation(lab, hosts, lab.tmp / "logs") as fed:
        submit(lab.operator, spec)
        state: ExperimentState | None = None
        cut_probe: dict = {}
        try:
            while time.monotonic() - t0 < 80:
                fed.check_alive()
                state = redis_state.load(spec.experiment_id, with_history=True)
                if state is not None:
                    if "cut" not in events and state.history:
                        net.cut("b")  # round 1 closed with both sites: pull b's cable
                        events["cut"] = time.monotonic() - t0
                        events["cut_in_round"] = state.round
                        cut_probe = net.probe("b", [(net.central, 5672)], timeout_s=0.5)
                    elif "cut" in events and "restore" not in events and _late_round(state, b):
                        net.restore("b")  # b missed a round: plug the cable back in
                        events["restore"] = time.monotonic() - t0
                        events["restore_in_round"] = state.round
                    if state.phase in TERMINAL:
                        break
                time.sleep(0.2)
        finally:
            if "cut" in events and "restore" not in events:
                net.restore("b")
        events["end"] = time.monotonic() - t0
        logs = fed.logs_tail()
    events["stopped"] = time.monotonic() - t0

    assert state is not None, f"experiment never started\n{logs}"
    summary = [(r.round, sorted(r.participants), sorted(r.late)) for r in state.history]
    print(f"\nmulti-host timeline (s since submit): {events}\nrounds: {summary}")
    assert state.phase == "done", f"{state.phase}: {state.error} {events} {summary}\n{logs}"
    assert [r.round for r in state.history] == list(range(1, 7))
    assert sorted(state.history[0].participants) == sorted(lab.sites)
    assert cut_probe.get(f"{net.central}:5672") != "ok", cut_probe  # the cut was real

    # While cut off, b missed a round: it closed on quorum (a alone) at the deadline.
    missed = _late_round(state, b)
    assert missed is not None, summary
    assert missed.participants == [a] and missed.late == [b], summary
    assert missed.closed_at - missed.opened_at >= ROUND_DEADLINE_S, missed
    assert missed.round >= events["cut_in_round"]
    # Link back: b takes part again in a later round and in the final validation.
    rejoined = [r.round for r in state.history if r.round > missed.round and b in r.participants]
    assert rejoined, f"{b} never rejoined: {summary}\n{logs}"
    assert set(state.final_metrics) == set(lab.sites), state.final_metrics
    assert events["end"] < 85, events
