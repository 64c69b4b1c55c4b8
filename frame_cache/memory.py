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
lengths of its retained encoded records (``light_bytes``, their light copies
without keys/values and their token copies, is counted apart).

Spill (``spill_dir``): records live in one file per stream in that folder
instead of in memory (a slot's bytes are rewritten in place when the new record
fits, so a ring of equal-sized records keeps a file of capacity x record size);
the process then holds only pts and offsets, and a question reads its window
chunk by chunk. The CLI uses this so that memory stays flat however long the
video. Snapshots and reads copy bytes out of the file under the stream's lock. Records evicted while a caller still
holds a `Snapshot` stay alive until that snapshot is released; they are no
longer counted. The bounded history of evicted pts (for
``Snapshot.dropped_before``) is reported separately as ``index_bytes``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from typing import Any

from lmcore.errors import BadArgument, CapacityExceeded, StaleWriter

from .base import (
    MAX_CAPACITY,
    CacheBudgetExceeded,
    CacheClosed,
    FrameCache,
    FrameWindow,
    Snapshot,
    StreamExists,
    StreamInfo,
    StreamNotFound,
    check_budget_arg as _check_budget_arg,
    check_count as _check_count,
    check_new_stream,
    check_existing_meta,
    check_replacements,
    check_read_part,
    light_copy_bytes,
    token_copy_bytes,
    check_window_args,
    validate_stream_id,
    validate_stream_meta,
)
from .record import FrameRecord, encode_record, record_seq

__all__ = ["InProcessFrameCache", "MAX_CAPACITY", "DEFAULT_PTS_HISTORY"]

#: Default number of evicted frames whose pts are remembered exactly per stream.
DEFAULT_PTS_HISTORY = 1 << 18


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


