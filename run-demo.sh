#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then answer questions about a synthetic
# video end to end (decode -> encode -> ring buffer -> fuse -> answer), with the ground truth.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/lmstream demo "$@"
