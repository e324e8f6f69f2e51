"""Uploads kept in the sha256 cache: the coordinator never re-downloads its global."""

from __future__ import annotations

import pytest

from fednnunet.adapters.s3_store import ArtifactStore

pytestmark = pytest.mark.integration


def test_uploaded_file_is_served_from_cache(stack, unique_id, tmp_path):
    store = ArtifactStore(stack, cache_dir=tmp_path / "cache")
    store.ensure_bucket("fedtest-store")
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights" * 1000)
    ref = store.put_file("fedtest-store", f"{unique_id('k')}/w.bin", src)
    assert store.cache_path(ref).read_bytes() == src.read_bytes()
    src.write_bytes(b"changed later")  # the cache holds a copy, not the caller's file
    store.client = None  # any S3 request now fails: the read must come from the cache
    path = store.get_file(ref)
    assert path == store.cache_path(ref)
    assert path.read_bytes() == b"weights" * 1000


def test_uploaded_bytes_with_cache_are_served_from_cache(stack, unique_id, tmp_path):
    """The coordinator uploads each global from memory and reads it back next round."""
    store = ArtifactStore(stack, cache_dir=tmp_path / "cache")
    store.ensure_bucket("fedtest-store")
    data = b"global" * 1000
    ref = store.put_bytes("fedtest-store", f"{unique_id('k')}/g.bin", data, cache=True)
    plain = store.put_bytes("fedtest-store", f"{unique_id('k')}/p.bin", b"not cached")
    assert not store.cache_path(plain).exists()
    store.client = None  # any S3 request now fails: the read must come from the cache
    assert store.get_file(ref).read_bytes() == data


def test_get_bytes_caches_in_the_background_and_rechecks_the_copy(stack, unique_id, tmp_path):
    """A site reads each global into memory; the verified copy is written meanwhile and
    checked again when read (a damaged copy is downloaded anew, never used)."""
    from fednnunet.adapters.s3_store import sha256_bytes

    store = ArtifactStore(stack, cache_dir=tmp_path / "cache")
    store.ensure_bucket("fedtest-store")
    data = bytes(range(256)) * 4096
    ref = ArtifactStore(stack).put_bytes("fedtest-store", f"{unique_id('k')}/g.bin", data)
    assert store.get_bytes(ref, cache=True) == data
    cached = store.cache_path(ref)  # waits for the background write
    assert cached.read_bytes() == data
    client, store.client = store.client, None  # any S3 request now fails
    assert store.get_bytes(ref, cache=True) == data
    cached.write_bytes(b"x" + data[1:])  # damaged on disk, same size
    store.client = client
    again = store.get_bytes(ref, cache=True)
    assert again == data and sha256_bytes(again) == ref.sha256
    assert store.cache_path(ref).read_bytes() == data  # the copy was replaced
