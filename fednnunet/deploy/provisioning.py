"""Per-site credentials and permissions for S3 (SeaweedFS/MinIO) and RabbitMQ.

One source of truth: the local stack script, ``broker_config/provision.py``, the
compose stack's generated ``deploy/.generated/definitions.json`` and the MinIO
policies under ``deploy/minio`` are all generated from (or checked against) the
pure functions here, so what a site may touch is defined exactly once.

Why these rules: a hospital's worker must only consume its own task queue, only
write to its own bucket, and only read what the coordinator publishes. A
compromised site must not read another site's uploads, impersonate the
coordinator, or send tasks to other sites.

Credential convention (documented in ``deploy/README.md``):
  * S3 access key of site ``X`` is ``site-X``; RabbitMQ user of site ``X`` is ``site-X``.
  * Secrets are ``HMAC-SHA256(seed, "<service>/<site>")`` in hex (40 chars), so the
    central operator can re-derive them from one seed and hand each site its own
    pair. ``seed`` comes from ``FEDNNUNET_CREDENTIAL_SEED`` (local dev default below);
    explicit secrets may be given instead.

This module is stdlib-only so that shell tooling can call it before anything
else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote

from fednnunet.keys import (
    CONTROL_EXCHANGE,
    CONTROL_QUEUE,
    COORDINATOR_QUEUE,
    PROGRESS_EXCHANGE,
    SITE_ID_RE,
    coordinator_bucket,
    global_bucket,
    site_queue,
)
from fednnunet.keys import site_bucket as _site_bucket
from fednnunet.keys import site_user as _site_user

DEFAULT_PREFIX = "fednnunet"
DEFAULT_ADMIN_ACCESS = "fednnunet"
DEFAULT_ADMIN_SECRET = "fednnunet-secret"  # noqa: S105 - documented dev-only default
DEFAULT_SEED = "fednnunet-dev-seed"  # local development only; set FEDNNUNET_CREDENTIAL_SEED
DEFAULT_SITES = ("901", "902", "903")
DEFAULT_VHOST = "/"
COORDINATOR_USER = "coordinator"

TASKS_EXCHANGE = "fednnunet.tasks"
RESULTS_EXCHANGE = "fednnunet.results"


def _check_site(site: str) -> str:
    if not SITE_ID_RE.match(site):
        raise ValueError(f"invalid site id {site!r} (lowercase letters, digits, '-')")
    return site


def credential_seed() -> str:
    return os.environ.get("FEDNNUNET_CREDENTIAL_SEED", DEFAULT_SEED)


def derive_secret(seed: str, service: str, site: str) -> str:
    """Deterministic per-site secret, so one seed regenerates every site's password."""
    mac = hmac.new(seed.encode(), f"{service}/{_check_site(site)}".encode(), hashlib.sha256)
    return mac.hexdigest()[:40]


def site_user(site: str) -> str:
    """RabbitMQ user name and S3 access key of a site."""
    return _site_user(_check_site(site))


def site_s3_credentials(site: str, seed: str | None = None) -> tuple[str, str]:
    """(access_key, secret_key) of a site's S3 identity."""
    return site_user(site), derive_secret(seed or credential_seed(), "s3", site)


def coordinator_s3_credentials(seed: str | None = None) -> tuple[str, str]:
    """(access_key, secret_key) of the coordinator's scoped S3 identity."""
    return COORDINATOR_USER, derive_secret(seed or credential_seed(), "s3", COORDINATOR_USER)


def site_amqp_credentials(site: str, seed: str | None = None) -> tuple[str, str]:
    """(user, password) of a site's RabbitMQ user."""
    return site_user(site), derive_secret(seed or credential_seed(), "amqp", site)


def broker_url(
    user: str,
    password: str,
    host: str = "127.0.0.1",
    vhost: str = DEFAULT_VHOST,
    tls: bool = False,
    port: int | None = None,
) -> str:
    """AMQP URL for kombu/Celery (``amqps://`` on 5671 when ``tls``)."""
    scheme, default_port = ("amqps", 5671) if tls else ("amqp", 5672)
    creds = f"{quote(user, safe='')}:{quote(password, safe='')}"
    return f"{scheme}://{creds}@{host}:{port or default_port}/{quote(vhost, safe='')}"


# ----------------------------------------------------------------------------- S3


def site_bucket(prefix: str, site: str) -> str:
    return _site_bucket(prefix, _check_site(site))


def all_buckets(prefix: str, sites: Iterable[str]) -> list[str]:
    return [global_bucket(prefix), coordinator_bucket(prefix)] + [
        site_bucket(prefix, s) for s in sites
    ]


