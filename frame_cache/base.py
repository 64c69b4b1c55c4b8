"""The frame-cache interface shared by the in-process and Redis backends.

A frame cache holds, per stream, a ring buffer of a fixed number of frames.
Each frame is an encoded `FrameRecord` (opaque ``bytes``, see
`frame_cache.record`); per-stream metadata is a small JSON object; sequence
numbers are monotonic ints assigned at commit (0, 1, 2, ... per stream, never
reused, even after the slot holding them is overwritten). Writers commit a
frame atomically; readers get a `Snapshot` of a time window that is consistent
(one instant of the stream) even while writers keep appending and overwriting
the oldest slots.

Backends:

* ``InProcessFrameCache`` (`frame_cache.memory`): the CLI's embedded default.
* ``RedisFrameCache`` (`frame_cache.redis_cache`): the service's backend.

Reading a long window: `FrameCache.window` returns a cheap, consistent
`FrameWindow` (a seq range and its pts, no record bytes); `FrameWindow.chunks`
then reads the records ``size`` frames at a time with `FrameCache.read`
(prefetching the next chunk while the caller works on the current one). Each
record read is checked against the seq asked for, so a frame overwritten
between the window and the read is reported in `WindowChunk.missing`, never
mixed in. A "light" read returns each frame's record without keys/values
(vision token, fused prefix rows, a watch's rows, pts: see `record.light_record`),
which is what a watch's answer reads. A "tokens" read returns each frame's
vision token(s), pts and meta only (`record.token_record`): what every question
reads of every frame of its window (at 8B shapes 8 KB a frame instead of the
light record's 0.37 MB), before it reads the full records of those it fuses.

Writers: `FrameCache.acquire_writer` hands out a fencing token (a per-stream
epoch); an append carrying an older token raises `StaleWriter`. An append that
names the seq of its first record is idempotent: a retry of records already
committed returns their seqs and stores nothing twice.

Redis key layout (every key of one stream carries the hash tag
``{<stream_id>}`` so Redis Cluster places them in one slot, which MULTI/EXEC and
Lua scripts require; keys come from `stream_key`):

* ``lms:{<sid>}:meta`` - HASH, small: ``capacity``, ``next_seq`` (== total
  appended), ``count``, ``bytes_used``, ``last_pts``, ``evicted``, ``meta``
  (the stream's JSON meta), ``version`` (record format version).
* ``lms:{<sid>}:slots`` - HASH ``slot index (seq % capacity) -> record bytes``.
* ``lms:{<sid>}:light`` - HASH ``slot index -> light record bytes`` (no keys/values).
* ``lms:{<sid>}:tokens`` - HASH ``slot index -> token record bytes`` (vision token(s) only).
* ``lms:{<sid>}:pts`` - ZSET ``member = seq, score = pts`` of retained frames;
  window lookup is ``ZRANGEBYSCORE start end`` (O(log n)), ties in pts are
  ordered by seq because members are zero-padded decimal seqs.
* ``lms:{<sid>}:evicted`` - ZSET of evicted frames' pts (trimmed to a bound)
  so that ``Snapshot.dropped_before`` can be answered.
* ``lms:streams`` - SET of stream ids (global, no hash tag; only for listing).

A commit is one Lua script (or WATCH + MULTI/EXEC) that checks the pts order and
byte budget, assigns ``seq = next_seq``, writes the slot, updates the zsets and
counters, so a reader never sees a half-written frame. A snapshot is one Lua
script (or MULTI/EXEC) reading the zset range and the matching slots, so the
records returned all belong to the same instant.
"""
from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from numbers import Real
from typing import TYPE_CHECKING, Any

from lmcore.errors import (
    BadArgument,
    CacheBudgetExceeded,
    CacheClosed,
    CacheError,
    StreamExists,
    StreamNotFound,
)

from .record import KV_TENSORS, FrameRecord, decode_record, encode_record, light_record, token_record

if TYPE_CHECKING:
    import torch

__all__ = [
    "FrameCache",
    "FrameWindow",
    "WindowChunk",
    "ON_FULL",
    "MAX_CAPACITY",
    "LIGHT_SAME_AS_FULL",
    "Snapshot",
    "StreamInfo",
    "StreamNotFound",
    "StreamExists",
    "CacheBudgetExceeded",
    "CacheClosed",
    "STREAM_ID_PATTERN",
    "KEY_PREFIX",
    "MAX_STREAM_META_BYTES",
    "validate_stream_id",
    "validate_stream_meta",
    "stream_key",
]

