"""A malicious-site harness on the real RabbitMQ, Redis and S3, in production mode.

Everything runs as at a real consortium: a private vhost with a broker user per site
and for the coordinator (random passwords, the provisioning code's permissions), a
private S3 server with random keys, ``FEDNNUNET_DEVELOPMENT`` off. Two honest sites
run real site workers (stand-in training); the third site, ``evil``, is played by the
test: it consumes its own queue with its own credentials, behaves honestly where an
attack needs it to, and sends whatever an attacker would.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from kombu import Connection

from fednnunet.adapters.broker import coordinator_queue, make_celery
from fednnunet.adapters.redis_state import RedisState
from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.adapters.weights_codec import load_weights_file, read_header
from fednnunet.cli.simulate import LocalFederation, submit, wait_for
from fednnunet.core.state_machine import ExperimentState
from fednnunet.deploy import provisioning as prov
from fednnunet.keys import artifact_key, site_bucket
from fednnunet.messages import SiteReport, SiteTask
from fednnunet.settings import Settings
from fednnunet.site.service import SiteService
from tests.faults.harness import PrivateS3, claim_redis_db, rabbitmqctl
from tests.support.standin import BACKEND as STANDIN_BACKEND
from tests.support.standin import StandInBackend
from tests.support.weed import free_port_block

EVIL = "evil"
HONEST = ("a", "b")


@dataclass
class Consortium:
    """Private corner of the shared services: vhost, Redis database, S3, users."""

    tag: str
    vhost: str
    coordinator: Settings  # production settings of the coordinator (and operator)
    sites: dict[str, Settings]  # each site's own production settings
    env: dict[str, str]  # common environment of the worker processes
    tmp: Path
    s3: PrivateS3
    users: list[str] = field(default_factory=list)

    def site_id(self, short: str) -> str:
        return f"{short}{self.tag}"

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.coordinator, retry_total_s=20)

    def redis(self) -> RedisState:
        return RedisState.from_settings(self.coordinator)


def _env_of(settings: Settings) -> dict[str, str]:
    return {
        "FEDNNUNET_BROKER_URL": settings.broker_url,
        "FEDNNUNET_REDIS_URL": settings.redis_url,
        "FEDNNUNET_S3_ENDPOINT": settings.s3_endpoint,
        "FEDNNUNET_S3_ACCESS_KEY": settings.s3_access_key,
        "FEDNNUNET_S3_SECRET_KEY": settings.s3_secret_key,
        "FEDNNUNET_BUCKET_PREFIX": settings.bucket_prefix,
        "FEDNNUNET_DEVELOPMENT": "false",
    }


def open_consortium(base: Settings, tmp: Path) -> Consortium:
    tag = secrets.token_hex(3)
    vhost = f"fednnunet-adv-{tag}"
    access, secret = f"adm{tag}", secrets.token_hex(16)
    coord_user, coord_pw, seed = f"coordinator-{tag}", secrets.token_hex(12), secrets.token_hex(8)
    site_ids = [f"{short}{tag}" for short in (*HONEST, EVIL)]
    prefix = f"adv{tag}"
    # Every party with its own scoped S3 identity, as provisioned for production: the
    # coordinator may not write a site's bucket, a site may not read another's.
    identities = prov.s3_identities(access, secret, site_ids, prefix, seed=seed)
    s3 = PrivateS3(tmp / "s3", free_port_block(), access, secret, identities=identities)
    s3.start()
    try:
        _make_buckets(s3.endpoint, access, secret, prov.all_buckets(prefix, site_ids))
        db = claim_redis_db(base.redis_url, tag)
        _import_broker_definitions(tmp, vhost, site_ids, coord_user, coord_pw, seed)
    except BaseException:
        s3.stop()  # no server left behind
        raise
    common = dict(
        redis_url=base.redis_url.rsplit("/", 1)[0] + f"/{db}",
        s3_endpoint=s3.endpoint,
        bucket_prefix=prefix,
        development=False,
        heartbeat_interval_s=1.0,
    )
    coord_access, coord_secret = prov.coordinator_s3_credentials(seed)
    coordinator = Settings(
        broker_url=prov.broker_url(coord_user, coord_pw, vhost=vhost),
        s3_access_key=coord_access,
        s3_secret_key=coord_secret,
        **common,
    )
    sites: dict[str, Settings] = {}
    users = [coord_user]
    for site in site_ids:
        user, pw = prov.site_amqp_credentials(site, seed)
        users.append(user)
        short = site[: -len(tag)]
        site_access, site_secret = prov.site_s3_credentials(site, seed)
        sites[site] = Settings(
            broker_url=prov.broker_url(user, pw, vhost=vhost),
            s3_access_key=site_access,
            s3_secret_key=site_secret,
            site_id=site,
            dataset_id=HONEST.index(short) + 11 if short in HONEST else 13,
            site_backend=STANDIN_BACKEND,
            **common,
        )
    env = _env_of(coordinator) | {
        "FEDNNUNET_SITE_BACKEND": STANDIN_BACKEND,
        "FEDNNUNET_STANDIN_MODEL": "tiny",
        "FEDNNUNET_STANDIN_DIR": str(tmp / "standin"),
        "FEDNNUNET_HEARTBEAT_INTERVAL_S": "1",
        "FEDNNUNET_TORCH_THREADS": "1",
        "FEDNNUNET_PLOTS": "false",
        "OMP_NUM_THREADS": "1",
        "nnUNet_raw": str(tmp),
        "nnUNet_preprocessed": str(tmp),
        "nnUNet_results": str(tmp),
    }
    return Consortium(tag, vhost, coordinator, sites, env, tmp, s3, users)


def _make_buckets(endpoint: str, access: str, secret: str, buckets: list[str]) -> None:
    """Provisioning's job, with the admin keys (no party below may create buckets)."""
    from minio import Minio

    admin = Minio(endpoint, access_key=access, secret_key=secret, secure=False)
    for bucket in buckets:
        admin.make_bucket(bucket)


