"""TLS for S3 and AMQP with a private CA, against real servers.

S3: a private SeaweedFS whose S3 port serves HTTPS only (``-s3.cert.file`` and
``-s3.key.file``), with a throwaway CA. AMQPS: the shared RabbitMQ has no TLS
listener and must not be reconfigured, so a TLS-terminating proxy (this test's
certificate) forwards to its plain port; the clients still do a full TLS handshake
and verify the certificate chain and host name, which is the part that is ours.
"""

from __future__ import annotations

import json
import secrets
import ssl
import time
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest
from kombu import Connection

from fednnunet.adapters.broker import (
    PROGRESS_EXCHANGE,
    SITE_TASKS,
    _pika_params,
    check_broker,
    declare_topology,
    make_celery,
    site_task_queue,
)
from fednnunet.adapters.s3_store import ArtifactStore
from fednnunet.errors import FedError, ServiceUnreachable
from fednnunet.settings import Settings
from tests.security.tlslab import Pki, TlsProxy, TlsWeed, make_pki

ACCESS, SECRET = "tls-admin", "tls-admin-secret"
PLAIN_BROKER = ("127.0.0.1", 5672)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> Pki:
    """A second, unrelated CA: trusting it must not make our server trusted."""
    return make_pki(tmp_path_factory.mktemp("pki-other"), label="some other CA")


@pytest.fixture(scope="module")
def tls_s3(tmp_path_factory, pki):
    server = TlsWeed(tmp_path_factory.mktemp("tls-s3"), pki, ACCESS, SECRET)
    server.start()
    yield server
    server.stop()


def _s3_settings(endpoint: str, ca: object) -> Settings:
    return Settings(
        s3_endpoint=endpoint,
        s3_access_key=ACCESS,
        s3_secret_key=SECRET,
        s3_secure=True,
        s3_ca_file=str(ca) if ca else None,
    )


# ---------------------------------------------------------------- S3
@pytest.mark.integration
def test_s3_over_tls_with_the_ca(tls_s3, pki, tmp_path):
    store = ArtifactStore(_s3_settings(tls_s3.endpoint, pki.ca))
    assert store.endpoint_url == f"https://{tls_s3.endpoint}"
    store.ping()
    bucket = f"tls-{secrets.token_hex(3)}"
    store.ensure_bucket(bucket)
    ref = store.put_bytes(bucket, "round-1/weights.bin", b"\x00\x01weights" * 1000)
    assert store.stat(bucket, ref.key) == ref
    assert store.get_bytes(ref) == b"\x00\x01weights" * 1000
    src = tmp_path / "fp.json"
    src.write_text(json.dumps({"spacing": [1.0, 1.0, 1.0]}))
    fref = store.put_file(bucket, "fp.json", src)
    assert store.get_file(fref, tmp_path / "back.json").read_text() == src.read_text()
    assert sorted(store.list_keys(bucket, "")) == ["fp.json", "round-1/weights.bin"]


@pytest.mark.integration
@pytest.mark.parametrize("case", ["system-cas", "other-ca", "wrong-host"])
def test_s3_untrusted_certificate_fails_fast_and_clearly(tls_s3, pki, other_pki, case):
    """No CA, another CA, or a host name the certificate does not cover ('localhost':
    the certificate names IP 127.0.0.1 only): one clear error, no two-minute retry."""
    endpoint, ca = {
        "system-cas": (tls_s3.endpoint, None),
        "other-ca": (tls_s3.endpoint, other_pki.ca),
        "wrong-host": (f"localhost:{tls_s3.port}", pki.ca),
    }[case]
    store = ArtifactStore(_s3_settings(endpoint, ca))  # default retry budget: 120 s
    for op in (lambda: store.ensure_bucket("never"), store.ping):
        t0 = time.monotonic()
        with pytest.raises(FedError) as err:
            op()
        assert time.monotonic() - t0 < 15
        msg = str(err.value)
        assert not isinstance(err.value, ServiceUnreachable), msg
        assert "TLS verification failed" in msg and f"https://{endpoint}" in msg, msg
        assert "\n" not in msg


@pytest.mark.integration
def test_s3_tls_client_against_plain_http_server_is_a_tls_error(stack):
    """FEDNNUNET_S3_SECURE=true against a plain-HTTP server (the local stack)."""
    store = ArtifactStore(stack.model_copy(update={"s3_secure": True}))
    t0 = time.monotonic()
    with pytest.raises(FedError, match="TLS handshake failed") as err:
        store.ensure_bucket(stack.bucket_prefix + "-global")
    assert time.monotonic() - t0 < 15
    assert f"https://{stack.s3_endpoint}" in str(err.value)


def test_s3_missing_ca_file_is_one_line(tmp_path):
    with pytest.raises(FedError, match="FEDNNUNET_S3_CA_FILE .* is not a readable file"):
        ArtifactStore(_s3_settings("127.0.0.1:1", tmp_path / "nope.pem"))


# ---------------------------------------------------------------- AMQPS configuration
def _amqps(port: int = 5671, host: str = "127.0.0.1", **extra: object) -> Settings:
    return Settings(broker_url=f"amqps://guest:guest@{host}:{port}//", **extra)


