"""The test suite's own corner of the services, so it runs beside anyone else's stack.

A second clone's ``deploy/local/stack.sh up`` (S3 on 8333) and its experiments in
Redis must neither fail the suite nor see it. So a test session gets

* its own S3 server: SeaweedFS on a free port block, data in ``<repo>/.stack-test``,
  with the same identities and buckets as ``stack.sh`` (admin + sites 901-903). It is
  left running and reused by the next session of this clone (a restart costs seconds);
  ``python -m tests.support.private_stack down`` (``scripts/test.sh`` at its end) stops it;
* its own RabbitMQ virtual host ``fednnunet-test-<token>`` (made with ``rabbitmqctl``,
  deleted afterwards; without ``rabbitmqctl`` the configured broker URL is used, and
  the session header says so);
* its own Redis namespace ``fednnunet-test-<token>`` (keys deleted afterwards), so
  ``fednnunet experiment list`` in the user's namespace never shows the suite's runs.

Worker and coordinator sub-processes read ``FEDNNUNET_*`` from the environment, so the
session exports these values into ``os.environ`` (see ``tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.support.weed import WeedServer, free_port_block

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = Path(os.environ.get("FEDNNUNET_TEST_STACK_DIR", REPO / ".stack-test"))
SITES = ("901", "902", "903")  # the sites whose scoped S3 identities tests use
TEST_PREFIX = "fednnunet-test-"


# ---------------------------------------------------------------- S3
@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Concurrent sessions of one clone start at most one server."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _record(state_dir: Path) -> dict | None:
    path = state_dir / "server.json"
    return json.loads(path.read_text()) if path.exists() else None


def _ours_and_alive(rec: dict, state_dir: Path) -> bool:
    """The recorded pid is still the weed serving ``state_dir`` (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{rec['pid']}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "weed" in cmdline and str(state_dir / "s3") in cmdline


def _answers(endpoint: str) -> bool:
    """Any HTTP status (403 for anonymous requests) means S3 is serving."""
    try:
        urllib.request.urlopen(f"http://{endpoint}/", timeout=2)  # noqa: S310 - fixed http URL
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def _identities(access: str, secret: str, prefix: str) -> dict:
    from fednnunet.deploy.provisioning import s3_identities

    return s3_identities(access, secret, list(SITES), prefix)


def _make_buckets(endpoint: str, access: str, secret: str, prefix: str) -> None:
    from minio import Minio

    from fednnunet.deploy.provisioning import all_buckets

    client = Minio(endpoint, access_key=access, secret_key=secret, secure=False)
    for bucket in all_buckets(prefix, SITES):
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)


def ensure_s3(access: str, secret: str, prefix: str, state_dir: Path = STATE_DIR) -> str:
    """Endpoint of this clone's test S3 server: the running one, else a new one."""
    with _locked(state_dir):
        rec = _record(state_dir)
        want = {
            "access": access,
            "secret_sha256": hashlib.sha256(secret.encode()).hexdigest(),
            "prefix": prefix,
            # A changed identity layout (new bucket, new rights) needs a fresh server.
            "identities_sha256": hashlib.sha256(
                json.dumps(_identities(access, secret, prefix), sort_keys=True).encode()
            ).hexdigest(),
        }
        if rec and _ours_and_alive(rec, state_dir):
            if rec.get("config") == want and _answers(rec["endpoint"]):
                _make_buckets(rec["endpoint"], access, secret, prefix)
                return rec["endpoint"]
            _stop_pid(rec["pid"])  # other keys or prefix: start afresh
        server = WeedServer(
            state_dir / "s3",
            _identities(access, secret, prefix),
            port=free_port_block(),
            extra_args=("-master.volumeSizeLimitMB=256", "-volume.max=4000"),
            memlimit="512MiB",
        )
        server.start()
        record = {"pid": server.proc.pid, "endpoint": server.endpoint, "config": want}
        (state_dir / "server.json").write_text(json.dumps(record))
        _make_buckets(server.endpoint, access, secret, prefix)
        return server.endpoint


