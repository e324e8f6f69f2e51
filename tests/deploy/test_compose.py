"""Static checks of the docker-compose deployment (no Docker engine needed).

Compose-spec essentials, per-site isolation (own network, volume and credentials, no
Redis), no working secret in any committed file or on any command line, ports bound to
127.0.0.1 by default, image pins equal to pyproject.toml. The stack itself is brought up
for real by ``test_compose_stack.py`` (marked ``docker``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from fednnunet.deploy import provisioning as prov

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
IMAGES = ["runtime", "rabbitmq", "redis", "s3", "flower"]


def _load_generate():
    spec = importlib.util.spec_from_file_location("deploy_generate", DEPLOY / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gen():
    return _load_generate()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dotenv(gen) -> dict[str, str]:
    """A fresh first-init .env, rendered in memory (the real one is never committed)."""
    out = {}
    for line in gen.render_env(SITES, "fednnunet", {}, rotate=False).splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


def _interpolate(value: str, env: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name, default = m.group(1), re.match(r"\$\{[^:}-]*(:?-)([^}]*)\}", m.group(0))
        if name in env:
            return env[name]
        if default:
            return default.group(2)
        raise KeyError(name)

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


def test_services_and_local_images(compose):
    assert set(compose["services"]) >= {
        "rabbitmq", "redis", "s3", "s3-init", "demo-data", "coordinator", "flower", "client",
        *SITE_SERVICES,
    }  # fmt: skip
    for name, svc in compose["services"].items():
        assert "build" not in svc, f"{name}: images come from deploy/docker/build.sh"
        m = re.fullmatch(r"fednnunet/([a-z0-9]+):\$\{FEDNNUNET_IMAGE_TAG:-local\}", svc["image"])
        assert m and m.group(1) in IMAGES, (name, svc["image"])
        assert (DEPLOY / "docker" / f"{m.group(1)}.Dockerfile").exists()
    assert "name" not in compose, "top-level name breaks docker-compose 1.29"


def test_dockerfiles_build_from_local_base_only():
    for image in IMAGES:
        text = (DEPLOY / "docker" / f"{image}.Dockerfile").read_text()
        froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
        assert froms == ["${BASE}"], (image, froms)
        assert "ARG BASE=local/debian:bookworm" in text
        for line in text.splitlines():
            if "pip install" in line:
                assert "--no-index" in line and "--find-links" in line, (image, line)


def test_references_are_declared(compose):
    services = compose["services"]
    volumes, networks = set(compose.get("volumes", {})), set(compose.get("networks", {}))
    for name, svc in services.items():
        for src in _volume_sources(svc):
            if src.startswith((".", "/")):
                if ".generated" not in src:  # written by deploy/generate.py on first init
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


def test_healthchecks(compose):
    for name in ("rabbitmq", "redis", "s3"):
        hc = compose["services"][name]["healthcheck"]
        assert hc["test"] and hc["test"][0] in {"CMD", "CMD-SHELL"}
        assert "interval" in hc and "retries" in hc


def test_ports_bind_loopback_by_default(compose, dotenv):
    published = {}
    for name, svc in compose["services"].items():
        for p in svc.get("ports", []):
            value = _interpolate(str(p), dotenv)
            addr, host_port, container_port = value.split(":")
            assert addr == "127.0.0.1", f"{name}: {p} binds {addr}"
            assert container_port.isdigit()
            published[host_port] = name
    # never the host's own RabbitMQ / Redis / native S3 ports
    assert not set(published) & {"5672", "15672", "25672", "6379", "8333"}
    assert "ports" not in compose["services"]["redis"]


def test_every_variable_is_in_dotenv(dotenv):
    text = (DEPLOY / "docker-compose.yml").read_text()
    for m in VAR_RE.finditer(text):
        has_default = re.match(r"\$\{[^}]*:?-", m.group(0))
        assert m.group(1) in dotenv or has_default, f"${{{m.group(1)}}} missing from .env"


def test_no_secret_on_any_command_line(compose, dotenv):
    secrets = {v for k, v in dotenv.items() if "PASSWORD" in k or "SECRET" in k or "SEED" in k}
    secrets |= {dotenv["FLOWER_BASIC_AUTH"]}
    for name, svc in compose["services"].items():
        for field in ("command", "entrypoint"):
            text = json.dumps(svc.get(field, ""))
            assert not VAR_RE.search(text), f"{name}: {field} interpolates a variable"
            assert not any(s in _interpolate(text, dotenv) for s in secrets), name
        hc = json.dumps(svc.get("healthcheck", {}))
        assert "PASSWORD}" not in hc.replace("$$", "$"), f"{name}: healthcheck with a secret"


def test_site_workers_isolated(compose, dotenv):
    services = compose["services"]
    seed = dotenv["FEDNNUNET_CREDENTIAL_SEED"]
    seen_volumes, seen_creds, seen_nets = set(), set(), set()
    for site, name in zip(SITES, SITE_SERVICES, strict=True):
        svc = services[name]
        env = {k: _interpolate(v, dotenv) for k, v in _env(svc).items()}
        assert set(env) >= SITE_ENV, f"{name} misses {SITE_ENV - set(env)}"
        assert "FEDNNUNET_REDIS_URL" not in env
        assert env["FEDNNUNET_SITE_ID"] == site and env["FEDNNUNET_DATASET_ID"] == site
        assert svc["command"][:4] == ["fednnunet", "worker", "--site", site]
        user, pw = prov.site_amqp_credentials(site, seed)
        assert env["FEDNNUNET_BROKER_URL"] == f"amqp://{user}:{pw}@rabbitmq:5672/%2F"
        assert (env["FEDNNUNET_S3_ACCESS_KEY"], env["FEDNNUNET_S3_SECRET_KEY"]) == (
            prov.site_s3_credentials(site, seed)
        )
        seen_creds.add((env["FEDNNUNET_BROKER_URL"], env["FEDNNUNET_S3_SECRET_KEY"]))
        vols = _volume_sources(svc)
        assert vols == [f"site-{site}-data"]
        seen_volumes.update(vols)
        assert env["nnUNet_raw"].startswith("/data/")
        # its own internal network, shared only with the broker and the S3 server
        assert svc["networks"] == [f"site-{site}-net"]
        seen_nets.add(f"site-{site}-net")
        assert compose["networks"][f"site-{site}-net"].get("internal") is True
        members = {n for n, s in services.items() if f"site-{site}-net" in s.get("networks", [])}
        assert members == {name, "rabbitmq", "s3"}
    assert len(seen_volumes) == len(seen_creds) == len(seen_nets) == len(SITES)


def test_coordinator_env(compose, dotenv):
    svc = compose["services"]["coordinator"]
    env = {k: _interpolate(v, dotenv) for k, v in _env(svc).items()}
    assert {"FEDNNUNET_BROKER_URL", "FEDNNUNET_REDIS_URL", "FEDNNUNET_S3_ENDPOINT"} <= set(env)
    assert env["FEDNNUNET_BROKER_URL"].startswith("amqp://coordinator:")
    assert env["FEDNNUNET_REDIS_URL"] == f"redis://:{dotenv['REDIS_PASSWORD']}@redis:6379/0"
    assert {"federation", "central"} <= set(svc["networks"])
    assert compose["networks"]["central"].get("internal") is True
    services = compose["services"]
    redis_members = {n for n, s in services.items() if "central" in s.get("networks", [])}
    assert redis_members == {"redis", "coordinator", "client"}


def test_flower_credentials_in_environment_only(compose):
    flower = compose["services"]["flower"]
    assert "command" not in flower  # the image's `celery flower --port=5555`
    env = _env(flower)
    assert {"CELERY_BROKER_URL", "FLOWER_BROKER_API", "FLOWER_BASIC_AUTH"} <= set(env)
    text = (DEPLOY / "docker" / "flower.Dockerfile").read_text()
    cmd = re.search(r"^CMD (.*)$", text, re.M).group(1)
    assert "--broker" not in cmd and "basic_auth" not in cmd


def test_first_init_secrets_random_and_kept(gen, tmp_path, monkeypatch):
    a = gen.render_env(SITES, "fednnunet", {}, rotate=False)
    b = gen.render_env(SITES, "fednnunet", {}, rotate=False)
    assert a != b  # every installation draws its own
    old = dict(line.split("=", 1) for line in a.splitlines() if "=" in line)
    assert gen.render_env(SITES, "fednnunet", old, rotate=False) == a  # later runs keep them
    assert old["FEDNNUNET_CREDENTIAL_SEED"] != prov.DEFAULT_SEED
    assert old["S3_ADMIN_SECRET_KEY"] != prov.DEFAULT_ADMIN_SECRET
    assert gen.render_env(SITES, "fednnunet", old, rotate=True) != a
    monkeypatch.setattr(gen, "GENERATED", tmp_path)
    outs = gen.secret_outputs(old)
    defs = json.loads(outs[tmp_path / "definitions.json"])
    pw = {u["name"]: u["password"] for u in defs["users"]}
    assert pw["site-901"] == old["SITE_901_AMQP_PASSWORD"]
    ident = json.loads(outs[tmp_path / "identities.json"])
    keys = {i["name"]: i["credentials"][0]["secretKey"] for i in ident["identities"]}
    assert keys["admin"] == old["S3_ADMIN_SECRET_KEY"]
    assert keys["site-902"] == old["SITE_902_S3_SECRET"]


def test_no_committed_file_holds_secrets():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "deploy/.env" not in tracked
    assert not any(p.startswith("deploy/.generated/") for p in tracked)
    assert "broker_config/definitions.json" not in tracked
    ignored = subprocess.run(
        ["git", "check-ignore", "deploy/.env", "deploy/.generated/definitions.json"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert ignored.stdout.split() == ["deploy/.env", "deploy/.generated/definitions.json"]


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b(torch|torchvision)==([0-9][0-9A-Za-z.+]*)", text))


def test_cuda_dockerfile_pins_match_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    want = _pins(" ".join(deps))
    assert set(want) == {"torch", "torchvision"}
    text = (DEPLOY / "Dockerfile.cuda").read_text()
    assert _pins(text) == want
    assert re.search(r"pip install\b.*\s\.( |$)", text, re.M)


def test_runtime_image_installs_the_host_lock():
    """Versions come from pyproject.toml through build.sh's lock, not from the Dockerfile."""
    text = (DEPLOY / "docker" / "runtime.Dockerfile").read_text()
    assert not _pins(text), "pins live in pyproject.toml (runtime.lock), not here"
    assert '-r "${WHEELS}runtime.lock"' in text
    assert re.search(r"pip install --no-index --no-deps .*\s\.( |$)", text, re.M)
    build = (DEPLOY / "docker" / "build.sh").read_text()
    assert '"$REPO/pyproject.toml"' in build and "lock runtime" in build


