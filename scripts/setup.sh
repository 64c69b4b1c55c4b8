#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv.
#   scripts/setup.sh            runtime only
#   scripts/setup.sh test       plus what the tests need
# torch is pinned to its CPU build first (2.13.0+cpu): an unpinned torch would pull GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
log=.venv/setup.log
pipq() {  # quiet pip: the full output goes to $log, shown only when pip fails
    python -m pip install "$@" >>"$log" 2>&1 || { tail -n 30 "$log" >&2; echo "error[E_SETUP]: pip install $* failed (log: $log)" >&2; exit 1; }
}
echo "setting up .venv (first run: about a minute; log in $log)" >&2
: >"$log"
pipq --upgrade pip
if ! python -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
    # The CPU build. PyPI's own Linux torch is the CUDA build (several GB with its nvidia-* wheels), so
    # on Linux: 2.13.0+cpu from a local wheel folder when pip has one (find-links), else from PyTorch's
    # CPU index added to the configured ones (LMSTREAM_TORCH_INDEX names another). macOS wheels on PyPI
    # are CPU builds already.
    if [ "$(uname -s)" = Darwin ]; then
        pipq "torch==2.13.0"
    elif python -m pip install --no-index --no-deps "torch==2.13.0+cpu" >>"$log" 2>&1; then
        pipq "torch==2.13.0+cpu"                               # its dependencies, from the indexes
    else
        pipq "torch==2.13.0+cpu" --extra-index-url "${LMSTREAM_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
    fi
fi
# System packages the service and the tests start themselves (never started here): redis-server.
# Debian's packages, as root (apt-get does not start it).
apt_need() {
    command -v apt-get >/dev/null || { echo "error[E_SETUP]: expected apt-get to install $*, got none; install them by hand" >&2; exit 1; }
    echo "installing system packages: $* (log in $log)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >>"$log" 2>&1 \
        || { tail -n 30 "$log" >&2; echo "error[E_SETUP]: apt-get install $* failed (log: $log)" >&2; exit 1; }
}
command -v redis-server >/dev/null && command -v redis-cli >/dev/null || apt_need redis-server
# Tests only: the RTSP camera of tests/rtsp_server.py, Debian's GStreamer RTSP server run by /usr/bin/python3 (gi).
rtsp_ok() {
    /usr/bin/python3 -c 'import sys, gi; gi.require_version("Gst", "1.0"); gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer; Gst.init(None)
sys.exit(0 if all(Gst.ElementFactory.find(e) for e in ("videotestsrc", "x264enc", "rtph264pay")) else 1)' 2>/dev/null
}
[ "${1:-}" != "test" ] || rtsp_ok || apt_need gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-ugly \
    gstreamer1.0-plugins-good gstreamer1.0-plugins-base gstreamer1.0-libav python3-gi
# Tests only: Debian's Chromium for the web page (Playwright drives it; it downloads no browser).
[ "${1:-}" != "test" ] || command -v chromium >/dev/null || apt_need chromium
extras="kernels,cache,serve"
[ "${1:-}" = "test" ] && extras="kernels,cache,serve,test,bench"
pipq -e ".[${extras}]"
python -c 'import torch, transformers, av, ray.serve, redis, fastapi, model, stream, frame_cache, deploy.settings' \
    || { echo "error[E_SETUP]: expected the installed packages to import, got a failure above" >&2; exit 1; }