#: Allowed stream ids: 1-128 characters of letters, digits and ``._:-``.
STREAM_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_KEY_PART_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
#: Prefix of every Redis key the frame cache writes.
KEY_PREFIX = "lms"
#: Largest JSON encoding of a stream's meta dict.
MAX_STREAM_META_BYTES = 64 * 1024
#: Largest ring a stream may have, in frames.
MAX_CAPACITY = 1 << 20
#: What a backend stores as a frame's light copy when the record itself holds no keys/values (a
#: frame demoted to token-only by its retention policy): light reads then return the record.
LIGHT_SAME_AS_FULL = b""

#: What an append does to a full ring: overwrite the oldest frames (a live stream's
#: ring buffer; readers see them in ``dropped_before``) or refuse (`CapacityExceeded`,
#: nothing stored: a file job that must keep every frame it was asked for).
ON_FULL = ("overwrite", "error")


def validate_stream_id(stream_id: Any) -> str:
    """Return ``stream_id`` if it is 1-128 chars of ``[A-Za-z0-9._:-]``, else raise BadArgument."""
    if not isinstance(stream_id, str) or STREAM_ID_PATTERN.fullmatch(stream_id) is None:
        raise BadArgument(f"expected a stream id of 1-128 characters from [A-Za-z0-9._:-], got {stream_id!r}")
    return stream_id


# Argument checks shared by both backends: one wording for one mistake.
def check_budget_arg(name: str, value: Any) -> int | None:
    """None, or an int >= 1 (a byte budget)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadArgument(f"expected {name} to be None or an int >= 1, got {value!r}")
    return value


def check_time(name: str, value: Any) -> float | None:
    """None, or a finite number of seconds."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise BadArgument(f"expected {name} to be None or a finite number of seconds, got {value!r}")
    return float(value)


def check_count(name: str, value: Any) -> int:
    """An int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadArgument(f"expected {name} to be an int >= 0, got {value!r}")
    return value


def check_replacements(records: Iterable[FrameRecord]) -> list[FrameRecord]:
    """`replace_records`' argument: FrameRecords with a seq each, no seq twice."""
    recs = list(records)
    seen: set[int] = set()
    for i, r in enumerate(recs):
        if not isinstance(r, FrameRecord):
            raise BadArgument(f"expected records[{i}] to be a FrameRecord, got {type(r).__name__}")
        if isinstance(r.seq, bool) or not isinstance(r.seq, int) or r.seq < 0 or r.seq in seen:
            raise BadArgument(f"expected records[{i}].seq to be a distinct seq >= 0, got {r.seq!r}")
        seen.add(r.seq)
    return recs


def token_copy_bytes(rec: FrameRecord) -> bytes:
    """The token copy a backend stores beside `rec` (`record.token_record`): read by questions for
    every frame of their window, instead of the light copy that also holds the fused rows."""
    return encode_record(token_record(rec))


def check_read_part(light: Any, tokens: Any) -> None:
    """`FrameCache.read`'s ``light`` and ``tokens``: at most one of them."""
    if light and tokens:
        raise BadArgument("expected light=True or tokens=True in one read, got both")


def light_copy_bytes(rec: FrameRecord) -> bytes:
    """The light copy a backend stores beside `rec` when rewriting it: `LIGHT_SAME_AS_FULL` (empty)
    when the record holds no keys/values, so a token-only frame is kept once, not twice."""
    if not set(KV_TENSORS) & set(rec.tensors):
        return LIGHT_SAME_AS_FULL
    return encode_record(light_record(rec))


def check_window_args(start: Any, end: Any, max_frames: Any) -> tuple[float | None, float | None]:
    """The (start, end) of `FrameCache.snapshot` / `window`, checked, and ``max_frames`` checked."""
    start, end = check_time("start", start), check_time("end", end)
    if start is not None and end is not None and start > end:
        raise BadArgument(f"expected start <= end, got start={start} end={end}")
    if max_frames is not None:
        check_count("max_frames", max_frames)
    return start, end