def s3_identities(
    admin_access: str,
    admin_secret: str,
    sites: Sequence[str],
    prefix: str = DEFAULT_PREFIX,
    site_secrets: dict[str, str] | None = None,
    seed: str | None = None,
) -> dict:
    """SeaweedFS ``-s3.config`` identities: admin, plus one scoped identity per site.

    A site gets Read/Write/List/Tagging on its own bucket and Read/List on the
    global bucket; nothing else (bucket-scoped actions ``Action:bucket``): in
    particular not the coordinator bucket, which holds every site's history.
    """
    identities: list[dict] = [
        {
            "name": "admin",
            "credentials": [{"accessKey": admin_access, "secretKey": admin_secret}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
    ]
    # The coordinator reads what sites upload and writes the global bucket, nothing else:
    # it needs no admin keys (buckets are created here, at provisioning).
    coord_access, coord_secret = coordinator_s3_credentials(seed)
    coord_actions = [
        f"{action}:{bucket}"
        for bucket in (global_bucket(prefix), coordinator_bucket(prefix))
        for action in ("Read", "Write", "List")
    ]
    for site in sites:
        own = site_bucket(prefix, site)
        coord_actions += [f"Read:{own}", f"List:{own}"]
    identities.append(
        {
            "name": COORDINATOR_USER,
            "credentials": [{"accessKey": coord_access, "secretKey": coord_secret}],
            "actions": coord_actions,
        }
    )
    for site in sites:
        access, secret = site_s3_credentials(site, seed)
        if site_secrets and site in site_secrets:
            secret = site_secrets[site]
        own, glob = site_bucket(prefix, site), global_bucket(prefix)
        identities.append(
            {
                "name": site_user(site),
                "credentials": [{"accessKey": access, "secretKey": secret}],
                "actions": [
                    f"Read:{own}",
                    f"Write:{own}",
                    f"List:{own}",
                    f"Tagging:{own}",
                    f"Read:{glob}",
                    f"List:{glob}",
                ],
            }
        )
    return {"identities": identities}


def minio_coordinator_policy(prefix: str, sites: Sequence[str]) -> dict:
    """IAM policy of the coordinator for MinIO: same rights as in :func:`s3_identities`
    (read every site bucket; read and write the global and the coordinator bucket)."""
    own = [global_bucket(prefix), coordinator_bucket(prefix)]
    site_buckets = [site_bucket(prefix, s) for s in sites]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
                "Resource": [f"arn:aws:s3:::{b}" for b in own + site_buckets],
            },
            {
                "Effect": "Allow",
                # Delete: retention of old globals (core/retention.py).
                "Action": [
                    "s3:GetObject",
                    "s3:PutObject",
                    "s3:AbortMultipartUpload",
                    "s3:DeleteObject",
                ],
                "Resource": [f"arn:aws:s3:::{b}/*" for b in own],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{b}/*" for b in site_buckets],
            },
        ],
    }


def minio_site_policy(prefix: str, site: str) -> dict:
    """IAM policy for MinIO (docker-compose stack): same rights as :func:`s3_identities`."""
    own, glob = site_bucket(prefix, site), global_bucket(prefix)
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
                "Resource": [f"arn:aws:s3:::{own}", f"arn:aws:s3:::{glob}"],
            },
            {
                "Effect": "Allow",
                # Delete: retention of the site's own old updates (core/retention.py).
                "Action": [
                    "s3:GetObject",
                    "s3:PutObject",
                    "s3:AbortMultipartUpload",
                    "s3:DeleteObject",
                ],
                "Resource": [f"arn:aws:s3:::{own}/*"],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{glob}/*"],
            },
        ],
    }


# ----------------------------------------------------------------------- RabbitMQ


@dataclass(frozen=True)
class AmqpPermissions:
    """RabbitMQ configure/write/read regexes (matched against resource names)."""

    configure: str
    write: str
    read: str


def _exact(*names: str) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def site_permissions(site: str) -> AmqpPermissions:
    """Exactly what a site worker needs, nothing more.

    * read ``site.<id>`` (consume; basic.get/consume need read on the queue);
    * write ``fednnunet.results`` and ``fednnunet.progress`` (basic.publish needs
      write on the exchange);
    * configure nothing: the coordinator declares all topology, the worker uses
      ``no_declare=True`` and passive declares (which need no configure right).

    Binding a queue needs write on the queue, read on the exchange: both absent,
    so a site cannot bind its own queue to other sites' routing keys.
    """
    return AmqpPermissions(
        configure="^$",
        write=_exact(RESULTS_EXCHANGE, PROGRESS_EXCHANGE),
        read=_exact(site_queue(_check_site(site))),
    )


@dataclass(frozen=True)
class TopicPermission:
    """Routing-key regexes on one topic exchange (RabbitMQ topic authorisation)."""

    exchange: str
    write: str
    read: str


def site_topic_permission(site: str) -> TopicPermission:
    """A site may only publish progress under its own id: ``<experiment>.<site>.<kind>``.

    Without this, a site could forge heartbeats for another site and keep a dead
    site's task from being re-dispatched.
    """
    return TopicPermission(
        exchange=PROGRESS_EXCHANGE,
        write=rf"^[^.]+\.{re.escape(_check_site(site))}\.[^.]+$",
        read="^$",
    )


def coordinator_permissions() -> AmqpPermissions:
    return AmqpPermissions(configure=".*", write=".*", read=".*")


@dataclass(frozen=True)
class Queue:
    name: str
    exchange: str
    routing_key: str


def topology(sites: Sequence[str]) -> tuple[list[tuple[str, str]], list[Queue]]:
    """(exchanges as (name, type), durable queues with their single binding)."""
    exchanges = [(TASKS_EXCHANGE, "direct"), (RESULTS_EXCHANGE, "direct")]
    exchanges += [(CONTROL_EXCHANGE, "direct"), (PROGRESS_EXCHANGE, "topic")]
    queues = [
        Queue(COORDINATOR_QUEUE, RESULTS_EXCHANGE, COORDINATOR_QUEUE),
        Queue(CONTROL_QUEUE, CONTROL_EXCHANGE, CONTROL_QUEUE),
    ]
    queues += [Queue(site_queue(s), TASKS_EXCHANGE, site_queue(_check_site(s))) for s in sites]
    return exchanges, queues


def rabbitmq_definitions(
    sites: Sequence[str] = DEFAULT_SITES,
    vhost: str = DEFAULT_VHOST,
    coordinator_password: str | None = None,
    seed: str | None = None,
    site_passwords: dict[str, str] | None = None,
) -> dict:
    """RabbitMQ definitions (``load_definitions``) for the compose stack.

    Passwords are written as ``password`` (RabbitMQ hashes them on import). The
    committed file uses the dev seed; production regenerates it with its own seed.
    """
    seed = seed or credential_seed()
    coord_pw = coordinator_password or derive_secret(seed, "amqp", COORDINATOR_USER)
    users = [{"name": COORDINATOR_USER, "password": coord_pw, "tags": "administrator"}]
    perms = [_perm_entry(COORDINATOR_USER, vhost, coordinator_permissions())]
    topic_perms = []
    for site in sites:
        user, pw = site_amqp_credentials(site, seed)
        if site_passwords and site in site_passwords:
            pw = site_passwords[site]
        users.append({"name": user, "password": pw, "tags": ""})
        perms.append(_perm_entry(user, vhost, site_permissions(site)))
        t = site_topic_permission(site)
        topic_perms.append(
            {"user": user, "vhost": vhost, "exchange": t.exchange, "write": t.write, "read": t.read}
        )
    exchanges, queues = topology(sites)
    return {
        "rabbit_version": "3.13.0",
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": perms,
        "topic_permissions": topic_perms,
        "exchanges": [
            {
                "name": n,
                "vhost": vhost,
                "type": t,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for n, t in exchanges
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": {},
            }
            for q in queues
        ],
        "bindings": [
            {
                "source": q.exchange,
                "vhost": vhost,
                "destination": q.name,
                "destination_type": "queue",
                "routing_key": q.routing_key,
                "arguments": {},
            }
            for q in queues
        ],
    }


def _perm_entry(user: str, vhost: str, p: AmqpPermissions) -> dict:
    return {
        "user": user,
        "vhost": vhost,
        "configure": p.configure,
        "write": p.write,
        "read": p.read,
    }


# ------------------------------------------------------------- rabbitmqctl (I/O)


def _ctl(rabbitmqctl: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(  # noqa: S603 - broker admin tool, fixed argv
        [rabbitmqctl, *args], capture_output=True, text=True, check=check, timeout=120
    )


def ensure_vhost(vhost: str, rabbitmqctl: str = "rabbitmqctl") -> None:
    vhosts = _ctl(rabbitmqctl, "-q", "list_vhosts", "--formatter", "json").stdout
    if vhost not in {v["name"] for v in json.loads(vhosts or "[]")}:
        _ctl(rabbitmqctl, "add_vhost", vhost)


def ensure_user(
    user: str,
    password: str,
    perms: AmqpPermissions,
    vhost: str = DEFAULT_VHOST,
    tags: str = "",
    rabbitmqctl: str = "rabbitmqctl",
    topic: TopicPermission | None = None,
) -> None:
    """Create or update one user and its permissions on an existing ``vhost`` (idempotent)."""
    added = _ctl(rabbitmqctl, "add_user", user, password, check=False)
    if added.returncode != 0:
        if "already exists" not in (added.stdout + added.stderr):
            raise RuntimeError(f"rabbitmqctl add_user {user} failed: {added.stderr.strip()}")
        _ctl(rabbitmqctl, "change_password", user, password)
    _ctl(rabbitmqctl, "set_user_tags", user, *([tags] if tags else []))
    regexes = (perms.configure, perms.write, perms.read)
    _ctl(rabbitmqctl, "set_permissions", "-p", vhost, user, *regexes)
    if topic is not None:
        _ctl(
            rabbitmqctl, "set_topic_permissions", "-p", vhost, user,
            topic.exchange, topic.write, topic.read,
        )  # fmt: skip


def delete_user(user: str, rabbitmqctl: str = "rabbitmqctl") -> None:
    _ctl(rabbitmqctl, "delete_user", user, check=False)


def provision_broker(
    sites: Sequence[str],
    vhost: str = DEFAULT_VHOST,
    coordinator_password: str | None = None,
    seed: str | None = None,
    rabbitmqctl: str = "rabbitmqctl",
) -> dict[str, str]:
    """Create the coordinator and per-site users on a running broker; returns user->password."""
    seed = seed or credential_seed()
    coord_pw = coordinator_password or derive_secret(seed, "amqp", COORDINATOR_USER)
    ensure_vhost(vhost, rabbitmqctl)
    ensure_user(
        COORDINATOR_USER, coord_pw, coordinator_permissions(), vhost, "administrator", rabbitmqctl
    )
    out = {COORDINATOR_USER: coord_pw}
    for site in sites:
        user, pw = site_amqp_credentials(site, seed)
        topic = site_topic_permission(site)
        ensure_user(user, pw, site_permissions(site), vhost, "", rabbitmqctl, topic)
        out[user] = pw
    return out


def declare_topology(channel, sites: Sequence[str]) -> None:
    """Declare exchanges, queues and bindings with an admin (coordinator) pika channel."""
    exchanges, queues = topology(sites)
    for name, kind in exchanges:
        channel.exchange_declare(name, exchange_type=kind, durable=True)
    for q in queues:
        channel.queue_declare(q.name, durable=True)
        channel.queue_bind(q.name, q.exchange, routing_key=q.routing_key)


# ---------------------------------------------------------------------------- CLI


def _sites_from_env() -> list[str]:
    return os.environ.get("FEDNNUNET_SITES", " ".join(DEFAULT_SITES)).split()


def main(argv: Sequence[str] | None = None) -> int:
    """Small CLI used by deploy/local/stack.sh and broker_config/provision.py."""
    ap = argparse.ArgumentParser(prog="python -m fednnunet.deploy.provisioning")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ident = sub.add_parser("s3-identities", help="print the SeaweedFS identities JSON")
    defs = sub.add_parser("rabbitmq-definitions", help="print RabbitMQ definitions JSON")
    creds = sub.add_parser("site-credentials", help="print a site's S3 and AMQP credentials")
    creds.add_argument("site")
    buckets = sub.add_parser("buckets", help="print bucket names, one per line")
    for p in (ident, defs, buckets):
        p.add_argument("--sites", nargs="*", default=None)
        p.add_argument("--prefix", default=os.environ.get("FEDNNUNET_BUCKET_PREFIX", "fednnunet"))
    defs.add_argument("--vhost", default=DEFAULT_VHOST)
    a = ap.parse_args(argv)
    sites = getattr(a, "sites", None) or _sites_from_env()
    if a.cmd == "s3-identities":
        access = os.environ.get("FEDNNUNET_S3_ACCESS_KEY", DEFAULT_ADMIN_ACCESS)
        secret = os.environ.get("FEDNNUNET_S3_SECRET_KEY", DEFAULT_ADMIN_SECRET)
        print(json.dumps(s3_identities(access, secret, sites, a.prefix), indent=2))
    elif a.cmd == "rabbitmq-definitions":
        print(json.dumps(rabbitmq_definitions(sites, a.vhost), indent=2))
    elif a.cmd == "buckets":
        print("\n".join(all_buckets(a.prefix, sites)))
    else:
        s3a, s3s = site_s3_credentials(a.site)
        mqu, mqp = site_amqp_credentials(a.site)
        print(f"FEDNNUNET_S3_ACCESS_KEY={s3a}\nFEDNNUNET_S3_SECRET_KEY={s3s}")
        print(f"AMQP_USER={mqu}\nAMQP_PASSWORD={mqp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
