"""``deploy/local/stack.sh`` beside another checkout's S3 server.

A second clone on the same machine must get an S3 server of its own (not fail, not
share the other one's). The test holds the default port with a stand-in HTTP server
when nothing holds it already, runs ``up`` with its own state folder and checks that
the new server answers on the port it recorded, with the buckets made.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from minio import Minio

from fednnunet.deploy.provisioning import all_buckets

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DEFAULT_PORT = 8333


class _Forbidden(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(403)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def default_port_held():
    """Something answers HTTP on 8333 (another checkout's S3, or our stand-in)."""
    if not _port_free(DEFAULT_PORT):
        yield  # already held (e.g. this machine's own demo stack)
        return
    server = http.server.HTTPServer(("127.0.0.1", DEFAULT_PORT), _Forbidden)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def test_up_beside_another_server_starts_its_own_on_a_free_block(tmp_path, default_port_held):
    stack_dir = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDNNUNET_S3_")}
    env |= {
        "FEDNNUNET_STACK_DIR": str(stack_dir),
        "FEDNNUNET_BUCKET_PREFIX": "stacktest",
        "FEDNNUNET_SITES": "901",
        "FEDNNUNET_PYTHON": sys.executable,
    }
    script = str(REPO / "deploy" / "local" / "stack.sh")
    try:
        up = subprocess.run(
            ["bash", script, "up"], env=env, capture_output=True, text=True, timeout=180
        )
        assert up.returncode == 0, up.stdout + up.stderr
        assert "taken by another S3 server" in up.stdout
        port = int((stack_dir / "s3_port").read_text())
        assert port != DEFAULT_PORT
        assert f"http://127.0.0.1:{port} (seaweedfs pid" in up.stdout
        client = Minio(
            f"127.0.0.1:{port}",
            access_key="fednnunet",
            secret_key="fednnunet-secret",  # noqa: S106 - the local stack's dev key
            secure=False,
        )
        for bucket in all_buckets("stacktest", ["901"]):
            assert client.bucket_exists(bucket)
        # A second `up` finds its own server again (no restart, same port).
        again = subprocess.run(
            ["bash", script, "up"], env=env, capture_output=True, text=True, timeout=120
        )
        assert again.returncode == 0, again.stdout + again.stderr
        assert "taken by another" not in again.stdout
        assert int((stack_dir / "s3_port").read_text()) == port
    finally:
        subprocess.run(["bash", script, "down"], env=env, capture_output=True, timeout=60)
