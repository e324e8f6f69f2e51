#!/usr/bin/env bash
# GPU check (<= 8 min on one CUDA device): 3 simulated sites on one GPU, nnU-Net
# 3d_fullres on demo volumes, 3 rounds x 50 iterations, sync and async; prints one
# table of the federation's overhead per round as a fraction of the local epoch time.
#
#   bench/gpu_check.sh            on a CUDA machine
#   bench/gpu_check.sh --dry-run  the same plumbing on the CPU, tiny sizes
#
# Needs the project's Python (FEDNNUNET_PYTHON or .venv/bin/python), RabbitMQ and Redis
# (started here from the system packages when installed and not running), and the
# local S3 (deploy/local/stack.sh up).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${FEDNNUNET_PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export FEDNNUNET_DEVELOPMENT="${FEDNNUNET_DEVELOPMENT:-true}"
cd "$REPO"

if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  command -v rabbitmq-server >/dev/null && rabbitmq-server -detached && sleep 10 \
    || { echo "gpu_check: RabbitMQ is not reachable on 127.0.0.1:5672"; exit 2; }
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  command -v redis-server >/dev/null && redis-server --daemonize yes \
    || { echo "gpu_check: Redis is not reachable on 127.0.0.1:6379"; exit 2; }
fi
FEDNNUNET_PYTHON="$PY" bash deploy/local/stack.sh up >/dev/null
exec timeout 480 "$PY" -m bench.gpu_check "$@"
