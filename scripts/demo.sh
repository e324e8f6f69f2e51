#!/usr/bin/env bash
# The main job: a 3-site federated (FFE) nnU-Net experiment on synthetic data, end to end,
# on this machine; prints per-site Dice. Results land in demo_run/results (plain nnU-Net).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# The local stack uses well-known development credentials, which a production
# setting refuses (fednnunet/settings.py): say that this is a development run.
export FEDNNUNET_DEVELOPMENT="${FEDNNUNET_DEVELOPMENT:-true}"
bash scripts/setup.sh
bash deploy/local/stack.sh up
# This checkout's S3 server (on another port when another checkout's holds 8333).
STACK_DIR="${FEDNNUNET_STACK_DIR:-$REPO/.stack}"
if [[ -z "${FEDNNUNET_S3_ENDPOINT:-}" && -f "$STACK_DIR/s3_port" ]]; then
  export FEDNNUNET_S3_ENDPOINT="127.0.0.1:$(cat "$STACK_DIR/s3_port")"
fi
exec .venv/bin/fednnunet demo "$@"
