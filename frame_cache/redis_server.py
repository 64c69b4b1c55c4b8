"""``redis-server`` processes this program starts, owns and stops: one server, or a 3-master Redis Cluster.

Used by `lmstream serve` (its own Redis when no --redis URL is given), `lmstream bench cache` and the
tests. Every server runs in the foreground (``--daemonize no``) as a child of the test process,
on a free loopback port, with all its files (append-only file, cluster config, log) in the
folder it is given, and is stopped by its own pid (terminate, wait, kill). Nothing is left
running or written elsewhere; on Linux a server also gets SIGTERM if the test process dies
without stopping it (``PR_SET_PDEATHSIG``: it fires when the *thread* that started the
server exits, so start servers from the test's main thread).

    with RedisServer(tmp_path / "r") as srv:       # srv.url == "redis://127.0.0.1:PORT/0"
        srv.kill9(); srv.restart()                   # same port and folder: AOF replayed

    with RedisClusterServers(tmp_path / "c") as cl:  # cl.url == "redis://127.0.0.1:P1?cluster=1"
        ...
"""
from __future__ import annotations

import errno
import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import redis

from lmcore.errors import CacheUnavailable
from lmcore.procs import die_with_parent, stop_child

__all__ = ["RedisServer", "RedisClusterServers", "redis_binaries_missing", "free_port", "reserve_port"]



_INSTALL_HINT = ("run ./run-tests.sh or scripts/setup.sh (they install redis-server with apt-get), or give the "
                 "redis:// URL of a running server")


def redis_binaries_missing() -> str | None:
    """A message naming the missing binaries and how to install them, or None."""
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        return f"expected {' and '.join(missing)} on PATH, got none: {_INSTALL_HINT}"
    return None


