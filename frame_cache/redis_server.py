"""A `redis-server` child process that this program starts, owns and stops by its own PID.

    with RedisServer(data_dir) as srv:          # free loopback port, AOF everysec, files in data_dir
        cache = RedisFrameCache.from_url(srv.url)

Used by `lmstream bench cache` (and the service's `lmstream serve` when no --redis URL is
given). Nothing is written outside ``data_dir``; `stop` terminates the process it started (SIGTERM,
then SIGKILL after a grace period) and never touches any other redis-server.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from lmcore.errors import CacheUnavailable

__all__ = ["RedisServer", "free_port"]


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when the process that started it dies, so a
    crashed parent never leaves a redis-server behind."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server on 127.0.0.1 with its data (AOF) in ``data_dir``.

    Args:
        data_dir: folder for the AOF and the log (created if missing).
        port: TCP port (default: a free one).
        appendonly: AOF with ``appendfsync everysec`` (every acknowledged write survives a crash
            of the server up to about a second before it).
        maxmemory: e.g. "2gb" (with ``noeviction``: writes past it are refused, never evicted).
        extra: more ``--option value`` arguments.
    """

    def __init__(self, data_dir: str | os.PathLike, port: int | None = None, *, appendonly: bool = True,
                 maxmemory: str | None = None, extra: list[str] | None = None, executable: str = "redis-server"):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.maxmemory = maxmemory
        self.extra = list(extra or [])
        self.executable = executable
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        exe = shutil.which(self.executable)
        if exe is None:
            raise CacheUnavailable(f"expected {self.executable} on PATH to start a local Redis, got none "
                                   "(./run-tests.sh installs it; or give a redis:// URL of a running server)")
        a = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.data_dir),
             "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log"), "--protected-mode", "yes"]
        if self.appendonly:
            a += ["--appendonly", "yes", "--appendfsync", "everysec"]
        if self.maxmemory:
            a += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
        return a + self.extra

    def start(self, timeout: float = 10.0) -> "RedisServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.data_dir / "redis.log")
                tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                raise CacheUnavailable(f"expected redis-server to start on port {self.port}, got exit status "
                                       f"{self.proc.returncode}: {tail.strip()}")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise CacheUnavailable(f"expected redis-server on port {self.port} to answer PING within {timeout:g} s, "
                               "got no answer")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")       # "-LOADING" while the AOF is replayed
        except OSError:
            return False

    def stop(self, grace: float = 5.0) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def __enter__(self) -> "RedisServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
