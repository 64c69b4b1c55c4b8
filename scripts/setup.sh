#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv.
#   scripts/setup.sh            runtime only
#   scripts/setup.sh test       plus what the tests need
# torch is pinned to the CPU build first: an unpinned torch would pull GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING' || true
if ! python -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
    python -m pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING' || true
fi
extras="kernels"
[ "${1:-}" = "test" ] && extras="kernels,test,bench"
python -m pip install -q -e ".[${extras}]" 2>&1 | grep -v -e '^WARNING' -e '^ *$' -e '!!' -e 'wheel_obj' -e '\*\*\*' || true
python -c 'import torch, transformers, av, model, stream, frame_cache' \
    || { echo "error[E_SETUP]: expected the installed packages to import, got a failure above" >&2; exit 1; }
