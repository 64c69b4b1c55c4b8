"""`lmstream demo --service`: the main job through the service, as a client sees it.

Starts `lmstream serve` (its own Redis and Ray, in a temporary folder), writes a synthetic video with
known answers, uploads it to `POST /v1/videos`, follows the job's progress, asks the questions over
HTTP (the last one streamed token by token, SSE), prints each answer next to the truth; then pushes the
same scene live over the `/v1/live` WebSocket and asks about its last 30 s on the socket; and stops the
service (SIGTERM to the PID it started: Serve, Ray and Redis go with it).
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _start_service(data: Path, model: str | None, key: str) -> tuple[subprocess.Popen, str, Path]:
    from frame_cache.redis_server import free_port
    from .serve_cmd import start_serve_process
    log = data / "serve.log"
    args = ["--port", free_port(), "--data-dir", data / "svc", "--api-key", key] + (["--model", model] if model else [])
    env = dict(os.environ)
    env.pop("LMSTREAM_API_KEYS", None)
    proc, ready = start_serve_process(args, log, env=env)
    return proc, ready["url"], log


def _print_log_tail(log: Path, lines: int = 40) -> None:
    """The service's last log lines on stderr: the demo failed, and its folder is about to go."""
    try:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    print(f"--- the last {len(tail)} lines of the service's log ({log}):", file=sys.stderr)
    print("\n".join(tail), file=sys.stderr)
    print("---", file=sys.stderr)


def _stop(proc: subprocess.Popen) -> float:
    from lmcore.procs import stop_child
    t = time.perf_counter()
    stop_child(proc, 90)
    return time.perf_counter() - t


def run(args) -> int:
    import httpx
    from stream.synthetic import make_scene, questions, score, write_video
    key = "demo-" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="lmstream-demo-") as tmp:
        tmpd = Path(tmp)
        t0 = time.perf_counter()
        print("service: starting `lmstream serve` (Redis, Ray Serve, the demo model) ...", flush=True)
        proc, url, log = _start_service(tmpd, args.model, key)
        try:
            print(f"service: ready at {url} in {time.perf_counter() - t0:.1f} s (its log, {log}, is printed "
                  "here if the demo fails; the folder goes when it ends)")
            spec = make_scene(args.seed, args.duration, size=(64, 64))
            video = Path(args.out) if args.out else tmpd / f"synthetic-{args.seed}.mp4"
            write_video(spec, video)
            print(f"video: {video.name} ({args.duration:.0f} s synthetic scene, seed {args.seed}, H.264, "
                  f"{video.stat().st_size / 1e3:.0f} kB)")
            h = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=url, headers=h, timeout=120) as c:
                t = time.perf_counter()
                with open(video, "rb") as f:
                    r = c.post("/v1/videos", files={"file": (video.name, f, "video/mp4")},
                               data={"fps": str(args.fps)})
                r.raise_for_status()
                vid = r.json()["id"]
                print(f"POST /v1/videos -> 202 {vid}")
                last = None
                while True:
                    d = c.get(f"/v1/videos/{vid}").json()
                    line = f"  {d['status']:<10} {d['progress']:>6.0%}  {d['frames']} frames"
                    if line != last:
                        print(line, flush=True)
                        last = line
                    if d["status"] in ("ready", "failed"):
                        break
                    time.sleep(0.5)
                if d["status"] != "ready":
                    print(f"error[{d['error']['code']}]: {d['error']['message']}", file=sys.stderr)
                    return 1
                print(f"ingest: {d['frames']} frames of {d['duration_s']:.0f} s in {time.perf_counter() - t:.1f} s "
                      "(decode -> Encoder batches -> Redis ring)")
                qas = questions(spec, per_family=1)
                print()
                print(f"{'family':<8} {'question':<52} {'truth':<16} {'answer':<16} ok  first token")
                right = 0
                for i, qa in enumerate(qas):
                    if i < len(qas) - 1:
                        a = c.post(f"/v1/videos/{vid}/questions", json={"question": qa.question, "max_tokens": 8})
                        a.raise_for_status()
                        ans = a.json()
                    else:                                   # the last one streamed, token by token
                        print(f"{qa.family:<8} {qa.question[:52]:<52} {qa.answer[:16]:<16} ", end="", flush=True)
                        ans, shown = None, ""
                        with c.stream("POST", f"/v1/videos/{vid}/questions",
                                      json={"question": qa.question, "max_tokens": 8, "stream": True}) as s:
                            kind = None
                            for ln in s.iter_lines():
                                if ln.startswith("event: "):
                                    kind = ln[7:]
                                elif ln.startswith("data: "):
                                    ev = json.loads(ln[6:])
                                    if kind == "token":
                                        print(ev["text"], end="", flush=True)
                                        shown += ev["text"]
                                    elif kind == "answer":
                                        ans = ev
                        ok = score(qa, ans["text"])
                        right += ok
                        print(f"{'':<{max(0, 16 - len(shown))}} {'yes' if ok else 'no':<3} "
                              f"{ans['timings']['first_token_s'] * 1e3:.0f} ms  (streamed)")
                        continue
                    ok = score(qa, ans["text"])
                    right += ok
                    print(f"{qa.family:<8} {qa.question[:52]:<52} {qa.answer[:16]:<16} {ans['text'][:16]:<16} "
                          f"{'yes' if ok else 'no':<3} {ans['timings']['first_token_s'] * 1e3:.0f} ms")
                print(f"\n{right}/{len(qas)} correct; every answer: {ans['frames']} frames "
                      f"({ans['time_span'][0]:.0f}-{ans['time_span'][1]:.0f} s), fused {ans['frames_fused']}, policy "
                      f"{ans['policy']}, keys/values {ans['kv_policy']}, gaps {ans['gaps']}")
                closed = [q for q in qas if q.choices and len(q.choices) >= 2]
                pick = next((q for q in closed if q.family == "order"), closed[0] if closed else None)
                if pick is not None:                        # the same question, answered from its candidates
                    a = c.post(f"/v1/videos/{vid}/questions", json={"question": pick.question, "choices": pick.choices})
                    err = a.json().get("error", {}) if a.status_code in (400, 422) else {}
                    if err.get("code") == "E_BAD_ARGUMENT":     # a random tiny model's tokenizer lacks the words
                        print(f"with \"choices\": {pick.question!r} not scored: {err.get('message')}")
                    else:
                        a.raise_for_status()
                        got = a.json()
                        ch = sorted(got["choices"], key=lambda d: -d["logprob"])
                        print(f"with \"choices\" ({len(ch)} candidates): {pick.question!r} -> {got['text']!r} "
                              f"(log-probability {ch[0]['logprob']:.2f}; next {ch[1]['text']!r} "
                              f"{ch[1]['logprob']:.2f}); truth {pick.answer!r}")
            _live_demo(url, key, video, qas[-1])
        except Exception:                       # a failure, not Ctrl-C: the log says why
            _print_log_tail(log)
            raise
        finally:
            s = _stop(proc)
            print(f"service: stopped in {s:.1f} s (Serve, Ray and Redis); total {time.perf_counter() - t0:.1f} s")
    return 0


