"""In-process frame cache: the CLI's embedded backend.

Each stream is a ring of ``capacity`` slots holding encoded records
(immutable ``bytes``) plus a parallel ring of their pts. Because slots hold
immutable objects, a snapshot is just a tuple of references taken under the
stream's lock, which makes it consistent at that instant no matter what
writers do afterwards.

Locking (always acquired in this order, never the reverse):

1. ``_registry_lock`` - the dict of streams and the closed flag.
2. ``_Stream.write_lock`` - serialises writers of one stream; held while a
   writer checks pts order and encodes, so readers are not blocked by encoding.
3. ``_Stream.lock`` - the ring state; held briefly by commits and readers.
4. ``_acct_lock`` - the cache-wide byte total (for ``max_bytes_total``).

Memory accounting: ``bytes_used`` of a stream is exactly the sum of the byte
lengths of its retained encoded records. Records evicted while a caller still
holds a `Snapshot` stay alive until that snapshot is released; they are no
longer counted. The bounded history of evicted pts (for
``Snapshot.dropped_before``) is reported separately as ``index_bytes``.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from numbers import Real
from typing import Any

from lmcore.errors import BadArgument

from .base import (
    CacheBudgetExceeded,
    CacheClosed,
    FrameCache,
    Snapshot,
    StreamExists,
    StreamInfo,
    StreamNotFound,
    validate_stream_id,
    validate_stream_meta,
)
from .record import FrameRecord, encode_record

__all__ = ["InProcessFrameCache", "MAX_CAPACITY", "DEFAULT_PTS_HISTORY"]

#: Largest ring a stream may have, in frames.
MAX_CAPACITY = 1 << 20
#: Default number of evicted frames whose pts are remembered exactly per stream.
DEFAULT_PTS_HISTORY = 1 << 18


def _check_budget_arg(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadArgument(f"expected {name} to be None or an int >= 1, got {value!r}")
    return value


def _check_time(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise BadArgument(f"expected {name} to be None or a finite number of seconds, got {value!r}")
    return float(value)


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadArgument(f"expected {name} to be an int >= 0, got {value!r}")
    return value


class _EvictionLog:
    """pts of overwritten frames, exact for the newest ``limit`` of them.

    Older entries are collapsed into a count and a pts range; counts that
    need them are then linear-interpolated estimates (flagged as inexact).
    """

    __slots__ = ("limit", "pts", "collapsed", "collapsed_first", "collapsed_last")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pts = array("d")
        self.collapsed = 0
        self.collapsed_first = 0.0
        self.collapsed_last = 0.0

    def extend(self, values: list[float]) -> None:
        self.pts.extend(values)
        if len(self.pts) > 2 * self.limit:  # trim in chunks: amortised O(1)
            k = len(self.pts) - self.limit
            if self.collapsed == 0:
                self.collapsed_first = self.pts[0]
            self.collapsed_last = self.pts[k - 1]
            self.collapsed += k
            del self.pts[:k]

    @property
    def nbytes(self) -> int:
        return len(self.pts) * self.pts.itemsize

    def count(self, start: float | None, end: float | None) -> tuple[int, bool]:
        lo = 0 if start is None else bisect_left(self.pts, start)
        hi = len(self.pts) if end is None else bisect_right(self.pts, end)
        n, exact = max(0, hi - lo), True
        if self.collapsed:
            a, b = self.collapsed_first, self.collapsed_last
            if (start is None or start <= a) and (end is None or end >= b):
                n += self.collapsed
            elif (start is not None and start > b) or (end is not None and end < a):
                pass
            else:  # partial overlap with a range a < b we no longer know exactly
                s = a if start is None else max(start, a)
                e = b if end is None else min(end, b)
                n += round(self.collapsed * (e - s) / (b - a))
                exact = False
        return n, exact


class _Stream:
    """One stream's ring. All fields but the locks are guarded by ``lock``."""

    __slots__ = (
        "stream_id", "capacity", "meta", "max_bytes", "blobs", "pts", "head", "count",
        "next_seq", "bytes_used", "last_pts", "evicted", "deleted", "lock", "write_lock",
    )

    def __init__(self, stream_id: str, capacity: int, meta: dict, max_bytes: int | None, history: int) -> None:
        self.stream_id = stream_id
        self.capacity = capacity
        self.meta = meta
        self.max_bytes = max_bytes
        self.blobs: list[bytes | None] = [None] * capacity
        self.pts: list[float] = [0.0] * capacity
        self.head = 0  # slot of the oldest retained frame
        self.count = 0
        self.next_seq = 0  # == total appended
        self.bytes_used = 0
        self.last_pts: float | None = None  # pts of the newest frame ever committed
        self.evicted = _EvictionLog(history)
        self.deleted = False
        self.lock = threading.Lock()
        self.write_lock = threading.Lock()

    def _pts_at(self, i: int) -> float:
        """pts of the i-th oldest retained frame."""
        return self.pts[(self.head + i) % self.capacity]

    def window(self, start: float | None, end: float | None) -> tuple[int, int]:
        """Logical index range [lo, hi) of retained frames with start <= pts <= end; O(log n)."""
        idx = range(self.count)
        lo = 0 if start is None else bisect_left(idx, start, key=self._pts_at)
        hi = self.count if end is None else bisect_right(idx, end, key=self._pts_at)
        return lo, max(lo, hi)

    def take(self, lo: int, hi: int, dropped: int, exact: bool) -> Snapshot:
        cap, head = self.capacity, self.head
        slots = [(head + i) % cap for i in range(lo, hi)]
        oldest_seq = self.next_seq - self.count
        return Snapshot(
            stream_id=self.stream_id,
            blobs=tuple(self.blobs[s] for s in slots),  # type: ignore[misc]
            pts_list=tuple(self.pts[s] for s in slots),
            first_seq=oldest_seq + lo if hi > lo else -1,
            last_seq=oldest_seq + hi - 1 if hi > lo else -1,
            dropped_before=dropped,
            dropped_exact=exact,
        )

    def bytes_after(self, blobs: list[bytes]) -> int:
        """Bytes the ring would hold after committing ``blobs``."""
        cap, n = self.capacity, len(blobs)
        if n >= cap:
            return sum(len(b) for b in blobs[-cap:])
        n_evict = max(0, self.count + n - cap)
        gone = sum(len(self.blobs[(self.head + i) % cap]) for i in range(n_evict))  # type: ignore[arg-type]
        return self.bytes_used - gone + sum(len(b) for b in blobs)

    def info(self) -> StreamInfo:
        c = self.count
        return StreamInfo(
            stream_id=self.stream_id,
            capacity=self.capacity,
            count=c,
            total_appended=self.next_seq,
            oldest_seq=self.next_seq - c if c else -1,
            newest_seq=self.next_seq - 1 if c else -1,
            oldest_pts=self._pts_at(0) if c else None,
            newest_pts=self._pts_at(c - 1) if c else None,
            bytes_used=self.bytes_used,
            max_bytes=self.max_bytes,
            meta=validate_stream_meta(self.meta),  # a copy
        )


