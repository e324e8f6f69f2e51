"""Provision RabbitMQ users on a running broker with ``rabbitmqctl`` (idempotent).

    python broker_config/provision.py --sites 901 902 903 [--vhost /] [--consumer-timeout-ms N]

(the compose stack's ``deploy/.generated/definitions.json`` is written by
``deploy/generate.py`` from the same functions.)

Creates ``coordinator`` (full rights on the vhost) and ``site-<id>`` per site with
the regexes of :func:`fednnunet.deploy.provisioning.site_permissions`. Passwords
are derived from ``FEDNNUNET_CREDENTIAL_SEED`` (print one site's with
``python -m fednnunet.deploy.provisioning site-credentials <id>``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fednnunet.deploy.provisioning import (  # noqa: E402
    DEFAULT_SITES,
    provision_broker,
    site_permissions,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sites", nargs="+", default=os.environ.get("FEDNNUNET_SITES", "").split())
    ap.add_argument("--vhost", default="/")
    ap.add_argument("--rabbitmqctl", default="rabbitmqctl")
    ap.add_argument(
        "--consumer-timeout-ms",
        type=int,
        default=None,
        help="also set consumer_timeout on the running node (lost on broker restart). "
        "Not needed for fednnunet: site tasks are acked on receipt, coordinator tasks "
        "take seconds (see rabbitmq.conf)",
    )
    a = ap.parse_args()
    sites = a.sites or list(DEFAULT_SITES)
    users = provision_broker(sites, a.vhost, rabbitmqctl=a.rabbitmqctl)
    for user in users:
        site = user.removeprefix("site-") if user.startswith("site-") else None
        rights = site_permissions(site) if site else "configure/write/read '.*'"
        print(f"{user}: {rights}")
    if a.consumer_timeout_ms:
        expr = f"application:set_env(rabbit, consumer_timeout, {a.consumer_timeout_ms})."
        subprocess.run([a.rabbitmqctl, "eval", expr], check=True, capture_output=True)  # noqa: S603 - broker admin tool, fixed argv
        print(f"consumer_timeout set to {a.consumer_timeout_ms} ms on the running node")
    return 0


if __name__ == "__main__":
    sys.exit(main())
