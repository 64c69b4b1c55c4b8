"""`lmstream serve`: the service on this machine, with everything it needs started and stopped by it.

    lmstream serve [--host 127.0.0.1] [--port 8000] [--model DIR] [--redis URL]
                   [--allowed-dir DIR ...] [--api-key KEY ...] [--data-dir DIR]
                   [--ray-address HOST:PORT] [--service-resources JSON] [--camera-resources JSON]
                   [--warm-decoders N] [--redis-maxmemory SIZE]

* Redis: its own `redis-server` child (AOF everysec, data in DATA_DIR/redis) unless --redis URL
  (a Redis Cluster: ``redis://HOST:PORT?cluster=1``, one node's address). Its own server has a memory cap
  (--redis-maxmemory, default half this machine's memory, policy ``noeviction``): past it new frames are
  refused with `E_CACHE_BUDGET` and nothing stored is evicted; without it Redis grew until the kernel's
  OOM killer took it or a model replica.
* Ray: a local instance (no dashboard web UI, usage stats off, every Ray process listening on loopback only
  but Serve's HTTP proxy, on HOST; temp folder DATA_DIR/ray), or with
  --ray-address an existing cluster (``ray start --head`` ...), and the Serve app of
  `deploy/app.py`, HTTP on HOST:PORT (one proxy, on the head node).
* API keys: --api-key, else LMSTREAM_API_KEYS, else one generated now and printed.
* DATA_DIR is locked (DATA_DIR/serve.lock, holding the PID) while it runs: a second service on it is refused.
* Prints the URL once `/ready` answers 200, as one JSON line (`{"url", "api_key", "redis"}`) on stdout, which
  carries nothing else: everything else, Ray's own lines included, goes to stderr.
* Ctrl-C or SIGTERM stops what it started: Serve, Ray and its Redis (by PID). On a cluster it attached
  to, it deletes its app (and Serve, when it started Serve there) and leaves the cluster running.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from lmcore.errors import BadArgument, ServiceUnavailable
from lmcore.urls import redact_redis_url


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the service (Ray Serve + Redis) on this machine")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the HTTP API listens on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--model", help="checkpoint folder (default: LMSTREAM_MODEL or the demo checkpoint)")
    p.add_argument("--vision-tower", help="CLIP folder (default: the checkpoint's mm_vision_tower)")
    p.add_argument("--device", help="cpu | cuda (default: cuda when present)")
    p.add_argument("--redis", help="redis://HOST:PORT/DB of a running Redis (default: start one)")
    p.add_argument("--allowed-dir", action="append", default=None,
                   help="folder whose files POST /v1/videos {\"path\"} may name (repeatable)")
    p.add_argument("--api-key", action="append", default=None, help="accepted API key (repeatable)")
    p.add_argument("--data-dir", help="uploads, Redis AOF, Ray temp files (default: .lmstream in the repo)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all; local Ray only)")
    p.add_argument("--ray-address", help="attach to this running Ray cluster (HOST:PORT of its GCS) instead of "
                   "starting a local one; it is left running on exit")
    p.add_argument("--service-resources", type=json.loads, default=None, metavar="JSON",
                   help='Ray resources each Serve replica asks for, e.g. \'{"head_node": 0.01}\' (pins them)')
    p.add_argument("--camera-resources", type=json.loads, default=None, metavar="JSON",
                   help="Ray resources each camera actor asks for (cameras spread over the nodes that have them)")
    p.add_argument("--warm-decoders", type=int, default=None, metavar="N",
                   help="file-job decoder actors kept started and idle, so that a new job does not wait ~3 s for a "
                        "Ray worker to start and import torch; each is an idle worker of about 340 MB; a decoder whose "
                        "job ended takes the next one; 0 keeps none idle (default: LMSTREAM_WARM_DECODERS or 1)")
    p.add_argument("--redis-maxmemory", metavar="SIZE", default=None,
                   help="memory cap of its own redis-server, e.g. 8gb or 500mb (0: none): past it new frames are "
                        "refused (E_CACHE_BUDGET, 507), stored ones kept, and DELETE frees room (default: "
                        "LMSTREAM_REDIS_MAXMEMORY, else half this machine's memory)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /ready")
    p.set_defaults(fn=cmd_serve)


#: the smallest --redis-maxmemory: job records, stream rings' indexes and the replicas' counters need room too
MIN_REDIS_MAXMEMORY = 64 << 20
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1 << 10, "m": 1000 ** 2, "mb": 1 << 20, "g": 1000 ** 3, "gb": 1 << 30,
          "t": 1000 ** 4, "tb": 1 << 40}


def parse_memory_size(text: str, name: str) -> int:
    """Bytes of a size as redis.conf writes them (``500mb``, ``8gb``, ``1g``, ``1073741824``: k/m/g are powers
    of 1000, kb/mb/gb of 1024, as Redis reads them); 0 for none. `BadArgument` naming `name` otherwise, or
    under `MIN_REDIS_MAXMEMORY`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text or "")
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise BadArgument(f"expected {name} to be a size such as 8gb, 500mb or 0 (none), got {text!r}")
    n = int(float(m.group(1)) * _UNITS[unit])
    if 0 < n < MIN_REDIS_MAXMEMORY:
        raise BadArgument(f"expected {name} to be 0 (none) or at least {MIN_REDIS_MAXMEMORY >> 20}mb (job records "
                          f"and the streams' indexes need room too), got {text!r} ({n} bytes)")
    return n


