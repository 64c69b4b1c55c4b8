"""`lmstream bench cache`: how fast each frame-cache backend takes and gives back frame records.

For each backend (in-process; Redis, a redis-server this command starts in a temporary folder
with AOF everysec, unless --redis URL names one) and each record size:

* append: records committed in batches (`append_many`, one atomic commit per batch), frames/s and MB/s;
* chunked read: a question's pass over the window, `FrameWindow.chunks(size)` with prefetch,
  every record decoded (zero-copy), frames/s and MB/s;

at the demo model's record size (one real frame encoded by checkpoints/demo), and at the 8B record
sizes (DESIGN section 4: token 8 KB + 4 pre-fusion layers x 8 heads x (577 + 45) rows x 128 keys
and values in bf16 + 45 fused prefix rows: 10.6 MB; fp8 keys/values with per-head scales: 5.5 MB).
Records are made of random bytes of the real tensor shapes and dtypes.

The next table is what that means for an exact question over 10,000 frames at 8B: the
keys/values it must read (10,000 x the record) divided by the measured chunked-read rate of
each backend: an extrapolation from the measured rate, labelled as such.

The last table is what every question reads of every frame of its window before it fuses any
(`stream.window.CachedFrames`: each frame's vision token for the LLM), over a window of
``--frames-window`` frames (10,000) stored without keys/values: each frame's token record
(`record.token_record`) against its light record (`record.light_record`: the token and the fused
prefix rows, what it read before the token copies), each record decoded on its own (`decode_record`)
and the chunk's tokens stacked; and the token records again decoded a chunk at a time (`decode_stacked`: the
chunk's records share one checked header and their tokens are stacked with one copy, what
`CachedFrames` does now). All three in the same run, alternated, median of the repeats.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from .common import emit, machine, table

REPO = Path(__file__).resolve().parents[1]


def record_8b(fp8: bool):
    """One frame record at the 8B shapes (random contents, real shapes and dtypes)."""
    from frame_cache import FrameRecord
    P, nkv, C, D, H, pre = 4, 8, 577 + 45, 128, 4096, 45
    g = torch.Generator().manual_seed(0)
    kv = lambda: (torch.randint(0, 255, (P, nkv, C, D), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
                  if fp8 else torch.randn(P, nkv, C, D, generator=g).to(torch.bfloat16))
    t = {"token": torch.randn(1, H, generator=g).to(torch.bfloat16), "k": kv(), "v": kv(),
         "prefix_out": torch.randn(pre, H, generator=g).to(torch.bfloat16)}
    if fp8:
        t["k_scale"] = torch.rand(P, nkv, generator=g)
        t["v_scale"] = torch.rand(P, nkv, generator=g)
    meta = {"n_vision_rows": 577, "prefix_ids": list(range(1, pre + 1)), "kv_policy": "fp8" if fp8 else "exact"}
    return FrameRecord(pts=0.0, tensors=t, meta=meta)


def record_demo():
    """One real frame encoded by the demo checkpoint (its exact record layout)."""
    from model import LlavaMini
    from stream.ingest import states_to_records
    m = LlavaMini.from_pretrained(REPO / "checkpoints" / "demo")
    S = m.preprocess["size"]
    with torch.no_grad():
        st = m.encode_frames(torch.zeros(1, 3, S, S), pts=[0.0])
    return states_to_records(st)[0]


def _with_pts(rec, i: int):
    import dataclasses
    return dataclasses.replace(rec, pts=float(i))


def measure(cache, rec, frames: int, batch: int, chunk: int, repeats: int) -> dict:
    """Median append and chunked-read rates over `repeats` fresh streams."""
    from frame_cache import decode_record, encode_record
    nbytes = len(encode_record(rec))
    app, rd = [], []
    for r in range(repeats):
        sid = f"bench-{r}-{time.time_ns()}"
        cache.create_stream(sid, frames)
        recs = [_with_pts(rec, i) for i in range(frames)]
        t = time.perf_counter()
        for i in range(0, frames, batch):
            cache.append_many(sid, recs[i:i + batch])
        app.append(time.perf_counter() - t)
        del recs
        t = time.perf_counter()
        win = cache.window(sid)
        n = 0
        for ch in win.chunks(cache, chunk):
            for b in ch.blobs:
                decode_record(b)
            n += len(ch)
        rd.append(time.perf_counter() - t)
        assert n == frames, (n, frames)
        cache.delete_stream(sid)
    a, b = statistics.median(app), statistics.median(rd)
    return {"record_bytes": nbytes, "frames": frames, "batch": batch, "chunk": chunk, "repeats": repeats,
            "append_s": a, "read_s": b, "append_fps": frames / a, "read_fps": frames / b,
            "append_MBps": frames * nbytes / a / 1e6, "read_MBps": frames * nbytes / b / 1e6}


def window_reads(cache, rec, frames: int, chunk: int, repeats: int) -> dict:
    """A window of `frames` token-only frames (`rec` without keys/values); the per-frame read a question
    makes before fusing, as token records and as light records decoded one at a time, and as token records
    decoded a chunk at a time ("stacked"), alternated: median seconds and bytes."""
    from frame_cache import decode_record, decode_stacked
    from frame_cache.retention import demote_record
    base = demote_record(rec, "none") or rec
    sid = f"bench-window-{time.time_ns()}"
    cache.create_stream(sid, frames)
    for i in range(0, frames, 64):
        cache.append_many(sid, [_with_pts(base, j) for j in range(i, min(frames, i + 64))])
    win = cache.window(sid)
    times = {"tokens": [], "light": [], "stacked": []}
    nbytes = {}
    for _ in range(repeats):
        for part in ("tokens", "light", "stacked"):
            t, n, b = time.perf_counter(), 0, 0
            for ch in win.chunks(cache, chunk, **{"light" if part == "light" else "tokens": True}):
                if part == "stacked":
                    assert decode_stacked(ch.blobs, "token")[3].shape[0] == len(ch.blobs)
                    b += sum(len(blob) for blob in ch.blobs)
                else:                       # as CachedFrames read before: each record decoded, the tokens stacked
                    torch.stack([decode_record(blob).tensors["token"] for blob in ch.blobs])
                    b += sum(len(blob) for blob in ch.blobs)
                n += len(ch)
            times[part].append(time.perf_counter() - t)
            assert n == frames, (n, frames)
            nbytes[part] = b
    cache.delete_stream(sid)
    return {"frames": frames, "chunk": chunk, "repeats": repeats,
            **{f"{p}_s": statistics.median(v) for p, v in times.items()},
            **{f"{p}_bytes": v for p, v in nbytes.items()}}


def run(args) -> int:
    from frame_cache import InProcessFrameCache, RedisFrameCache
    from frame_cache.redis_server import RedisServer
    sizes = [("demo", record_demo(), args.frames_small, 16, 64),
             ("8B bf16", record_8b(False), args.frames_8b, 4, 8),
             ("8B fp8", record_8b(True), args.frames_8b, 4, 8)]
    results, windows = [], []
    with tempfile.TemporaryDirectory(prefix="lms-bench-cache-") as tmp:
        server = None if args.redis else RedisServer(Path(tmp) / "redis").start()
        url = args.redis or server.url
        try:
            backends = [("in-process", InProcessFrameCache()), ("redis", RedisFrameCache.from_url(url))]
            for bname, cache in backends:
                for sname, rec, frames, batch, chunk in sizes:
                    r = measure(cache, rec, frames, batch, chunk, args.repeats)
                    results.append({"backend": bname, "size": sname, **r})
                for sname, rec, *_ in sizes[:2]:           # demo and 8B: the same small state in bf16 or fp8
                    w = window_reads(cache, rec, args.frames_window, 256, args.repeats)
                    windows.append({"backend": bname, "size": sname, **w})
                cache.close()
        finally:
            if server is not None:
                server.stop()
    rows = [[r["backend"], r["size"], f"{r['record_bytes'] / 1e6:.3f}", r["frames"], f"{r['append_fps']:.0f}",
             f"{r['append_MBps']:.0f}", f"{r['read_fps']:.0f}", f"{r['read_MBps']:.0f}"] for r in results]
    text = [table(rows, ["backend", "record", "MB/frame", "frames", "append fr/s", "append MB/s", "read fr/s",
                         "read MB/s"], title="frame cache throughput (median of repeats; reads chunked, prefetched)")]
    q = []
    for r in results:
        if r["size"].startswith("8B"):
            gb = 10_000 * r["record_bytes"] / 1e9
            q.append([r["backend"], r["size"], f"{gb:.0f} GB", f"{gb * 1e3 / r['read_MBps']:.0f} s"])
    text.append(table(q, ["backend", "keys/values", "bytes for 10,000 frames", "read time (extrapolated)"],
                      title="an exact question over 10,000 frames at 8B: reading its records once"))
    w = [[r["backend"], r["size"], f"{r['frames']:,}", f"{r['light_bytes'] / 1e6:,.1f} MB", f"{r['light_s']:.3f} s",
          f"{r['tokens_bytes'] / 1e6:,.1f} MB", f"{r['tokens_s']:.3f} s", f"{r['stacked_s']:.3f} s",
          f"{r['light_s'] / r['stacked_s']:.1f}x"]
         for r in windows]
    text.append(table(w, ["backend", "size", "frames", "light records", "read, one by one", "token records",
                          "read, one by one", "read, stacked (now)", "now vs light"],
                      title="every question's per-frame read before fusion: light records, token records decoded "
                            "one by one, token records decoded a chunk at a time (now); same run, median"))
    result = {"machine": machine(), "redis_url": "local redis-server (AOF everysec)" if server else "given",
              "results": results, "window_reads": windows}
    text.append(f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; Redis: "
                f"{result['redis_url']}")
    emit(result, "\n\n".join(text), args.json, args.out)
    return 0
