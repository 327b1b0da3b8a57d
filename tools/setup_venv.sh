#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv at .venv with everything tests, demo and the ComfyUI host need.
# Idempotent: a stamp holding the requirements' checksum skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
stamp="$VENV/.esd-stamp"
want="$(cat tools/requirements-dev.txt tools/setup_venv.sh | sha256sum | cut -c1-16)"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "[setup] installing into $VENV (torch ${TORCH_PINS[*]} and tools/requirements-dev.txt); first run takes a few minutes" >&2
# torch is pinned in the same resolve so that nothing swaps in a different (multi-GB) build.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${TORCH_PINS[@]}" -r tools/requirements-dev.txt 2>&1 \
  | grep -v "is ignored: it is neither" || true
"$VENV/bin/python" -c "import torch, diffusers, transformers, safetensors" 
echo "$want" > "$stamp"
