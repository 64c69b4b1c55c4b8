"""The ingest pipeline: decode -> sample -> preprocess -> encode in batches -> ring buffer.

One engine under every entry point (CLI today, the service later):

    report = ingest_video(model, path, cache, "cam-1", fps=1.0)     # frames into the ring buffer
    states = states_from_snapshot(cache.snapshot("cam-1", 0, 60))  # a window back, for a question

A frame's record (frame_cache layout v1) holds its vision token(s), the
pre-fusion keys/values of its cached rows, the fused prompt prefix when one
was fused at ingest, and, under the fp8 policy, the dequantisation scales.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from frame_cache import FrameCache, FrameRecord, InProcessFrameCache
from lmcore.errors import BadArgument
from model.states import FrameStates

from .decode import DecodeReport, VideoSource
from .preprocess import preprocess_image, preprocess_video_frames

_OPTIONAL = ("prefix_out", "k_scale", "v_scale")


def states_to_records(states: FrameStates) -> list[FrameRecord]:
    """One record per frame (time order)."""
    meta = {"n_vision_rows": states.n_vision_rows, "prefix_ids": list(states.prefix_ids),
            "kv_policy": states.kv_policy, **states.meta}
    out = []
    for i in range(len(states)):
        t = {"token": states.tokens[i], "k": states.keys[i], "v": states.values[i]}
        for name in _OPTIONAL:
            v = getattr(states, name)
            if v is not None:
                t[name] = v[i]
        pts = float(states.pts[i]) if states.pts is not None else float(i)
        out.append(FrameRecord(pts=pts, tensors=t, meta=meta))
    return out


def states_from_records(records) -> FrameStates:
    """Stack records (as returned by a snapshot) back into FrameStates."""
    records = list(records)
    if not records:
        raise BadArgument("expected at least one stored frame in the requested window, got none")
    m = records[0].meta
    key = (m["n_vision_rows"], tuple(m["prefix_ids"]), m["kv_policy"])
    for r in records[1:]:
        if (r.meta["n_vision_rows"], tuple(r.meta["prefix_ids"]), r.meta["kv_policy"]) != key:
            raise BadArgument("expected frames encoded with one model, prefix and policy in a window, got a mix")
    stack = lambda name: (torch.stack([r.tensors[name] for r in records]) if name in records[0].tensors else None)
    extra = {k: v for k, v in m.items() if k not in ("n_vision_rows", "prefix_ids", "kv_policy")}
    return FrameStates(tokens=stack("token"), keys=stack("k"), values=stack("v"), n_vision_rows=key[0],
                       prefix_ids=key[1], kv_policy=key[2], prefix_out=stack("prefix_out"),
                       k_scale=stack("k_scale"), v_scale=stack("v_scale"),
                       pts=torch.tensor([r.pts for r in records], dtype=torch.float64), meta=extra)


def states_from_snapshot(snapshot) -> FrameStates:
    return states_from_records(snapshot.records)


def ingest_video(model, path, cache: FrameCache, stream_id: str, *, fps: float | None = 1.0,
                 window: tuple[float | None, float | None] | None = None, kv_policy: str = "exact",
                 progress: bool = False, timings: dict | None = None, capacity: int | None = None) -> DecodeReport:
    """Decode `path`, encode its sampled frames in batches of `model.batch_size`, append them to
    `cache` under `stream_id`. Frames stored before an error stay stored. Returns the decode report."""
    start, end = window if window is not None else (None, None)
    src = VideoSource(path, fps=fps, start=start, end=end, progress=progress)
    prep = model.preprocess
    if capacity is None:
        dur = src.info.duration_s or 0.0
        capacity = max(16, int(math.ceil(dur * (fps or src.info.source_fps or 30.0))) + 16) if dur else 1 << 20
    cache.create_stream(stream_id, capacity=capacity, meta={"source": str(path)}, exist_ok=True)
    t_dec = t_enc = 0.0
    batch, pts = [], []

    def flush():
        nonlocal t_enc
        t = time.perf_counter()
        if src.info.is_image:
            px = torch.cat([preprocess_image(f, **prep) for f in batch])
        else:
            px = preprocess_video_frames(batch, **prep)
        states = model.encode_frames(px, pts=pts, kv_policy=kv_policy, progress=False)
        cache.append_many(stream_id, states_to_records(states))
        t_enc += time.perf_counter() - t
        batch.clear()
        pts.clear()

    t = time.perf_counter()
    try:
        for frame in src:
            batch.append(frame.rgb)
            pts.append(frame.pts)
            if len(batch) == model.batch_size:
                t_dec += time.perf_counter() - t
                flush()
                t = time.perf_counter()
        t_dec += time.perf_counter() - t
        if batch:
            flush()
    finally:
        src.close()
    if timings is not None:
        timings["decode_s"] = timings.get("decode_s", 0.0) + t_dec
        timings["encode_s"] = timings.get("encode_s", 0.0) + t_enc
    return src.report


def encode_video(model, path, *, fps: float | None = 1.0, window=None, kv_policy: str = "exact",
                 progress: bool = False, timings: dict | None = None, cache: FrameCache | None = None,
                 stream_id: str = "file") -> tuple[FrameStates, dict]:
    """A whole file (or a window of it) to FrameStates, through the (in-process) ring buffer."""
    cache = cache or InProcessFrameCache()
    report = ingest_video(model, path, cache, stream_id, fps=fps, window=window, kv_policy=kv_policy,
                          progress=progress, timings=timings)
    states = states_from_snapshot(cache.snapshot(stream_id))
    return states, dataclasses.asdict(report)