def _import_broker_definitions(
    tmp: Path, vhost: str, sites: list[str], coord_user: str, coord_pw: str, seed: str
) -> None:
    """Users, permissions and topology as provisioning defines them, in one rabbitmqctl
    call (each call costs ~2 s); the coordinator user gets a name of its own."""
    defs = prov.rabbitmq_definitions(sites, vhost=vhost, coordinator_password=coord_pw, seed=seed)
    for entry in defs["users"] + defs["permissions"]:
        key = "name" if "password" in entry else "user"
        if entry.get(key) == prov.COORDINATOR_USER:
            entry[key] = coord_user
    defs["vhosts"] = [{"name": vhost}]
    defs["permissions"].append(
        {"user": "guest", "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
    )
    # rabbitmqctl runs as the rabbitmq user, which cannot read pytest's private tmp (and
    # 3.10 cannot read definitions from stdin): a file it can read, removed at once.
    fd, name = tempfile.mkstemp(prefix="fednnunet-adv-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(defs, fh)
        os.chmod(name, 0o644)  # test-only random passwords, for a few seconds
        rabbitmqctl("import_definitions", name)
    finally:
        os.unlink(name)


def close_consortium(c: Consortium) -> None:
    import redis

    users = ",".join(f'<<"{u}">>' for u in c.users)
    try:
        rabbitmqctl(
            "eval",
            f'[rabbit_auth_backend_internal:delete_user(U, <<"cli">>) || U <- [{users}]], '
            f'rabbit_vhost:delete(<<"{c.vhost}">>, <<"cli">>).',
        )
        redis.Redis.from_url(c.coordinator.redis_url).flushdb()
    finally:
        c.s3.stop()


def honest_federation(c: Consortium) -> LocalFederation:
    """The coordinator and the two honest sites, each with its own broker user."""
    honest = {c.site_id(s): c.sites[c.site_id(s)].dataset_id for s in HONEST}
    site_envs = {s: _env_of(c.sites[s]) for s in honest}
    return LocalFederation(
        honest, c.tmp / "logs", env=c.env, tick_s=0.5, site_envs=site_envs, with_coordinator=True
    )


# ---------------------------------------------------------------- the attacker
Attack = Callable[["Evil", SiteTask, Callable[[], SiteReport]], None]


class Evil(threading.Thread):
    """Plays site ``evil``: consumes its own queue with its own credentials.

    ``attack(evil, task, honest)`` decides what to send for each task; ``honest()``
    runs the task as an honest site would (stand-in training) and returns the report.
    """

    def __init__(self, c: Consortium, attack: Attack) -> None:
        super().__init__(name="evil", daemon=True)
        self.c = c
        self.site = c.site_id(EVIL)
        self.settings = c.sites[self.site]
        self.store = ArtifactStore(self.settings, retry_total_s=20)
        workdir = c.tmp / "standin" / self.site
        backend = StandInBackend(self.settings, model="tiny", workdir=workdir)
        self.service = SiteService(self.settings, self.store, backend=backend)
        self.app = make_celery(self.settings, "site", self.site)
        self.user = prov.site_user(self.site)
        self.attack = attack
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.tasks: list[SiteTask] = []

    @property
    def bucket(self) -> str:
        return site_bucket(self.settings.bucket_prefix, self.site)

    def send(self, report: SiteReport | dict) -> None:
        """Publish a report as ``evil`` (RabbitMQ checks that we are evil)."""
        body = report if isinstance(report, dict) else report.model_dump(mode="json")
        self.app.send_task(
            "fednnunet.coordinator.site_report",
            args=[body],
            queue=coordinator_queue(no_declare=True),
            exchange="fednnunet.results",
            routing_key="coordinator",
            user_id=self.user,
        )

    def put(self, task: SiteTask, data: bytes, name: str = "update.safetensors"):
        key = artifact_key(task.experiment_id, task.phase, task.round, self.site, name)
        return self.store.put_bytes(self.bucket, key, data)

    def run(self) -> None:
        with Connection(self.settings.broker_url) as conn:
            queue = conn.SimpleQueue(
                f"site.{self.site}", no_ack=True, queue_opts={"durable": True, "no_declare": True}
            )
            while not self.stop.is_set():
                try:
                    msg = queue.get(timeout=0.3)
                except queue.Empty:
                    continue
                try:
                    task = SiteTask.model_validate(json.loads(msg.body)[0][0])
                    self.tasks.append(task)
                    self.attack(self, task, lambda task=task: self.service.handle(task))
                except Exception as exc:  # noqa: BLE001 - reported by the test
                    self.errors.append(exc)
            queue.close()


def honestly(evil: Evil, task: SiteTask, honest: Callable[[], SiteReport]) -> None:
    evil.send(honest())


def run_experiment(
    c: Consortium, attack: Attack, rounds: int = 3, timeout_s: float = 120, **spec_fields
) -> tuple[ExperimentState, Evil]:
    from fednnunet.spec import parse_spec

    exp = f"adv-{secrets.token_hex(3)}"
    spec = parse_spec(
        {
            "experiment_id": exp,
            "sites": [c.site_id(s) for s in (*HONEST, EVIL)],
            "method": "asym",
            "rounds": rounds,
            "quorum": 2,
            "max_attempts": 2,
            "configuration": "2d",
            "device": "cpu",
            "heartbeat_timeout_s": 30,
            **spec_fields,
        }
    )
    evil = Evil(c, attack)
    evil.start()
    try:
        submit(c.coordinator, spec)
        try:
            state = wait_for(c.coordinator, exp, timeout_s, poll_s=0.3)
        except Exception as exc:
            raise AssertionError(f"{exc}; the attacker's own errors: {evil.errors}") from exc
    finally:
        evil.stop.set()
        evil.join(timeout=5)
    assert not evil.errors, evil.errors
    return state, evil


# ---------------------------------------------------------------- the oracle
def independent_fedavg(paths: list[Path], cases: list[int], names: list[str]) -> dict:
    """sum_i n_i * w_i / sum_i n_i in float64, written here, not the product's code."""
    total = float(sum(cases))
    out = {}
    for name in names:
        acc = None
        for path, n in zip(paths, cases, strict=True):
            w = load_weights_file(path, [name])[name].double().numpy() * (n / total)
            acc = w if acc is None else acc + w
        out[name] = acc
    return out


def assert_rounds_are_honest_fedavg(c: Consortium, state: ExperimentState) -> None:
    """Every round's global = the independent FedAvg of exactly its participants' S3
    updates, weighted by the case counts they declared when planning."""
    store = c.store()
    assert state.history, "no round closed"
    for record in state.history:
        paths, cases = [], []
        for site in record.participants:
            key = artifact_key(
                state.experiment_id, "train", record.round, site, "update.safetensors"
            )
            ref = store.stat(site_bucket(c.coordinator.bucket_prefix, site), key)
            paths.append(store.get_file(ref))
            cases.append(state.declared_cases[site])
        global_path = store.get_file(record.global_weights)
        names = list(read_header(global_path).shapes)
        expected = independent_fedavg(paths, cases, names)
        got = load_weights_file(global_path, names)
        for name in names:
            np.testing.assert_allclose(
                got[name].double().numpy(), expected[name], rtol=0, atol=1e-6, err_msg=name
            )


def refusals(c: Consortium, experiment: str | None) -> dict[str, int]:
    return c.redis().refusals(experiment)[0]


def wait_until(predicate: Callable[[], bool], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.2)
