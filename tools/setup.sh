#!/usr/bin/env bash
# Set-up for a fresh machine, safe to run again: a virtual environment in .venv holding a CPU
# build of torch (unless one is there already) and this package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # An unpinned torch would pull a multi-GB CUDA build; the engine runs on CPU workers too.
    .venv/bin/pip install -q "torch==${COMFY_XDIT_TORCH:-2.13.0}"
fi
.venv/bin/pip install -q -e ".[test]"