def _stop_pid(pid: int, grace_s: float = 15.0) -> None:
    """SIGTERM the server's process group (it runs in its own session), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def stop_s3(state_dir: Path = STATE_DIR) -> bool:
    """Stop this clone's test S3 server if it runs; True if one was stopped."""
    with _locked(state_dir):
        rec = _record(state_dir)
        (state_dir / "server.json").unlink(missing_ok=True)
        if rec and _ours_and_alive(rec, state_dir):
            _stop_pid(rec["pid"])
            return True
        return False


# ---------------------------------------------------------------- RabbitMQ and Redis
def rabbitmqctl_usable() -> bool:
    return shutil.which("rabbitmqctl") is not None and os.geteuid() == 0


def _ctl(*args: str) -> None:
    # rabbitmqctl from PATH: the broker's own admin tool (run as root in CI and dev).
    subprocess.run(  # noqa: S603 - broker admin tool, fixed argv
        ["rabbitmqctl", "-q", *args],  # noqa: S607 - rabbitmqctl from PATH
        check=True,
        capture_output=True,
        timeout=120,  # noqa: S607 - broker admin tool, fixed argv
    )


def with_vhost(broker_url: str, vhost: str) -> str:
    return urlunsplit(urlsplit(broker_url)._replace(path="/" + vhost.replace("/", "%2F")))


def delete_namespace(redis_url: str, namespace: str) -> int:
    """Delete every key of ``namespace``; the number deleted."""
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{namespace}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])
    return len(keys)


@dataclass
class SessionServices:
    """What one test session uses; ``env`` is exported to the session's processes."""

    token: str
    namespace: str
    vhost: str | None = None
    s3_endpoint: str | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def new(cls) -> SessionServices:
        token = secrets.token_hex(3)
        return cls(token=token, namespace=f"{TEST_PREFIX}{token}")

    def env(self, broker_url: str) -> dict[str, str]:
        out = {"FEDNNUNET_REDIS_NAMESPACE": self.namespace}
        if self.vhost is not None:
            out["FEDNNUNET_BROKER_URL"] = with_vhost(broker_url, self.vhost)
        if self.s3_endpoint is not None:
            out["FEDNNUNET_S3_ENDPOINT"] = self.s3_endpoint
            out["FEDNNUNET_S3_PORT"] = self.s3_endpoint.rsplit(":", 1)[1]
        return out

    def open_vhost(self) -> None:
        if not rabbitmqctl_usable():
            self.notes.append(
                "rabbitmqctl unavailable (not installed or not root): the suite uses the "
                "configured broker URL (default vhost '/'); its queues are shared with any "
                "other stack on that vhost"
            )
            return
        vhost = f"{TEST_PREFIX}{self.token}"
        _ctl("add_vhost", vhost)
        _ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        self.vhost = vhost

    def close(self, redis_url: str) -> None:
        """Delete the vhost and the namespace's keys (the S3 server stays for reuse)."""
        try:
            if self.vhost is not None:
                _ctl("delete_vhost", self.vhost)
        finally:
            with contextlib.suppress(Exception):  # Redis down: nothing of ours is there
                delete_namespace(redis_url, self.namespace)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.support.private_stack up|down|status``."""
    from fednnunet.settings import get_settings

    cmd = (list(argv if argv is not None else sys.argv[1:]) or ["status"])[0]
    settings = get_settings()
    if cmd == "up":
        print(ensure_s3(settings.s3_access_key, settings.s3_secret_key, settings.bucket_prefix))
    elif cmd == "down":
        print("stopped" if stop_s3() else "not running")
    elif cmd == "status":
        rec = _record(STATE_DIR)
        alive = bool(rec and _ours_and_alive(rec, STATE_DIR))
        print(f"test S3 {'up at ' + rec['endpoint'] if alive else 'down'} ({STATE_DIR})")
    else:
        print("usage: python -m tests.support.private_stack up|down|status", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
