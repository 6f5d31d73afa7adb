#!/usr/bin/env bash
# Creates ./.venv and installs mopd (and, with --dev, the test tools) into it.
# torch is pinned to the CPU build only when no torch is present yet: a looser requirement would pull
# several GB of CUDA packages on a laptop; on a GPU machine, install your CUDA torch first and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==${MOPD_TORCH_VERSION:-2.13.0}"
fi
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
.venv/bin/python -m pip install -q -e ".${extras}"
