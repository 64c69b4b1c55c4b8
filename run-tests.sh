#!/usr/bin/env bash
# Install everything the tests need into .venv and run them (CPU; Triton through its interpreter).
# Two pytest workers (LMSTREAM_TEST_WORKERS; 0: one process): much of the suite waits on Ray,
# Redis, RTSP and browser processes rather than computing. The files that start Ray
# (xdist_group "ray") run in one worker, one after another. Temporary files go to one short
# folder (Ray's socket paths must stay under 108 bytes), removed when every test passed.
# The 25 slowest tests are listed at the end (CI must stay under 30 minutes).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh test
export TRITON_INTERPRET=1
workers=${LMSTREAM_TEST_WORKERS:-2}
par=()
[ "$workers" = 0 ] || par=(-n "$workers" --dist loadgroup)
tmp=$(mktemp -d /tmp/lmt.XXXXXX)
rc=0
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 --basetemp "$tmp" "${par[@]}" "$@" || rc=$?
if [ "$rc" = 0 ]; then
    rm -rf "$tmp"
else
    echo "tests' temporary files kept in $tmp" >&2
fi
exit "$rc"
