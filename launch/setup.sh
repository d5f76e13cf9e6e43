#!/usr/bin/env bash
# Create .venv beside the repo root and install clipdist with its test extras (idempotent).
# torch: whatever pip resolves for "torch>=2.4" (here 2.14.1, a CUDA build that also runs on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
