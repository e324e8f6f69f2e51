"""Per-site S3 identities on the real local SeaweedFS: a site sees only what it should.

The suite's S3 server (``tests/support/private_stack.py``, provisioned like
``deploy/local/stack.sh up``) has identities for sites 901 902 903 with secrets derived
by ``fednnunet.deploy.provisioning``; this test uses those same derived keys.
"""

from __future__ import annotations

import io
import secrets

import pytest
from minio import Minio
from minio.error import S3Error

from fednnunet.deploy.provisioning import (
    coordinator_bucket,
    global_bucket,
    site_bucket,
    site_s3_credentials,
)

pytestmark = pytest.mark.integration

SITE_A, SITE_B = "901", "902"


def _client(settings, access: str, secret: str) -> Minio:
    # region given: otherwise minio-py asks GetBucketLocation first, which needs bucket rights.
    return Minio(
        settings.s3_endpoint,
        access_key=access,
        secret_key=secret,
        secure=False,
        region=settings.s3_region,
    )


def _put(c: Minio, bucket: str, key: str, data: bytes) -> None:
    c.put_object(bucket, key, io.BytesIO(data), len(data))


def _denied(fn) -> str:
    with pytest.raises(S3Error) as ei:
        fn()
    return ei.value.code


@pytest.fixture(scope="module")
def s3(stack):
    prefix = stack.bucket_prefix
    admin = _client(stack, stack.s3_access_key, stack.s3_secret_key)
    site_a = _client(stack, *site_s3_credentials(SITE_A))
    key = f"isolation-test/{secrets.token_hex(4)}/obj.bin"
    _put(admin, global_bucket(prefix), key, b"global-weights")
    _put(admin, site_bucket(prefix, SITE_B), key, b"site-b-private")
    _put(admin, coordinator_bucket(prefix), key, b"history: site 902 has 7 cases")
    yield admin, site_a, prefix, key
    buckets = (global_bucket(prefix), coordinator_bucket(prefix))
    for b in buckets + (site_bucket(prefix, SITE_A), site_bucket(prefix, SITE_B)):
        for name in (key, key + ".a"):
            admin.remove_object(b, name)


def test_site_reads_and_writes_own_bucket(s3):
    admin, site_a, prefix, key = s3
    own = site_bucket(prefix, SITE_A)
    _put(site_a, own, key + ".a", b"site-a-upload")
    assert site_a.get_object(own, key + ".a").read() == b"site-a-upload"
    # The coordinator (admin) reads what the site uploaded.
    assert admin.get_object(own, key + ".a").read() == b"site-a-upload"
    listed = [o.object_name for o in site_a.list_objects(own, prefix=key, recursive=True)]
    assert key + ".a" in listed


def test_site_reads_global_bucket(s3):
    _, site_a, prefix, key = s3
    assert site_a.get_object(global_bucket(prefix), key).read() == b"global-weights"


def test_site_cannot_write_global_bucket(s3):
    admin, site_a, prefix, key = s3
    g = global_bucket(prefix)
    assert _denied(lambda: _put(site_a, g, key, b"forged")) == "AccessDenied"
    assert admin.get_object(g, key).read() == b"global-weights"


def test_site_cannot_touch_other_site_bucket(s3):
    admin, site_a, prefix, key = s3
    other = site_bucket(prefix, SITE_B)
    assert _denied(lambda: site_a.get_object(other, key).read()) == "AccessDenied"
    assert _denied(lambda: _put(site_a, other, key, b"tampered")) == "AccessDenied"
    assert _denied(lambda: list(site_a.list_objects(other, recursive=True))) == "AccessDenied"
    assert admin.get_object(other, key).read() == b"site-b-private"


def test_wrong_secret_is_rejected(s3):
    _, _, prefix, key = s3
    access, _ = site_s3_credentials(SITE_A)
    from fednnunet.settings import get_settings

    bad = _client(get_settings(), access, "not-the-secret")
    code = _denied(lambda: bad.get_object(global_bucket(prefix), key).read())
    assert code in {"SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId"}


def test_coordinator_identity_reads_sites_and_writes_only_the_global_bucket(s3, stack):
    from fednnunet.deploy.provisioning import coordinator_s3_credentials

    admin, _, prefix, key = s3
    coord = _client(stack, *coordinator_s3_credentials())
    assert coord.get_object(site_bucket(prefix, SITE_B), key).read() == b"site-b-private"
    _put(coord, global_bucket(prefix), key + ".a", b"new global")
    assert _denied(lambda: _put(coord, site_bucket(prefix, SITE_A), key + ".a", b"forged"))
    assert _denied(lambda: coord.make_bucket(f"{prefix}-site-new{secrets.token_hex(2)}"))


def test_site_cannot_read_the_per_site_history(s3):
    """The coordinator bucket (round history with every site's case count, metrics and
    quarantine reasons; journal; plots) is closed to site credentials."""
    admin, site_a, prefix, key = s3
    private = coordinator_bucket(prefix)
    assert _denied(lambda: site_a.get_object(private, key).read()) == "AccessDenied"
    assert _denied(lambda: list(site_a.list_objects(private, recursive=True))) == "AccessDenied"
    assert _denied(lambda: _put(site_a, private, key, b"forged history")) == "AccessDenied"
    assert admin.get_object(private, key).read() == b"history: site 902 has 7 cases"


def test_coordinator_identity_keeps_its_own_bucket(s3, stack):
    from fednnunet.deploy.provisioning import coordinator_s3_credentials

    _, _, prefix, key = s3
    coord = _client(stack, *coordinator_s3_credentials())
    _put(coord, coordinator_bucket(prefix), key + ".a", b"round record")
    assert coord.get_object(coordinator_bucket(prefix), key + ".a").read() == b"round record"


def test_retention_deletes_stay_inside_each_identitys_own_buckets(s3, stack):
    """Retention (core/retention.py): a site deletes its own old updates, the coordinator
    its old globals; neither can delete anything of anyone else."""
    from fednnunet.deploy.provisioning import coordinator_s3_credentials

    admin, site_a, prefix, key = s3
    coord = _client(stack, *coordinator_s3_credentials())
    own, other = site_bucket(prefix, SITE_A), site_bucket(prefix, SITE_B)
    assert _denied(lambda: site_a.remove_object(other, key)) == "AccessDenied"
    assert _denied(lambda: site_a.remove_object(global_bucket(prefix), key)) == "AccessDenied"
    assert _denied(lambda: coord.remove_object(other, key)) == "AccessDenied"
    assert admin.get_object(other, key).read() == b"site-b-private"
    assert admin.get_object(global_bucket(prefix), key).read() == b"global-weights"
    _put(site_a, own, key + ".a", b"old update")
    site_a.remove_object(own, key + ".a")
    assert _denied(lambda: admin.stat_object(own, key + ".a")) in {"NoSuchKey", "NoSuchObject"}
    _put(admin, global_bucket(prefix), key + ".a", b"old global")
    coord.remove_object(global_bucket(prefix), key + ".a")
    assert _denied(lambda: admin.stat_object(global_bucket(prefix), key + ".a")) in {
        "NoSuchKey",
        "NoSuchObject",
    }
