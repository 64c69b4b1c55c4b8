"""`lmstream bench load`: N synthetic cameras at 1 fps into the real service, N = 1, 2, 4, ... until the
ingest lag grows (or --max-n).

    lmstream bench load [--max-n 32] [--duration 30] [--kinds rtsp,ws] [--json] [--out FILE] [--plot FILE]

What runs, all started here and stopped by PID at the end (also on Ctrl-C, SIGTERM or an error), all files
in one temporary folder that is removed:

* a `redis-server` (AOF everysec, like `lmstream serve`'s own), whose INFO gives Redis' memory;
* `lmstream serve` (Ray Serve, the demo checkpoint) through `start_serve_process`;
* per step, one GStreamer RTSP server (`tests/rtsp_server.py`) with N mounts: `videotestsrc` at 1 fps,
  H.264; each mount registered with `POST /v1/streams` (a `StreamSource` actor pulls it);
* per step, N WebSocket pushers speaking `/v1/live` in one asyncio thread: one JPEG of a synthetic scene
  (`stream.synthetic`) per second each, with explicit pts, phases spread over the second.

Each step (both kinds at once: 2N streams with --kinds rtsp,ws) waits until every stream stores frames,
warms up, then measures over a steady window of --duration seconds:

* offered vs ingested frames/s: RTSP offered = N x 1 fps, ingested = the change of
  `lms_stream_frames_ingested_total` (/metrics) over the window; WebSocket offered = frames sent in the window,
  ingested = those of them acknowledged `ingested`;
* ingest lag at the window's start and end (mean of its first and last fifth): RTSP the service's
  `lag_s` (a frame's arrival at the source -> stored, queue wait included; `/v1/streams`), WebSocket the
  time from sending a frame to its `ingested` message; the growth is end - start;
* dropped frames in the window: RTSP the change of the stream's `dropped` (the camera sends exactly 1 fps,
  so these are frames shed by the source's bounded queue), WebSocket frames sent but never acknowledged;
* time to first token of questions asked during the load (`POST /v1/streams/ID/questions`, SSE,
  `last_s` 10), p50/p95 as the client sees it (and the server's `first_token_s`);
* Redis `used_memory` at the window's end (the step's streams are purged afterwards).

A step keeps up when the lag grows by at most --lag-tolerance s and ingested >= 90 % of offered; the sweep
stops at the first step that does not (unless --keep-going).

Cross-stream batching vs per-stream batches: the service's Encoder gathers requests of all streams with
`@serve.batch(max_batch_size=16)`, fixed in `deploy/app.py` (no setting changes it), so the end-to-end
comparison cannot be switched here. After the sweep, in the same run, the Encoder's own work
(`deploy.serving.EncoderCore.encode`: preprocess, `encode_frames_multi`, Redis append) is timed
in-process on the same Redis for B streams with one frame each: one call with all B (what one
`@serve.batch` does) vs B calls of one (per-stream batches).

The CPU of this machine is shared with other jobs: timings are noisy; the numbers say what this run saw.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "checkpoints" / "demo"
DEFAULT_OUT = "benchmarks/results/bench_load.json"
QUESTION = "what colour is the circle ?"
KINDS = ("rtsp", "ws")


def _log(msg: str) -> None:
    print(f"[load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _rtsp_server_class():
    """tests/rtsp_server.py's RtspServer (the tests' GStreamer camera), loaded by path: tests/ is no package."""
    spec = importlib.util.spec_from_file_location("lmstream_tests_rtsp_server", REPO / "tests" / "rtsp_server.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.RtspServer


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0                       # linear interpolation, as numpy's default
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _r(x, d=3):
    return None if x is None else round(float(x), d)


# ------------------------------------------------------------------------------------------ WebSocket
@dataclass
class _Pusher:
    sid: str
    sent: dict[int, float] = field(default_factory=dict)     # frame k -> monotonic time sent
    acks: dict[int, float] = field(default_factory=dict)     # frame k -> monotonic time of its `ingested`
    errors: list[dict] = field(default_factory=list)
    dropped_by_reason: dict[str, int] = field(default_factory=dict)   # summed over its `dropped` messages
    stopped: dict | None = None
    started: bool = False


class WsPushers:
    """N `/v1/live` clients in one asyncio thread, each sending one JPEG per 1/fps s with pts k/fps."""

    def __init__(self, ws_url: str, sids: list[str], jpegs: list[bytes], fps: float = 1.0):
        self.ws_url, self.jpegs, self.fps = ws_url, jpegs, fps
        self.pushers = [_Pusher(s) for s in sids]
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None

    def start(self) -> "WsPushers":
        self.thread = threading.Thread(target=self._thread, daemon=True, name="lms-load-ws")
        self.thread.start()
        self._ready.wait(10)
        return self

    def _thread(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:                     # noqa: BLE001 - reported by stop()
            self.error = e

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        n = len(self.pushers)
        await asyncio.gather(*(self._push(p, i / max(n, 1) / self.fps) for i, p in enumerate(self.pushers)),
                             return_exceptions=True)

    async def _push(self, p: _Pusher, phase: float) -> None:
        import websockets
        try:
            async with websockets.connect(self.ws_url, max_size=None, open_timeout=120) as ws:
                await ws.send(json.dumps({"type": "start", "stream_id": p.sid, "fps": self.fps, "format": "jpeg"}))
                m = json.loads(await ws.recv())
                if m.get("type") != "started":
                    p.errors.append(m)
                    return
                p.started = True
                rx = asyncio.create_task(self._receive(ws, p))
                t0 = time.monotonic() + phase
                k = 0
                while not self._stop.is_set():
                    delay = t0 + k / self.fps - time.monotonic()
                    if delay > 0:
                        try:
                            await asyncio.wait_for(self._stop.wait(), delay)
                            break
                        except asyncio.TimeoutError:
                            pass
                    p.sent[k] = time.monotonic()
                    await ws.send(json.dumps({"type": "frame", "pts": k / self.fps}))
                    await ws.send(self.jpegs[(k + hash(p.sid)) % len(self.jpegs)])
                    k += 1
                await ws.send(json.dumps({"type": "stop"}))
                try:
                    await asyncio.wait_for(rx, 60)
                except asyncio.TimeoutError:
                    rx.cancel()
                    p.errors.append({"type": "error", "code": "TIMEOUT", "message": "no `stopped` within 60 s"})
        except Exception as e:                         # noqa: BLE001 - one pusher's failure is its own
            p.errors.append({"type": "error", "code": type(e).__name__, "message": str(e)[:200]})

    async def _receive(self, ws, p: _Pusher) -> None:
        async for raw in ws:
            if isinstance(raw, bytes):
                continue
            m = json.loads(raw)
            t = m.get("type")
            if t == "ingested":
                # one message may acknowledge several frames (those that waited go as one request):
                # the `frames` count says how many; they are the newest unacknowledged ones up to last_pts
                now, last = time.monotonic(), int(round(float(m["last_pts"]) * self.fps))
                new = int(m.get("frames", len(p.acks) + 1)) - len(p.acks)
                for k in sorted((k for k in p.sent if k <= last and k not in p.acks), reverse=True)[:max(new, 1)]:
                    p.acks[k] = now
            elif t == "dropped":                 # each says the frames shed since the previous one
                for k, v in (m.get("by_reason") or {}).items():
                    p.dropped_by_reason[k] = p.dropped_by_reason.get(k, 0) + int(v)
            elif t == "stopped":
                p.stopped = m
                return
            elif t == "error":
                p.errors.append(m)

    def stop(self, timeout: float = 90.0) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self.thread is not None:
            self.thread.join(timeout)

    def all_acked_once(self) -> bool:
        return all(p.acks or p.errors for p in self.pushers)


def _jpegs(n_scenes: int = 4, frames: int = 16, size: int = 64) -> list[bytes]:
    from PIL import Image
    from stream.synthetic import make_scene, render_frame
    out = []
    for s in range(n_scenes):
        spec = make_scene(100 + s, frames, size=(size, size))
        for t in range(frames):
            b = io.BytesIO()
            Image.fromarray(render_frame(spec, float(t))).save(b, format="JPEG", quality=90)
            out.append(b.getvalue())
    return out


# ------------------------------------------------------------------------------------------ the service
class Harness:
    """Everything the benchmark starts, each stopped by its own PID in `close` (idempotent)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.redis = None
        self.serve = None
        self.rtsp = None
        self.url = ""
        self.key = "load-" + secrets.token_hex(8)
        self.pids: dict[str, list[int]] = {"redis": [], "serve": [], "rtsp": []}
        self.tree: dict[int, int] = {}                 # pid -> start time: the service's descendants seen

    def start(self, max_streams: int) -> "Harness":
        from frame_cache.redis_server import RedisServer, free_port
        from lmstream.serve_cmd import start_serve_process
        self.redis = RedisServer(self.folder / "redis").start()
        self.pids["redis"].append(self.redis.pid)
        env = dict(os.environ)
        for k in ("LMSTREAM_API_KEYS", "LMSTREAM_REDIS_URL", "LMSTREAM_DATA_DIR"):
            env.pop(k, None)
        env.update(LMSTREAM_ALLOW_PRIVATE_SOURCES="1",     # the cameras are on loopback
                   LMSTREAM_LIMITS=json.dumps({"max_live_streams": max(64, max_streams + 8)}),
                   TRITON_INTERPRET="0")                    # the PyTorch references on the CPU, as a user runs it
        port = free_port()
        self.serve, _ = start_serve_process(
            ["--port", port, "--model", DEMO, "--redis", self.redis.url, "--data-dir", self.folder / "svc",
             "--api-key", self.key, "--num-cpus", str(os.cpu_count() or 2)],
            self.folder / "serve.log", env=env, timeout=300)
        self.pids["serve"].append(self.serve.pid)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def start_cameras(self, n: int) -> list[str]:
        RtspServer = _rtsp_server_class()
        self.stop_cameras()
        self.rtsp = RtspServer(self.folder / f"rtsp-{n}", mounts=[f"cam{i}" for i in range(n)],
                               width=160, height=120, fps=1).start()
        self.pids["rtsp"].append(self.rtsp.pid)
        return [self.rtsp.url(f"cam{i}") for i in range(n)]

    def stop_cameras(self) -> None:
        if self.rtsp is not None:
            self.rtsp.stop()
            self.rtsp = None

    def redis_used_memory(self) -> int:
        import redis
        r = redis.Redis.from_url(self.redis.url)
        try:
            return int(r.info("memory")["used_memory"])
        finally:
            r.close()

    def stop_service(self) -> float:
        from lmcore.procs import stop_child
        self.note_tree()
        t = time.perf_counter()
        p, self.serve = self.serve, None
        stop_child(p, 90)
        return time.perf_counter() - t

    def close(self) -> None:
        self.stop_cameras()
        self.stop_service()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def note_tree(self) -> None:
        """Remember every process under the service now (Ray's GCS, raylet and workers, whose titles do not
        name the folder), to check after the stop that none is left."""
        if self.serve is not None:
            self.tree.update(descendants(self.serve.pid))

    def leftovers(self) -> list[dict]:
        """Processes still alive that this run started: its PIDs, the service's process tree as last noted,
        and any whose command line names its folder."""
        mine = {p for ps in self.pids.values() for p in ps}
        out = []
        for pid, (_, start, cmd) in _proc_table().items():
            if pid == os.getpid():
                continue
            if pid in mine or self.tree.get(pid) == start or str(self.folder) in cmd:
                out.append({"pid": pid, "cmd": cmd[:160]})
        return out