class InProcessFrameCache(FrameCache):
    """Thread-safe in-memory `FrameCache`.

    Args:
        max_bytes_per_stream: budget for each stream's retained records, in
            bytes (None: unlimited).
        max_bytes_total: budget for all streams together (None: unlimited).
            An append that would exceed either budget raises
            `CacheBudgetExceeded` and stores and evicts nothing.
        pts_history: evicted frames per stream whose pts are remembered exactly
            for ``Snapshot.dropped_before``; older ones give an estimate.
    """

    backend = "in-process"

    def __init__(
        self,
        *,
        max_bytes_per_stream: int | None = None,
        max_bytes_total: int | None = None,
        pts_history: int = DEFAULT_PTS_HISTORY,
    ) -> None:
        self.max_bytes_per_stream = _check_budget_arg("max_bytes_per_stream", max_bytes_per_stream)
        self.max_bytes_total = _check_budget_arg("max_bytes_total", max_bytes_total)
        self.pts_history = _check_count("pts_history", pts_history)
        self._streams: dict[str, _Stream] = {}
        self._registry_lock = threading.Lock()
        self._acct_lock = threading.Lock()
        self._total_bytes = 0
        self._closed = False

    # -- helpers -----------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosed("expected an open frame cache, got one that was closed")

    def _get(self, stream_id: str) -> _Stream:
        validate_stream_id(stream_id)
        with self._registry_lock:
            self._check_open()
            s = self._streams.get(stream_id)
        if s is None:
            raise StreamNotFound(f"expected an existing stream, got unknown stream {stream_id!r}")
        return s

    @staticmethod
    def _alive(s: _Stream) -> None:
        """Call with ``s.lock`` held: the stream may have been deleted meanwhile."""
        if s.deleted:
            raise StreamNotFound(f"expected an existing stream, got deleted stream {s.stream_id!r}")

    # -- FrameCache ----------------------------------------------------------
    def create_stream(
        self, stream_id: str, capacity: int, meta: dict | None = None, exist_ok: bool = True
    ) -> StreamInfo:
        validate_stream_id(stream_id)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= MAX_CAPACITY:
            raise BadArgument(f"expected capacity to be an int in [1, {MAX_CAPACITY}] frames, got {capacity!r}")
        clean_meta = validate_stream_meta(meta)
        with self._registry_lock:
            self._check_open()
            s = self._streams.get(stream_id)
            if s is not None:
                if not exist_ok:
                    raise StreamExists(f"expected a new stream id, got existing stream {stream_id!r}")
                if s.capacity != capacity:
                    raise BadArgument(
                        f"expected capacity {s.capacity} for existing stream {stream_id!r}, got {capacity}"
                    )
                if meta is not None and clean_meta != s.meta:
                    raise BadArgument(
                        f"expected meta=None or the existing meta of stream {stream_id!r}, got a different meta"
                    )
            else:
                s = _Stream(stream_id, capacity, clean_meta, self.max_bytes_per_stream, self.pts_history)
                self._streams[stream_id] = s
            with s.lock:
                return s.info()

    def append(self, stream_id: str, record: FrameRecord) -> int:
        return self.append_many(stream_id, [record])[0]

    def append_many(self, stream_id: str, records: Iterable[FrameRecord]) -> list[int]:
        """Commit ``records`` in order, atomically: readers see all of them or none.

        On any error (pts order, encoding, budget) nothing is stored or evicted.
        """
        recs = list(records)
        for i, r in enumerate(recs):
            if not isinstance(r, FrameRecord):
                raise BadArgument(f"expected records[{i}] to be a FrameRecord, got {type(r).__name__}")
        s = self._get(stream_id)
        if not recs:
            return []
        with s.write_lock:
            prev = s.last_pts
            for i, r in enumerate(recs):
                pts = r.pts
                if not isinstance(pts, float) or not math.isfinite(pts):
                    raise BadArgument(f"expected a finite pts for stream {stream_id!r}, got {pts!r}")
                if prev is not None and pts < prev:
                    where = f" (records[{i}])" if len(recs) > 1 else ""
                    raise BadArgument(
                        f"expected non-decreasing pts >= {prev} for stream {stream_id!r}, got {pts}{where}"
                    )
                prev = pts
            # Only committers change next_seq and they hold write_lock, so it is stable here.
            seq0 = s.next_seq
            blobs = [encode_record(dataclasses.replace(r, seq=seq0 + i)) for i, r in enumerate(recs)]
            with s.lock:
                self._alive(s)
                after = s.bytes_after(blobs)
                if s.max_bytes is not None and after > s.max_bytes:
                    raise CacheBudgetExceeded(
                        f"expected at most {s.max_bytes} bytes for stream {stream_id!r}, would hold {after}"
                    )
                with self._acct_lock:
                    total = self._total_bytes - s.bytes_used + after
                    if self.max_bytes_total is not None and total > self.max_bytes_total:
                        raise CacheBudgetExceeded(
                            f"expected at most {self.max_bytes_total} bytes in the cache in total, "
                            f"would hold {total} (appending to stream {stream_id!r})"
                        )
                    self._total_bytes = total
                cap = s.capacity
                evicted: list[float] = []
                for r, b in zip(recs, blobs):
                    if s.count == cap:  # overwrite the oldest slot
                        slot = s.head
                        evicted.append(s.pts[slot])
                        s.head = (s.head + 1) % cap
                    else:
                        slot = (s.head + s.count) % cap
                        s.count += 1
                    s.blobs[slot] = b
                    s.pts[slot] = r.pts
                s.next_seq = seq0 + len(recs)
                s.bytes_used = after
                s.last_pts = prev
                if evicted:
                    s.evicted.extend(evicted)
        return list(range(seq0, seq0 + len(recs)))

    def snapshot(
        self,
        stream_id: str,
        start: float | None = None,
        end: float | None = None,
        *,
        max_frames: int | None = None,
    ) -> Snapshot:
        start = _check_time("start", start)
        end = _check_time("end", end)
        if start is not None and end is not None and start > end:
            raise BadArgument(f"expected start <= end, got start={start} end={end}")
        if max_frames is not None:
            _check_count("max_frames", max_frames)
        s = self._get(stream_id)
        with s.lock:
            self._alive(s)
            lo, hi = s.window(start, end)
            if max_frames is not None and hi - lo > max_frames:
                lo = hi - max_frames
            dropped, exact = s.evicted.count(start, end)
            return s.take(lo, hi, dropped, exact)

    def latest(self, stream_id: str, n: int) -> Snapshot:
        _check_count("n", n)
        s = self._get(stream_id)
        with s.lock:
            self._alive(s)
            k = min(n, s.count)
            dropped = min(n - k, s.next_seq - s.count)
            return s.take(s.count - k, s.count, dropped, True)

    def stream_info(self, stream_id: str) -> StreamInfo:
        s = self._get(stream_id)
        with s.lock:
            self._alive(s)
            return s.info()

    def streams(self) -> list[str]:
        with self._registry_lock:
            self._check_open()
            return sorted(self._streams)

    def delete_stream(self, stream_id: str) -> None:
        validate_stream_id(stream_id)
        with self._registry_lock:
            self._check_open()
            s = self._streams.pop(stream_id, None)
        if s is None:
            raise StreamNotFound(f"expected an existing stream, got unknown stream {stream_id!r}")
        self._drop(s)

    def _drop(self, s: _Stream) -> None:
        with s.lock:
            if s.deleted:
                return
            s.deleted = True
            with self._acct_lock:
                self._total_bytes -= s.bytes_used
            s.blobs = [None] * s.capacity
            s.count = 0
            s.bytes_used = 0
            s.evicted = _EvictionLog(0)

    def stats(self) -> dict[str, Any]:
        with self._registry_lock:
            self._check_open()
            items = sorted(self._streams.items())
        per: dict[str, dict[str, Any]] = {}
        for sid, s in items:
            with s.lock:
                if s.deleted:
                    continue
                per[sid] = {
                    "frames": s.count,
                    "capacity": s.capacity,
                    "bytes": s.bytes_used,
                    "max_bytes": s.max_bytes,
                    "total_appended": s.next_seq,
                    "evicted": s.next_seq - s.count,
                    "index_bytes": s.evicted.nbytes,
                }
        return {
            "backend": self.backend,
            "streams": per,
            "num_streams": len(per),
            "total_frames": sum(v["frames"] for v in per.values()),
            "total_bytes": sum(v["bytes"] for v in per.values()),
            "max_bytes_total": self.max_bytes_total,
            "max_bytes_per_stream": self.max_bytes_per_stream,
        }

    def close(self) -> None:
        with self._registry_lock:
            if self._closed:
                return
            self._closed = True
            streams = list(self._streams.values())
            self._streams.clear()
        for s in streams:
            self._drop(s)