#: a container's memory limit (cgroup v2, then v1): "max" or a huge number when there is none
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _physical_memory() -> int | None:
    """This machine's memory, or its container's limit when that is lower (half the host's memory was more
    than a container limited to less: the kernel's OOM killer again)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):       # not a POSIX system that says
        total = None
    for f in CGROUP_MEMORY_LIMITS:
        try:
            raw = Path(f).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) > 0:
            total = min(total, int(raw)) if total else int(raw)
        break
    return total


def redis_maxmemory(arg: str | None) -> tuple[int, str]:
    """The cap of the service's own redis-server, in bytes (0: none), and where it came from: --redis-maxmemory,
    else LMSTREAM_REDIS_MAXMEMORY, else half of this machine's memory (the other half for the model replicas,
    Ray, and the copy an AOF rewrite's fork may make)."""
    if arg is not None:
        return parse_memory_size(arg, "--redis-maxmemory"), "--redis-maxmemory"
    env = os.environ.get("LMSTREAM_REDIS_MAXMEMORY")
    if env:
        return parse_memory_size(env, "LMSTREAM_REDIS_MAXMEMORY"), "LMSTREAM_REDIS_MAXMEMORY"
    total = _physical_memory()
    if not total:
        return 0, "no default: this system does not say its memory"
    return max(MIN_REDIS_MAXMEMORY, total // 2), "half this machine's memory (or its container's limit)"


def _gb(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def _wait_ready(url: str, key: str, timeout: float, alive) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not alive():
            raise ServiceUnavailable("expected the service to start, got a stop request")
        try:
            req = urllib.request.Request(url + "/ready", headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
            try:                        # /ready's 503 names what does not answer (Redis, a model replica)
                msg = json.loads(e.read() or b"{}").get("error", {}).get("message")
            except (ValueError, OSError, AttributeError):
                msg = None
            if msg:
                last += f" ({msg})"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.5)
    raise ServiceUnavailable(f"expected {url}/ready to answer 200 within {timeout:g} s, got {last}")


def _check_http_port(host: str, port: int) -> None:
    """Before a local Ray starts: the HTTP port must be free and not the one Ray's dashboard agent
    always takes (`ray.init` cannot move it), else Serve's proxy fails 30 s later with Ray's words.
    (On a cluster it attaches to, a Serve already there may hold the port: not checked.)"""
    import errno
    import socket
    from frame_cache.redis_server import RAY_FIXED_PORTS
    if port in RAY_FIXED_PORTS:
        raise BadArgument(f"expected --port other than {port}: a local Ray's dashboard agent listens on it "
                          f"(Ray's default, fixed for `ray.init`); got --port {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise BadArgument(f"expected --host to be an address or name of this machine, got {host!r} ({e})") from e
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # a port in TIME_WAIT is free to bind
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise BadArgument(f"expected --port {port} to be free on {host}, got it in use (another service, "
                                  f"or an `lmstream serve` already running?)") from e
            raise BadArgument(f"expected --host to be an address of this machine, got {host!r} "
                              f"({e.strerror or e})") from e


def cmd_serve(args) -> int:
    from deploy.settings import MAX_WARM_DECODERS, Settings
    if not 0 < args.port < 65536:
        raise BadArgument(f"expected --port in 1..65535, got {args.port}")
    if args.warm_decoders is not None and not 0 <= args.warm_decoders <= MAX_WARM_DECODERS:
        raise BadArgument(f"expected --warm-decoders in 0..{MAX_WARM_DECODERS}, got {args.warm_decoders}")
    if not args.ray_address:
        _check_http_port(args.host, args.port)
    from frame_cache.redis_server import reserve_port
    reserve_port(args.port)                 # its own redis-server, started first, must not take it
    settings = Settings.from_env(model=args.model, vision_tower=args.vision_tower, device=args.device,
                                 redis_url=args.redis, data_dir=args.data_dir, allowed_dirs=args.allowed_dir,
                                 api_keys=args.api_key, service_resources=args.service_resources,
                                 camera_resources=args.camera_resources, warm_decoders=args.warm_decoders)
    if not (Path(settings.model) / "config.json").exists():
        from lmcore.errors import CheckpointError
        raise CheckpointError(f"expected a checkpoint folder with config.json, got {settings.model}")
    from lmcore.weights import check_weight_files
    check_weight_files(Path(settings.model))     # a cut-short file: E_CHECKPOINT now, not a failed deploy later
    for d in settings.allowed_dirs:
        if not os.path.isdir(d):
            name = "--allowed-dir" if args.allowed_dir else "LMSTREAM_ALLOWED_DIRS"
            raise BadArgument(f"expected {name} to be an existing folder, got {d}")
    if settings.device:
        from .cli import check_device
        check_device(settings.device, here=not args.ray_address,
                     name="--device" if args.device else "LMSTREAM_DEVICE")
    own_redis = args.redis is None and not os.environ.get("LMSTREAM_REDIS_URL")     # else someone else's
    if not own_redis and args.redis_maxmemory is not None:
        raise BadArgument("expected --redis-maxmemory only for the service's own redis-server, got it with "
                          f"{'--redis' if args.redis else 'LMSTREAM_REDIS_URL'} too (that server's maxmemory is "
                          "its own configuration's)")
    maxmemory, maxmemory_from = redis_maxmemory(args.redis_maxmemory) if own_redis else (0, "")
    if not own_redis and not args.ray_address:
        # someone else's Redis (else we start our own below): reachable before Ray starts, or a clear error now.
        # Not on a cluster: its replicas may reach a Redis this driver's host cannot
        from frame_cache.redis_cache import check_reachable
        check_reachable(settings.redis_url)
    settings, generated = settings.with_generated_key()
    data = Path(settings.data_dir)
    try:
        data.mkdir(parents=True, exist_ok=True)
    except OSError as e:                       # a file there, a read-only or virtual file system: not our fault
        name = "--data-dir" if args.data_dir else "LMSTREAM_DATA_DIR" if os.environ.get("LMSTREAM_DATA_DIR") \
            else "the data folder"
        raise BadArgument(f"expected {name} to be a folder it can create and write, got {data} "
                          f"({e.strerror or type(e).__name__})") from None
    lock = _lock_data_dir(data)     # held until this process ends: one service per folder (its Redis AOF, Ray's)
    ours = _stdout_for_our_lines()  # from here on fd 1 is stderr: Ray's lines cannot mix into the ready line
    stopping = {"flag": False}

    def on_signal(signum, _frame):
        stopping["flag"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    redis_srv = None
    own_ray_tmp: Path | None = None          # Ray's temp folder outside DATA_DIR (its path was too long): removed
    ray_dead: frozenset = frozenset()        # Ray's own processes that had exited when it was ready
    ray_started = False            # connected to Ray (a local instance we started, or a cluster)
    serve_started = False          # Serve was not running before us: we shut it down on exit
    ready = False                  # /ready answered 200: the app is up (it may hold open sockets)
    try:
        if own_redis:
            from frame_cache.redis_server import RedisServer
            redis_srv = RedisServer(data / "redis", port=_last_redis_port(data / "redis", avoid=int(args.port)),
                                    maxmemory=str(maxmemory) if maxmemory else None).start()
            (data / "redis" / "port").write_text(f"{redis_srv.port}\n")
            settings = settings.model_copy(update={"redis_url": redis_srv.url})
            cap = f"maxmemory {_gb(maxmemory)} ({maxmemory_from})" if maxmemory else \
                f"no maxmemory ({maxmemory_from or '--redis-maxmemory 0'})"
            print(f"redis: started redis-server pid {redis_srv.proc.pid} on {redis_srv.url} (AOF in {data / 'redis'}, "
                  f"{cap})", file=sys.stderr)
            _say_if_full(redis_srv, maxmemory)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
        if not args.ray_address:
            # A local instance is one node: its GCS, raylet, workers and agents need no other machine, so
            # they listen on loopback only (Ray reads this at import, as it does on macOS). Without it they
            # listen on the host's address with authentication off, and anyone who can reach this machine
            # could attach to Ray and run code, whatever --host and the API keys say.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        import ray
        from ray import serve
        from deploy.app import build_app
        import logging
        # Serve's driver-side INFO lines ("Connecting to existing Serve app ... New http_options will not be
        # applied", after the serve.start it just made) say less than the lines below, and one misleads
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        common = dict(namespace="lmstream", logging_level="WARNING", log_to_driver=False,
                      runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
        if args.ray_address:
            print(f"ray: attaching to the cluster at {args.ray_address}", file=sys.stderr)
            ray.init(address=args.ray_address, **common)
        else:
            ray_tmp = _ray_temp_dir(data)
            if ray_tmp != data / "ray":
                own_ray_tmp = ray_tmp
            os.environ["RAY_TMPDIR"] = str(ray_tmp)
            ray_tmp.mkdir(exist_ok=True)
            print("ray: starting a local instance (no dashboard, loopback only)", file=sys.stderr)
            ray.init(num_cpus=args.num_cpus, include_dashboard=False, _temp_dir=str(ray_tmp), **common)
            node_ip = ray.util.get_node_ip_address()
            if node_ip not in ("127.0.0.1", "::1"):
                print(f"warning: Ray's processes listen on {node_ip}, not loopback only (ray was imported before "
                      "`lmstream serve` could ask for loopback); anyone reaching that address can attach to Ray",
                      file=sys.stderr)
        ray_started = True
        signal.signal(signal.SIGTERM, on_signal)        # ray.init installs its own handlers: ours again
        signal.signal(signal.SIGINT, on_signal)
        serve_started = not _serve_running()
        try:
            serve.start(http_options={"host": args.host, "port": args.port}, proxy_location="HeadOnly")
        except Exception as e:          # Ray's words are a RayTaskError of ProxyActor.ready(): say what it means
            cause = re.search(r"Failed to bind to address [^\n]*", str(e))
            if cause is None:
                raise
            raise ServiceUnavailable(f"expected Serve's HTTP proxy to listen on {args.host}:{args.port}, got "
                                     f"'{cause.group(0).rstrip('.')}' (the port taken on a cluster by another "
                                     "service on the head node, or locally since the check before Ray "
                                     "started?); give another --port") from e
        serve.run(build_app(settings), name="lmstream", route_prefix="/", blocking=False)
        url = service_url(args.host, args.port)
        _wait_ready(url, settings.api_keys[0], args.ready_timeout, lambda: not stopping["flag"])
        ready = True
        if not args.ray_address:                    # Ray's processes already gone (crashed): not a signal's doing
            ray_dead = frozenset(_ray_processes_gone(0.0))
        print(json.dumps({"url": url, "api_key": generated or "(from --api-key / LMSTREAM_API_KEYS)",
                          "redis": redact_redis_url(settings.redis_url)}), file=ours, flush=True)   # no password
        print(f"lmstream: serving {settings.model} at {url}" +
              (f"\nAPI key: {generated}" if generated else ""), file=sys.stderr, flush=True)
        while True:
            time.sleep(1.0)
            if redis_srv is not None and redis_srv.proc.poll() is not None:
                _restart_redis(redis_srv, data / "redis")
    except KeyboardInterrupt:
        print("lmstream: stopping", file=sys.stderr)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if ray_started:
            gone = [] if args.ray_address else _ray_processes_gone(0.5 if stopping["flag"] else 0.0, ray_dead)
            if gone:
                # the stop signal went to the whole process group (`timeout`, `kill -TERM -PGID`, systemd's
                # default KillMode=control-group): Ray's own processes got it too and exited. Serve cannot be
                # reached: a drain waited on the gone GCS until Ray ended this process after 60 s
                print(f"lmstream: Ray's own processes ({', '.join(gone)}) stopped with this one (a stop signal sent to "
                      "its whole process group or cgroup reaches them too; send it to this PID, or under systemd use "
                      "KillMode=mixed): open sockets and questions were cut, not drained", file=sys.stderr)
            else:
                try:
                    from ray import serve
                    if ready:                           # a Serve that never answered has no socket open
                        _drain_for_stop(serve)
                    if serve_started:
                        serve.shutdown()
                    else:                               # someone else's Serve: only our app goes
                        serve.delete("lmstream")
                except Exception as e:  # noqa: BLE001 - shutting down regardless
                    print(f"warning: stopping Serve: {e}", file=sys.stderr)
            import ray
            ray.shutdown()                              # a cluster we attached to keeps running
            if ready:                                   # its decoders are gone: their jobs say so now
                _mark_jobs_interrupted(settings)
        if redis_srv is not None:
            redis_srv.stop()
        if own_ray_tmp is not None:
            import shutil
            shutil.rmtree(own_ray_tmp, ignore_errors=True)
        lock.close()


#: Ray's longest socket path past its temp folder: ``/session_<date>_<time>_<us>_<pid>/sockets/plasma_store``
RAY_SOCKET_SUFFIX_CHARS = 66
#: what a Unix socket's path may hold (sun_path less its NUL: 108 bytes on Linux, 104 on macOS)
UNIX_PATH_MAX = 103 if sys.platform == "darwin" else 107


def _ray_temp_dir(data: Path) -> Path:
    """Where a local Ray keeps its session (sockets, logs): DATA_DIR/ray, or, when that path is too long for
    the Unix sockets Ray makes in it (Ray failed with "validate_socket_filename failed: AF_UNIX path length
    cannot exceed 107 bytes", said as E_INTERNAL: a checkout in a deep home folder was enough), a short
    folder of its own under the system's temporary folder, said on stderr and removed on exit."""
    import tempfile
    want = data / "ray"
    if len(os.fsencode(str(want))) + RAY_SOCKET_SUFFIX_CHARS <= UNIX_PATH_MAX:
        return want
    short = Path(tempfile.mkdtemp(prefix="lms-ray-"))
    if len(os.fsencode(str(short))) + RAY_SOCKET_SUFFIX_CHARS > UNIX_PATH_MAX:
        short.rmdir()
        room = UNIX_PATH_MAX - RAY_SOCKET_SUFFIX_CHARS
        raise BadArgument(f"expected a path for Ray's Unix sockets of at most {room} bytes (a socket's path holds "
                          f"{UNIX_PATH_MAX}): DATA_DIR/ray or a folder in TMPDIR, got {want} and {short} (give a "
                          "shorter --data-dir or TMPDIR)")
    print(f"ray: its session in {short} (removed on exit): {want} is too long a path for the Unix sockets Ray "
          f"makes in it ({UNIX_PATH_MAX} bytes at most)", file=sys.stderr)
    return short


def _ray_processes_gone(wait_s: float, before: frozenset = frozenset()) -> list[str]:
    """The kinds of a local Ray's own processes (``gcs_server``, ``raylet``, ``log_monitor``, ...) that have
    exited, but those in `before` (exited already while it served), after up to `wait_s` s for a signal sent to
    them with this process to take effect; [] when none did (or Ray does not say)."""
    try:
        import ray._private.worker as worker
        node = worker._global_node
        if node is None:
            return []
        deadline = time.monotonic() + wait_s
        while True:
            dead = sorted({kind for kind, _ in node.dead_processes()} - before)
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - Ray's internals moved: drain as before
        return []


def _say_if_full(srv, maxmemory: int) -> None:
    """A warning when the frames its AOF brought back already fill the cap (a restart with a smaller one):
    Redis loads them all, then refuses every new frame until videos or streams are deleted."""
    if not maxmemory:
        return
    try:
        c = srv.client()
        try:
            used = int(c.info("memory")["used_memory"])
        finally:
            c.close()
    except Exception:  # noqa: BLE001 - only a warning; /ready says whether it answers
        return
    if used >= maxmemory * 0.95:
        print(f"warning: redis holds {_gb(used)} of its maxmemory {_gb(maxmemory)}: new frames will be refused "
              "(E_CACHE_BUDGET) until videos or streams are deleted, or a larger --redis-maxmemory is given",
              file=sys.stderr)


def _mark_jobs_interrupted(settings) -> None:
    """Video jobs still queued or ingesting when the service stopped: `failed` with `E_INTERRUPTED` (their
    frames stay), their uploads removed. They stayed `ingesting` until the next start marked them, so a
    `lmstream cache ls` or another reader of the Redis in between saw jobs that nothing was running."""
    from deploy.serving import JobStore
    from frame_cache import open_cache
    try:
        failed = JobStore(settings.redis_url).fail_interrupted(open_cache(settings.redis_url))
        JobStore.remove_uploads(settings.upload_dir, failed)
    except Exception as e:  # noqa: BLE001 - the next start marks them
        print(f"warning: interrupted video jobs not marked ({type(e).__name__}: {e}); the next start does it",
              file=sys.stderr)
        return
    if failed:
        print(f"lmstream: {len(failed)} video job(s) interrupted: marked failed (E_INTERRUPTED), their frames "
              f"stay: {' '.join(failed)}", file=sys.stderr)


def _drain_for_stop(serve) -> None:
    """Before Serve goes: the Ingress refuses new questions and jobs (503), tells its open `/v1/live` sockets
    the service is stopping and closes them 1001 (they were cut with no close frame), and lets the HTTP
    questions in flight finish (they were cut with no response). Best effort: a Serve that never got that far
    has none."""
    try:
        d = serve.get_deployment_handle("Ingress", "lmstream").drain_for_stop.remote().result(timeout_s=40)
    except Exception as e:  # noqa: BLE001 - not deployed, or already going: stopping regardless
        print(f"lmstream: open sockets and questions not drained ({type(e).__name__})", file=sys.stderr)
        return
    if d["sockets"]:
        print(f"lmstream: {d['sockets']} open /v1/live socket(s) told the service is stopping", file=sys.stderr)
    if d["questions"]:
        print(f"lmstream: {d['questions']} question(s) still being answered after 30 s: cut", file=sys.stderr)


def _last_redis_port(folder: Path, avoid: int | None = None) -> int | None:
    """The port the service's own redis-server had the last time on this data folder, when it is free again:
    `lmstream cache ... --cache redis://127.0.0.1:PORT/0` and dashboards keep working across restarts (it was
    a new port each start). None (a new free port) when there is none, it is taken, or it is `avoid`."""
    from frame_cache.redis_server import RAY_FIXED_PORTS, _port_free
    try:
        port = int((folder / "port").read_text().strip())
    except (OSError, ValueError):
        return None
    ok = 1024 <= port <= 65535 and port not in RAY_FIXED_PORTS and port != avoid    # `avoid`: the HTTP port, not
    return port if ok and _port_free(port) else None                                  # bound yet when Redis starts


def service_url(host: str, port: int) -> str:
    """The URL clients reach the service at: an IPv6 address in brackets (`http://[::1]:8000`; `http://::1:8000`
    was printed, which curl and httpx refuse)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


#: Restarts of its own redis-server `lmstream serve` makes before it gives up (exit 6, `E_CACHE_UNAVAILABLE`):
#: within `REDIS_RESTART_WINDOW_S`, so a server that keeps dying is not restarted forever.
REDIS_RESTARTS = 5
REDIS_RESTART_WINDOW_S = 300.0
_redis_restarts: list[float] = []


def _restart_redis(srv, folder: Path) -> None:
    """The service's own redis-server exited (killed, out of memory): started again on its port with its AOF
    folder, so the service goes on without a restart (its replicas' clients reconnect; frames written before
    the last fsync, at most a second's, are what an AOF replay keeps). It stayed a zombie and the service
    answered 503 until someone restarted it by hand, with nothing said."""
    from lmcore.errors import CacheUnavailable
    code = srv.proc.returncode
    now = time.monotonic()
    _redis_restarts[:] = [t for t in _redis_restarts if now - t < REDIS_RESTART_WINDOW_S] + [now]
    if len(_redis_restarts) > REDIS_RESTARTS:
        raise CacheUnavailable(f"expected the service's redis-server to keep running, got it exited {len(_redis_restarts)} "
                               f"times in {REDIS_RESTART_WINDOW_S:g} s (last status {code}); its log: "
                               f"{folder / 'redis.log'}")
    print(f"redis: redis-server pid {srv.proc.pid} exited with status {code}; starting it again on {srv.url} "
          f"(AOF in {folder})", file=sys.stderr, flush=True)
    srv.start_timeout = max(srv.start_timeout, 300.0)    # replaying a large AOF takes a while
    srv.start()
    print(f"redis: started redis-server pid {srv.proc.pid} on {srv.url}", file=sys.stderr, flush=True)


def _stdout_for_our_lines():
    """A private copy of stdout for our own (JSON) lines, returned as a text file; fd 1 itself, and with it
    `sys.stdout` and every child started afterwards, then writes to stderr. Ray prints from places a Python
    logging setting does not reach: the driver's C++ core worker and the log monitor relay raylet lines such
    as "(raylet) WARNING: 8 PYTHON worker processes have been started ..." or "Task
    ServeController.graceful_shutdown failed ..." (with ANSI colours) to fd 1, and the raylet, GCS and
    workers inherit it, so only moving fd 1 keeps stdout to the lines a script parses. The copy is not
    inherited (`os.dup`), so a reader sees EOF when this process ends, whatever children linger."""
    sys.stdout.flush()
    ours = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return ours


def _lock_data_dir(data: Path):
    """An exclusive lock on DATA_DIR/serve.lock (its holder's PID written in it), held by the returned open
    file until it is closed or this process ends; two services on one folder would append to one Redis AOF."""
    import fcntl
    f = open(data / "serve.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if not isinstance(e, BlockingIOError):      # e.g. a file system without locks: say so, not "in use"
            f.close()
            raise BadArgument(f"expected --data-dir {data} on a file system that can lock a file, got "
                              f"{e.strerror or e} locking {data / 'serve.lock'}") from None
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise BadArgument(f"expected --data-dir {data} to be used by no other service, got it locked by "
                          f"`lmstream serve` pid {holder} (stop that one, or give another --data-dir)") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _serve_running() -> bool:
    """Whether Ray Serve already runs on the connected cluster (its controller actor exists)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def start_serve_process(args: list[str], log_path: Path, *, env: dict | None = None, timeout: float = 300.0,
                        new_session: bool = False):
    """`lmstream serve ARGS` as a child process (stderr to `log_path`), returned with its ready line
    (`{"url", "api_key", "redis"}`) once `/ready` answered 200; stop it with `lmcore.procs.stop_child`.
    `new_session`: in a session and process group of its own (as a terminal or a supervisor starts it).
    Raises `ServiceUnavailable` with the log's tail when it does not come up within `timeout` s."""
    import subprocess
    from lmcore.procs import stop_child
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = str(repo)
    with open(log_path, "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lmstream.cli", "serve", *map(str, args)],
                                stdout=subprocess.PIPE, stderr=err, env=env, cwd=repo, start_new_session=new_session)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()             # the ready line, or "" when the process ended
            if line.startswith(b"{"):
                return proc, json.loads(line)
            if not line and proc.poll() is not None:
                break
    except BaseException:                             # Ctrl-C / SIGTERM while it starts: stop it, by its PID
        stop_child(proc, 30)
        raise
    stop_child(proc, 30)
    tail = Path(log_path).read_text(errors="replace")[-3000:]
    raise ServiceUnavailable(f"expected `lmstream serve` to be ready within {timeout:g} s, got exit status "
                             f"{proc.returncode}; its log ({log_path}):\n{tail}")