def trap_sigterm():
    """From now until `restore_sigterm(returned)`, SIGTERM raises KeyboardInterrupt (in the main thread:
    a benchmark's `finally` then stops what it started, as on Ctrl-C). None off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None
    old = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    return old


def restore_sigterm(old) -> None:
    if old is not None:
        signal.signal(signal.SIGTERM, old)


def descendants(root: int) -> dict[int, int]:
    """pid -> start time (clock ticks) of every live process below `root` now."""
    procs = _proc_table()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        for k in kids.get(todo.pop(), []):
            out[k] = procs[k][1]
            todo.append(k)
    return out


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time in clock ticks, command line) of every live (non-zombie) process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()        # after "pid (comm) ": state ppid ... starttime (22nd)
        if f[0] == "Z":
            continue
        out[int(d.name)] = (int(f[1]), int(f[19]), cmd)
    return out


# ------------------------------------------------------------------------------------------ one step
def _metrics(c, sids: set[str]) -> dict[str, dict[str, float]]:
    """{"ingested": {stream: frames ever stored}, "stored": {stream: frames held now}} from /metrics."""
    text = c.get("/metrics").text
    out: dict[str, dict[str, float]] = {"ingested": {}, "stored": {}}
    for name, key in (("lms_stream_frames_ingested_total", "ingested"), ("lms_stream_frames", "stored")):
        for m in re.finditer(r'^' + name + r'\{stream="([^"]+)"\} (\S+)$', text, re.M):
            if m.group(1) in sids:
                out[key][m.group(1)] = float(m.group(2))
    return out


def _streams(c) -> dict[str, dict]:
    r = c.get("/v1/streams")
    r.raise_for_status()
    return {d["id"]: d for d in r.json()["data"]}


def _ask(base: str, key: str, sid: str) -> dict:
    import httpx
    t0 = time.perf_counter()
    ttft, ans, err = None, None, None
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
            with c.stream("POST", f"/v1/streams/{sid}/questions",
                          json={"question": QUESTION, "last_s": 10, "max_tokens": 8, "stream": True}) as s:
                if s.status_code != 200:
                    s.read()
                    return {"stream": sid, "error": f"HTTP {s.status_code}: {s.text[:200]}"}
                kind = None
                for ln in s.iter_lines():
                    if ln.startswith("event: "):
                        kind = ln[7:]
                    elif ln.startswith("data: "):
                        if kind == "token" and ttft is None:
                            ttft = time.perf_counter() - t0
                        elif kind == "answer":
                            ans = json.loads(ln[6:])
                        elif kind == "error":
                            err = ln[6:][:200]
    except Exception as e:                              # noqa: BLE001 - recorded with the step
        err = f"{type(e).__name__}: {e}"[:200]
    d = {"stream": sid, "ttft_s": _r(ttft, 4), "total_s": _r(time.perf_counter() - t0, 4)}
    if ans is not None:
        d.update(server_first_token_s=_r(ans["timings"].get("first_token_s"), 4), frames=ans.get("frames"))
    if err or ttft is None:
        d["error"] = err or "no token"
    return d


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _ends(samples: list[tuple[float, float]], t0: float, t1: float) -> tuple[float | None, float | None]:
    """Mean of the samples (t, value) in the window's first fifth and in its last fifth."""
    fifth = max((t1 - t0) / 5.0, 1.0)
    a = [v for t, v in samples if t0 <= t <= t0 + fifth]
    b = [v for t, v in samples if t1 - fifth <= t <= t1]
    return _mean(a), _mean(b)


