"""Throwaway TLS for tests: a private CA, a TLS SeaweedFS S3 server, an AMQPS proxy.

Nothing here touches the shared services: the S3 server has its own ports and data
directory, and the proxy only terminates TLS in front of the machine's RabbitMQ
(which keeps its plain listener and configuration).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.weed import WeedServer, admin_identities


# ---------------------------------------------------------------- certificates
@dataclass(frozen=True)
class Pki:
    ca: Path  # CA certificate (PEM): what clients get as *_CA_FILE
    cert: Path  # server certificate for 127.0.0.1 (IP SAN only)
    key: Path
    misnamed_cert: Path  # same CA, but for DNS name fed.example.org only
    misnamed_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(folder: Path, label: str = "fednnunet test CA") -> Pki:
    """A CA and a server certificate valid for IP 127.0.0.1 only (not 'localhost')."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(label))
        .issuer_name(_name(label))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(
        folder / "ca.pem",
        folder / "server.pem",
        folder / "server.key",
        folder / "misnamed.pem",
        folder / "misnamed.key",
    )
    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for san, cert_path, key_path in (
        (x509.IPAddress(ipaddress.ip_address("127.0.0.1")), pki.cert, pki.key),
        (x509.DNSName("fed.example.org"), pki.misnamed_cert, pki.misnamed_key),
    ):
        _issue(ca_cert, ca_key, san, valid, cert_path, key_path)
    return pki


def _issue(ca_cert, ca_key, san, valid, cert_path: Path, key_path: Path) -> None:
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(str(san.value)))
        .issuer_name(ca_cert.subject)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path.write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        srv_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)


# ---------------------------------------------------------------- S3 over TLS
class TlsWeed(WeedServer):
    """``weed mini`` with ``-s3.cert.file``/``-s3.key.file``: its S3 port speaks HTTPS only."""

    def __init__(self, folder: Path, pki: Pki, access_key: str, secret_key: str) -> None:
        self.pki = pki
        super().__init__(
            folder,
            admin_identities(access_key, secret_key),
            extra_args=(f"-s3.cert.file={pki.cert}", f"-s3.key.file={pki.key}"),
        )

    def answers(self) -> bool:
        """A TLS handshake that verifies against our CA, then an HTTP answer."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw,
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
            ):
                tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return tls.recv(12).startswith(b"HTTP/")
        except OSError:
            return False


# ---------------------------------------------------------------- AMQPS in front of 5672
class TlsProxy:
    """Terminates TLS on a loopback port and forwards the bytes to a plain TCP port.

    Lets a test prove amqps:// end to end without reconfiguring the shared broker.
    """

    def __init__(self, pki: Pki, upstream: tuple[str, int], misnamed: bool = False) -> None:
        self.upstream = upstream
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if misnamed:  # a certificate our CA signed, but for another host name
            self.ctx.load_cert_chain(str(pki.misnamed_cert), str(pki.misnamed_key))
        else:
            self.ctx.load_cert_chain(str(pki.cert), str(pki.key))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self.handshake_errors: list[str] = []
        self._thread = threading.Thread(target=self._accept, name="tls-proxy", daemon=True)

    def __enter__(self) -> TlsProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.listener.close()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            client.settimeout(10)
            tls = self.ctx.wrap_socket(client, server_side=True)
            tls.settimeout(None)
        except (ssl.SSLError, OSError) as exc:
            self.handshake_errors.append(str(exc))
            client.close()
            return
        up = socket.create_connection(self.upstream, timeout=5)
        up.settimeout(None)
        with self._lock:
            self._socks += [tls, up]
        threading.Thread(target=self._pump, args=(up, tls), daemon=True).start()
        self._pump(tls, up)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()
