"""The docker-compose stack for real: build, up, a 2-round 3-site experiment, isolation.

Marked ``docker``; skipped in one line when no Docker engine answers (``docker info``)
or no compose client is installed, so machines without an engine pay nothing. Images
come from ``deploy/docker/build.sh`` (cached after the first build; a cold build takes
minutes). The stack runs as its own compose project with ephemeral host ports, so it
can run beside a demo stack, and is taken down with its volumes at the end.

    python -m pytest -q -m docker tests/deploy/test_compose_stack.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SITES = ["901", "902", "903"]

pytestmark = [pytest.mark.docker, pytest.mark.timeout(2400)]


def _compose_cmd() -> list[str] | None:
    docker = shutil.which("docker")
    v2 = docker and subprocess.run([docker, "compose", "version"], capture_output=True)
    if v2 and v2.returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def _unavailable() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "no docker CLI on this machine"
    try:
        info = subprocess.run([docker, "info"], capture_output=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "docker info timed out (engine not answering)"
    if info.returncode != 0:
        return "no Docker engine reachable (docker info failed)"
    if _compose_cmd() is None:
        return "no compose client (docker compose / docker-compose)"
    return None


class Stack:
    def __init__(self, project: str) -> None:
        self.project = project
        self.cmd = _compose_cmd()
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": project,
            # ephemeral host ports: never collide with another stack or host service
            "FEDNNUNET_AMQP_PORT": "",
            "FEDNNUNET_RABBITMQ_UI_PORT": "",
            "FEDNNUNET_S3_PORT": "",
            "FEDNNUNET_FLOWER_PORT": "",
        }

    def __call__(self, *args: str, timeout: float = 600, check: bool = True, **kw):
        r = subprocess.run(
            [*self.cmd, *args], cwd=DEPLOY, env=self.env, capture_output=True, text=True,
            timeout=timeout, **kw,
        )  # fmt: skip
        if check and r.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
        return r

    def cid(self, service: str) -> str:
        return self("ps", "-q", service).stdout.strip()

    def health(self, service: str) -> str:
        fmt = "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}"
        r = subprocess.run(
            ["docker", "inspect", "-f", fmt, self.cid(service)], capture_output=True, text=True
        )
        return r.stdout.strip()

    def status(self, experiment_id: str) -> dict:
        r = self("exec", "-T", "coordinator", "fednnunet", "experiment", "status",
                 experiment_id, "--json")  # fmt: skip
        return json.loads(r.stdout)

    def python_in(self, service: str, code: str) -> dict:
        r = subprocess.run(
            ["docker", "exec", "-i", self.cid(service), "python", "-"],
            input=code, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def stack():
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    subprocess.run(
        [sys.executable, str(DEPLOY / "generate.py")], check=True, capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    build = subprocess.run(
        ["bash", str(DEPLOY / "docker" / "build.sh")], capture_output=True, text=True, timeout=3600
    )
    assert build.returncode == 0, build.stderr[-4000:]
    s = Stack(f"fednnunet-test-{os.getpid()}")
    try:
        t0 = time.monotonic()
        s("up", "-d", timeout=900)
        want = {"rabbitmq": "healthy", "redis": "healthy", "s3": "healthy"}
        want |= {name: "running" for name in ("coordinator", *[f"site-{x}" for x in SITES])}
        deadline = time.monotonic() + 300
        while (seen := {n: s.health(n) for n in want}) != want:
            assert time.monotonic() < deadline, f"not healthy after 300 s: {seen}"
            time.sleep(2)
        for name in ("coordinator", *[f"site-{x}" for x in SITES]):  # consuming its queue
            while not re.search(r"@\S+ ready\.", s("logs", "--no-color", name).stdout):
                assert time.monotonic() < deadline, f"{name} not ready after 300 s"
                time.sleep(2)
        print(f"compose up -> healthy and ready in {time.monotonic() - t0:.1f} s")
        yield s
    finally:
        s("--profile", "tools", "down", "-v", "--remove-orphans", check=False, timeout=300)


def test_two_round_experiment_across_containers(stack):
    exp = f"compose-test-{int(time.time())}"
    t0 = time.monotonic()
    run = stack(
        "run", "--rm", "-T", "client", "fednnunet", "experiment", "start", "/specs/smoke.yml",
        "--id", exp, "--watch", timeout=1800,
    )  # fmt: skip
    wall = time.monotonic() - t0
    st = stack.status(exp)
    assert st["phase"] == "done", (st["phase"], st["error"], run.stdout[-2000:])
    assert [h["round"] for h in st["history"]] == [1, 2]
    for h in st["history"]:
        assert sorted(h["participants"]) == SITES, h
    assert sorted(st["final_metrics"]) == SITES
    for site, m in st["final_metrics"].items():
        assert 0.0 <= m["mean_dice"] <= 1.0, (site, m)
    for name in ("coordinator", *[f"site-{x}" for x in SITES]):  # scoped S3 identities
        logs = stack("logs", "--no-color", name).stdout
        assert "AccessDenied" not in logs, (name, logs[-3000:])
    dice = {s: round(m["mean_dice"], 3) for s, m in st["final_metrics"].items()}
    print(f"2-round experiment in {wall:.0f} s, Dice {dice}")


ISOLATION_PROBE = r"""
import json, os, socket
import pika
from minio import Minio
from minio.error import S3Error
from fednnunet.settings import get_settings

