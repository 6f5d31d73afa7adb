#!/usr/bin/env bash
# Runs a quick subset of the tests with transformers and peft at the lowest versions pyproject.toml allows.
#
# Why: pyproject.toml states the supported range of transformers, torch and peft; the suite runs at whatever
# .venv holds (the newest), so without this nothing checks the lower end. Not part of the suite (it installs
# packages, a few minutes); run it after changing a bound or a call into transformers / peft:
#
#   bash scripts/check_dependency_bounds.sh                 # the lower bounds read from pyproject.toml
#   bash scripts/check_dependency_bounds.sh 4.57.6 0.17.0   # or the transformers and peft versions given
#   KEEP_VENV=1 bash scripts/check_dependency_bounds.sh     # keep the temporary venv (its path is printed)
#
# The venv is new and temporary; torch is the CPU build, as scripts/setup.sh installs it (torch==2.13.0, never a
# looser requirement: that pulls GBs of CUDA). mopd itself runs from src/ (PYTHONPATH), not installed, so the
# checkout and .venv are left as they were. TESTS overrides the test subset.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

lower_bound() {  # the X of "NAME>=X" in pyproject.toml's dependencies or optional dependencies
  "$PY" - "$1" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
specs = project["dependencies"] + [d for group in project["optional-dependencies"].values() for d in group]
for spec in specs:
    m = re.match(rf"{sys.argv[1]}\s*>=\s*([^,;\s]+)", spec)
    if m:
        print(m.group(1))
        break
else:
    sys.exit(f"pyproject.toml states no lower bound for {sys.argv[1]}")
EOF
}

TRANSFORMERS=${1:-$(lower_bound transformers)}
PEFT=${2:-$(lower_bound peft)}
TORCH=${MOPD_TORCH_VERSION:-2.13.0}
TESTS=${TESTS:-tests/test_sampler.py tests/test_logprobs.py tests/test_eval_stage.py tests/test_precision.py \
tests/test_real_models.py tests/test_model_card.py}

# the other runtime dependencies at whatever version pip picks next to these (their own bounds are not the point)
OTHERS=$("$PY" - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
skip = ("torch", "transformers", "peft", "mopd")  # mopd[...]: the extras that dev pulls in, not on an index
deps = project["dependencies"] + [d for d in project["optional-dependencies"]["dev"]]
print(" ".join(d for d in deps if not re.match(rf"({'|'.join(skip)})\b", d)))
EOF
)

VENV=$(mktemp -d /tmp/mopd-bounds-XXXXXX)
[ -n "${KEEP_VENV:-}" ] || trap 'rm -rf "$VENV"' EXIT
echo "venv $VENV: transformers==$TRANSFORMERS peft==$PEFT torch==$TORCH"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==$TORCH"
# shellcheck disable=SC2086  # OTHERS is a list of requirement strings without spaces
"$VENV/bin/python" -m pip install -q "transformers==$TRANSFORMERS" "peft==$PEFT" $OTHERS
"$VENV/bin/python" -c "import torch, transformers, peft; print('installed: torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)"
# shellcheck disable=SC2086
PYTHONPATH=src "$VENV/bin/python" -m pytest -q -x -p no:cacheprovider -o addopts="" $TESTS
