#!/usr/bin/env bash
# The test command: set up, lint, run every test.
# RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379) must be running.
#
# The suite does not use the development stack (deploy/local/stack.sh, S3 on 8333):
# it starts an S3 server of its own on free ports (tests/support/private_stack.py),
# a RabbitMQ vhost and a Redis namespace of its own, so it runs beside another
# clone's stack and leaves no experiments in the user's namespace. The S3 server
# is stopped at the end.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# The local stack uses well-known development credentials, which a production
# setting refuses (fednnunet/settings.py): say that this is a development run.
export FEDNNUNET_DEVELOPMENT="${FEDNNUNET_DEVELOPMENT:-true}"
bash scripts/setup.sh
require_service() {  # a function, so that its positional arguments are not the script's
  (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null || { echo "$1 is not running on 127.0.0.1:$2" >&2; exit 1; }
}
require_service RabbitMQ 5672
require_service Redis 6379
.venv/bin/ruff check fednnunet workers tests bench broker_config
trap '.venv/bin/python -m tests.support.private_stack down >/dev/null || true' EXIT
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
