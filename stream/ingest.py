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
import time
import warnings

import torch

from frame_cache import MAX_CAPACITY, FrameCache, FrameRecord, InProcessFrameCache
from lmcore.errors import BadArgument, CacheUnavailable
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


def _states(metas, pts, stack) -> FrameStates:
    """FrameStates of frames with these metas and pts; `stack(name)`: the tensor `name` of every frame stacked,
    or None when the frames have none."""
    m, key = metas[0], _one_kind(metas)
    extra = {k: v for k, v in m.items() if k not in ("n_vision_rows", "prefix_ids", "kv_policy")}
    return FrameStates(tokens=stack("token"), keys=stack("k"), values=stack("v"), n_vision_rows=key[0],
                       prefix_ids=key[1], kv_policy=key[2], prefix_out=stack("prefix_out"),
                       k_scale=stack("k_scale"), v_scale=stack("v_scale"),
                       pts=torch.tensor(pts, dtype=torch.float64), meta=extra)


def _one_kind(metas) -> tuple:
    """(n_vision_rows, prefix_ids, kv_policy) shared by every frame of `metas`; BadArgument for a mix."""
    m = metas[0]
    key = (m["n_vision_rows"], tuple(m["prefix_ids"]), m["kv_policy"])
    for r in metas[1:]:
        if r is not m and (r["n_vision_rows"], tuple(r["prefix_ids"]), r["kv_policy"]) != key:
            raise BadArgument("expected frames encoded with one model, prefix and policy in a window, got a mix")
    return key


#: The record tensors FrameStates holds.
STATE_TENSORS = ("token", "k", "v", "prefix_out", "k_scale", "v_scale")


def states_from_records(records) -> FrameStates:
    """Stack records (as returned by a snapshot) back into FrameStates."""
    records = list(records)
    if not records:
        raise BadArgument("expected at least one stored frame in the requested window, got none")
    stack = lambda name: (torch.stack([r.tensors[name] for r in records]) if name in records[0].tensors else None)
    return _states([r.meta for r in records], [r.pts for r in records], stack)


def states_from_blobs(blobs, metas=None) -> FrameStates:
    """FrameStates of encoded records (a chunk of the frames a question fuses, as the cache gives them): the same
    as `states_from_records` of each one decoded, bit for bit, decoded a chunk at a time (`decode_columns`:
    records of one layout share one checked header, each tensor is copied out with one join). `metas`: the
    records' metas when the caller has read their headers already (`decode_columns(blobs, ())`)."""
    from frame_cache import decode_columns, record_header
    blobs = list(blobs)
    if not blobs:
        raise BadArgument("expected at least one stored frame in the requested window, got none")
    have = {e["name"] for e in record_header(blobs[0])["tensors"]}
    _one_kind(metas if metas is not None else decode_columns(blobs, ())[2])   # a mix refused before stacking
    _, pts, metas, cols = decode_columns(blobs, [n for n in STATE_TENSORS if n in have])
    return _states(metas, pts, cols.get)


def states_from_snapshot(snapshot) -> FrameStates:
    return states_from_records(snapshot.records)


#: Retries of one batch's append when the cache is briefly unreachable (seconds to wait before each).
APPEND_RETRY_WAITS = (0.5, 1.0, 2.0)


def append_retrying(cache: FrameCache, stream_id: str, records: list[FrameRecord], *, writer: int | None,
                    seq: int, waits=APPEND_RETRY_WAITS) -> list[int]:
    """Append with the seq of the first record, retried while the cache is unavailable: the append
    is idempotent (a retry of frames the cache had committed stores nothing twice), and a writer
    that was fenced off meanwhile gets `StaleWriter` instead of writing."""
    for wait in (*waits, None):
        try:
            return cache.append_many(stream_id, records, writer=writer, seq=seq)
        except CacheUnavailable:
            if wait is None:
                raise
            time.sleep(wait)
    raise AssertionError("unreachable")


