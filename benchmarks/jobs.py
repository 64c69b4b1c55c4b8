"""`lmstream bench jobs`: file-job latency through the real service, with and without warm decoder actors.

    lmstream bench jobs [--warm 0,1] [--videos 3,60] [--repeats 3] [--bursts 2] [--burst-size 4] [--pause 6]
                        [--json] [--out FILE]

A file job (`POST /v1/videos`) runs on a decoder, a `FileSource` Ray actor. A fresh one's worker process starts
and imports torch, PyAV and the service (~3.5 s on a 2-core CPU) before it decodes a frame; the Ingress keeps
`warm_decoders` of them started and idle, and a decoder whose job ended takes the next job (deploy/app.py,
`RayBackend._take_source` / `_give_back`). This measures what a client sees, for each setting in --warm, the
first being the baseline (default 0: none kept idle, a fresh actor per job unless a busy one frees first), in
one run:

* per setting, `lmstream serve` (demo checkpoint, its own redis-server and Ray, a temporary --data-dir,
  `--warm-decoders N`) through `start_serve_process`, stopped by PID with `stop_child` before the next;
  the idle `ray::FileSource` workers in its process tree are counted once none is starting, to show the
  setting took effect;
* synthetic videos (`stream.synthetic.make_scene` + `write_video`, 64x64, H.264 at FILE_FPS, sampled by the
  job at the service's 1 fps), one per duration in --videos; one unmeasured job of the shortest first,
  so that no measured job pays the Encoder's first pass;
* `sequential`: --repeats jobs per video, one at a time; after each, --pause s and then until no decoder
  is starting (a taken spare is replaced in ~3.5 s here, several starting at once take longer);
* `burst`: --bursts times, --burst-size jobs of the shortest video posted together (one thread each,
  released by a barrier; at most the job limit, 4 by default), the same rest after each burst.

Per job, from just before its multipart upload is sent: POST answered (202), first `GET /v1/videos/{id}`
showing it past `queued` (ingesting or already ready: the time it waited for a decoder, plus the upload),
and first GET showing it `ready`, polling every --poll s (the times are of the GET's answer: an upper
bound, late by at most one poll plus a GET). Each video is deleted after its timing. Reported per case and
setting: median / min / max, and the baseline's median over this setting's (x faster).

Everything it starts (the services, their Redis and Ray) is stopped by PID, also on Ctrl-C, SIGTERM or an
error; the videos and data folders live in one temporary folder that is removed. The CPU of this machine
may be shared with other jobs: the numbers say what this run saw.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "checkpoints" / "demo"
FILE_FPS = 4.0               # the files' frame rate: the job decodes 4 frames per sampled one, as from a real file
JOB_TIMEOUT_S = 300.0        # a job not ready by then counts as failed ("timeout")


def _log(msg: str) -> None:
    print(f"[jobs {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _r(x, d=3):
    return None if x is None else round(float(x), d)


# ------------------------------------------------------------------------------------------ the service
class Service:
    """One `lmstream serve` with `--warm-decoders N` in its own data folder; `stop` is idempotent."""

    def __init__(self, folder: Path, warm: int):
        self.folder, self.warm = folder, warm
        self.proc = None
        self.url = ""
        self.key = "jobs-" + os.urandom(8).hex()
        self.tree: dict[int, int] = {}                 # pid -> start time: the service's descendants seen

    def start(self, timeout: float = 300.0) -> "Service":
        from frame_cache.redis_server import free_port
        from lmstream.serve_cmd import start_serve_process
        env = dict(os.environ)
        for k in ("LMSTREAM_API_KEYS", "LMSTREAM_REDIS_URL", "LMSTREAM_DATA_DIR", "LMSTREAM_LIMITS",
                  "LMSTREAM_WARM_DECODERS"):           # the flag is the one source of the setting
            env.pop(k, None)
        env["TRITON_INTERPRET"] = "0"                  # the PyTorch references on the CPU, as a user runs it
        port = free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc, _ = start_serve_process(
            ["--port", port, "--model", DEMO, "--data-dir", self.folder / "data", "--api-key", self.key,
             "--num-cpus", str(os.cpu_count() or 2), "--warm-decoders", self.warm],
            self.folder / "serve.log", env=env, timeout=timeout)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def client(self, timeout: float = 120.0):
        import httpx
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=timeout)

    def decoders(self) -> dict[str, int]:
        """The service's FileSource workers by state: idle (title `ray::FileSource`), starting
        (`ray::FileSource.warm`), running a job (`ray::FileSource.run`)."""
        self.note_tree()
        out = {"idle": 0, "starting": 0, "running": 0}
        for pid, (_, _, cmd) in _proc_table().items():
            if pid not in self.tree or not cmd.startswith("ray::FileSource"):
                continue
            title = cmd.split()[0]
            key = {"ray::FileSource": "idle", "ray::FileSource.warm": "starting",
                   "ray::FileSource.run": "running"}.get(title)
            if key:
                out[key] += 1
        return out

    def settled_decoders(self, timeout: float = 60.0) -> dict[str, int]:
        """`decoders()` once none is starting (or after `timeout` s)."""
        deadline = time.monotonic() + timeout
        while (d := self.decoders())["starting"] and time.monotonic() < deadline:
            time.sleep(0.2)
        return d

    def note_tree(self) -> None:
        """Remember every process under the service now (Ray's GCS, raylet, workers: their titles do not
        name the folder), to check after the stop that none is left."""
        if self.proc is not None:
            from benchmarks.load import descendants
            self.tree.update(descendants(self.proc.pid))

    def stop(self) -> float:
        from lmcore.procs import stop_child
        self.note_tree()
        t = time.perf_counter()
        p, self.proc = self.proc, None
        stop_child(p, 90)
        return time.perf_counter() - t

    def leftovers(self) -> list[dict]:
        """Processes still alive of this service: its process tree as last noted, or naming its folder."""
        out = []
        for pid, (_, start, cmd) in _proc_table().items():
            if pid != os.getpid() and (self.tree.get(pid) == start or str(self.folder) in cmd):
                out.append({"pid": pid, "cmd": cmd[:160]})
        return out


def _proc_table():
    from benchmarks.load import _proc_table as table       # pid -> (ppid, start time, command line)
    return table()


# ------------------------------------------------------------------------------------------ one job
def make_videos(folder: Path, durations: list[float], size: int) -> dict[float, bytes]:
    """duration -> the bytes of a `size` x `size` H.264 file of a synthetic scene that long."""
    from stream.synthetic import make_scene, write_video
    out = {}
    for i, d in enumerate(durations):
        path = write_video(make_scene(500 + i, d, size=(size, size), events=False), folder / f"scene-{d:g}s.mp4",
                           fps=FILE_FPS)
        out[d] = path.read_bytes()
    return out


def run_job(service: Service, name: str, data: bytes, poll: float, start: threading.Barrier | None = None) -> dict:
    """Upload `data` as a client would (multipart), then poll its status every `poll` s until ready or failed.
    Times are seconds from just before the upload was sent; `start`: wait there before sending."""
    rec: dict = {"id": None, "post_s": None, "started_s": None, "ready_s": None, "status": None,
                 "first_status": None, "frames": None, "error": None, "polls": 0}
    with service.client() as c:
        if start is not None:
            start.wait()
        t0 = time.perf_counter()
        r = c.post("/v1/videos", files={"file": (name, data, "video/mp4")})
        rec["post_s"] = time.perf_counter() - t0
        if r.status_code != 202:
            rec.update(status="refused", error=f"HTTP {r.status_code}: {r.text[:200]}")
            return rec
        rec["id"] = r.json()["id"]
        while True:
            t = time.perf_counter()
            d = c.get(f"/v1/videos/{rec['id']}").json()
            now = time.perf_counter() - t0
            rec["polls"] += 1
            st = d["status"]
            rec["first_status"] = rec["first_status"] or st
            if st != "queued" and rec["started_s"] is None:
                rec["started_s"] = now
            if st in ("ready", "failed"):
                rec.update(status=st, frames=d.get("frames"), error=d.get("error"))
                if st == "ready":
                    rec["ready_s"] = now
                return rec
            if now > JOB_TIMEOUT_S:
                rec.update(status="timeout", error=f"still {st} after {JOB_TIMEOUT_S:g} s")
                return rec
            time.sleep(max(0.0, poll - (time.perf_counter() - t)))


def _delete(service: Service, ids: list[str]) -> None:
    with service.client() as c:
        for vid in ids:
            try:
                c.delete(f"/v1/videos/{vid}")
            except Exception as e:                     # noqa: BLE001 - the service goes at the end anyway
                _log(f"DELETE {vid}: {e}")


def _rounded(rec: dict) -> dict:
    return {k: (_r(v) if k.endswith("_s") else v) for k, v in rec.items()}


def _rest(service: Service, pause: float) -> None:
    """`pause` s, then until no decoder is starting: the next job finds the spares refilled."""
    time.sleep(pause)
    service.settled_decoders()


def sequential(service: Service, video: float, data: bytes, repeats: int, pause: float, poll: float) -> list[dict]:
    """`repeats` jobs one at a time, `pause` s after each (the decoders seen idle just before each POST)."""
    jobs = []
    for i in range(repeats):
        idle = service.decoders()["idle"]
        rec = run_job(service, f"scene-{video:g}s.mp4", data, poll)
        rec["idle_decoders_before"] = idle
        jobs.append(_rounded(rec))
        _delete(service, [rec["id"]] if rec["id"] else [])
        _log(f"  {video:g} s video, job {i + 1}/{repeats}: {rec['status']}, ingesting after "
             f"{_r(rec['started_s'], 2)} s, ready after {_r(rec['ready_s'], 2)} s (idle decoders before: {idle})")
        _rest(service, pause)
    return jobs


def burst(service: Service, video: float, data: bytes, size: int, bursts: int, pause: float,
          poll: float) -> list[dict]:
    """`bursts` times: `size` jobs posted together (one thread each, released by one barrier), `pause` s after."""
    jobs = []
    for b in range(bursts):
        idle = service.decoders()["idle"]
        start = threading.Barrier(size, timeout=120)   # a thread that failed first breaks it
        recs: list[dict | None] = [None] * size

        def one(i):
            try:
                recs[i] = run_job(service, f"burst-{i}.mp4", data, poll, start)
            except Exception as e:                     # noqa: BLE001 - reported as this job's failure
                recs[i] = {"id": None, "status": "error", "error": f"{type(e).__name__}: {e}"}

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, rec in enumerate(recs):
            rec.update(burst=b, idle_decoders_before=idle)
            jobs.append(_rounded(rec))
        _delete(service, [r["id"] for r in recs if r.get("id")])
        ready = sorted(r["ready_s"] for r in recs if r.get("ready_s") is not None)
        _log(f"  burst {b + 1}/{bursts} of {size}: ready after {', '.join(f'{x:.2f}' for x in ready)} s "
             f"(idle decoders before: {idle})")
        _rest(service, pause)
    return jobs


# ------------------------------------------------------------------------------------------ summary
def _stats(xs: list[float]) -> dict | None:
    if not xs:
        return None
    return {"median": _r(statistics.median(xs)), "min": _r(min(xs)), "max": _r(max(xs))}


def summarize(result: dict) -> list[dict]:
    """One row per (case, setting): job count, failures, POST / ingesting / ready stats, and the baseline's
    (the first setting's) median over this one's for ingesting and ready."""
    rows = []
    base: dict[str, dict] = {}
    for s in result["settings"]:
        for case, jobs in s["cases"].items():
            ok = [j for j in jobs if j.get("status") == "ready"]
            row = {"case": case, "warm_decoders": s["warm_decoders"], "jobs": len(jobs),
                   "failed": len(jobs) - len(ok),
                   "post_s": _stats([j["post_s"] for j in ok]),
                   "ingesting_s": _stats([j["started_s"] for j in ok]),
                   "ready_s": _stats([j["ready_s"] for j in ok])}
            b = base.setdefault(case, row)
            for k in ("ingesting_s", "ready_s"):
                mine, theirs = row[k], b[k]
                row[f"speedup_{k[:-2]}"] = (_r(theirs["median"] / mine["median"], 2)
                                            if mine and theirs and mine["median"] > 0 else None)
            rows.append(row)
    return rows


def _cell(st: dict | None) -> str:
    return "-" if st is None else f"{st['median']:.2f} ({st['min']:.2f}-{st['max']:.2f})"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def render(result: dict) -> str:
    from benchmarks.common import table
    cfg = result["config"]
    rows = [[r["case"], r["warm_decoders"], f"{r['jobs'] - r['failed']}/{r['jobs']}", _cell(r["post_s"]),
             _cell(r["ingesting_s"]), _cell(r["ready_s"]), _x(r["speedup_ingesting"]), _x(r["speedup_ready"])]
            for r in result["summary"]]
    base = result["settings"][0]["warm_decoders"] if result["settings"] else "-"
    out = [table(rows, ["case", "warm", "ready/jobs", "POST answered s", "POST->ingesting s", "POST->ready s",
                        "ingesting vs base", "ready vs base"],
                 title=f"lmstream bench jobs: file-job latency, median (min-max) in s, baseline warm_decoders={base} "
                       f"(machine: {result['machine']['cores']} cores, {result['machine']['cpu']}; "
                       f"{cfg['size']}x{cfg['size']} H.264 at {cfg['file_fps']:g} fps, sampled at 1 fps; "
                       f"polled every {cfg['poll_s']:g} s)")]
    for s in result["settings"]:
        busy = s.get("load_average_during_jobs")
        busy = "-" if busy is None else f"median {busy['median']:.2f}, max {busy['max']:.2f}"
        out.append(f"warm_decoders={s['warm_decoders']}: idle decoders after start {s['decoders_at_start']['idle']}, "
                   f"service up in {_r(s.get('service_start_s'), 1)} s, stopped in {_r(s.get('service_stop_s'), 1)} s, "
                   f"processes left {len(s.get('leftover_processes', []))}; load average (1 min) during its jobs {busy}")
        for case, jobs in s["cases"].items():
            for j in jobs:
                if j.get("status") != "ready":
                    out.append(f"  {case}: {j.get('status')} {j.get('error')}")
    la = result.get("load_average")
    if la:
        out.append(f"load average (1 min) at start {la['start'][0]:.2f}, at end {la['end'][0]:.2f}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ entry
class LoadSampler:
    """The 1-minute load average every `every` s in a thread: how busy the machine was during each setting
    (other jobs on a shared CPU slow a starting worker most)."""

    def __init__(self, every: float = 2.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lms-jobs-load")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), os.getloadavg()[0]))
            self._stop.wait(self.every)

    def start(self) -> "LoadSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def between(self, t0: float, t1: float) -> dict | None:
        xs = [x for t, x in self.samples if t0 <= t <= t1]
        return {"median": round(statistics.median(xs), 2), "max": round(max(xs), 2)} if xs else None


def measure(warm: tuple[int, ...] = (0, 1), videos: tuple[float, ...] = (3.0, 60.0), size: int = 64,
            repeats: int = 3, bursts: int = 2, burst_size: int = 4, pause: float = 6.0, poll: float = 0.05) -> dict:
    from lmcore.errors import BadArgument
    from benchmarks.common import machine
    if not warm or any(not 0 <= w <= 64 for w in warm):
        raise BadArgument(f"expected --warm as settings in 0..64, got {','.join(map(str, warm)) or 'none'}")
    if not pause >= 0:
        raise BadArgument(f"expected --pause >= 0 s, got {pause}")
    if not 1 <= burst_size <= 4:
        raise BadArgument(f"expected --burst-size in 1..4 (the service's job limit), got {burst_size}")
    if size < 16 or size % 2 or not videos or min(videos) < 3:
        raise BadArgument(f"expected --size an even number >= 16 and --videos durations >= 3 s, got {size} and "
                          f"{','.join(map(str, videos))}")
    videos = tuple(sorted(videos))
    folder = Path(tempfile.mkdtemp(prefix="lmstream-jobs-"))
    result: dict = {"benchmark": "jobs", "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "config": {"warm_decoders": list(warm), "videos_s": list(videos), "size": size,
                               "file_fps": FILE_FPS, "job_fps": 1.0, "repeats": repeats, "bursts": bursts,
                               "burst_size": burst_size, "burst_video_s": videos[0], "pause_s": pause, "poll_s": poll,
                               "model": "checkpoints/demo"},
                    "load_average": {"start": list(os.getloadavg())}, "settings": [], "folder": str(folder)}
    from benchmarks.load import restore_sigterm, trap_sigterm
    old_term = trap_sigterm()
    t_all = time.perf_counter()
    services: list[Service] = []
    sampler = LoadSampler().start()
    try:
        data = make_videos(folder / "videos", list(videos), size)
        for w in warm:
            svc = Service(folder / f"warm{w}", w)
            services.append(svc)
            s: dict = {"warm_decoders": w, "cases": {}}
            result["settings"].append(s)
            _log(f"warm_decoders={w}: starting `lmstream serve` in {svc.folder}")
            t = time.perf_counter()
            svc.start()
            s["service_start_s"] = _r(time.perf_counter() - t, 1)
            s["decoders_at_start"] = svc.settled_decoders()
            _log(f"warm_decoders={w}: up in {s['service_start_s']} s at {svc.url}; decoders {s['decoders_at_start']}")
            t_jobs = time.monotonic()
            warmup = run_job(svc, "warm-up.mp4", data[videos[0]], poll)
            s["warmup_job"] = _rounded(warmup)
            _log(f"warm_decoders={w}: warm-up job (not counted) {warmup['status']} after {_r(warmup['ready_s'], 2)} s")
            _delete(svc, [warmup["id"]] if warmup["id"] else [])
            _rest(svc, pause)
            for v in videos:
                s["cases"][f"sequential {v:g} s"] = sequential(svc, v, data[v], repeats, pause, poll)
            if bursts:
                s["cases"][f"burst {burst_size} x {videos[0]:g} s"] = burst(svc, videos[0], data[videos[0]],
                                                                            burst_size, bursts, pause, poll)
            s["load_average_during_jobs"] = sampler.between(t_jobs, time.monotonic())
            s["service_stop_s"] = _r(svc.stop(), 1)
            time.sleep(0.5)
            s["leftover_processes"] = svc.leftovers()
        result["summary"] = summarize(result)
    finally:
        sampler.stop()
        for svc in services:                           # ours: stopped, then anything left of them by PID
            svc.stop()
            time.sleep(0.5)
            for p in svc.leftovers():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p["pid"], signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)
        result["folder_removed"] = not folder.exists()
        result["load_average"]["end"] = list(os.getloadavg())
        result["total_s"] = _r(time.perf_counter() - t_all, 1)
        restore_sigterm(old_term)
    return result


def run(args) -> int:
    from benchmarks.common import emit
    warm = tuple(int(x) for x in args.warm.split(","))
    videos = tuple(float(x) for x in args.videos.split(","))
    result = measure(warm=warm, videos=videos, size=args.size, repeats=args.repeats, bursts=args.bursts,
                     burst_size=args.burst_size, pause=args.pause, poll=args.poll)
    emit(result, render(result), args.json, args.out)
    return 0
