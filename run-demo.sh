#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, start the service (its own Redis and Ray Serve),
# send a synthetic video through the batch file API, ask its questions over HTTP (one streamed),
# print the answers next to the truth, stop everything. `lmstream demo` alone: the same in-process.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/lmstream demo --service "$@"
