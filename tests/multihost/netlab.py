"""A tiny multi-host lab on one machine: network namespaces on a private bridge.

Why: the federation must work when the coordinator, the central services and each
hospital are different hosts that only share a network link, and must survive a
hospital's link going down. Namespaces give each process its own network stack
(own loopback, own routes) so nothing can silently fall back to ``127.0.0.1``.

Layout (``X`` is a random third octet of 10.231.X.0/24, which exists only here)::

    root namespace = central host: bridge fnb<tok> with 10.231.X.1 (broker, S3)
                                   and 10.231.X.2 (Redis, coordinator only)
    namespace per host: one veth into the bridge, one /32 address, and host
                        routes only to the central addresses it may use

RabbitMQ and Redis of the machine listen on loopback only, so :class:`TcpForwarder`
relays the central addresses to them. Every resource is named with a random token
and removed by :meth:`NetLab.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from fednnunet.deploy.provisioning import s3_identities
from tests.support.weed import WeedServer

SUBNET_PREFIX = "10.231"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)  # noqa: S603, S607 - iproute2, fixed argv


def unavailable_reason() -> str | None:
    """Why this machine cannot run the lab (None when it can): root and ``ip netns``."""
    if os.geteuid() != 0:
        return "needs root (creates network namespaces and veth pairs)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip netns`)"
    probe = f"fnprobe{secrets.token_hex(3)}"
    res = ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def _free_octet() -> int:
    used = ip("-4", "-o", "addr").stdout + ip("-4", "route").stdout
    for x in random.sample(range(1, 255), 254):
        if f"{SUBNET_PREFIX}.{x}." not in used:
            return x
    raise RuntimeError(f"no free {SUBNET_PREFIX}.X.0/24 subnet")


class NetLab:
    """Bridge + namespaces. ``central`` (.1) and ``redis_addr`` (.2) live in the root ns."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(2)
        self.octet = _free_octet()
        self.bridge = f"fnb{self.token}"
        self.central = self.addr(1)
        self.redis_addr = self.addr(2)
        self.hosts: dict[str, dict] = {}
        self._created_bridge = False

    def addr(self, host: int) -> str:
        return f"{SUBNET_PREFIX}.{self.octet}.{host}"

    def open(self) -> NetLab:
        ip("link", "add", self.bridge, "type", "bridge")
        self._created_bridge = True
        ip("addr", "add", f"{self.central}/24", "dev", self.bridge)
        ip("addr", "add", f"{self.redis_addr}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        return self

    def add_host(self, name: str, host: int, routes: list[str]) -> str:
        """A namespace with one link to the bridge; it can reach only ``routes``."""
        i = len(self.hosts)
        ns, outer, inner = f"fn{self.token}-{name}", f"fnh{self.token}{i}", f"fnp{self.token}{i}"
        address = self.addr(host)
        self.hosts[name] = {"ns": ns, "outer": outer, "inner": inner, "addr": address}
        self.hosts[name]["routes"] = list(routes)
        ip("netns", "add", ns)
        ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
        ip("link", "set", outer, "master", self.bridge)
        ip("link", "set", outer, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "addr", "add", f"{address}/32", "dev", inner)
        ip("-n", ns, "link", "set", inner, "up")
        for dest in routes:
            ip("-n", ns, "route", "add", f"{dest}/32", "dev", inner)
        return address

    def ns(self, name: str) -> str:
        return self.hosts[name]["ns"]

    def exec_argv(self, name: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name), *argv]

    def cut(self, name: str) -> None:
        """Pull the host's cable (central side): its TCP connections stall, not reset."""
        ip("link", "set", self.hosts[name]["outer"], "down")

    def restore(self, name: str) -> None:
        h = self.hosts[name]
        ip("link", "set", h["outer"], "up")
        for dest in h["routes"]:
            ip("-n", h["ns"], "route", "replace", f"{dest}/32", "dev", h["inner"])

    def probe(self, name: str, targets: list[tuple[str, int]], timeout_s: float = 1.0) -> dict:
        """From inside ``name``: which (addr, port) accept a TCP connection ("ok" or the error)."""
        code = (
            "import json, socket, sys\n"
            "out = {}\n"
            "for h, p in json.loads(sys.argv[1]):\n"
            "    try:\n"
            f"        socket.create_connection((h, p), timeout={timeout_s}).close()\n"
            "        out[f'{h}:{p}'] = 'ok'\n"
            "    except OSError as e:\n"
            "        out[f'{h}:{p}'] = type(e).__name__ + ': ' + str(e)\n"
            "print(json.dumps(out))\n"
        )
        argv = self.exec_argv(name, [sys.executable, "-c", code, json.dumps(targets)])
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)  # noqa: S603 - own interpreter, argv list, no shell
        return json.loads(res.stdout)

    def close(self) -> list[str]:
        """Remove every namespace (and with it its veth pair) and the bridge; return errors."""
        errors = []
        for h in self.hosts.values():
            res = ip("netns", "del", h["ns"], check=False)
            if res.returncode != 0:
                errors.append(res.stderr.strip())
        if self._created_bridge:
            res = ip("link", "del", self.bridge, check=False)
            if res.returncode != 0:
                errors.append(res.stderr.strip())
        return errors


class TcpForwarder:
    """Relays ``listen`` -> ``target`` (asyncio, in a thread of the test process).

    Stands in for the central host's firewall/NAT: RabbitMQ and Redis here only
    listen on loopback. The relay connects from 127.0.0.1, so RabbitMQ's guest user
    (loopback-only) works through it.
    """

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen, self.target = listen, target
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._run, name=f"fwd-{listen}", daemon=True)

    def start(self) -> TcpForwarder:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, *self.listen, reuse_address=True)
            )
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers -= {writer, up_writer}

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        def _shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                with contextlib.suppress(Exception):
                    w.transport.abort()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.call_later(0.2, self._loop.stop)

        self._loop.call_soon_threadsafe(_shutdown)
        self._thread.join(timeout=10)


class PrivateWeed(WeedServer):
    """A SeaweedFS ``weed mini`` of this test only, bound to the central address.

    Admin keys for the coordinator plus one bucket-scoped identity per site
    (:func:`s3_identities`), as on a real central node. Telemetry off: nothing leaves.
    Stopped after 3 s (its graceful shutdown takes ~12 s; the data is scratch).
    """

    def __init__(self, data_dir: Path, addr: str, admin: tuple[str, str], sites: list[str]):
        super().__init__(
            data_dir,
            s3_identities(admin[0], admin[1], sites),
            addr=addr,
            memlimit="512MiB",
            stop_grace_s=3,
        )
