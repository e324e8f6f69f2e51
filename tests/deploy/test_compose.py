"""Static checks of the docker-compose deployment (no Docker engine on these machines).

Validates the compose-spec essentials, per-site isolation (own volume, own
credentials, no Redis), the torch pins against pyproject.toml, and that every
generated file equals what ``fednnunet.adapters.provisioning`` produces now.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from fednnunet.adapters import provisioning as prov

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SITES = ["901", "902", "903"]
SITE_SERVICES = [f"site-{s}" for s in SITES]
SITE_ENV = {
    "FEDNNUNET_BROKER_URL",
    "FEDNNUNET_S3_ENDPOINT",
    "FEDNNUNET_S3_ACCESS_KEY",
    "FEDNNUNET_S3_SECRET_KEY",
    "FEDNNUNET_SITE_ID",
    "FEDNNUNET_DATASET_ID",
    "nnUNet_raw",
    "nnUNet_preprocessed",
    "nnUNet_results",
}
VAR_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    out = {}
    for line in (DEPLOY / ".env").read_text().splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


def _interpolate(value: str, env: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) not in env:
            raise KeyError(m.group(1))
        return env[m.group(1)]

    return VAR_RE.sub(sub, value)


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _volume_sources(service: dict) -> list[str]:
    out = []
    for v in service.get("volumes", []):
        src = v["source"] if isinstance(v, dict) else v.split(":", 1)[0]
        out.append(src)
    return out


def test_services_have_image_or_build(compose):
    assert set(compose["services"]) >= {
        "rabbitmq",
        "redis",
        "minio",
        "minio-init",
        "coordinator",
        "demo-data",
        "flower",
        *SITE_SERVICES,
    }
    for name, svc in compose["services"].items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            dockerfile = REPO / "deploy" / ".." / svc["build"]["dockerfile"]
            assert (DEPLOY / svc["build"]["context"]).resolve() == REPO
            assert dockerfile.exists(), name


def test_references_are_declared(compose):
    services = compose["services"]
    volumes, networks = set(compose.get("volumes", {})), set(compose.get("networks", {}))
    for name, svc in services.items():
        for src in _volume_sources(svc):
            if src.startswith((".", "/")):
                assert (DEPLOY / src).exists(), f"{name}: bind source {src} missing"
            else:
                assert src in volumes, f"{name}: volume {src} not declared"
        nets = svc.get("networks", [])
        for net in nets if isinstance(nets, list) else list(nets):
            assert net in networks, f"{name}: network {net} not declared"
        for target, cond in (svc.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            assert cond["condition"] in {
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            }
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
        for secret in svc.get("secrets", []):
            assert secret in compose.get("secrets", {})


def test_healthchecks(compose):
    for name in ("rabbitmq", "redis", "minio"):
        hc = compose["services"][name]["healthcheck"]
        assert hc["test"] and hc["test"][0] in {"CMD", "CMD-SHELL"}
        assert "interval" in hc and "retries" in hc


def test_ports_valid_and_admin_uis_local(compose):
    for name, svc in compose["services"].items():
        for p in svc.get("ports", []):
            parts = str(p).split(":")
            assert 2 <= len(parts) <= 3, (name, p)
            assert all(x.isdigit() and 0 < int(x) < 65536 for x in parts[-2:]), (name, p)
    ui_ports = {"15672", "9001", "5555"}
    for svc in compose["services"].values():
        for p in svc.get("ports", []):
            if str(p).split(":")[-1] in ui_ports:
                assert str(p).startswith("127.0.0.1:"), f"admin UI {p} must bind locally"
    assert "ports" not in compose["services"]["redis"]


def test_every_variable_is_in_dotenv(compose, dotenv):
    text = (DEPLOY / "docker-compose.yml").read_text()
    for m in VAR_RE.finditer(text):
        assert m.group(1) in dotenv, f"${{{m.group(1)}}} missing from deploy/.env"


def test_site_workers_isolated(compose, dotenv):
    services = compose["services"]
    seen_volumes, seen_creds = set(), set()
    for site, name in zip(SITES, SITE_SERVICES, strict=True):
        svc = services[name]
        env = {k: _interpolate(v, dotenv) for k, v in _env(svc).items()}
        assert set(env) >= SITE_ENV, f"{name} misses {SITE_ENV - set(env)}"
        assert "FEDNNUNET_REDIS_URL" not in env
        assert env["FEDNNUNET_SITE_ID"] == site and env["FEDNNUNET_DATASET_ID"] == site
        assert svc["command"][:4] == ["fednnunet", "worker", "--site", site]
        # its own credentials, equal to the provisioned ones
        user, pw = prov.site_amqp_credentials(site, prov.DEFAULT_SEED)
        assert env["FEDNNUNET_BROKER_URL"] == f"amqp://{user}:{pw}@rabbitmq:5672/%2F"
        assert (env["FEDNNUNET_S3_ACCESS_KEY"], env["FEDNNUNET_S3_SECRET_KEY"]) == (
            prov.site_s3_credentials(site, prov.DEFAULT_SEED)
        )
        seen_creds.add((env["FEDNNUNET_BROKER_URL"], env["FEDNNUNET_S3_SECRET_KEY"]))
        # its own dataset volume, mounted where its nnU-Net folders point
        vols = _volume_sources(svc)
        assert vols == [f"site-{site}-data"]
        seen_volumes.update(vols)
        assert env["nnUNet_raw"].startswith("/data/")
        # no path to Redis
        assert "central" not in svc["networks"]
    assert len(seen_volumes) == len(seen_creds) == len(SITES)


def test_coordinator_env(compose, dotenv):
    svc = compose["services"]["coordinator"]
    env = {k: _interpolate(v, dotenv) for k, v in _env(svc).items()}
    assert {"FEDNNUNET_BROKER_URL", "FEDNNUNET_REDIS_URL", "FEDNNUNET_S3_ENDPOINT"} <= set(env)
    assert env["FEDNNUNET_BROKER_URL"].startswith("amqp://coordinator:")
    assert {"federation", "central"} <= set(svc["networks"])
    assert compose["networks"]["central"].get("internal") is True


def test_redis_persists(compose):
    redis = compose["services"]["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(v.endswith(":/data") for v in redis["volumes"])


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b(torch|torchvision)==([0-9][0-9A-Za-z.+]*)", text))


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_pins_match_pyproject(dockerfile):
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    want = _pins(" ".join(deps))
    assert set(want) == {"torch", "torchvision"}
    text = (DEPLOY / dockerfile).read_text()
    assert _pins(text) == want
    assert "pip install ." in text
    assert (DEPLOY / f"{dockerfile}.dockerignore").exists(), "context would include .venv"


def test_generated_files_are_current():
    """One source of truth: definitions.json, MinIO policies and .env come from provisioning."""
    r = subprocess.run(  # noqa: S603 - own interpreter, argv list, no shell
        [sys.executable, str(DEPLOY / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},  # no FEDNNUNET_CREDENTIAL_SEED: the committed dev seed
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_definitions_match_provisioning_regexes():
    defs = json.loads((REPO / "broker_config" / "definitions.json").read_text())
    perms = {p["user"]: p for p in defs["permissions"]}
    for site in SITES:
        p, want = perms[prov.site_user(site)], prov.site_permissions(site)
        assert (p["configure"], p["write"], p["read"]) == (want.configure, want.write, want.read)
    assert perms["coordinator"]["configure"] == ".*"
    topic = {t["user"]: t for t in defs["topic_permissions"]}
    assert topic["site-901"]["write"] == prov.site_topic_permission("901").write
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in defs["bindings"]}
    assert ("fednnunet.tasks", "site.901", "site.901") in bindings
    assert ("fednnunet.results", "coordinator", "coordinator") in bindings
    kinds = {e["name"]: e["type"] for e in defs["exchanges"]}
    assert kinds == {
        "fednnunet.tasks": "direct",
        "fednnunet.results": "direct",
        "fednnunet.progress": "topic",
    }


def test_site_regexes_match_only_own_resources():
    p = prov.site_permissions("901")
    assert re.match(p.read, "site.901") and not re.match(p.read, "site.9010")
    for name in ("site.902", "coordinator", "fednnunet.tasks", "site.901x"):
        assert not re.match(p.read, name)
    for name in ("fednnunet.results", "fednnunet.progress"):
        assert re.match(p.write, name)
    for name in ("fednnunet.tasks", "amq.default", "", "site.901", "coordinator"):
        assert not re.match(p.write, name)
    assert not re.match(p.configure, "site.901")
    t = prov.site_topic_permission("901")
    assert re.match(t.write, "exp1.901.heartbeat")
    assert not re.match(t.write, "exp1.902.heartbeat")
    assert not re.match(t.write, "exp1.9011.heartbeat")


def test_minio_policies_grant_own_bucket_only():
    pol = json.loads((DEPLOY / "minio" / "site-901.json").read_text())
    writes = [s for s in pol["Statement"] if "s3:PutObject" in s["Action"]]
    assert [r for s in writes for r in s["Resource"]] == ["arn:aws:s3:::fednnunet-site-901/*"]
    resources = {r for s in pol["Statement"] for r in s["Resource"]}
    assert not any("site-902" in r or "site-903" in r for r in resources)


def test_docker_compose_config_offline(tmp_path):
    """`docker compose config` validates the full spec if a compose client exists (no engine)."""
    docker = shutil.which("docker")
    cmd = None
    has_plugin = docker and subprocess.run([docker, "compose", "version"], capture_output=True)  # noqa: S603 - docker client, fixed argv
    if has_plugin and has_plugin.returncode == 0:
        cmd = [docker, "compose"]
    elif shutil.which("docker-compose"):
        cmd = [shutil.which("docker-compose")]
    if cmd is None:
        pytest.skip("no docker compose client on this machine")
    r = subprocess.run(  # noqa: S603 - docker client, fixed argv
        [*cmd, "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=DEPLOY,
    )
    assert r.returncode == 0, r.stderr
