"""Artifacts in S3 (MinIO, SeaweedFS, AWS): write-once, sha256-verified, retried.

Every object carries its sha256 in its metadata; every reader verifies size and
sha256 against the reference it was given before using a byte. Objects are
never overwritten: writing a key again with the same bytes is a no-op (so a
redelivered task is harmless), with different bytes it is an error.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from minio import Minio
from minio.error import S3Error

from fednnunet.adapters.buffers import SpanHasher, uninitialized_bytearray
from fednnunet.background import low_priority_pool
from fednnunet.errors import FedError, IntegrityError, ServiceUnreachable
from fednnunet.messages import ArtifactRef
from fednnunet.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
SHA_META = "sha256"
_NOT_FOUND = {"NoSuchKey", "NoSuchObject", "NoSuchBucket", "ResourceNotFound"}
# One PUT per object up to this size. The client's default (5 MiB parts, a multipart
# upload, parts sent from a thread pool) costs the server far more per byte: measured
# on SeaweedFS, a 31 MB global took 0.4-1.4 s as 7 parts and 0.26 s as one PUT.
SINGLE_PUT_BYTES = 256 << 20
# Carries a PUT body's sha256, known beforehand, to PayloadHashMinio (never sent).
_KNOWN_SHA256 = "X-Fednnunet-Known-Sha256"


def sha256_bytes(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(4 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tls_problem(exc: BaseException) -> str | None:
    """Why TLS failed, if it did in a way that retrying cannot fix (untrusted or
    mismatched certificate, not a TLS server, unreadable CA file); else None.

    An EOF or reset during the handshake is left to the retry loop (server restarting).
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS verification failed: {e.verify_message or e.reason or e}"
        if isinstance(e, ssl.SSLError) and not isinstance(
            e, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
        ):
            return f"TLS handshake failed: {e.reason or e}"
        if isinstance(e, urllib3.exceptions.SSLError) and isinstance(
            e.args[0] if e.args else None, OSError
        ):
            inner = e.args[0]
            if not isinstance(inner, ssl.SSLError):  # e.g. the CA file cannot be read
                return f"TLS setup failed: {inner}"
        reason = getattr(e, "reason", None)  # urllib3 keeps the cause there
        todo.extend([reason if isinstance(reason, BaseException) else None])
        todo.extend([e.__cause__, e.__context__])
        todo.extend(a for a in e.args if isinstance(a, BaseException))
    return None


def _is_transient(exc: BaseException) -> bool:
    if _tls_problem(exc) is not None:
        return False
    if isinstance(exc, S3Error):
        return exc.code in {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"}
    return isinstance(exc, (urllib3.exceptions.HTTPError, OSError, ConnectionError))


class ObjectRefused(FedError):
    """An object that is not what its reference claims (``kind``: missing-object,
    oversized, mismatch), seen before its body is read."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind, self.reason = kind, reason
        super().__init__(reason)


def _refusal(ref: ArtifactRef, size: int, sha: str | None, max_bytes: int) -> ObjectRefused | None:
    """Why the stored object (``size``, ``sha`` metadata) is not what ``ref`` claims,
    or is over ``max_bytes``; None when it is."""
    if size > max_bytes:
        return ObjectRefused("oversized", f"{size}-byte object (limit {max_bytes})")
    if size != ref.size or sha != ref.sha256:
        return ObjectRefused(
            "mismatch",
            f"s3://{ref.bucket}/{ref.key} is {size} B sha256 {(sha or '?')[:12]}…, "
            f"the report claims {ref.size} B {ref.sha256[:12]}…",
        )
    return None


def _missing(ref: ArtifactRef) -> ObjectRefused:
    return ObjectRefused("missing-object", f"s3://{ref.bucket}/{ref.key} does not exist")


def _read_body(resp: Any, claimed: int, hashed: bool = True) -> tuple[bytearray, str]:
    """An object's body read into one buffer (``hashed``: hashed by a second thread as it
    fills, "" for the digest otherwise); at most ``claimed`` + 1 bytes are read (a larger
    body is refused by the verification, rest unread)."""
    buffer = uninitialized_bytearray(claimed + 1)  # cut to what was read, below
    view = memoryview(buffer)
    readinto = _raw_readinto(resp)
    size = 0
    hasher = SpanHasher("read-sha256") if hashed else None
    try:
        while size <= claimed:
            n = readinto(view[size : size + _READ_CHUNK])
            if not n:
                break
            if hasher is not None:
                hasher.add(view[size : size + n])
            size += n
    finally:
        digest = hasher.finish() if hasher is not None else ""
        view.release()
    del buffer[size:]
    return buffer, digest


# Read (and hash) in spans this large: long GIL-free runs for the socket and the hasher.
_READ_CHUNK = 4 << 20


def _is_bytes_of(ref: ArtifactRef, data: bytes | bytearray) -> bool:
    """Whether ``data`` is the object ``ref`` names (its size, then its sha256)."""
    return len(data) == ref.size and sha256_bytes(data) == ref.sha256


def _raw_readinto(resp: Any) -> Callable[[memoryview], int]:
    """Where the body's bytes can be read straight into the buffer: the HTTP response
    under urllib3's (one copy from the socket, where urllib3's own ``readinto`` reads a
    new ``bytes`` and copies it, 3 ms of CPU per 31 MB here) when urllib3 decodes
    nothing and holds nothing read yet; otherwise urllib3's ``readinto``."""
    raw = getattr(resp, "_fp", None)
    plain = not resp.headers.get("Content-Encoding") and getattr(resp, "_decoder", None) is None
    pending = getattr(resp, "_decoded_buffer", None)
    if plain and callable(getattr(raw, "readinto", None)) and pending is not None and not pending:
        return raw.readinto
    return resp.readinto