def run_step(h: Harness, n: int, kinds: tuple[str, ...], duration: float, warmup: float, n_questions: int,
             jpegs: list[bytes], lag_tolerance: float) -> dict:
    import httpx
    tag = f"load-n{n}-{secrets.token_hex(2)}"
    rtsp_ids = [f"{tag}-rtsp{i}" for i in range(n)] if "rtsp" in kinds else []
    ws_ids = [f"{tag}-ws{i}" for i in range(n)] if "ws" in kinds else []
    step: dict = {"n": n, "streams": {"rtsp": len(rtsp_ids), "ws": len(ws_ids)}}
    pushers = None
    mem_before = h.redis_used_memory()
    t_setup = time.monotonic()
    c = httpx.Client(base_url=h.url, headers={"Authorization": f"Bearer {h.key}"}, timeout=120)
    try:
        if rtsp_ids:
            urls = h.start_cameras(n)
            for sid, url in zip(rtsp_ids, urls):
                r = c.post("/v1/streams", json={"source": url, "fps": 1, "id": sid})
                if r.status_code != 201:
                    raise RuntimeError(f"POST /v1/streams for {sid}: HTTP {r.status_code} {r.text[:200]}")
        if ws_ids:
            ws_url = h.url.replace("http://", "ws://") + f"/v1/live?token={h.key}"
            pushers = WsPushers(ws_url, ws_ids, jpegs).start()
        deadline = time.monotonic() + 90 + 5 * n
        while True:                                   # every stream stores frames
            st = _streams(c)
            waiting = [s for s in rtsp_ids if st.get(s, {}).get("status") != "live" or not st[s].get("frames")]
            if pushers is not None and not pushers.all_acked_once():
                waiting += [p.sid for p in pushers.pushers if not (p.acks or p.errors)]
            if not waiting or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        step["setup_s"] = _r(time.monotonic() - t_setup, 1)
        step["not_live_at_start"] = waiting
        if waiting:                                   # what the service says about them
            step["not_live_status"] = {s: {k: st.get(s, {}).get(k) for k in ("status", "frames", "last_error")}
                                       for s in waiting[:4]}
        time.sleep(warmup)

        # -- the window --------------------------------------------------------------------------
        all_ids = set(rtsp_ids) | set(ws_ids)
        answers: list[dict] = []
        q_stop = threading.Event()

        def questions(t_start: float):
            ids = [x for pair in zip(rtsp_ids or ws_ids, ws_ids or rtsp_ids) for x in pair]
            for i in range(n_questions):
                at = t_start + (i + 0.5) * duration / max(n_questions, 1)
                if q_stop.wait(max(at - time.monotonic(), 0)):
                    return
                answers.append(_ask(h.url, h.key, ids[i % len(ids)]))

        m0 = _metrics(c, all_ids)["ingested"]
        t0 = time.monotonic()
        qt = threading.Thread(target=questions, args=(t0,), daemon=True, name="lms-load-questions")
        qt.start()
        samples: dict[str, list[tuple[float, dict]]] = {s: [] for s in rtsp_ids}
        while True:
            now = time.monotonic()
            st = _streams(c)
            for s in rtsp_ids:
                if s in st:
                    samples[s].append((now, st[s]))
            if now - t0 >= duration:
                break
            time.sleep(max(0.0, min(1.0, t0 + duration - time.monotonic())))
        mt = _metrics(c, all_ids)
        m1 = mt["ingested"]
        t1 = time.monotonic()
        window = t1 - t0
        step["window_s"] = _r(window, 2)
        mem = h.redis_used_memory()
        h.note_tree()                                  # the camera actors' workers too
        qt.join(180)
        q_stop.set()
        per_kind: dict[str, dict] = {}

        if rtsp_ids:
            d_frames = sum(m1.get(s, 0.0) - m0.get(s, 0.0) for s in rtsp_ids)
            lag_a, lag_b, drift, dropped = [], [], [], 0
            st_frames, st_advance = 0, 0.0                # from the status samples: frames vs stream time
            for s in rtsp_ids:
                sm = samples[s]
                a, b = _ends([(t, d["lag_s"]) for t, d in sm if d.get("lag_s") is not None], t0, t1)
                lag_a.append(a)
                lag_b.append(b)
                pts = [(t, d) for t, d in sm if d.get("last_pts") is not None]
                if len(pts) >= 2:
                    (ta, da), (tb, db) = pts[0], pts[-1]
                    advance = float(db["last_pts"]) - float(da["last_pts"])
                    drift.append((tb - ta) - advance)       # wall time passed minus stream time advanced
                    st_frames += int(db["frames"]) - int(da["frames"])
                    st_advance += advance
                if sm:
                    dropped += int(sm[-1][1].get("dropped") or 0) - int(sm[0][1].get("dropped") or 0)
            la, lb = _mean(lag_a), _mean(lag_b)
            per_kind["rtsp"] = {
                "offered_fps": _r(len(rtsp_ids) * 1.0, 3), "ingested_fps": _r(d_frames / window, 3),
                "lag_start_s": _r(la), "lag_end_s": _r(lb),
                "lag_growth_s": _r(lb - la) if la is not None and lb is not None else None,
                "pts_drift_s": _r(_mean(drift)), "dropped": dropped,
                # the same window seen through the streams' status (published about once a second): frames
                # stored and the stream time they cover. A service catching up on a backlog stores more frames
                # than the window's wall time offers (ingested_fps above offered_fps) but never more than its
                # stream time holds: stored_frames <= stream_advance_s * 1 fps (+1 per camera at the edges).
                "status_stored_frames": st_frames, "stream_advance_s": _r(st_advance, 3),
                "status": sorted({samples[s][-1][1]["status"] for s in rtsp_ids if samples[s]}),
            }
        if pushers is not None:
            ws_t0, ws_t1 = t0, t1
            pushers.stop()
            sent = acked = 0
            lat: list[tuple[float, float]] = []
            errors = []
            for p in pushers.pushers:
                for k, ts in p.sent.items():
                    if ws_t0 <= ts < ws_t1:
                        sent += 1
                        if k in p.acks:
                            acked += 1
                            lat.append((ts, p.acks[k] - ts))
                errors += p.errors
            la, lb = _ends(lat, ws_t0, ws_t1)
            per_kind["ws"] = {
                "offered_fps": _r(sent / window, 3), "ingested_fps": _r(acked / window, 3),
                "offered_frames": sent, "ingested_frames": acked,
                "lag_start_s": _r(la), "lag_end_s": _r(lb),
                "lag_growth_s": _r(lb - la) if la is not None and lb is not None else None,
                "ack_p50_s": _r(_pct([v for _, v in lat], 50)), "ack_p95_s": _r(_pct([v for _, v in lat], 95)),
                "dropped": sent - acked,
                "server_dropped_total": sum(int((p.stopped or {}).get("dropped") or 0) for p in pushers.pushers),
                "server_dropped_by_reason": _merge_reasons(p.dropped_by_reason for p in pushers.pushers),
                "errors": errors[:5],
            }
            pushers = None
        step["per_kind"] = per_kind
        step["offered_fps"] = _r(sum(k["offered_fps"] for k in per_kind.values()))
        step["ingested_fps"] = _r(sum(k["ingested_fps"] for k in per_kind.values()))
        growths = [k["lag_growth_s"] for k in per_kind.values() if k["lag_growth_s"] is not None]
        step["lag_growth_s"] = _r(max(growths)) if growths else None
        step["dropped"] = sum(k["dropped"] for k in per_kind.values())
        ok_q = [a for a in answers if "error" not in a]
        tt = [a["ttft_s"] for a in ok_q]
        step["questions"] = {"asked": len(answers), "answered": len(ok_q),
                             "ttft_p50_s": _r(_pct(tt, 50)), "ttft_p95_s": _r(_pct(tt, 95)),
                             "server_first_token_p50_s": _r(_pct([a["server_first_token_s"] for a in ok_q
                                                                  if a.get("server_first_token_s") is not None], 50)),
                             "errors": [a["error"] for a in answers if "error" in a][:5]}
        step["redis_used_memory_bytes"] = mem
        step["redis_used_memory_mb"] = _r(mem / 1e6, 1)
        stored = int(sum(mt["stored"].values()))
        step["frames_stored"] = stored                # by the step's streams at the window's end
        step["redis_bytes_per_frame"] = round((mem - mem_before) / stored) if stored else None
        why = []
        if step["lag_growth_s"] is None:
            why.append("no lag measured")
        elif step["lag_growth_s"] > lag_tolerance:
            why.append(f"lag grew {step['lag_growth_s']:.2f} s")
        if step["ingested_fps"] < 0.9 * step["offered_fps"]:
            why.append(f"ingested {step['ingested_fps']:.2f} < 90 % of offered {step['offered_fps']:.2f} frames/s")
        if step["not_live_at_start"]:
            why.append(f"{len(step['not_live_at_start'])} streams never stored a frame")
        step["keeps_up"] = not why
        step["why_not"] = "; ".join(why)
        return step
    finally:
        if pushers is not None:
            pushers.stop()
        for sid in rtsp_ids + ws_ids:                 # stop the sources, free their frames
            try:
                c.delete(f"/v1/streams/{sid}", params={"purge": "true"}, timeout=60)
            except Exception as e:                     # noqa: BLE001 - the service goes at the end anyway
                _log(f"DELETE {sid}: {e}")
        c.close()
        h.stop_cameras()


