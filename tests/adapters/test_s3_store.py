"""ArtifactStore against the real local S3 server (SeaweedFS, minio client)."""

from __future__ import annotations

import io
import json

import pytest

from fednnunet.adapters.s3_store import ArtifactStore, sha256_bytes
from fednnunet.errors import FedError, IntegrityError
from fednnunet.messages import ArtifactRef

pytestmark = pytest.mark.integration


@pytest.fixture
def store(stack, tmp_path):
    s = ArtifactStore(
        stack, egress_log=str(tmp_path / "egress.jsonl"), cache_dir=tmp_path / "cache"
    )
    s.ensure_bucket("fedtest-store")
    return s


def test_roundtrip_verified_write_once_and_egress_logged(store, unique_id, tmp_path):
    key = f"{unique_id('k')}/a.json"
    ref = store.put_json("fedtest-store", key, {"x": 1}, kind="test")
    assert ref.sha256 == sha256_bytes(b'{"x":1}') and ref.size == 7
    assert store.get_json(ref) == {"x": 1}
    assert store.stat("fedtest-store", key) == ref
    assert store.put_json("fedtest-store", key, {"x": 1}) == ref  # same bytes: no-op
    with pytest.raises(IntegrityError, match="write-once"):
        store.put_json("fedtest-store", key, {"x": 2})
    path = store.get_file(ref)
    assert path.read_bytes() == b'{"x":1}' and path.parent == tmp_path / "cache"
    log = [json.loads(line) for line in (tmp_path / "egress.jsonl").read_text().splitlines()]
    assert len(log) == 1  # the no-op write left nothing
    assert log[0]["key"] == key and log[0]["bytes"] == 7 and log[0]["sha256"] == ref.sha256
    assert log[0]["kind"] == "test"


def test_corrupted_object_is_refused(store, unique_id):
    key = f"{unique_id('k')}/w.safetensors"
    ref = store.put_bytes("fedtest-store", key, b"good bytes")
    # Someone replaces the object behind our back (keeping the old sha256 metadata).
    store.client.put_object(
        "fedtest-store", key, io.BytesIO(b"evil bytes"), 10, metadata={"sha256": ref.sha256}
    )
    with pytest.raises(IntegrityError, match="failed verification"):
        store.get_bytes(ref)
    with pytest.raises(IntegrityError):
        store.get_file(ref)
    # A reference whose sha256 does not match what is stored is refused too.
    wrong = ArtifactRef(bucket=ref.bucket, key=key, sha256="f" * 64, size=10)
    with pytest.raises(IntegrityError):
        store.get_bytes(wrong)


def test_oversized_payload_refused_both_ways(stack, unique_id):
    small = ArtifactStore(stack.model_copy(update={"max_object_bytes": 16}))
    small.ensure_bucket("fedtest-store")
    with pytest.raises(FedError, match="limit"):
        small.put_bytes("fedtest-store", unique_id("k"), b"x" * 17)
    huge = ArtifactRef(bucket="fedtest-store", key="k", sha256="0" * 64, size=10**12)
    with pytest.raises(FedError, match="limit"):
        small.get_bytes(huge)


def test_unreachable_s3_is_one_line(stack):
    dead = ArtifactStore(stack.model_copy(update={"s3_endpoint": "127.0.0.1:1"}), retry_total_s=0.5)
    with pytest.raises(FedError) as err:
        dead.ping()
    assert str(err.value).startswith("S3 unreachable at http://127.0.0.1:1")
    assert "\n" not in str(err.value)


def test_write_once_is_the_put_itself_no_stat_first(stack, unique_id, monkeypatch):
    """The PUT only creates (If-None-Match): a new object costs one request, a second
    writer with other bytes is refused by the server (two writers racing cannot both
    succeed), the same bytes again are a no-op."""
    from fednnunet.errors import IntegrityError

    store = ArtifactStore(stack, retry_total_s=5)
    store.ensure_bucket("fedtest-store")
    key = f"{unique_id('race')}/obj"
    first = store.put_bytes("fedtest-store", key, b"first writer")
    real_stat = store.stat
    stats: list[str] = []

    def counted_stat(bucket, k):
        stats.append(k)
        return real_stat(bucket, k)

    monkeypatch.setattr(store, "stat", counted_stat)
    store.put_bytes("fedtest-store", f"{key}-2", b"another object")
    assert stats == []  # nothing asked before the PUT
    with pytest.raises(IntegrityError, match="write-once"):
        store.put_bytes("fedtest-store", key, b"second writer")
    assert store.put_bytes("fedtest-store", key, b"first writer") == first
    assert store.get_bytes(first) == b"first writer"