def _live_demo(url: str, key: str, video: Path, qa) -> None:
    """The live path: the same scene pushed frame by frame over the /v1/live WebSocket (as a browser or
    a camera app would), then a question about the last 30 s, answered token by token on the socket."""
    import asyncio
    import io
    import websockets
    from PIL import Image
    from stream.decode import VideoSource
    frames = [(f.pts, f.rgb) for f in VideoSource(video, fps=1.0)]

    async def run():
        ws_url = url.replace("http://", "ws://") + f"/v1/live?token={key}"
        async with websockets.connect(ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "stream_id": None, "fps": 1, "format": "jpeg"}))
            sid = json.loads(await ws.recv())["stream_id"]
            t = time.perf_counter()
            for pts, rgb in frames:
                buf = io.BytesIO()
                Image.fromarray(rgb).save(buf, format="PNG")
                await ws.send(json.dumps({"type": "frame", "pts": pts}))
                await ws.send(buf.getvalue())
                while json.loads(await ws.recv())["type"] != "ingested":
                    pass
            print(f"\nlive: pushed {len(frames)} frames over the WebSocket as stream {sid} in "
                  f"{time.perf_counter() - t:.1f} s; asking about the last 30 s on the same socket")
            await ws.send(json.dumps({"type": "ask", "id": "q1", "question": qa.question, "last_s": 30,
                                      "max_tokens": 8}))
            print(f"  {qa.question} -> ", end="", flush=True)
            while True:
                m = json.loads(await ws.recv())
                if m["type"] == "token":
                    print(m["text"], end="", flush=True)
                elif m["type"] == "answer":
                    print(f"   ({m['frames']} frames, {m['time_span'][0]:.0f}-{m['time_span'][1]:.0f} s, "
                          f"first token {m['timings']['first_token_s'] * 1e3:.0f} ms)")
                    break
                elif m["type"] == "error":
                    print(f"error[{m['code']}]: {m['message']}")
                    break
            await ws.send(json.dumps({"type": "stop"}))
            while json.loads(await ws.recv())["type"] != "stopped":
                pass
    asyncio.run(run())