def ingest_video(model, path, cache: FrameCache, stream_id: str, *, fps: float | None = 1.0,
                 window: tuple[float | None, float | None] | None = None, kv_policy: str = "exact",
                 progress: bool = False, timings: dict | None = None, capacity: int | None = None,
                 on_full: str | None = None, retain=None) -> DecodeReport:
    """Decode `path`, encode its sampled frames in batches of `model.batch_size`, append them to
    `cache` under `stream_id`. Frames stored before an error stay stored. Returns the decode report
    (its `dropped_frames`/`gaps` say whether a capacity limit overwrote any).

    Capacity never drops frames silently: by default the stream may hold `MAX_CAPACITY` frames
    (2**20, 12 days at 1 fps) and refuses more (`on_full="error"`: `CapacityExceeded`, frames so far
    kept). With an explicit `capacity` the default is a ring (`on_full="overwrite"`): the oldest
    frames are overwritten, and the report counts them and records their span as a gap.

    `retain`: a retention policy (`frame_cache.retention.Retention` or its dict / CLI form), stored
    in the stream's meta and applied after every batch: frames that leave the hot window keep
    their keys/values in the policy's form or none (docs/design.md section 9). None keeps all exact."""
    from frame_cache.retention import Retention, RetentionRunner
    retain = Retention.parse(retain)
    start, end = window if window is not None else (None, None)
    src = VideoSource(path, fps=fps, start=start, end=end, progress=progress and "ingesting video",
                      **_resize_kw(model))
    prep = model.preprocess
    if capacity is None:
        capacity, on_full = MAX_CAPACITY, on_full or "error"
    on_full = on_full or "overwrite"
    meta = {"source": str(path), "fps": fps}
    if retain is not None:
        meta["retain"] = retain.to_dict()
    info = cache.create_stream(stream_id, capacity=capacity, meta=meta, exist_ok=True, on_full=on_full)
    writer = cache.acquire_writer(stream_id)
    runner = RetentionRunner(cache, stream_id, retain) if retain is not None else None
    next_seq = info.total_appended
    t_dec = t_enc = 0.0
    batch, pts = [], []
    first_pts: list[float] = []
    appended = 0

    def flush():
        nonlocal t_enc, next_seq, appended
        t = time.perf_counter()
        if src.info.is_image:
            px = torch.cat([preprocess_image(f, **prep) for f in batch])
        else:
            px = preprocess_video_frames(batch, **prep)
        states = model.encode_frames(px, pts=pts, kv_policy=kv_policy, progress=False)
        recs = states_to_records(states)
        append_retrying(cache, stream_id, recs, writer=writer, seq=next_seq)
        if runner is not None:
            runner.apply()
        next_seq += len(recs)
        appended += len(recs)
        if not first_pts:
            first_pts.append(pts[0])
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
    report = src.report
    kept = cache.stream_info(stream_id)
    lost = info.count + appended - kept.count                  # overwritten by this ingest (a ring)
    if lost > 0:
        report.dropped_frames += lost
        report.add_gap(first_pts[0], kept.oldest_pts)
        report.add_error(f"W_CAPACITY_DROP: the stream's ring holds {kept.capacity} frames; the first {lost} "
                         f"sampled frames ({first_pts[0]:.2f}-{kept.oldest_pts:.2f} s) were overwritten")
        warnings.warn(f"stream {stream_id!r} holds {kept.capacity} frames: {lost} of the {appended} frames "
                      "sampled were overwritten (raise the capacity to keep them)", CapacityWarning, stacklevel=2)
    return report


class CapacityWarning(UserWarning):
    """A ring overwrote frames that an ingest had just stored (explicit capacity)."""


def _resize_kw(model) -> dict:
    """Frames shrink to the tower's size as decoded (an 8K batch never sits in memory) when the
    decoder supports it: the same nearest resize as `preprocess_video_frames`, bit for bit."""
    import inspect
    if "resize_to" in inspect.signature(VideoSource).parameters:
        return {"resize_to": int(model.preprocess["size"])}
    return {}


def encode_video(model, path, *, fps: float | None = 1.0, window=None, kv_policy: str = "exact",
                 progress: bool = False, timings: dict | None = None, cache: FrameCache | None = None,
                 stream_id: str = "file") -> tuple[FrameStates, dict]:
    """A whole file (or a window of it) to FrameStates, through the (in-process) ring buffer."""
    cache = cache or InProcessFrameCache()
    report = ingest_video(model, path, cache, stream_id, fps=fps, window=window, kv_policy=kv_policy,
                          progress=progress, timings=timings)
    states = states_from_snapshot(cache.snapshot(stream_id))
    return states, dataclasses.asdict(report)