def check_new_stream(stream_id: Any, capacity: Any, meta: Any, on_full: Any) -> dict[str, Any]:
    """The arguments of `FrameCache.create_stream`, checked; returns a clean copy of ``meta``."""
    validate_stream_id(stream_id)
    if on_full not in ON_FULL:
        raise BadArgument(f"expected on_full to be one of {', '.join(ON_FULL)}, got {on_full!r}")
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= MAX_CAPACITY:
        raise BadArgument(f"expected capacity to be an int in [1, {MAX_CAPACITY}] frames, got {capacity!r}")
    return validate_stream_meta(meta)


def validate_stream_meta(meta: Any) -> dict[str, Any]:
    """Return a deep copy of ``meta`` (a small JSON object), else raise BadArgument."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise BadArgument(f"expected stream meta to be a dict, got {type(meta).__name__}")
    try:
        text = json.dumps(meta, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise BadArgument(f"expected stream meta to be JSON-serialisable without NaN/inf, got an error: {e}") from None
    if len(text) > MAX_STREAM_META_BYTES:
        raise BadArgument(f"expected stream meta of at most {MAX_STREAM_META_BYTES} bytes as JSON, got {len(text)}")
    return json.loads(text)


def check_existing_meta(stream_id: str, existing: dict[str, Any], given: dict[str, Any] | None,
                        match: Iterable[str] | None) -> None:
    """`create_stream(..., exist_ok=True)` on an existing stream: raise `meta_differs` unless `given` is None
    or matches the stored meta (on the keys in `match` alone, when given)."""
    if given is None:
        return
    if match is None:
        if given != existing:
            raise meta_differs(stream_id, existing, given)
        return
    keys = set(match)
    if any(existing.get(k) != given.get(k) for k in keys):
        raise meta_differs(stream_id, {k: v for k, v in existing.items() if k in keys},
                           {k: v for k, v in given.items() if k in keys})


def meta_differs(stream_id: str, existing: dict[str, Any], given: dict[str, Any]) -> BadArgument:
    """The error for `create_stream(..., exist_ok=True)` given a meta other than the stream's: the keys that
    differ, each with the stored value against the one given."""
    keys = sorted(k for k in existing.keys() | given.keys() if existing.get(k) != given.get(k))
    show = lambda v: json.dumps(v, separators=(",", ":"))[:120]          # noqa: E731
    diff = "; ".join(f"{k}: {show(existing.get(k))} stored, {show(given.get(k))} given" for k in keys)
    return BadArgument(f"expected meta=None or the existing meta of stream {stream_id!r}, got one that differs "
                       f"({diff})")


def stream_key(stream_id: str, part: str, *, prefix: str = KEY_PREFIX) -> str:
    """Redis key for one part of a stream, e.g. ``lms:{cam-1}:slots``.

    The stream id is wrapped in ``{}`` (a Redis Cluster hash tag) so every key
    of one stream hashes to the same cluster slot. Stream ids cannot contain
    braces, so the tag is always exactly the id.
    """
    validate_stream_id(stream_id)
    if not isinstance(part, str) or _KEY_PART_PATTERN.fullmatch(part) is None:
        raise BadArgument(f"expected a key part of 1-64 characters from [A-Za-z0-9._:-], got {part!r}")
    return f"{prefix}:{{{stream_id}}}:{part}"


@dataclass(frozen=True)
class StreamInfo:
    """Small, JSON-friendly description of one stream at one instant.

    Fields:
        stream_id: str. The stream's id.
        capacity: int, scalar. Most frames retained (ring size).
        count: int, scalar. Frames retained now, ``0 <= count <= capacity``.
        total_appended: int, scalar. Frames ever committed (== next seq).
        oldest_seq: int, scalar. Seq of the oldest retained frame, -1 if none.
        newest_seq: int, scalar. Seq of the newest retained frame, -1 if none.
        oldest_pts: float | None. pts (s) of the oldest retained frame.
        newest_pts: float | None. pts (s) of the newest retained frame.
        bytes_used: int, scalar. Sum of the encoded byte lengths of retained records.
        max_bytes: int | None. The stream's byte budget, None for unlimited.
        meta: dict. The stream's JSON meta (a copy).
        on_full: str. "overwrite" (ring) or "error" (refuse appends past capacity).
        writer: int. Current writer epoch (0 until `FrameCache.acquire_writer` is called).
        light_bytes: int. Bytes of the retained light and token copies (counted apart from bytes_used).
    """

    stream_id: str
    capacity: int
    count: int
    total_appended: int
    oldest_seq: int
    newest_seq: int
    oldest_pts: float | None
    newest_pts: float | None
    bytes_used: int
    max_bytes: int | None
    meta: dict[str, Any] = field(default_factory=dict)
    on_full: str = "overwrite"
    writer: int = 0
    light_bytes: int = 0

    @property
    def evicted(self) -> int:
        """Frames committed and since overwritten."""
        return self.total_appended - self.count

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for the service and the Redis meta hash)."""
        return {
            "stream_id": self.stream_id,
            "capacity": self.capacity,
            "count": self.count,
            "total_appended": self.total_appended,
            "oldest_seq": self.oldest_seq,
            "newest_seq": self.newest_seq,
            "oldest_pts": self.oldest_pts,
            "newest_pts": self.newest_pts,
            "bytes_used": self.bytes_used,
            "max_bytes": self.max_bytes,
            "meta": json.loads(json.dumps(self.meta)),
            "on_full": self.on_full,
            "writer": self.writer,
            "light_bytes": self.light_bytes,
        }


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A consistent, immutable view of some frames of one stream.

    All frames were retained at one instant; they are in time order (pts, then
    seq) with contiguous seqs ``first_seq .. last_seq``. Records are kept as
    encoded bytes and decoded on access (`records`, `__iter__`, `record`).

    Fields:
        stream_id: str. The stream the frames belong to.
        blobs: tuple[bytes, ...], length N. Encoded records (see `frame_cache.record`).
        pts_list: tuple[float, ...], length N. pts (s) of each record, non-decreasing.
        first_seq: int, scalar. Seq of ``blobs[0]``; -1 when N == 0.
        last_seq: int, scalar. Seq of ``blobs[-1]``; -1 when N == 0.
        dropped_before: int, scalar. Frames that fell in the requested window
            (or the requested ``latest(n)`` count) but had already been
            overwritten, i.e. the window starts before the oldest retained frame.
        dropped_exact: bool. False when ``dropped_before`` is an estimate
            (the backend's history of overwritten pts was trimmed).
        copy_tensors: bool. Whether decoded tensors own their memory (default
            True). False makes them zero-copy, read-only-by-contract views of the
            cached bytes: cheaper, but an in-place write would corrupt the bytes
            shared with the cache.
    """

    stream_id: str
    blobs: tuple[bytes, ...] = ()
    pts_list: tuple[float, ...] = ()
    first_seq: int = -1
    last_seq: int = -1
    dropped_before: int = 0
    dropped_exact: bool = True
    copy_tensors: bool = True

    def __post_init__(self) -> None:
        n = len(self.blobs)
        if len(self.pts_list) != n:
            raise CacheError(f"expected {n} pts for {n} snapshot records, got {len(self.pts_list)}")
        if n and self.last_seq - self.first_seq + 1 != n:
            raise CacheError(
                f"expected snapshot seqs {self.first_seq}..{self.last_seq} to cover {n} records, "
                f"they cover {self.last_seq - self.first_seq + 1}"
            )

    def __len__(self) -> int:
        return len(self.blobs)

    def __iter__(self) -> Iterator[FrameRecord]:
        return iter(self.records)

    def __getitem__(self, i: int) -> FrameRecord:
        return self.records[i]

    def pts(self) -> list[float]:
        """pts (s) of every record, in order, without decoding."""
        return list(self.pts_list)

    def seqs(self) -> list[int]:
        """Seq of every record, in order."""
        return list(range(self.first_seq, self.last_seq + 1)) if self.blobs else []

    @property
    def nbytes(self) -> int:
        """Sum of the encoded record sizes."""
        return sum(len(b) for b in self.blobs)

    @cached_property
    def records(self) -> list[FrameRecord]:
        """The decoded records (decoded once, on first access, on CPU)."""
        return [decode_record(b, copy=self.copy_tensors) for b in self.blobs]

    def record(self, i: int, *, device: str | torch.device = "cpu") -> FrameRecord:
        """Decode record ``i`` afresh, optionally straight onto ``device``."""
        return decode_record(self.blobs[i], device=device, copy=self.copy_tensors)


@dataclass(frozen=True)
class WindowChunk:
    """Up to ``size`` consecutive frames of a `FrameWindow`, as read from the cache.

    Fields:
        seqs: list[int], length n. Seqs of the frames present, in order.
        pts: list[float], length n. Their pts (s).
        blobs: list[bytes], length n. Their encoded records (light or token ones for such a read).
        missing: list[int]. Seqs of this chunk that were overwritten (or deleted) between
            the window and the read: reported, never replaced by other frames.
    """

    seqs: list[int]
    pts: list[float]
    blobs: list[bytes]
    missing: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.blobs)

    def records(self, *, copy: bool = True) -> list[FrameRecord]:
        """Decoded records; ``copy=False`` gives zero-copy views that must stay read-only (they may
        share memory with the cache)."""
        return [decode_record(b, copy=copy) for b in self.blobs]


@dataclass(frozen=True, eq=False)
class FrameWindow:
    """A consistent seq range of one stream: which frames a question covers, no bytes yet.

    Fields:
        stream_id: str.
        first_seq, last_seq: int. Inclusive seq range; -1, -1 when empty.
        pts_list: tuple[float, ...], length last_seq - first_seq + 1. pts (s), non-decreasing.
        dropped_before: int. Frames in the asked window already overwritten (see `Snapshot`).
        dropped_exact: bool. False when ``dropped_before`` is an estimate.
    """

    stream_id: str
    first_seq: int = -1
    last_seq: int = -1
    pts_list: tuple[float, ...] = ()
    dropped_before: int = 0
    dropped_exact: bool = True

    def __post_init__(self) -> None:
        n = len(self.pts_list)
        if (self.last_seq - self.first_seq + 1 if n else 0) != n:
            raise CacheError(f"expected window seqs {self.first_seq}..{self.last_seq} to match {n} pts")

    def __len__(self) -> int:
        return len(self.pts_list)

    def seqs(self) -> range:
        return range(self.first_seq, self.last_seq + 1) if self.pts_list else range(0)

    def chunks(self, cache: "FrameCache", size: int, *, seqs: Iterable[int] | None = None, light: bool = False,
               tokens: bool = False, prefetch: bool = True) -> Iterator[WindowChunk]:
        """Read the window's frames (or the subset ``seqs``, in order) ``size`` at a time; ``light`` and
        ``tokens`` as in `FrameCache.read`.

        With ``prefetch`` the next chunk is read on a helper thread while the caller works
        on the current one, so at most two chunks are in memory at once."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise BadArgument(f"expected a chunk size >= 1 frames, got {size!r}")
        order = list(self.seqs() if seqs is None else seqs)
        for q in order:
            if not self.first_seq <= q <= self.last_seq:
                raise BadArgument(f"expected seqs inside the window {self.first_seq}..{self.last_seq}, got {q}")
        groups = [order[i:i + size] for i in range(0, len(order), size)]

        def read(group: list[int]) -> WindowChunk:
            blobs = cache.read(self.stream_id, group, light=light, tokens=tokens)
            keep = [(q, b) for q, b in zip(group, blobs) if b is not None]
            return WindowChunk(seqs=[q for q, _ in keep], pts=[self.pts_list[q - self.first_seq] for q, _ in keep],
                               blobs=[b for _, b in keep], missing=[q for q, b in zip(group, blobs) if b is None])

        if not prefetch or len(groups) < 2:
            for g in groups:
                yield read(g)
            return
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(1, thread_name_prefix="lms-prefetch") as pool:
            nxt = pool.submit(read, groups[0])
            for i in range(len(groups)):
                cur = nxt.result()
                if i + 1 < len(groups):
                    nxt = pool.submit(read, groups[i + 1])
                yield cur


class FrameCache(ABC):
    """Per-stream ring buffers of encoded frame records.

    Implementations must be safe to call from several threads: appends to one
    stream are serialised, and `snapshot`/`latest` return views consistent at
    one instant. Every method taking a stream id raises `BadArgument` for an
    invalid id and `StreamNotFound` for an unknown one (except `create_stream`).
    """

    @abstractmethod
    def create_stream(
        self, stream_id: str, capacity: int, meta: dict | None = None, exist_ok: bool = True,
        *, on_full: str = "overwrite", match: Iterable[str] | None = None,
    ) -> StreamInfo:
        """Create a stream holding at most ``capacity`` frames and return its info.

        ``on_full`` (see `ON_FULL`): "overwrite" makes a ring; "error" refuses an append
        past capacity with `CapacityExceeded` (nothing stored). If the stream exists and
        ``exist_ok``, return its info when ``capacity`` and ``on_full`` match (and ``meta``
        matches, unless None; only on the keys named in ``match``, when given), else raise
        BadArgument; if it exists and not ``exist_ok``, raise `StreamExists`. Creating or
        finding it is one step: a stream deleted meanwhile is created with ``meta``.
        """

    @abstractmethod
    def acquire_writer(self, stream_id: str) -> int:
        """Become the stream's writer: bump and return its writer epoch (a fencing token).

        Appends passing an older ``writer`` token raise `StaleWriter` from then on."""

    def append(self, stream_id: str, record: FrameRecord, *, writer: int | None = None,
               seq: int | None = None) -> int:
        """Commit one record atomically and return the seq assigned to it (see `append_many`)."""
        return self.append_many(stream_id, [record], writer=writer, seq=seq)[0]

    @abstractmethod
    def append_many(self, stream_id: str, records: Iterable[FrameRecord], *, writer: int | None = None,
                    seq: int | None = None) -> list[int]:
        """Commit several records in order, atomically (all or none); returns their seqs.

        ``record.pts`` must be >= the previous frame's pts (BadArgument otherwise).
        When the stream is full the oldest frames are overwritten (``on_full="overwrite"``)
        or `CapacityExceeded` is raised. ``record.seq`` is ignored (the stored copy gets the
        assigned seq) and the caller's object is not modified.

        ``writer``: a token from `acquire_writer`; an older one raises `StaleWriter`.
        ``seq``: the seq the caller expects ``records[0]`` to get. Records whose seqs are
        already committed are not stored again (an idempotent retry: their seqs are
        returned); a ``seq`` past the stream's next seq raises BadArgument (a gap).
        """

    @abstractmethod
    def replace_records(self, stream_id: str, records: Iterable[FrameRecord]) -> list[int]:
        """Rewrite frames still in the ring (retention tiers: `frame_cache.retention`): each record
        replaces the stored frame with the same ``seq`` (its pts must equal the stored one), the
        light copy too, atomically per call. Frames no longer retained are skipped; returns the
        seqs rewritten. Byte accounting follows the new sizes; budgets are not checked (a rewrite
        only ever shrinks a frame here)."""

    @abstractmethod
    def window(
        self,
        stream_id: str,
        start: float | None = None,
        end: float | None = None,
        *,
        max_frames: int | None = None,
    ) -> FrameWindow:
        """Like `snapshot` (same selection and ``dropped_before``), but only the seq range
        and pts: cheap, consistent; read the frames with `FrameWindow.chunks`."""

    @abstractmethod
    def read(self, stream_id: str, seqs: Iterable[int], *, light: bool = False,
             tokens: bool = False) -> list[bytes | None]:
        """Encoded records for ``seqs``, in that order; None for a seq no longer retained
        (overwritten or never written). With ``light``, the records without keys/values; with
        ``tokens``, each frame's token record (vision token(s), pts, meta: `record.token_record`)."""

    @abstractmethod
    def snapshot(
        self,
        stream_id: str,
        start: float | None = None,
        end: float | None = None,
        *,
        max_frames: int | None = None,
    ) -> Snapshot:
        """Frames with ``start <= pts <= end`` (None = unbounded), in time order.

        With ``max_frames``, only the newest ``max_frames`` of them.
        """

    @abstractmethod
    def latest(self, stream_id: str, n: int) -> Snapshot:
        """The newest ``n`` frames (fewer if fewer are retained)."""

    @abstractmethod
    def stream_info(self, stream_id: str) -> StreamInfo:
        """Capacity, counts, pts range, bytes used and meta of one stream."""

    @abstractmethod
    def streams(self) -> list[str]:
        """Ids of all streams, sorted."""

    @abstractmethod
    def delete_stream(self, stream_id: str) -> None:
        """Drop a stream and all its frames (StreamNotFound if unknown)."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """JSON-serialisable memory/frame accounting: per stream and totals."""

    @abstractmethod
    def close(self) -> None:
        """Release all resources; later calls raise `CacheClosed`. Idempotent."""

    def __enter__(self) -> "FrameCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