@pytest.mark.parametrize("role", ["site", "coordinator", "client"])
def test_make_celery_amqps_requires_verified_certificates(role, monkeypatch):
    monkeypatch.delenv("FEDNNUNET_BROKER_CA_FILE", raising=False)
    app = make_celery(_amqps(s3_ca_file="/pki/federation-ca.pem"), role, site_id="901")
    opts = app.conf.broker_use_ssl
    assert opts["cert_reqs"] == ssl.CERT_REQUIRED
    assert opts["ca_certs"] == "/pki/federation-ca.pem"  # falls back to the S3 CA file
    assert "server_hostname" in opts  # None: kombu fills in the URL host (hostname check)
    monkeypatch.setenv("FEDNNUNET_BROKER_CA_FILE", "/pki/broker-ca.pem")
    app = make_celery(_amqps(s3_ca_file="/pki/federation-ca.pem"), role, site_id="901")
    assert app.conf.broker_use_ssl["ca_certs"] == "/pki/broker-ca.pem"
    plain = make_celery(Settings(broker_url="amqp://guest:guest@127.0.0.1:5672//"), role, "901")
    assert not plain.conf.broker_use_ssl


def test_pika_params_use_the_federation_ca(pki, monkeypatch):
    monkeypatch.setenv("FEDNNUNET_BROKER_CA_FILE", str(pki.ca))
    params = _pika_params(_amqps(port=5671))
    assert params.ssl_options is not None and params.port == 5671
    assert params.virtual_host == "/"
    ctx = params.ssl_options.context
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert params.ssl_options.server_hostname == "127.0.0.1"
    subjects = [dict(x[0] for x in c["subject"]) for c in ctx.get_ca_certs()]
    assert {"commonName": "fednnunet test CA"} in subjects
    assert (
        _pika_params(Settings(broker_url="amqp://guest:guest@127.0.0.1:5672//")).ssl_options is None
    )


# ---------------------------------------------------------------- AMQPS end to end
@pytest.fixture
def amqps_proxy(pki, monkeypatch):
    monkeypatch.delenv("FEDNNUNET_BROKER_CA_FILE", raising=False)
    with TlsProxy(pki, PLAIN_BROKER) as proxy:
        yield proxy


@pytest.mark.integration
def test_check_broker_over_amqps(amqps_proxy, pki, stack, monkeypatch):
    check_broker(_amqps(amqps_proxy.port, s3_ca_file=str(pki.ca)), timeout_s=5)
    monkeypatch.setenv("FEDNNUNET_BROKER_CA_FILE", str(pki.ca))
    check_broker(_amqps(amqps_proxy.port), timeout_s=5)  # the broker CA variable alone


def _refused(settings: Settings) -> str:
    t0 = time.monotonic()
    with pytest.raises(ServiceUnreachable) as err:
        check_broker(settings, timeout_s=5)
    assert time.monotonic() - t0 < 15
    msg = str(err.value)
    assert "amqps://***@127.0.0.1" in msg and "guest" not in msg
    assert "TLS verification failed" in msg, msg
    return msg


@pytest.mark.integration
@pytest.mark.parametrize("case", ["system-cas", "other-ca", "misnamed-cert"])
def test_amqps_untrusted_certificate_is_refused(case, pki, other_pki, stack, monkeypatch):
    """Another CA, or a certificate our CA issued for another host name: refused.

    The misnamed case needs hostname checking, which py-amqp does only when given
    ``server_hostname`` (kombu fills it in from the URL when the option is None).
    """
    monkeypatch.delenv("FEDNNUNET_BROKER_CA_FILE", raising=False)
    ca = {"system-cas": None, "other-ca": other_pki.ca, "misnamed-cert": pki.ca}[case]
    with TlsProxy(pki, PLAIN_BROKER, misnamed=case == "misnamed-cert") as proxy:
        settings = _amqps(proxy.port, s3_ca_file=str(ca) if ca else None)
        _refused(settings)
        with pytest.raises((pika.exceptions.AMQPConnectionError, ssl.SSLError)):  # progress
            pika.BlockingConnection(_pika_params(settings))
        assert proxy.handshake_errors  # the client aborted the handshake


@pytest.mark.integration
def test_celery_and_progress_publish_through_amqps(amqps_proxy, pki, stack, unique_id):
    # The session's vhost, over TLS through the proxy and in plain on 5672 to read back.
    tls_url = urlunsplit(
        urlsplit(stack.broker_url)._replace(
            scheme="amqps", netloc=f"guest:guest@127.0.0.1:{amqps_proxy.port}"
        )
    )
    tls = Settings(broker_url=tls_url, s3_ca_file=str(pki.ca))
    site = unique_id("tls")
    declare_topology(tls, [site])
    app = make_celery(tls, "client")
    app.send_task(SITE_TASKS["fingerprint"], args=[{"hello": "tls"}], queue=site_task_queue(site))
    # progress (pika) through the same proxy, read back on the plain port
    with pika.BlockingConnection(pika.URLParameters(stack.broker_url)) as c:
        ch = c.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, PROGRESS_EXCHANGE, routing_key=f"exp.{site}.heartbeat")
        with pika.BlockingConnection(_pika_params(tls)) as pc:
            pc.channel().basic_publish(PROGRESS_EXCHANGE, f"exp.{site}.heartbeat", b'{"x":1}')
        deadline, body = time.monotonic() + 10, None
        while body is None and time.monotonic() < deadline:
            _m, _p, body = ch.basic_get(q, auto_ack=True)
            time.sleep(0.05) if body is None else None
        assert body == b'{"x":1}'
    with Connection(stack.broker_url) as conn:
        simple = conn.SimpleQueue(
            f"site.{site}", no_ack=True, queue_opts={"durable": True, "no_declare": True}
        )
        msg = simple.get(timeout=10)
        assert msg.content_type == "application/json"
        assert json.loads(msg.body)[0] == [{"hello": "tls"}]
        simple.close()
        conn.channel().queue_delete(f"site.{site}")
    app.close()
