#!/usr/bin/env bash
# The test command: set up, start the local S3 server, lint, run every test.
# RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379) must be running.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# The local stack uses well-known development credentials, which a production
# setting refuses (fednnunet/settings.py): say that this is a development run.
export FEDNNUNET_DEVELOPMENT="${FEDNNUNET_DEVELOPMENT:-true}"
bash scripts/setup.sh
bash deploy/local/stack.sh up
.venv/bin/ruff check fednnunet workers tests bench broker_config
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