def _port_free(port: int) -> bool:
    """Nothing holds `port` on any address, IPv4 or IPv6: bound on all of them (a port that only
    127.0.0.1 finds free may be taken on the machine's own IP, where Ray's nodes listen and connect;
    CI once lost a Ray node's metrics port that way). The IPv6 check binds ``::`` with
    ``IPV6_V6ONLY`` so that a server listening on ``::1`` or ``[::]`` alone counts as holding it
    too (the IPv4 bind does not see those); a machine without IPv6 skips that check."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    try:
        s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:                                   # no IPv6 in this kernel
        return True
    with s6:
        s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s6.bind(("::", port))
        except OSError as e:
            return e.errno == errno.EADDRNOTAVAIL     # IPv6 present but switched off: nothing there
    return True


# Ports a local Ray takes whatever `ray.init` is told (its dashboard agent's HTTP port, 52365), so a
# port handed out here for a server of ours (the service's HTTP port, a test's Redis) must not be one.
RAY_FIXED_PORTS = frozenset({52365})
RAY_WORKER_PORTS_END = 20000          # Ray's workers listen on 10002-19999 by default
_handed_out: set[int] = set()
_lock = threading.Lock()
_rng = random.SystemRandom()          # not the `random` module's state: tests seed that, in every worker alike


@functools.cache                      # read once: free_port may draw 200 candidates
def _port_range() -> tuple[int, int]:
    """Where `free_port` draws from: above Ray's worker ports and below the kernel's ephemeral range
    (``ip_local_port_range``, 32768-60999 by default), where every bind(0) and connect() gets its
    port, Ray's own randomly placed ports included. A port drawn there and bound seconds later
    cannot have been taken meanwhile by any of them (a service's HTTP port once lost that race to a
    local Ray's metrics port). (0, 0) when the ephemeral range leaves no room below it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return (RAY_WORKER_PORTS_END, low) if low - RAY_WORKER_PORTS_END >= 2000 else (0, 0)


def _candidate_port(span: int = 0) -> int:
    """A port to try, with `span` more above it also outside the ephemeral range (a cluster's bus
    port is port + 10000): drawn from `_port_range()`, else the kernel's pick (bound to port 0)."""
    lo, hi = _port_range()
    if hi - span - lo >= 500:
        return _rng.randrange(lo, hi - span)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reserve_port(port: int) -> None:
    """Never hand out `port` in this process: one chosen elsewhere (`lmstream serve --port`) that
    is bound only after servers started here (its Redis) have taken theirs."""
    with _lock:
        _handed_out.add(int(port))


def free_port(*, cluster_bus: bool = False) -> int:
    """A loopback port nobody listens on (and port + 10000 too, for a cluster's bus): outside the
    kernel's ephemeral range (`_port_range`), never one of `RAY_FIXED_PORTS` and never one this
    process was handed before or reserved (several ports are often picked before any is bound, e.g.
    a Ray node's)."""
    bus = 10000 if cluster_bus else 0
    with _lock:
        for _ in range(200):
            port = _candidate_port(bus)
            ports = (port, port + bus) if bus else (port,)
            if port + bus > 65535 or any(p in RAY_FIXED_PORTS or p in _handed_out or not _port_free(p) for p in ports):
                continue
            _handed_out.update(ports)
            return port
    raise CacheUnavailable("expected a free loopback port, got none in 200 tries")


class RedisServer:
    """One ``redis-server`` with AOF (``appendfsync everysec``) in ``folder``.

    Args:
        folder: where the server keeps its files (created; kept across `restart`).
        port: TCP port on 127.0.0.1 (default: a free one, kept across restarts).
        cluster: start with ``--cluster-enabled yes`` (see `RedisClusterServers`).
        maxmemory: e.g. "2gb": writes past it are refused (``noeviction``), never evicted.
        extra: more ``--option value`` arguments.
        start_timeout: seconds to wait for the first PING answer.
    """

    def __init__(self, folder: Path, *, port: int | None = None, cluster: bool = False,
                 maxmemory: str | None = None, extra: tuple[str, ...] = (), start_timeout: float = 15.0) -> None:
        msg = redis_binaries_missing()
        if msg:
            raise CacheUnavailable(msg)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port(cluster_bus=cluster)
        self.cluster = cluster
        self.extra = tuple(extra) + (("--maxmemory", maxmemory, "--maxmemory-policy", "noeviction")
                                     if maxmemory else ())
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self._log = None

    # -- addresses -------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def client(self, **kw) -> redis.Redis:
        """A plain client of this node (short timeouts, bytes replies)."""
        kw.setdefault("socket_timeout", 5)
        kw.setdefault("socket_connect_timeout", 5)
        return redis.Redis(host="127.0.0.1", port=self.port, **kw)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join((self.folder / "redis.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # -- life cycle --------------------------------------------------------------
    def _argv(self) -> list[str]:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.folder),
                "--daemonize", "no", "--logfile", "", "--protected-mode", "no"]
        if self.cluster:
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "5000"]
        return argv + list(self.extra)

    def start(self) -> "RedisServer":
        """Start the server and wait until it answers PING (RuntimeError with its log if not)."""
        if self.proc is not None and self.proc.poll() is None:
            raise CacheUnavailable(f"expected a stopped redis-server, got pid {self.proc.pid} running")
        self._close_log()                      # the log of a server that exited (started again after a crash)
        self._log = open(self.folder / "redis.log", "ab")
        # a process group of its own: Ctrl-C in a terminal signals the whole foreground group, and redis-server
        # shut down on it before `lmstream serve` could drain and mark its jobs; it stops with its parent
        # all the same (die_with_parent), and `stop` stops it by its PID
        self.proc = subprocess.Popen(self._argv(), cwd=self.folder, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=die_with_parent, process_group=0)
        deadline = time.monotonic() + self.start_timeout
        c = self.client(socket_timeout=1, socket_connect_timeout=1)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise CacheUnavailable(f"expected redis-server on port {self.port} to start, it exited with "
                                       f"status {self.proc.returncode}; log:\n{self.log_tail()}")
                try:
                    if c.ping():
                        return self
                except redis.exceptions.BusyLoadingError:
                    pass  # replaying its AOF
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise CacheUnavailable(f"expected redis-server on port {self.port} to answer PING within "
                                       f"{self.start_timeout} s, got no answer; log:\n{self.log_tail()}")
                time.sleep(0.02)
        finally:
            c.close()

    def kill9(self) -> None:
        """SIGKILL the server (no shutdown, no final fsync) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._close_log()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a frozen server)."""
        assert self.proc is not None and self.proc.poll() is None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self) -> "RedisServer":
        """`kill9` if running, then start again on the same port with the same folder."""
        self.kill9()
        return self.start()

    def stop(self) -> None:
        """Terminate the server by its pid (SIGCONT first in case it is paused), wait, kill."""
        stop_child(self.proc, 10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisClusterServers:
    """``n`` (default 3) cluster-enabled masters, no replicas, joined with
    ``redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes``; each in
    ``folder/node-<port>``.

    ``url`` is one node's address with ``?cluster=1`` (for `RedisFrameCache.from_url`)."""

    def __init__(self, folder: Path, n: int = 3, *, join_timeout: float = 30.0) -> None:
        self.folder = Path(folder)
        self.nodes: list[RedisServer] = []
        self.n = n
        self.join_timeout = join_timeout
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}?cluster=1"

    def start(self) -> "RedisClusterServers":
        try:
            ports: set[int] = set()
            for _ in range(self.n):
                port = free_port(cluster_bus=True)
                while port in ports or port + 10000 in ports or port - 10000 in ports:
                    port = free_port(cluster_bus=True)
                ports.add(port)
                node = RedisServer(self.folder / f"node-{port}", port=port, cluster=True)
                self.nodes.append(node)
                node.start()
            addrs = [f"127.0.0.1:{node.port}" for node in self.nodes]
            r = subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0",
                                "--cluster-yes"], capture_output=True, text=True, timeout=self.join_timeout,
                               stdin=subprocess.DEVNULL, cwd=self.folder)
            if r.returncode != 0:
                raise CacheUnavailable(f"expected redis-cli --cluster create to succeed, got status {r.returncode}:\n"
                                   f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
            self._wait_ok()
            return self
        except BaseException:
            self.stop()
            raise

    def _wait_ok(self) -> None:
        """Until every node says ``cluster_state:ok`` and knows all ``n`` masters."""
        deadline = time.monotonic() + self.join_timeout
        while True:
            ok = True
            for node in self.nodes:
                c = node.client(socket_timeout=2)
                try:
                    info = c.cluster("info")
                    nodes = c.cluster("nodes")
                except redis.exceptions.RedisError:
                    ok = False
                    break
                finally:
                    c.close()
                state = info.get("cluster_state") if isinstance(info, dict) else None
                if state != "ok" or len(nodes) != self.n:
                    ok = False
                    break
            if ok:
                return
            if time.monotonic() > deadline:
                raise CacheUnavailable(f"expected the {self.n}-node cluster to reach cluster_state:ok within "
                                   f"{self.join_timeout} s, got {info!r}")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> "RedisClusterServers":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