s = get_settings()
out = {"raw": sorted(os.listdir("/data/nnUNet_raw")), "uid": os.getuid()}
conn = pika.BlockingConnection(pika.URLParameters(s.broker_url))
for queue in ("site.901", "site.902", "coordinator"):
    ch = conn.channel()
    try:
        ch.queue_declare(queue, passive=True)
        ch.basic_get(queue) if queue != "site.901" else None
        out[queue] = "ok"
        ch.close()
    except pika.exceptions.ChannelClosedByBroker as exc:
        out[queue] = exc.reply_code
conn.close()
c = Minio(s.s3_endpoint, access_key=s.s3_access_key, secret_key=s.s3_secret_key,
          secure=False, region=s.s3_region)
def code(fn):
    try:
        fn()
        return "ok"
    except S3Error as exc:
        return exc.code
key = os.environ["PROBE_KEY"]
out["list_902"] = code(lambda: list(c.list_objects("fednnunet-site-902", recursive=True)))
out["get_902"] = code(lambda: c.get_object("fednnunet-site-902", key).read())
coord_key = os.environ["PROBE_COORD_KEY"]
out["list_coord"] = code(lambda: list(c.list_objects("fednnunet-coordinator", recursive=True)))
out["get_coord"] = code(lambda: c.get_object("fednnunet-coordinator", coord_key).read())
out["list_own"] = code(lambda: list(c.list_objects("fednnunet-site-901", recursive=True)))
for host, port in (("redis", 6379), ("site-902", 80), ("coordinator", 80), ("s3", 8888),
                   ("s3", 9333), ("s3", 8333)):
    try:
        socket.create_connection((host, port), timeout=3).close()
        out[f"{host}:{port}"] = "open"
    except OSError as exc:
        out[f"{host}:{port}"] = type(exc).__name__
print(json.dumps(out))
"""


def test_site_cannot_reach_other_sites_data(stack):
    """site-901's container vs site-902's volume, queue and bucket (after the run above)."""
    mounts = json.loads(
        subprocess.run(
            ["docker", "inspect", "-f", "{{json .Mounts}}", stack.cid("site-901")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
    )
    assert [m.get("Name") for m in mounts] == [f"{stack.project}_site-901-data"]
    keys = stack.python_in(  # with the coordinator's own (scoped) identity
        "coordinator",
        "import json\nfrom minio import Minio\nfrom fednnunet.settings import get_settings\n"
        "s=get_settings()\nc=Minio(s.s3_endpoint,access_key=s.s3_access_key,"
        "secret_key=s.s3_secret_key,secure=False,region=s.s3_region)\n"
        "print(json.dumps({b: [o.object_name for o in c.list_objects(b, recursive=True)]"
        " for b in ('fednnunet-site-902', 'fednnunet-coordinator')}))",
    )
    assert keys["fednnunet-site-902"], "site-902 uploaded nothing (run the experiment test first)"
    assert keys["fednnunet-coordinator"], "no round history in the coordinator bucket"
    code = ISOLATION_PROBE.replace(
        'os.environ["PROBE_KEY"]', repr(keys["fednnunet-site-902"][0])
    ).replace('os.environ["PROBE_COORD_KEY"]', repr(keys["fednnunet-coordinator"][0]))
    out = stack.python_in("site-901", code)
    print(json.dumps(out))
    assert out["raw"] == [d for d in out["raw"] if d.startswith("Dataset901_")] and out["raw"]
    assert out["uid"] == 10001
    assert out["site.901"] == "ok"
    assert out["site.902"] == 403 and out["coordinator"] == 403  # ACCESS_REFUSED
    assert out["list_902"] == "AccessDenied" and out["get_902"] == "AccessDenied"
    # the coordinator bucket (every site's history, journal, plots) is not for sites
    assert out["list_coord"] == "AccessDenied" and out["get_coord"] == "AccessDenied"
    assert out["list_own"] == "ok"
    assert out["s3:8333"] == "open"
    for target in ("redis:6379", "site-902:80", "coordinator:80", "s3:8888", "s3:9333"):
        assert out[target] != "open", (target, out[target])