def _merge_reasons(per_pusher) -> dict:
    out: dict[str, int] = {}
    for d in per_pusher:
        for k, v in d.items():
            out[k] = out.get(k, 0) + int(v)
    return out


# ------------------------------------------------------------------------------------------ batching
def batching_comparison(redis_url: str, sizes: list[int], rounds: int = 5, threads: int = 1) -> dict:
    """The Encoder's work for B streams with one frame each, in-process: one `EncoderCore.encode` call
    with all B items (one `@serve.batch`) vs B calls of one item (per-stream batches). `rounds` of each,
    the two orders interleaved; median and best (least disturbed by other jobs) reported. Frames are
    appended to Redis as the service does. `threads`: torch threads, 1 like the service's Encoder replica
    (Ray sets OMP_NUM_THREADS=1 in a replica that asks for no CPU)."""
    import torch
    from benchmarks.common import reference_kernels
    from deploy.serving import EncodeItem, EncoderCore
    from deploy.settings import Settings
    from stream.synthetic import make_scene, render_frame
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with reference_kernels():
            core = EncoderCore(Settings(model=str(DEMO), redis_url=redis_url, api_keys=["bench"]))
            size = core.info()["size"]
            spec = make_scene(7, 64, size=(size, size))
            frames = [render_frame(spec, float(t))[None] for t in range(64)]
            rows = []
            for b in sizes:
                sids = [f"batch-b{b}-{i}" for i in range(b)]
                for sid in sids:
                    core.cache.create_stream(sid, 100_000)
                clock = {"t": 0}

                def items():
                    clock["t"] += 1
                    return [EncodeItem(sid, frames[(clock["t"] + i) % len(frames)], [float(clock["t"])])
                            for i, sid in enumerate(sids)]

                core.encode(items())                   # warm-up
                cross, per = [], []
                for r in range(rounds):
                    for mode in (("cross", "per") if r % 2 == 0 else ("per", "cross")):
                        its = items()
                        t = time.perf_counter()
                        if mode == "cross":
                            res = core.encode(its)
                        else:
                            res = [x for it in its for x in core.encode([it])]
                        dt = time.perf_counter() - t
                        bad = [x for x in res if "error" in x]
                        if bad:
                            raise RuntimeError(f"EncoderCore.encode failed: {bad[0]['error']}")
                        (cross if mode == "cross" else per).append(dt)
                for sid in sids:
                    core.cache.delete_stream(sid)
                tc, tp = statistics.median(cross), statistics.median(per)
                bc, bp = min(cross), min(per)
                rows.append({"streams": b, "cross_stream_s": _r(tc, 4), "per_stream_s": _r(tp, 4),
                             "cross_stream_fps": _r(b / tc, 1), "per_stream_fps": _r(b / tp, 1),
                             "speedup": _r(tp / tc, 2), "best_cross_stream_fps": _r(b / bc, 1),
                             "best_per_stream_fps": _r(b / bp, 1), "best_speedup": _r(bp / bc, 2)})
            core.cache.close()
    finally:
        torch.set_num_threads(old_threads)
    return {"what": f"EncoderCore.encode in-process on the run's Redis, {threads} torch thread(s) like the "
                    f"Encoder replica: B streams x 1 frame, one call (cross-stream batch) vs B calls (per-stream "
                    f"batches); median and best of {rounds}",
            "torch_threads": threads, "rows": rows,
            "service_batch": "deploy/app.py Encoder: @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02), "
                             "not settable; Settings.encode_batch (32) is the model's frames per pass"}