def test_one_get_checks_what_a_stat_would_before_reading_the_body(store, unique_id):
    """The coordinator reads a claimed update with one request: a missing, oversized or
    mismatching object is refused from the response headers, with the stat's kinds."""
    from fednnunet.adapters.s3_store import ObjectRefused

    key = f"{unique_id('k')}/u.bin"
    ref = store.put_bytes("fedtest-store", key, b"u" * 4096)
    assert store.get_checked(ref, max_bytes=4096) == b"u" * 4096
    cases = {
        "missing-object": (ref.model_copy(update={"key": key + "-gone"}), 1 << 20),
        "oversized": (ref, 4095),
        "mismatch": (ref.model_copy(update={"sha256": "0" * 64}), 1 << 20),
    }
    for kind, (claim, limit) in cases.items():
        with pytest.raises(ObjectRefused) as err:
            store.get_checked(claim, max_bytes=limit)
        assert err.value.kind == kind
    # The same size and sha256 metadata over other bytes: refused by the body's hash.
    store.client.put_object(
        "fedtest-store", key + "-evil", io.BytesIO(b"e" * 4096), 4096,
        metadata={"sha256": ref.sha256},
    )  # fmt: skip
    with pytest.raises(IntegrityError, match="failed verification"):
        store.get_checked(ref.model_copy(update={"key": key + "-evil"}), max_bytes=1 << 20)


def test_a_body_this_process_hashed_is_not_hashed_again_by_the_client(
    store, unique_id, monkeypatch
):
    """minio hashes every PUT body itself (``minio.api.sha256_hash`` for SigV4 over http,
    ``md5sum_hash`` over https): PayloadHashMinio hands it the sha256 put_bytes knows,
    so no second pass reads the body. Fails if minio renames either helper."""
    import minio.api

    hashed: list[int] = []
    for name in ("sha256_hash", "md5sum_hash"):
        real = getattr(minio.api, name)  # AttributeError here: minio changed

        def counting(data, real=real):  # noqa: ANN001, ANN202
            hashed.append(len(data or b""))
            return real(data)

        monkeypatch.setattr(minio.api, name, counting)
    data = bytes(range(256)) * 4096  # 1 MiB
    ref = store.put_bytes("fedtest-store", f"{unique_id('k')}/w.bin", data)
    assert max(hashed, default=0) < len(data)  # the body was never hashed by the client
    assert store.get_bytes(ref) == data and ref.sha256 == sha256_bytes(data)
    # Control: the stock upload path does hash it (so the count above can fail).
    store.client.put_object("fedtest-store", f"{unique_id('k')}/c.bin", io.BytesIO(data), len(data))
    assert max(hashed) == len(data)


def test_a_body_of_many_spans_reads_and_hashes_the_same_on_every_path(store, unique_id):
    """Bodies are read in 4 MiB spans straight from the HTTP response and hashed by a
    second thread: several spans plus a tail give the bytes and the sha256 of one pass,
    and a body longer than its claim is refused."""
    import hashlib
    import os

    from fednnunet.adapters import s3_store

    body = os.urandom(2 * s3_store._READ_CHUNK + 12345)
    key = f"{unique_id('k')}/big.bin"
    ref = store.put_bytes("fedtest-store", key, body)
    assert ref.sha256 == hashlib.sha256(body).hexdigest()  # independent of the store
    assert store.get_checked(ref, max_bytes=len(body)) == body
    assert store.read_unverified(ref) == body
    assert store.get_bytes(ref) == body
    longer = ref.model_copy(update={"size": len(body) - 1})
    with pytest.raises(IntegrityError):
        store.read_unverified(longer)
    with pytest.raises(IntegrityError):
        store.get_bytes(longer)


def test_the_body_is_read_from_the_response_under_urllib3(store, unique_id):
    """The one reach into urllib3: a plain body is read from the HTTP response it wraps
    (this fails when urllib3 changes how it holds it); anything else uses its readinto."""
    from fednnunet.adapters.s3_store import _raw_readinto, _read_body

    key = f"{unique_id('k')}/raw.bin"
    ref = store.put_bytes("fedtest-store", key, b"r" * 1000)
    resp = store.client.get_object(ref.bucket, ref.key)
    try:
        assert _raw_readinto(resp) == resp._fp.readinto
        assert _read_body(resp, ref.size) == (bytearray(b"r" * 1000), ref.sha256)
    finally:
        resp.close()
        resp.release_conn()

    class Encoded(io.BytesIO):  # a body urllib3 would decode: read through its readinto
        headers = {"Content-Encoding": "gzip"}
        _fp = io.BytesIO(b"raw bytes must not be read")

    assert _read_body(Encoded(b"decoded"), 7, hashed=False) == (bytearray(b"decoded"), "")
