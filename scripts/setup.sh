#!/usr/bin/env bash
# Create .venv with the pinned toolchain (torch 2.14.1 / torchvision 0.29.1, nnunetv2 2.8.1)
# and install fednnunet in editable mode. Idempotent: a second run only checks.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.fednnunet-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "[setup] installing dependencies (first run: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev,bench]"
  echo "$want" > "$stamp"
fi
.venv/bin/python -c "import fednnunet, nnunetv2, torch, celery" >/dev/null
echo "[setup] ok: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