# ------------------------------------------------------------------------------------------ report
def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def render(result: dict) -> str:
    from benchmarks.common import table
    rows = []
    for s in result["steps"]:
        pk = s["per_kind"]
        q = s["questions"]
        rows.append([
            s["n"], sum(s["streams"].values()), _fmt(s["offered_fps"]), _fmt(s["ingested_fps"]),
            f"{_fmt(pk['rtsp']['lag_start_s'])} -> {_fmt(pk['rtsp']['lag_end_s'])}" if "rtsp" in pk else "-",
            f"{_fmt(pk['ws']['lag_start_s'])} -> {_fmt(pk['ws']['lag_end_s'])}" if "ws" in pk else "-",
            _fmt(s["lag_growth_s"], "+.2f"), s["dropped"],
            f"{_fmt(q['ttft_p50_s'])} / {_fmt(q['ttft_p95_s'])} ({q['answered']}/{q['asked']})",
            f"{_fmt(s['redis_used_memory_mb'], '.1f')} / {s.get('frames_stored', '-')}",
            "yes" if s["keeps_up"] else "NO",
        ])
    out = [table(rows, ["N", "streams", "offered f/s", "ingested f/s", "RTSP lag s", "WS ack s", "lag growth s",
                        "dropped", "TTFT p50/p95 s", "Redis MB / frames", "keeps up"],
                 title=f"lmstream bench load: {result['config']['kinds']} streams at 1 fps each, "
                       f"{result['config']['duration_s']:g} s window per N (machine: {result['machine']['cores']} cores, "
                       "shared: timings are noisy)")]
    out.append(f"largest N with no lag growth: {result['largest_n_no_lag_growth']}"
               + (f"  (stopped: {result['stopped_because']})" if result.get("stopped_because") else ""))
    for s in result["steps"]:
        if s.get("why_not"):
            out.append(f"  N={s['n']}: {s['why_not']}")
    b = result.get("batching")
    if b and b.get("rows"):
        out.append("")
        out.append(table([[r["streams"], f"{r['cross_stream_fps']:.1f}", f"{r['per_stream_fps']:.1f}",
                           f"{r['speedup']:.2f}x", f"{r['best_cross_stream_fps']:.1f}", f"{r['best_per_stream_fps']:.1f}",
                           f"{r['best_speedup']:.2f}x"] for r in b["rows"]],
                         ["streams B", "one batch of B f/s", "B batches of 1 f/s", "speedup", "best: one batch",
                          "best: B batches", "best speedup"],
                         title="Encoder work, cross-stream batch vs per-stream batches (" + b["what"] + ")"))
        out.append(b["service_batch"])
    elif b and b.get("error"):
        out.append(f"batching comparison failed: {b['error']}")
    out.append(f"processes left after stop: {len(result['leftover_processes'])}; service stopped in "
               f"{_fmt(result.get('service_stop_s'), '.1f')} s")
    return "\n".join(out)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = result["steps"]
    ns = [s["n"] for s in steps]
    fig, ax = plt.subplots(1, 4, figsize=(17, 4))
    ax[0].plot(ns, [s["offered_fps"] for s in steps], "o--", label="offered")
    ax[0].plot(ns, [s["ingested_fps"] for s in steps], "o-", label="ingested")
    ax[0].set(xscale="log", xlabel="N (per kind)", ylabel="frames/s", title="ingest")
    ax[0].legend()
    for k in ("rtsp", "ws"):
        xs = [(s["n"], s["per_kind"][k]["lag_growth_s"]) for s in steps if k in s["per_kind"]
              and s["per_kind"][k]["lag_growth_s"] is not None]
        if xs:
            ax[1].plot(*zip(*xs), "o-", label=k)
    ax[1].axhline(result["config"]["lag_tolerance_s"], color="grey", ls=":")
    ax[1].set(xscale="log", xlabel="N", ylabel="s", title="lag growth over the window")
    ax[1].legend()
    for key, lab in (("ttft_p50_s", "p50"), ("ttft_p95_s", "p95")):
        xs = [(s["n"], s["questions"][key]) for s in steps if s["questions"][key] is not None]
        if xs:
            ax[2].plot(*zip(*xs), "o-", label=lab)
    ax[2].set(xscale="log", xlabel="N", ylabel="s", title="time to first token under load")
    ax[2].legend()
    rows = (result.get("batching") or {}).get("rows") or []
    if rows:
        ax[3].plot([r["streams"] for r in rows], [r["cross_stream_fps"] for r in rows], "o-", label="one batch")
        ax[3].plot([r["streams"] for r in rows], [r["per_stream_fps"] for r in rows], "o-", label="per stream")
        ax[3].set(xscale="log", xlabel="streams B", ylabel="frames/s", title="Encoder: batching")
        ax[3].legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ entry
