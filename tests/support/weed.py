"""A private SeaweedFS S3 server (``weed mini``) for one test: own ports, data and keys.

Tests that stop S3, serve it over TLS or bind it to a namespace address need a server
of their own rather than the shared local stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

GRPC_OFFSET = 10000  # weed listens on port p (http) and p + 10000 (grpc) for each service


def free_port_block(addr: str = "127.0.0.1", width: int = 5) -> int:
    """A base port p with p..p+width-1 and their grpc twins free on ``addr`` and loopback."""
    hosts = {addr, "127.0.0.1"}
    for _ in range(300):
        base = random.randrange(20000, 54000, 10)  # noqa: S311 - a random port to try, not a secret
        ports = [base + i for i in range(width)] + [base + GRPC_OFFSET + i for i in range(width)]
        try:
            for port in ports:
                for host in hosts:
                    with socket.socket() as s:
                        s.bind((host, port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port block")


def admin_identities(access_key: str, secret_key: str) -> dict:
    return {"identities": [{
        "name": "admin",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}  # fmt: skip


def weed_binary() -> str:
    weed = str(Path(sys.executable).parent / "weed")
    return weed if os.access(weed, os.X_OK) else (shutil.which("weed") or weed)


class WeedStartFailed(RuntimeError):
    def __init__(self, message: str, died: bool) -> None:
        super().__init__(message)
        self.died = died


class WeedServer:
    """Start/stop a ``weed mini``; restarting it on the same folder keeps the objects."""

    def __init__(
        self,
        data_dir: Path,
        identities: dict,
        addr: str = "127.0.0.1",
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        memlimit: str = "256MiB",
        stop_grace_s: float = 15.0,
    ) -> None:
        self.dir, self.addr = Path(data_dir), addr
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self._own_ports = port is None  # chosen here: another block may be tried
        self.port = port if port is not None else free_port_block(addr)
        self.identities = self.dir / "identities.json"
        self.identities.write_text(json.dumps(identities))
        self.identities.chmod(0o600)
        self.extra_args = tuple(extra_args)
        self.memlimit, self.stop_grace_s = memlimit, stop_grace_s
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.addr}:{self.port}"

    def argv(self) -> list[str]:
        p, a, g = self.port, self.addr, GRPC_OFFSET
        services = ("s3", "master", "volume", "filer", "admin")
        ports = [f"-{name}.port={p + i}" for i, name in enumerate(services)]
        ports += [f"-{name}.port.grpc={p + g + i}" for i, name in enumerate(services)]
        return [
            weed_binary(), "mini", f"-dir={self.dir / 'data'}", f"-ip={a}", f"-ip.bind={a}",
            *ports, f"-s3.config={self.identities}", "-admin.ui=false", "-webdav=false",
            "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout_s: float = 60, attempts: int = 3) -> None:
        """Start and wait until S3 answers. A server that exits during start-up on ports
        chosen here (one of weed's many listeners lost a race for its port to another
        process) is started again on another free block."""
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(timeout_s)
                return
            except WeedStartFailed as exc:
                if not (exc.died and self._own_ports) or attempt == attempts:
                    raise
                self.port = free_port_block(self.addr)

    def _start_once(self, timeout_s: float) -> None:
        log = open(self.dir / "weed.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(  # noqa: S603 - the weed binary of our venv, argv list
            self.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, GOMEMLIMIT=self.memlimit),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.answers():
                return
            time.sleep(0.2)
        died = self.proc.poll() is not None
        tail = (self.dir / "weed.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise WeedStartFailed(f"private S3 did not come up on {self.endpoint}:\n{tail}", died)

    def answers(self) -> bool:
        """Any HTTP status (403 for anonymous requests) means S3 is serving."""
        try:
            urllib.request.urlopen(f"http://{self.endpoint}/", timeout=1)  # noqa: S310
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=self.stop_grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