class PayloadHashMinio(Minio):
    """minio's client, told the sha256 of a PUT body this process already computed.

    The stock client hashes every body again itself (SigV4's payload hash over http, a
    Content-MD5 over https): one more pass over up to 125 MB per upload, on the round's
    critical path. Given the hash, it signs with it (over https too, where servers that
    verify payloads check the body against it) and does not read the body before
    sending it. Every reader verifies the sha256 either way."""

    def _build_headers(  # the one reach into minio's request building
        self,
        host: str,
        headers: dict | None = None,
        body: bytes | None = None,
        creds: Any = None,
    ) -> tuple[dict, Any]:
        known = (headers or {}).pop(_KNOWN_SHA256, None)
        if known is None or body is None or creds is None:
            return super()._build_headers(host, headers, body, creds)
        built, date = super()._build_headers(host, headers, None, creds)
        built["Content-Length"] = str(len(body))
        built["x-amz-content-sha256"] = known
        return built, date


class ArtifactStore:
    """Thin adapter over the minio client; the only code that talks to S3."""

    def __init__(
        self,
        settings: Settings,
        *,
        retry_total_s: float = 120.0,
        egress_log: str | None = None,
        cache_dir: Path | None = None,
        client: Minio | None = None,
        cache_max_bytes: int = 16 << 30,
    ) -> None:
        self.settings = settings
        self.retry_total_s = retry_total_s
        self.egress_log = (
            Path(egress_log or settings.egress_log) if (egress_log or settings.egress_log) else None
        )
        self.cache_dir = cache_dir
        # The verified-object cache is bounded: least recently used entries go first.
        self.cache_max_bytes = cache_max_bytes
        self._seeder: ThreadPoolExecutor | None = None
        self._seeding: dict[Path, Future] = {}
        self._seeding_lock = threading.Lock()
        self.max_object_bytes = settings.max_object_bytes
        self.endpoint_url = ("https://" if settings.s3_secure else "http://") + settings.s3_endpoint
        if client is None:
            ca = settings.s3_ca_file if settings.s3_secure else None
            if ca and not Path(ca).is_file():
                raise FedError(f"FEDNNUNET_S3_CA_FILE {ca} is not a readable file")
            http = urllib3.PoolManager(
                # urllib3 sends a request body under the *connect* timeout: with 5 s, a
                # 125 MB 3d_fullres update stalled by a busy S3 server was cut off and
                # retried until it gave up (measured, B2 on a loaded host). A refused
                # connection still fails at once; only a silent host waits this long.
                timeout=urllib3.Timeout(connect=30.0, read=120.0),
                retries=urllib3.Retry(
                    total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
                ),
                maxsize=16,
                cert_reqs="CERT_REQUIRED" if settings.s3_secure else "CERT_NONE",
                ca_certs=ca,
            )
            client = PayloadHashMinio(
                settings.s3_endpoint,
                access_key=settings.s3_access_key,
                secret_key=settings.s3_secret_key,
                secure=settings.s3_secure,
                region=settings.s3_region,
                http_client=http,
            )
        self.client = client

    # -- retries -----------------------------------------------------------
    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.retry_total_s
        delay = 0.25
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - filtered below
                tls = _tls_problem(exc)
                if tls is not None:
                    raise self._tls_error(what, tls) from exc
                if not _is_transient(exc) or time.monotonic() + delay > deadline:
                    if _is_transient(exc):
                        raise ServiceUnreachable("S3", self.endpoint_url, f"{what}: {exc}") from exc
                    raise
                log.warning("S3 %s failed (%s); retrying in %.1fs", what, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    def _tls_error(self, what: str, problem: str) -> FedError:
        """Not retried: a wrong CA or certificate does not fix itself."""
        return FedError(
            f"S3 at {self.endpoint_url}: {problem} ({what}); check FEDNNUNET_S3_CA_FILE "
            f"(now {self.settings.s3_ca_file or 'unset: system CAs'}) and the server certificate"
        )

    # -- buckets -----------------------------------------------------------
    def ping(self) -> None:
        """Raise ServiceUnreachable with one line if S3 does not answer."""
        try:
            self.client.bucket_exists(self.settings.bucket_prefix + "-global")
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, S3Error):
                return  # it answered (maybe AccessDenied): reachable
            tls = _tls_problem(exc)
            if tls is not None:
                raise self._tls_error("ping", tls) from exc
            raise ServiceUnreachable("S3", self.endpoint_url, type(exc).__name__) from exc

    def ensure_bucket(self, bucket: str) -> None:
        def make() -> None:
            if not self.client.bucket_exists(bucket):
                try:
                    self.client.make_bucket(bucket)
                except S3Error as exc:
                    if exc.code == "AccessDenied":
                        raise FedError(
                            f"bucket {bucket} does not exist and this S3 identity may not "
                            "create it: provision the site first (deploy/README.md)"
                        ) from None
                    if exc.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                        raise

        self._retry(f"create bucket {bucket}", make)

    # -- reading references ------------------------------------------------
    def stat(self, bucket: str, key: str) -> ArtifactRef | None:
        """The reference of an existing object (sha256 from its metadata), or None."""

        def do() -> ArtifactRef | None:
            try:
                st = self.client.stat_object(bucket, key)
            except S3Error as exc:
                if exc.code in _NOT_FOUND:
                    return None
                raise
            meta = {k.lower(): v for k, v in (st.metadata or {}).items()}
            sha = meta.get("x-amz-meta-" + SHA_META) or meta.get(SHA_META)
            if not sha:
                raise IntegrityError(f"s3://{bucket}/{key} has no sha256 metadata")
            return ArtifactRef(bucket=bucket, key=key, sha256=sha, size=int(st.size or 0))

        return self._retry(f"stat {bucket}/{key}", do)

    def list_keys(self, bucket: str, prefix: str) -> list[str]:
        def do() -> list[str]:
            try:
                return [
                    o.object_name
                    for o in self.client.list_objects(bucket, prefix=prefix, recursive=True)
                ]
            except S3Error as exc:
                if exc.code in _NOT_FOUND:
                    return []
                raise

        return self._retry(f"list {bucket}/{prefix}", do)

    # -- deleting (retention) ------------------------------------------------
    def delete(self, bucket: str, key: str, reason: str) -> None:
        """Delete one object (absent already: nothing to do). Logged beside the egress
        log's upload line, so a site's audit shows it deleted, not missing."""
        self._retry(f"delete {bucket}/{key}", lambda: self.client.remove_object(bucket, key))
        self._append_egress({"bucket": bucket, "key": key, "deleted": reason})

    def first_key_after(self, bucket: str, prefix: str, start_after: str) -> str | None:
        """The first key under ``prefix`` that sorts after ``start_after`` (one LIST)."""

        def do() -> str | None:
            try:
                listing = self.client.list_objects(
                    bucket, prefix=prefix, recursive=True, start_after=start_after
                )
                return next((o.object_name for o in listing), None)
            except S3Error as exc:
                if exc.code in _NOT_FOUND:
                    return None
                raise

        return self._retry(f"list {bucket}/{prefix} after {start_after}", do)

    # -- writing -----------------------------------------------------------
    def put_bytes(
        self,
        bucket: str,
        key: str,
        data: bytes | bytearray,
        kind: str = "blob",
        cache: bool = False,
        sha256: str | None = None,
    ) -> ArtifactRef:
        """Upload once (same bytes again: no-op); ``cache``: keep a copy for get_file;
        ``sha256``: the hash of ``data`` when this process computed it while building
        ``data`` (no second pass over bytes it produced itself)."""
        if len(data) > self.max_object_bytes:
            raise FedError(
                f"refusing to upload {len(data)} bytes to s3://{bucket}/{key}: "
                f"over the {self.max_object_bytes}-byte limit"
            )
        sha = sha256 or sha256_bytes(data)
        if not self._conditional_put(data):
            existing = self.stat(bucket, key)
            if existing is not None:
                return self._same_or_error(existing, sha, len(data))
        # A conditional PUT needs no stat first: an existing object refuses it (412),
        # and the stat below tells a no-op from a conflict (one request less per write).

        def do() -> None:
            self._put_once(bucket, key, data, sha)

        try:
            self._retry(f"put {bucket}/{key}", do)
        except S3Error as exc:
            if exc.code != "PreconditionFailed":
                raise
            # Another writer got there between our stat and our PUT: same bytes are fine.
            existing = self.stat(bucket, key)
            if existing is None:
                raise IntegrityError(f"s3://{bucket}/{key}: write refused, object missing") from exc
            return self._same_or_error(existing, sha, len(data))
        ref = ArtifactRef(bucket=bucket, key=key, sha256=sha, size=len(data))
        self._log_egress(ref, kind)
        if cache:
            self._seed_cache_later(ref, data)
        return ref

    def _conditional_put(self, data: bytes | bytearray) -> bool:
        """Whether ``data`` goes up in one PUT with ``If-None-Match: *``."""
        return len(data) <= SINGLE_PUT_BYTES and hasattr(self.client, "_put_object")

    def _put_once(self, bucket: str, key: str, data: bytes | bytearray, sha: str) -> None:
        """One PUT that only creates: ``If-None-Match: *`` makes write-once atomic on
        servers that support conditional writes (AWS, MinIO, SeaweedFS), so two writers
        racing past the stat cannot both succeed with different bytes."""
        if not self._conditional_put(data):
            self.client.put_object(
                bucket, key, io.BytesIO(data), len(data),
                metadata={SHA_META: sha}, part_size=SINGLE_PUT_BYTES,
            )  # fmt: skip
            return
        headers = {
            "If-None-Match": "*",
            "Content-Type": "application/octet-stream",
            f"x-amz-meta-{SHA_META}": sha,
        }
        if isinstance(self.client, PayloadHashMinio):
            headers[_KNOWN_SHA256] = sha  # no second hash pass over the body
        # The public put_object cannot send If-None-Match.
        self.client._put_object(bucket, key, data, headers)

    def put_file(self, bucket: str, key: str, path: Path, kind: str = "blob") -> ArtifactRef:
        size = path.stat().st_size
        if size > self.max_object_bytes:
            raise FedError(f"refusing to upload {size} bytes: over the object size limit")
        sha = sha256_file(path)
        existing = self.stat(bucket, key)
        if existing is not None:
            return self._same_or_error(existing, sha, size)
        self._retry(
            f"put {bucket}/{key}",
            lambda: self.client.fput_object(
                bucket, key, str(path), metadata={SHA_META: sha}, part_size=SINGLE_PUT_BYTES
            ),
        )
        ref = ArtifactRef(bucket=bucket, key=key, sha256=sha, size=size)
        self._log_egress(ref, kind)
        # A copy, not a link: the caller may rewrite its file.
        self._seed_cache(ref, lambda tmp: shutil.copyfile(path, tmp))
        return ref

    def cache_path(self, ref: ArtifactRef) -> Path | None:
        """Where the verified copy of ``ref`` is cached (once a pending write is done)."""
        cached = self._cache_file(ref)
        self._wait_for_seed(cached)
        return cached

    def _cache_file(self, ref: ArtifactRef) -> Path | None:
        """The cache entry of ``ref``: keyed by bucket, key and sha256, so the same bytes
        under another site's key are never mistaken for this object."""
        if self.cache_dir is None:
            return None
        ident = hashlib.sha256(f"{ref.bucket}\0{ref.key}\0{ref.sha256}".encode()).hexdigest()
        return self.cache_dir / ident

    def _seed_cache(self, ref: ArtifactRef, write: Callable[[Path], object]) -> None:
        """Keep a verified copy of ``ref`` in the cache (written aside, then renamed in):
        a later read of the same object costs no download."""
        cached = self._cache_file(ref)
        if cached is None or cached.exists():
            return
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.parent / f".up-{cached.name}-{os.getpid()}-{threading.get_ident()}"
        try:
            write(tmp)
            os.replace(tmp, cached)
            self._trim_cache(keep=cached)
        except OSError as exc:  # a cache miss later is harmless
            log.warning("could not cache %s: %s", ref.key, exc)
        finally:
            tmp.unlink(missing_ok=True)

    def _seed_cache_later(self, ref: ArtifactRef, data: bytes | bytearray) -> None:
        """Seed the cache with ``data`` (verified bytes of ``ref``) from a background
        thread: the write (67 ms for the 2d global on this disk) is off the round's
        critical path; a reader of ``ref`` waits for it."""
        cached = self._cache_file(ref)
        if cached is None:
            return
        with self._seeding_lock:
            self._seeding[cached] = self._background().submit(
                self._seed_cache, ref, lambda tmp: tmp.write_bytes(data)
            )

    def _background(self) -> ThreadPoolExecutor:
        """The low-priority thread for work this round need not wait for (cache copies,
        late hashes); the caller holds ``_seeding_lock``."""
        if self._seeder is None:
            self._seeder = low_priority_pool("cache-seed")
        for path in [p for p, f in self._seeding.items() if f.done()]:  # bounded
            del self._seeding[path]
        return self._seeder

    def _wait_for_seed(self, cached: Path | None) -> None:
        if cached is None:
            return
        with self._seeding_lock:
            pending = self._seeding.pop(cached, None)
        if pending is not None:
            pending.result()

    def _trim_cache(self, keep: Path) -> None:
        """Drop least recently used entries until the cache fits ``cache_max_bytes``."""
        if self.cache_dir is None:
            return
        entries = []
        for entry in self.cache_dir.iterdir():
            try:
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                st = entry.stat()
            except FileNotFoundError:  # trimmed meanwhile by another thread
                continue
            entries.append((st.st_mtime, st.st_size, entry))
        total = sum(size for _, size, _ in entries)
        for _, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= self.cache_max_bytes:
                break
            if entry != keep:
                entry.unlink(missing_ok=True)
                total -= size

    def put_json(self, bucket: str, key: str, obj: Any, kind: str = "json") -> ArtifactRef:
        data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        return self.put_bytes(bucket, key, data, kind=kind)

    @staticmethod
    def _same_or_error(existing: ArtifactRef, sha: str, size: int) -> ArtifactRef:
        if existing.sha256 != sha or existing.size != size:
            raise IntegrityError(
                f"s3://{existing.bucket}/{existing.key} already exists with different content "
                "(artifacts are write-once)"
            )
        return existing

    def _log_egress(self, ref: ArtifactRef, kind: str) -> None:
        self._append_egress(
            {"bucket": ref.bucket, "key": ref.key, "kind": kind, "bytes": ref.size,
             "sha256": ref.sha256}
        )  # fmt: skip

    def _append_egress(self, entry: dict[str, Any]) -> None:
        """One timestamped JSON line in the site's egress log (when it has one)."""
        if self.egress_log is None:
            return
        self.egress_log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.egress_log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": time.time()} | entry) + "\n")

    # -- reading (verified) --------------------------------------------------
    def _check_ref_size(self, ref: ArtifactRef) -> None:
        if ref.size > self.max_object_bytes:
            raise FedError(f"refusing to download {ref.size} bytes: over the object size limit")

    def get_bytes(self, ref: ArtifactRef, cache: bool = False) -> bytearray:
        """The object's bytes, verified. ``cache``: served from the verified cache when
        there, else downloaded and cached in the background (nothing waits for the disk).

        Read into one buffer, hashed as it arrives: a 31 MB object in 28 ms here, where
        the file download takes 46 ms (the disk write) and ``read()`` 52 ms (copies)."""
        self._check_ref_size(ref)
        if cache and (data := self.get_cached(ref)) is not None:
            return data
        data, sha = self._retry(f"get {ref.bucket}/{ref.key}", lambda: self._read_capped(ref))
        self._verify(ref, len(data), sha)
        if cache:
            self._seed_cache_later(ref, data)
        return data

    def get_cached(self, ref: ArtifactRef) -> bytearray | None:
        """The cached copy of ``ref``, verified again; None if there is none (a copy
        that fails verification is removed)."""
        cached = self.cache_path(ref)
        if cached is None or not cached.exists():
            return None
        try:
            os.utime(cached)
            data = uninitialized_bytearray(cached.stat().st_size)
            with open(cached, "rb") as fh:
                size = fh.readinto(data)
        except FileNotFoundError:  # trimmed meanwhile
            return None
        # Checked again: the cached bytes were shared with their tensors while the
        # background write ran (only redelivered tasks read this copy).
        if size == len(data) and _is_bytes_of(ref, data):  # all read
            return data
        log.warning("cached copy of %s failed verification; downloading again", ref.key)
        cached.unlink(missing_ok=True)
        return None

    def read_unverified(self, ref: ArtifactRef) -> bytearray:
        """The object's bytes, not hashed yet: at most ``ref.size`` + 1 bytes are read and
        another size is refused. For a caller that hashes them later, while it works
        (:meth:`verify_later`), and lets nothing derived from them leave before that
        check passes: the hash is then off its critical path."""
        self._check_ref_size(ref)
        data, _ = self._retry(
            f"get {ref.bucket}/{ref.key}", lambda: self._read_capped(ref, hashed=False)
        )
        if len(data) != ref.size:
            self._verify(ref, len(data), "")
        return data

    def verify_later(
        self, ref: ArtifactRef, data: bytes | bytearray, cache: bool = False
    ) -> Future[bool]:
        """Hash ``data`` against ``ref`` on the low-priority thread; the future says
        whether they are its bytes. ``cache``: verified bytes are then copied to the cache
        (a reader of that copy waits for it)."""

        def check() -> bool:
            verified = _is_bytes_of(ref, data)
            if verified and cache:
                self._seed_cache(ref, lambda tmp: tmp.write_bytes(data))
            return verified

        cached = self._cache_file(ref) if cache else None
        with self._seeding_lock:
            future = self._background().submit(check)
            if cached is not None:
                self._seeding[cached] = future
        return future

    def _read_capped(self, ref: ArtifactRef, hashed: bool = True) -> tuple[bytearray, str]:
        """The object read into one buffer (and hashed as it fills, unless not ``hashed``);
        at most ``ref.size`` + 1 bytes are read (a larger object is refused, rest unread)."""
        resp = self.client.get_object(ref.bucket, ref.key)
        try:
            return _read_body(resp, ref.size, hashed)
        finally:
            resp.close()
            resp.release_conn()

    def stat_checked(self, ref: ArtifactRef, max_bytes: int) -> None:
        """Raise :class:`ObjectRefused` unless the stored object is what ``ref`` claims
        (it exists, its size is within ``max_bytes`` and equal to the claim, its sha256
        metadata is the claim); no byte of its body is read."""
        actual = self.stat(ref.bucket, ref.key)
        if actual is None:
            raise _missing(ref)
        refused = _refusal(ref, actual.size, actual.sha256, max_bytes)
        if refused is not None:
            raise refused

    def get_checked(self, ref: ArtifactRef, max_bytes: int) -> bytearray:
        """A claimed object checked and read with one request (instead of a stat, then a
        GET): the response headers must show what a stat would (the object exists, its
        size is within ``max_bytes`` and equal to the claim, its sha256 metadata is the
        claim), else :class:`ObjectRefused` before a byte of the body is read; then the
        body is read (at most the claimed size) and verified."""
        self._check_ref_size(ref)

        def do() -> tuple[bytearray, str]:
            try:
                resp = self.client.get_object(ref.bucket, ref.key)
            except S3Error as exc:
                if exc.code in _NOT_FOUND:
                    raise _missing(ref) from None
                raise
            try:
                size = int(resp.headers.get("Content-Length", -1))
                sha = resp.headers.get("x-amz-meta-" + SHA_META)
                refused = _refusal(ref, size, sha, max_bytes)
                if refused is not None:
                    raise refused
                return _read_body(resp, ref.size)
            finally:
                resp.close()
                resp.release_conn()

        data, sha = self._retry(f"get {ref.bucket}/{ref.key}", do)
        self._verify(ref, len(data), sha)
        return data

    def get_json(self, ref: ArtifactRef) -> Any:
        return json.loads(self.get_bytes(ref))

    def get_file(self, ref: ArtifactRef, dest: Path | None = None) -> Path:
        """Download to a file (or reuse the verified cached copy) and verify it.

        At most ``ref.size`` + 1 bytes are read: an object larger than its reference is
        refused without streaming the rest.
        """
        self._check_ref_size(ref)
        cached = self.cache_path(ref)
        if cached is not None and cached.exists():
            os.utime(cached)  # recently used
            if dest is None:
                return cached
            shutil.copyfile(cached, dest)
            return dest
        target_dir = (
            cached.parent if cached else (dest.parent if dest else Path(tempfile.gettempdir()))
        )
        target_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target_dir, prefix=".dl-")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            size, sha = self._retry(
                f"get {ref.bucket}/{ref.key}", lambda: self._stream_capped(ref, tmp)
            )
            self._verify(ref, size, sha)
            final = cached or dest or tmp.with_name(ref.sha256)
            os.replace(tmp, final)
            if cached is not None:
                self._trim_cache(keep=cached)
        finally:
            tmp.unlink(missing_ok=True)
        if cached is not None and dest is not None:
            shutil.copyfile(cached, dest)
            return dest
        return final

    def _stream_capped(self, ref: ArtifactRef, path: Path) -> tuple[int, str]:
        """Write the object to ``path``, hashing as it streams; stop past ``ref.size``."""
        h = hashlib.sha256()
        size = 0
        resp = self.client.get_object(ref.bucket, ref.key)
        try:
            with open(path, "wb") as fh:
                for chunk in resp.stream(1 << 20):
                    size += len(chunk)
                    if size > ref.size:
                        break  # larger than claimed: refused by _verify, rest unread
                    h.update(chunk)
                    fh.write(chunk)
        finally:
            resp.close()
            resp.release_conn()
        return size, h.hexdigest()

    def evict(self, ref: ArtifactRef | None) -> None:
        """Drop a cached copy that is no longer needed (keeps the cache bounded)."""
        path = self.cache_path(ref) if ref is not None else None
        if path is not None:
            path.unlink(missing_ok=True)

    @staticmethod
    def _verify(ref: ArtifactRef, size: int, sha: str) -> None:
        if size != ref.size or sha != ref.sha256:
            raise IntegrityError(
                f"s3://{ref.bucket}/{ref.key} failed verification "
                f"(size {size} vs {ref.size}, sha256 {sha[:12]}… vs {ref.sha256[:12]}…); refused"
            )

    def iter_json(self, bucket: str, prefix: str) -> Iterator[tuple[str, Any]]:
        for key in self.list_keys(bucket, prefix):
            ref = self.stat(bucket, key)
            if ref is not None:
                yield key, self.get_json(ref)
