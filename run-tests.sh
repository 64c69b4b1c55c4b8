#!/usr/bin/env bash
# Install everything the tests need into .venv and run them (CPU; Triton through its interpreter).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh test
export TRITON_INTERPRET=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