def test_committed_policies_are_current():
    r = subprocess.run(
        [sys.executable, str(DEPLOY / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_generated_definitions_match_provisioning(tmp_path, gen, monkeypatch, dotenv):
    monkeypatch.setattr(gen, "GENERATED", tmp_path)
    defs = json.loads(gen.secret_outputs(dotenv)[tmp_path / "definitions.json"])
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
        "fednnunet.control": "direct",
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


def _compose_clients() -> list[list[str]]:
    out = []
    docker = shutil.which("docker")
    v2 = docker and subprocess.run([docker, "compose", "version"], capture_output=True)
    if v2 and v2.returncode == 0:
        out.append([docker, "compose"])
    if shutil.which("docker-compose"):
        out.append([shutil.which("docker-compose")])
    return out


def test_docker_compose_config_offline(tmp_path, dotenv):
    """`config` validates the spec with every compose client present (no engine needed)."""
    clients = _compose_clients()
    if not clients:
        pytest.skip("no docker compose client on this machine")
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in dotenv.items()))
    for cmd in clients:
        for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.minio.yml"]):
            args = [x for f in files for x in ("-f", str(DEPLOY / f))]
            r = subprocess.run(
                [*cmd, "--env-file", str(env_file), *args, "config", "-q"],
                capture_output=True,
                text=True,
                cwd=DEPLOY,
            )
            assert r.returncode == 0, (cmd, files, r.stderr)


def test_only_s3_init_holds_the_admin_keys(compose, dotenv):
    """The coordinator runs with its scoped S3 identity, never as the S3 admin."""
    admin_secret = dotenv["S3_ADMIN_SECRET_KEY"]
    for name, svc in compose["services"].items():
        env = {k: _interpolate(v, dotenv) for k, v in _env(svc).items()}
        if name == "s3-init":
            assert env["FEDNNUNET_S3_SECRET_KEY"] == admin_secret
            continue
        if name == "s3":
            continue  # the server itself is given its admin identity
        assert admin_secret not in env.values(), name
    coordinator = _env(compose["services"]["coordinator"])
    coord = {k: _interpolate(v, dotenv) for k, v in coordinator.items()}
    assert coord["FEDNNUNET_S3_ACCESS_KEY"] == "coordinator"
    ident = json.loads(gen_secret_identities(dotenv))
    by_name = {i["name"]: i for i in ident["identities"]}
    assert by_name["coordinator"]["credentials"][0]["secretKey"] == coord["FEDNNUNET_S3_SECRET_KEY"]


def gen_secret_identities(dotenv: dict[str, str]) -> str:
    gen = _load_generate()
    outputs = gen.secret_outputs(dotenv)
    return next(text for path, text in outputs.items() if path.name == "identities.json")


def test_minio_coordinator_policy_reads_sites_writes_own_buckets():
    pol = json.loads((DEPLOY / "minio" / "coordinator.json").read_text())
    writes = {r for s in pol["Statement"] if "s3:PutObject" in s["Action"] for r in s["Resource"]}
    assert writes == {"arn:aws:s3:::fednnunet-global/*", "arn:aws:s3:::fednnunet-coordinator/*"}
    reads = {r for s in pol["Statement"] if "s3:GetObject" in s["Action"] for r in s["Resource"]}
    assert {f"arn:aws:s3:::fednnunet-site-{s}/*" for s in ("901", "902", "903")} <= reads
    for site in ("901", "902", "903"):
        site_pol = json.loads((DEPLOY / "minio" / f"site-{site}.json").read_text())
        assert "fednnunet-coordinator" not in json.dumps(site_pol)