class _Spill:
    """Blobs of one stream in a file: slot -> (offset, region size), rewritten in place when
    a new blob fits its slot's region, else appended."""

    def __init__(self, folder: str, stream_id: str) -> None:
        fd, self.path = tempfile.mkstemp(prefix=f"lms-{stream_id[:40]}-", suffix=".ring", dir=folder)
        self.f = os.fdopen(fd, "r+b", buffering=0)
        try:                # nameless from now on: even a killed process leaves no file behind (POSIX)
            os.unlink(self.path)
        except OSError:
            pass
        self.regions: dict[object, tuple[int, int]] = {}
        self.end = 0

    def put(self, key: object, data: bytes) -> tuple[int, int]:
        off, cap = self.regions.get(key, (0, -1))
        if len(data) > cap:
            off, cap = self.end, len(data)
            self.end += cap
            self.regions[key] = (off, cap)
        os.pwrite(self.f.fileno(), data, off)
        return off, len(data)

    def get(self, handle: tuple[int, int]) -> bytes:
        off, n = handle
        data = os.pread(self.f.fileno(), n, off)
        if len(data) != n:
            raise OSError(f"short read from {self.path}: expected {n} bytes at {off}, got {len(data)}")
        return data

    def close(self) -> None:
        try:
            self.f.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class _Stream:
    """One stream's ring. All fields but the locks are guarded by ``lock``.

    Slot lists grow as frames arrive (a ring of 2**20 frames costs nothing until used);
    a slot holds the record's bytes, or its (offset, length) in the spill file."""

    __slots__ = (
        "stream_id", "capacity", "meta", "max_bytes", "blobs", "light", "toks", "sizes", "light_sizes", "pts", "head",
        "count", "next_seq", "bytes_used", "light_bytes", "last_pts", "evicted", "deleted", "lock", "write_lock",
        "on_full", "writer", "spill",
    )

    def __init__(self, stream_id: str, capacity: int, meta: dict, max_bytes: int | None, history: int,
                 on_full: str = "overwrite", spill_dir: str | None = None) -> None:
        self.stream_id = stream_id
        self.capacity = capacity
        self.meta = meta
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.writer = 0
        self.blobs: list = []          # bytes | (offset, length)
        self.light: list = []
        self.toks: list = []           # token copies (`record.token_record`)
        self.sizes: list[int] = []
        self.light_sizes: list[int] = []
        self.pts: list[float] = []
        self.head = 0  # slot of the oldest retained frame
        self.count = 0
        self.next_seq = 0  # == total appended
        self.bytes_used = 0
        self.light_bytes = 0
        self.last_pts: float | None = None  # pts of the newest frame ever committed
        self.evicted = _EvictionLog(history)
        self.deleted = False
        self.spill = _Spill(spill_dir, stream_id) if spill_dir is not None else None
        self.lock = threading.Lock()
        self.write_lock = threading.Lock()

    def _pts_at(self, i: int) -> float:
        """pts of the i-th oldest retained frame."""
        return self.pts[(self.head + i) % self.capacity]

    def _bytes(self, h) -> bytes:
        return h if self.spill is None else self.spill.get(h)

    def window(self, start: float | None, end: float | None) -> tuple[int, int]:
        """Logical index range [lo, hi) of retained frames with start <= pts <= end; O(log n)."""
        idx = range(self.count)
        lo = 0 if start is None else bisect_left(idx, start, key=self._pts_at)
        hi = self.count if end is None else bisect_right(idx, end, key=self._pts_at)
        return lo, max(lo, hi)

    def take(self, lo: int, hi: int, dropped: int, exact: bool, *, bytes_too: bool = True):
        cap, head = self.capacity, self.head
        slots = [(head + i) % cap for i in range(lo, hi)]
        oldest_seq = self.next_seq - self.count
        kw = dict(stream_id=self.stream_id, pts_list=tuple(self.pts[s] for s in slots),
                  first_seq=oldest_seq + lo if hi > lo else -1, last_seq=oldest_seq + hi - 1 if hi > lo else -1,
                  dropped_before=dropped, dropped_exact=exact)
        if not bytes_too:
            return FrameWindow(**kw)
        return Snapshot(blobs=tuple(self._bytes(self.blobs[s]) for s in slots), **kw)

    def read(self, seqs: list[int], light: bool, tokens: bool = False) -> list[bytes | None]:
        oldest = self.next_seq - self.count
        ring = self.toks if tokens else self.light if light else self.blobs
        out: list[bytes | None] = []
        for q in seqs:
            if not oldest <= q < self.next_seq:
                out.append(None)
                continue
            b = self._bytes(ring[q % self.capacity])
            if light and not b:                              # LIGHT_SAME_AS_FULL: a record without keys/values
                b = self._bytes(self.blobs[q % self.capacity])
            out.append(b if record_seq(b) == q else None)   # belt and braces: slot = seq % capacity
        return out

    def bytes_after(self, sizes: list[int], light_sizes: list[int]) -> tuple[int, int]:
        """(bytes, light bytes) the ring would hold after committing blobs of these sizes."""
        cap, n = self.capacity, len(sizes)
        if n >= cap:
            return sum(sizes[-cap:]), sum(light_sizes[-cap:])
        n_evict = max(0, self.count + n - cap)
        ev = [(self.head + i) % cap for i in range(n_evict)]
        return (self.bytes_used - sum(self.sizes[j] for j in ev) + sum(sizes),
                self.light_bytes - sum(self.light_sizes[j] for j in ev) + sum(light_sizes))

    def put(self, slot: int, seq: int, blob: bytes, light: bytes, tok: bytes, pts: float) -> None:
        """Write a frame's record, light copy and token copy (``light_sizes`` counts the two copies)."""
        if self.spill is not None:
            hb, hl = self.spill.put(("r", slot), blob), self.spill.put(("l", slot), light)
            ht = self.spill.put(("t", slot), tok)
        else:
            hb, hl, ht = blob, light, tok
        if slot == len(self.blobs):          # growing (not yet full)
            self.blobs.append(hb), self.light.append(hl), self.toks.append(ht), self.pts.append(pts)
            self.sizes.append(len(blob)), self.light_sizes.append(len(light) + len(tok))
        else:
            self.blobs[slot], self.light[slot], self.toks[slot], self.pts[slot] = hb, hl, ht, pts
            self.sizes[slot], self.light_sizes[slot] = len(blob), len(light) + len(tok)

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
            on_full=self.on_full,
            writer=self.writer,
            light_bytes=self.light_bytes,
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
        spill_dir: keep record bytes in one file per stream in this existing folder
            instead of in memory (files removed by `delete_stream` / `close`).
    """

    backend = "in-process"

    def __init__(
        self,
        *,
        max_bytes_per_stream: int | None = None,
        max_bytes_total: int | None = None,
        pts_history: int = DEFAULT_PTS_HISTORY,
        spill_dir: str | os.PathLike | None = None,
    ) -> None:
        if spill_dir is not None and not os.path.isdir(spill_dir):
            raise BadArgument(f"expected spill_dir to be an existing folder, got {str(spill_dir)!r}")
        self.spill_dir = None if spill_dir is None else os.fspath(spill_dir)
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
        self, stream_id: str, capacity: int, meta: dict | None = None, exist_ok: bool = True,
        *, on_full: str = "overwrite", match: Iterable[str] | None = None,
    ) -> StreamInfo:
        clean_meta = check_new_stream(stream_id, capacity, meta, on_full)
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
                if s.on_full != on_full:
                    raise BadArgument(
                        f"expected on_full={s.on_full!r} for existing stream {stream_id!r}, got {on_full!r}"
                    )
                check_existing_meta(stream_id, s.meta, None if meta is None else clean_meta, match)
            else:
                s = _Stream(stream_id, capacity, clean_meta, self.max_bytes_per_stream, self.pts_history,
                            on_full, self.spill_dir)
                self._streams[stream_id] = s
            with s.lock:
                return s.info()

    def acquire_writer(self, stream_id: str) -> int:
        s = self._get(stream_id)
        with s.write_lock, s.lock:
            self._alive(s)
            s.writer += 1
            return s.writer

    def append_many(self, stream_id: str, records: Iterable[FrameRecord], *, writer: int | None = None,
                    seq: int | None = None) -> list[int]:
        """Commit ``records`` in order, atomically: readers see all of them or none.

        On any error (fencing, pts order, encoding, capacity, budget) nothing is stored or evicted.
        """
        recs = list(records)
        for i, r in enumerate(recs):
            if not isinstance(r, FrameRecord):
                raise BadArgument(f"expected records[{i}] to be a FrameRecord, got {type(r).__name__}")
        if writer is not None and (isinstance(writer, bool) or not isinstance(writer, int)):
            raise BadArgument(f"expected writer to be None or a token from acquire_writer, got {writer!r}")
        if seq is not None:
            _check_count("seq", seq)
        s = self._get(stream_id)
        if not recs:
            return []
        with s.write_lock:
            if writer is not None and writer != s.writer:
                raise StaleWriter(f"expected writer token {s.writer} for stream {stream_id!r} (the current "
                                  f"writer's), got {writer}: another writer took the stream over")
            # Only committers change next_seq and they hold write_lock, so it is stable here.
            seq0 = s.next_seq
            done: list[int] = []
            if seq is not None:
                if seq > seq0:
                    raise BadArgument(f"expected seq <= {seq0} (the next seq of stream {stream_id!r}), got {seq}: "
                                      f"frames {seq0}..{seq - 1} would be missing")
                skip = min(len(recs), seq0 - seq)       # an idempotent retry: these are committed already
                done, recs = list(range(seq, seq + skip)), recs[skip:]
                if not recs:
                    return done
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
            if s.on_full == "error" and s.count + len(recs) > s.capacity:
                raise CapacityExceeded(
                    f"expected at most {s.capacity} frames in stream {stream_id!r} (its capacity; on_full='error'), "
                    f"got {s.count} stored + {len(recs)} new")
            fulls = [dataclasses.replace(r, seq=seq0 + i) for i, r in enumerate(recs)]
            blobs = [encode_record(r) for r in fulls]
            lights = [light_copy_bytes(r) for r in fulls]
            toks = [token_copy_bytes(r) for r in fulls]
            with s.lock:
                self._alive(s)
                after, light_after = s.bytes_after([len(b) for b in blobs],
                                                   [len(b) + len(t) for b, t in zip(lights, toks)])
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
                for i, (r, b, lb, tb) in enumerate(zip(recs, blobs, lights, toks)):
                    if s.count == cap:  # overwrite the oldest slot
                        slot = s.head
                        evicted.append(s.pts[slot])
                        s.head = (s.head + 1) % cap
                    else:
                        slot = (s.head + s.count) % cap
                        s.count += 1
                    s.put(slot, seq0 + i, b, lb, tb, r.pts)
                s.next_seq = seq0 + len(recs)
                s.bytes_used = after
                s.light_bytes = light_after
                s.last_pts = prev
                if evicted:
                    s.evicted.extend(evicted)
        return done + list(range(seq0, seq0 + len(recs)))

    def replace_records(self, stream_id: str, records: Iterable[FrameRecord]) -> list[int]:
        recs = check_replacements(records)
        s = self._get(stream_id)
        if not recs:
            return []
        blobs = [encode_record(r) for r in recs]
        lights = [light_copy_bytes(r) for r in recs]
        toks = [token_copy_bytes(r) for r in recs]
        done: list[int] = []
        with s.write_lock, s.lock:
            self._alive(s)
            oldest = s.next_seq - s.count
            delta = 0
            for r, b, lb, tb in zip(recs, blobs, lights, toks):
                if not oldest <= r.seq < s.next_seq:
                    continue
                slot = r.seq % s.capacity
                if s.pts[slot] != r.pts:
                    raise BadArgument(f"expected pts {s.pts[slot]} for frame {r.seq} of stream {stream_id!r} "
                                      f"(a rewrite keeps the frame's time), got {r.pts}")
                delta += len(b) - s.sizes[slot]
                s.light_bytes += len(lb) + len(tb) - s.light_sizes[slot]
                s.put(slot, r.seq, b, lb, tb, r.pts)
                done.append(r.seq)
            s.bytes_used += delta
            with self._acct_lock:
                self._total_bytes += delta
        return done

    def snapshot(
        self,
        stream_id: str,
        start: float | None = None,
        end: float | None = None,
        *,
        max_frames: int | None = None,
    ) -> Snapshot:
        return self._select(stream_id, start, end, max_frames, bytes_too=True)

    def _select(self, stream_id, start, end, max_frames, *, bytes_too: bool):
        start, end = check_window_args(start, end, max_frames)
        s = self._get(stream_id)
        with s.lock:
            self._alive(s)
            lo, hi = s.window(start, end)
            if max_frames is not None and hi - lo > max_frames:
                lo = hi - max_frames
            dropped, exact = s.evicted.count(start, end)
            return s.take(lo, hi, dropped, exact, bytes_too=bytes_too)

    def window(
        self,
        stream_id: str,
        start: float | None = None,
        end: float | None = None,
        *,
        max_frames: int | None = None,
    ) -> FrameWindow:
        return self._select(stream_id, start, end, max_frames, bytes_too=False)

    def read(self, stream_id: str, seqs: Iterable[int], *, light: bool = False,
             tokens: bool = False) -> list[bytes | None]:
        check_read_part(light, tokens)
        qs = list(seqs)
        for q in qs:
            _check_count("seq", q)
        s = self._get(stream_id)
        with s.lock:
            self._alive(s)
            return s.read(qs, light, tokens)

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
            s.blobs, s.light, s.toks, s.sizes, s.light_sizes, s.pts = [], [], [], [], [], []
            s.count = 0
            s.bytes_used = 0
            s.light_bytes = 0
            if s.spill is not None:
                s.spill.close()
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
                    "light_bytes": s.light_bytes,
                    "on_full": s.on_full,
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
            "spill_dir": self.spill_dir,
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