def measure(max_n: int = 32, duration: float = 30.0, kinds=KINDS, warmup: float = 5.0, n_questions: int = 4,
            lag_tolerance: float = 1.0, keep_going: bool = False, batching: bool = True,
            batching_rounds: int = 5) -> dict:
    from benchmarks.common import machine
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        from lmcore.errors import BadArgument
        raise BadArgument(f"expected --kinds from {','.join(KINDS)}, got {','.join(kinds) or 'none'}")
    if max_n < 1 or duration <= 0:
        from lmcore.errors import BadArgument
        raise BadArgument(f"expected --max-n >= 1 and --duration > 0, got {max_n} and {duration}")
    ns = []
    n = 1
    while n <= max_n:
        ns.append(n)
        n *= 2
    folder = Path(tempfile.mkdtemp(prefix="lmstream-load-"))
    result: dict = {"benchmark": "load", "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "config": {"max_n": max_n, "n_values": ns, "duration_s": duration, "warmup_s": warmup,
                               "kinds": ",".join(kinds), "fps_per_stream": 1.0, "questions_per_step": n_questions,
                               "lag_tolerance_s": lag_tolerance, "model": "checkpoints/demo",
                               "camera": "GStreamer videotestsrc 160x120 @ 1 fps, x264, RTSP/TCP",
                               "ws_frames": "64x64 JPEG of stream.synthetic scenes, explicit pts"},
                    "steps": [], "largest_n_no_lag_growth": 0, "stopped_because": None, "folder": str(folder)}
    h = Harness(folder)
    old_term = trap_sigterm()
    t_all = time.perf_counter()
    completed = False
    try:
        _log(f"starting redis-server and `lmstream serve` in {folder}")
        t = time.perf_counter()
        h.start(max_streams=max_n * len(kinds))
        result["service_start_s"] = _r(time.perf_counter() - t, 1)
        _log(f"service ready at {h.url} in {result['service_start_s']} s")
        h.note_tree()
        jpegs = _jpegs()
        ok_so_far = True
        for n in ns:
            _log(f"N={n}: {n} x {'+'.join(kinds)} at 1 fps, {warmup:g} s warm-up, {duration:g} s window")
            step = run_step(h, n, kinds, duration, warmup, n_questions, jpegs, lag_tolerance)
            result["steps"].append(step)
            h.note_tree()
            _log(f"N={n}: offered {step['offered_fps']} ingested {step['ingested_fps']} frames/s, lag growth "
                 f"{step['lag_growth_s']} s, dropped {step['dropped']}, TTFT p50 {step['questions']['ttft_p50_s']} s, "
                 f"Redis {step['redis_used_memory_mb']} MB -> {'keeps up' if step['keeps_up'] else step['why_not']}")
            if step["keeps_up"] and ok_so_far:
                result["largest_n_no_lag_growth"] = n
            else:
                ok_so_far = False
                if result["stopped_because"] is None:
                    result["stopped_because"] = f"N={n}: {step['why_not']}"
                if not keep_going:
                    break
        if result["stopped_because"] is None:
            result["stopped_because"] = f"none: every N up to {ns[-1]} kept up (--max-n {max_n})"
        completed = True
    finally:
        try:
            result["service_stop_s"] = _r(h.stop_service(), 1) if h.serve is not None else None
            if batching and completed and h.redis is not None:
                _log("batching comparison (in-process EncoderCore, same Redis)")
                try:
                    result["batching"] = batching_comparison(h.redis.url, ns, batching_rounds)
                except Exception as e:                 # noqa: BLE001 - the sweep's numbers still count
                    result["batching"] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            h.close()
            time.sleep(0.5)
            result["leftover_processes"] = h.leftovers()
            for p in result["leftover_processes"]:     # ours (named by our folder): stop them by PID
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p["pid"], signal.SIGKILL)
            result["processes"] = {**h.pids, "service_tree": len(h.tree)}
            shutil.rmtree(folder, ignore_errors=True)
            result["folder_removed"] = not folder.exists()
            result["total_s"] = _r(time.perf_counter() - t_all, 1)
            restore_sigterm(old_term)
    return result


def run(args) -> int:
    from benchmarks.common import emit
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    result = measure(max_n=args.max_n, duration=args.duration, kinds=kinds, warmup=args.warmup,
                     n_questions=args.questions, lag_tolerance=args.lag_tolerance, keep_going=args.keep_going,
                     batching=not args.no_batching)
    if args.plot:
        plot(result, args.plot)
    emit(result, render(result), args.json, args.out)
    return 0
