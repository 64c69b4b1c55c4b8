"""A live RTSP camera for the tests: Debian's GStreamer RTSP server as a child process.

The server runs under the *system* Python (``/usr/bin/python3`` with ``python3-gi`` and
``gir1.2-gst-rtsp-server-1.0``), never the project's venv, from a script written to a
temporary folder. It serves a synthetic live scene (``videotestsrc is-live=true`` ->
``x264enc tune=zerolatency`` -> ``rtph264pay``) on a free loopback port, under one or
more mounts (one per "camera"), and is driven by its own pid:

    with RtspServer(tmp_path, mounts=("cam1", "cam2")) as srv:
        srv.url("cam1")          # rtsp://127.0.0.1:PORT/cam1
        srv.freeze(); srv.thaw() # SIGSTOP / SIGCONT: the sockets stay open, nothing is sent
        srv.kill(); srv.restart()  # SIGKILL, then a new server on the same port

`rtsp_server_missing()` says what is missing (and to run ./run-tests.sh) when the
system packages are not installed; the fixture fails with that message, never skips.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from frame_cache.redis_server import free_port
from lmcore.procs import stop_child

__all__ = ["RtspServer", "rtsp_server_missing", "free_port", "SYSTEM_PYTHON"]

SYSTEM_PYTHON = "/usr/bin/python3"
_PACKAGES = ("gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-ugly gstreamer1.0-plugins-good "
             "gstreamer1.0-plugins-base gstreamer1.0-libav python3-gi")

# The server itself: argv = port, then one "mount:pattern" per camera. Prints READY once
# it listens; SIGTERM/SIGINT quit its main loop.
_SERVER_SCRIPT = r'''
import ctypes, signal, sys
# SIGTERM when the thread that started this process ends (a test run killed leaves no server behind). Set
# here, after exec, not by a preexec_fn: Python code between fork and exec in a test process with other
# threads (PyAV's) hung camera restarts in a clean clone's run.
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer

Gst.init(None)
port, width, height, fps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
mounts = server.get_mount_points()
for spec in sys.argv[5:]:
    mount, pattern = spec.split(":", 1)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f"( videotestsrc is-live=true pattern={pattern} "
        f"! video/x-raw,width={width},height={height},framerate={fps}/1 "
        f"! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} "
        f"! rtph264pay name=pay0 pt=96 config-interval=1 )")
    factory.set_shared(True)
    mounts.add_factory("/" + mount, factory)
if server.attach(None) == 0:
    print("ERROR could not listen on port " + port, flush=True)
    sys.exit(3)
loop = GLib.MainLoop()
for sig in (signal.SIGTERM, signal.SIGINT):
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
print("READY", flush=True)
loop.run()
'''

_missing_cache: list[str | None] = []


def rtsp_server_missing() -> str | None:
    """A message saying what is missing and how to install it, or None when the server can run."""
    if _missing_cache:
        return _missing_cache[0]
    msg = None
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        msg = f"expected {SYSTEM_PYTHON} (the system Python with python3-gi), got none"
    else:
        probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
                 "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
                 "import sys; sys.exit(0 if all(Gst.ElementFactory.find(e) for e in "
                 "('videotestsrc', 'x264enc', 'rtph264pay')) else 4)")
        try:
            r = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            msg = f"expected {SYSTEM_PYTHON} to import GstRtspServer, got {exc}"
        else:
            if r.returncode == 4:
                msg = "expected the GStreamer elements videotestsrc, x264enc and rtph264pay, got some missing"
            elif r.returncode:
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                msg = f"expected {SYSTEM_PYTHON} to import gi's GstRtspServer 1.0, got: {last}"
    if msg:
        msg += f"; run ./run-tests.sh or scripts/setup.sh test (they apt-get install {_PACKAGES})"
    _missing_cache.append(msg)
    return msg


class RtspServer:
    """One GStreamer RTSP server process serving ``mounts`` on ``rtsp://127.0.0.1:PORT/<mount>``.

    Args:
        folder: where the script and the server's log go (created).
        mounts: one mount name per camera; ``{"name": "pattern"}`` picks each videotestsrc
            pattern (default: "ball" for the first, then "smpte", "snow", ...).
        port: loopback port (default: a free one; kept across `restart`).
        width, height, fps: the synthetic scene (small by default: the tests run on 2 cores).
        start_timeout: seconds to wait for the server to listen.
    """

    _PATTERNS = ("ball", "smpte", "snow", "pinwheel", "gamut")

    def __init__(self, folder: Path, mounts=("cam",), *, port: int | None = None, width: int = 320,
                 height: int = 240, fps: int = 10, start_timeout: float = 20.0) -> None:
        msg = rtsp_server_missing()
        if msg:
            raise RuntimeError(msg)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if isinstance(mounts, dict):
            self.mounts = dict(mounts)
        else:
            self.mounts = {m: self._PATTERNS[i % len(self._PATTERNS)] for i, m in enumerate(mounts)}
        self.port = port if port is not None else free_port()
        self.width, self.height, self.fps = width, height, fps
        self.start_timeout = start_timeout
        self.script = self.folder / "rtsp_server_gst.py"
        self.script.write_text(_SERVER_SCRIPT)
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.frozen = False

    # -- addresses ---------------------------------------------------------------
    def url(self, mount: str | None = None) -> str:
        """``rtsp://127.0.0.1:PORT/<mount>`` (the first mount by default)."""
        mount = mount if mount is not None else next(iter(self.mounts))
        return f"rtsp://127.0.0.1:{self.port}/{mount}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join((self.folder / "rtsp_server.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # -- life cycle ----------------------------------------------------------------
    def start(self) -> "RtspServer":
        """Start the server and wait until it prints READY and accepts a TCP connection."""
        if self.running:
            raise RuntimeError(f"expected a stopped RTSP server, got pid {self.proc.pid} running")
        self._close_log()
        self._log = open(self.folder / "rtsp_server.log", "ab")
        log_start = self._log.tell()  # the log is kept across restarts: look for READY after this
        argv = [SYSTEM_PYTHON, "-u", str(self.script), str(self.port), str(self.width), str(self.height),
                str(self.fps), *(f"{m}:{p}" for m, p in self.mounts.items())]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        self.proc = subprocess.Popen(argv, cwd=self.folder, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)   # no preexec_fn: the script dies
                                                                          # with its parent by itself
        self.frozen = False
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"expected the RTSP server on port {self.port} to start, it exited with "
                                   f"status {self.proc.returncode}; log:\n{self.log_tail()}")
            if self._ready_since(log_start):
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return self
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"expected the RTSP server on port {self.port} to listen within "
                                   f"{self.start_timeout} s, it did not; log:\n{self.log_tail()}")
            time.sleep(0.05)

    def _ready_since(self, offset: int) -> bool:
        try:
            with open(self.folder / "rtsp_server.log", "rb") as f:
                f.seek(offset)
                return b"READY" in f.read()
        except OSError:
            return False

    def freeze(self) -> None:
        """SIGSTOP: connections stay open (the kernel still accepts new ones), nothing is sent."""
        assert self.running, "freeze() needs a running server"
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        """SIGCONT after `freeze`."""
        if self.running:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.frozen = False

    def kill(self) -> None:
        """SIGKILL the server (clients see their connections reset) and reap it."""
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)
        self.frozen = False
        self._close_log()

    def restart(self) -> "RtspServer":
        """`kill` if running, then start again on the same port with the same mounts."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        """SIGCONT (in case it is frozen), SIGTERM, wait; SIGKILL if it does not exit."""
        stop_child(self.proc, 5)
        self.frozen = False
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "RtspServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "frozen" if self.frozen else ("running" if self.running else "stopped")
        return f"RtspServer(port={self.port}, mounts={list(self.mounts)}, pid={self.pid}, {state})"
