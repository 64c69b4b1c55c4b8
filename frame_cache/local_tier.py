"""Keys/values where a question can read them fast: a tier local to the answering process.

docs/design.md section 9: Redis holds the durable ring, but an exact question over a long window at 8B
shapes reads ~9.45 MB of keys/values per frame, which Redis on loopback moves at 0.3-0.5 GB/s. So
the Answerer keeps the full records it has read in a memory-mapped local file per stream, and reads
them from there the next time: page-cache speed, no network, no Redis CPU.

    tiered = LocalTierCache(redis_cache, LocalKVTier(folder, max_bytes=64 << 30))
    src = CachedFrames(tiered, "cam-1", 0, 3600)      # token records from Redis, keys/values local

Correctness never depends on the tier: Redis stays the source of truth. A full read first reads
the frames' token records from Redis (small: vision token, pts, meta; 8 KB a frame at 8B, 1/1000
of the full record) and takes a local copy only when it holds the same frame: the same seq, and a
copy made when that token record was byte for byte the one Redis holds now (its header: seq, pts,
meta with the keys/values form; and the vision token). A frame demoted by its retention
policy, overwritten in the ring, or written again by a stream deleted and created anew under the
same id (which starts at seq 0 again) is read again from Redis. A replica
that starts, or takes over a stream from another, simply starts empty and fills as questions read:
"rebuilt from Redis". `warm(stream_id)` fills it ahead of the first question.

Files are unlinked as soon as they are made (like the in-process cache's spill files), so a killed
process leaves nothing behind. The budget `max_bytes` bounds the files' bytes, dead records included: past
it, the least recently used streams' files are dropped whole; a stream over the budget alone keeps its
newest frames that fit in half of it (the ring overwrites the oldest first), copied to a fresh file. A
stream's file is also rewritten once more than half of it is dead records, and a frame the ring overwrote
is dropped when a read finds it gone.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from lmcore.errors import BadArgument

from .record import record_header

__all__ = ["LocalKVTier", "LocalTierCache"]


#: How much of a token record its mark hashes: the header and, at 8B, the vision token (8 KB).
_MARK_BYTES = 16 << 10


def _mark(head: bytes | memoryview) -> bytes:
    """What names one stored version of a frame: a hash of its token record's start (header: seq,
    pts, meta with the keys/values form; then the vision token) and its length. Cheap (16 KB at
    most), and it changes when the frame is demoted, overwritten or written by a recreated stream."""
    h = hashlib.blake2b(memoryview(head)[:_MARK_BYTES], digest_size=16)
    h.update(len(head).to_bytes(8, "little"))
    return h.digest()


class _StreamFile:
    """One stream's records in one unlinked file: seq -> (offset, length, mark of its token record)."""

    def __init__(self, folder: str, stream_id: str):
        fd, path = tempfile.mkstemp(prefix=f"lms-kv-{stream_id[:40]}-", suffix=".tier", dir=folder)
        os.unlink(path)                               # nameless: nothing left behind, whatever happens
        self.fd = fd
        self.index: dict[int, tuple[int, int, bytes]] = {}
        self.end = 0
        self.live = 0
        self._map: mmap.mmap | None = None
        self._mapped = 0

    def put(self, seq: int, mark: bytes, blob: bytes) -> int:
        """Append a record (an older copy of its frame becomes dead); returns the bytes the file grew by."""
        old = self.index.get(seq)
        os.pwrite(self.fd, blob, self.end)
        self.index[seq] = (self.end, len(blob), mark)
        self.end += len(blob)
        self.live += len(blob) - (old[1] if old else 0)
        return len(blob)

    def get(self, seq: int) -> tuple[memoryview, bytes] | None:
        e = self.index.get(seq)
        if e is None:
            return None
        off, n, mark = e
        if self._map is None or off + n > self._mapped:              # grow the mapping as the file grows
            # the old mapping is not closed: records decoded from it may still be in use (zero-copy
            # views); it goes away with the last of them. The file is append-only, so no view ever
            # sees its bytes change.
            self._map = mmap.mmap(self.fd, self.end, prot=mmap.PROT_READ)
            self._mapped = self.end
        return memoryview(self._map)[off:off + n], mark

    def drop(self, seqs: Iterable[int]) -> int:
        freed = 0
        for q in seqs:
            e = self.index.pop(q, None)
            if e is not None:
                freed += e[1]
        self.live -= freed
        return freed

    @property
    def dead(self) -> int:
        return self.end - self.live

    def close(self) -> None:
        self._map = None                              # unmapped when the last view of it is gone
        os.close(self.fd)


class LocalKVTier:
    """Full frame records kept in local memory-mapped files, per stream, within `max_bytes`.

    Thread-safe. `get` returns zero-copy views into the mapping (valid while the stream's file
    is open); callers copy what they keep (decoding a record and moving it to a device does)."""

    def __init__(self, folder: str | os.PathLike | None = None, max_bytes: int = 8 << 30):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise BadArgument(f"expected the local keys/values tier's max_bytes to be an int >= 0, got {max_bytes!r}")
        if folder is None:
            folder = tempfile.gettempdir()
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        self.folder, self.max_bytes = folder, max_bytes
        self._files: OrderedDict[str, _StreamFile] = OrderedDict()
        self._lock = threading.Lock()
        self.used = 0
        self.hits = self.misses = self.evicted_streams = self.trimmed_frames = 0
        self.bytes_local = self.bytes_remote = 0

    def _file(self, sid: str, create: bool) -> _StreamFile | None:
        f = self._files.get(sid)
        if f is None and create:
            f = self._files[sid] = _StreamFile(self.folder, sid)
        if f is not None:
            self._files.move_to_end(sid)
        return f

    def get(self, sid: str, seq: int, mark: bytes) -> memoryview | None:
        """The record of frame `seq` if held for the token record whose `_mark` is `mark` (the version
        of the frame the durable cache holds now)."""
        with self._lock:
            f = self._file(sid, False)
            got = f.get(seq) if f is not None else None
            if got is None or got[1] != mark:
                return None
            return got[0]

    def put(self, sid: str, blob: bytes, mark: bytes) -> None:
        """Keep a full record read from the durable cache (replacing an older copy of its frame);
        `mark` is `_mark` of the token record read with it."""
        if len(blob) > self.max_bytes:
            return
        seq = int(record_header(blob)["seq"])
        with self._lock:
            f = self._file(sid, True)
            if f.dead > max(f.live, 64 << 20):        # mostly dead records: the live ones to a fresh file
                f = self._rewrite(sid, f, sorted(f.index))
            self.used += f.put(seq, mark, blob)
            if self.used > self.max_bytes:            # dead records go first: this stream's, then the others'
                for other in [sid] + [o for o in self._files if o != sid]:      # (where at least a third of a
                    if self.used <= self.max_bytes:                             # file is dead: copying the rest
                        break                                                   # costs at most twice what it frees)
                    g = self._files[other]
                    if g.dead and 2 * g.dead >= g.live:
                        g = self._rewrite(other, g, sorted(g.index))
                        if other == sid:
                            f = g
            while self.used > self.max_bytes and len(self._files) > 1:
                _, of = self._files.popitem(last=False)        # least recently used (never `sid`: it is last)
                self.used -= of.end
                of.close()
                self.evicted_streams += 1
            if self.used > self.max_bytes:            # this stream alone: its newest frames within half the budget
                keep, total = [], 0
                for q in sorted(f.index, reverse=True):
                    n = f.index[q][1]
                    if keep and total + n > self.max_bytes // 2:
                        break
                    keep.append(q)
                    total += n
                self.trimmed_frames += len(f.index) - len(keep)
                self._rewrite(sid, f, sorted(keep))

    def _rewrite(self, sid: str, f: _StreamFile, keep: list[int]) -> _StreamFile:
        """The stream's records `keep` copied to a fresh file, which replaces `f` (under the lock)."""
        new = _StreamFile(self.folder, sid)
        for q in keep:
            got = f.get(q)
            if got is not None:
                new.put(q, got[1], bytes(got[0]))
        self.used += new.end - f.end
        f.close()
        self._files[sid] = new                        # same place in the recency order
        return new

    def count(self, *, hits: int, misses: int, local: int, remote: int) -> None:
        """Account one read through the tier (see `stats`)."""
        with self._lock:
            self.hits += hits
            self.misses += misses
            self.bytes_local += local
            self.bytes_remote += remote

    def forget(self, sid: str, below_seq: int | None = None) -> None:
        """Drop a stream's records (all, or those with seq < below_seq: overwritten in the ring)."""
        with self._lock:
            f = self._files.get(sid)
            if f is None:
                return
            if below_seq is None:
                del self._files[sid]
                self.used -= f.end
                f.close()
            else:
                f.drop([q for q in f.index if q < below_seq])

    def discard(self, sid: str, seqs: Iterable[int]) -> None:
        """Drop these frames' records (gone from the durable cache: overwritten in the ring)."""
        with self._lock:
            f = self._files.get(sid)
            if f is not None:
                f.drop(seqs)

    def streams(self) -> list[str]:
        with self._lock:
            return list(self._files)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"streams": len(self._files), "bytes": self.used, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evicted_streams": self.evicted_streams,
                    "trimmed_frames": self.trimmed_frames,
                    "bytes_local": self.bytes_local, "bytes_remote": self.bytes_remote,
                    "frames": sum(len(f.index) for f in self._files.values())}

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
            self.used = 0


class LocalTierCache:
    """A `FrameCache` for readers: everything from `inner` (the durable cache), except full-record
    reads, which come from the `LocalKVTier` when it holds the same version of the frame."""

    def __init__(self, inner, tier: LocalKVTier):
        self.inner, self.tier = inner, tier

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read(self, stream_id: str, seqs: Iterable[int], *, light: bool = False,
             tokens: bool = False) -> list[bytes | memoryview | None]:
        qs = list(seqs)
        if light or tokens or not qs:
            return self.inner.read(stream_id, qs, light=light, tokens=tokens)
        heads = self.inner.read(stream_id, qs, tokens=True)     # the truth: which frames, in which form
        out: list[bytes | memoryview | None] = [None] * len(qs)
        todo, marks = [], [None] * len(qs)
        gone = []
        for i, (q, h) in enumerate(zip(qs, heads)):
            if h is None:
                gone.append(q)                                    # overwritten: gone from the ring
                continue
            marks[i] = _mark(h)
            b = self.tier.get(stream_id, q, marks[i])
            if b is not None:
                out[i] = b
            else:
                todo.append(i)
        if todo:
            got = self.inner.read(stream_id, [qs[i] for i in todo])
            for i, b in zip(todo, got):
                if b is not None:
                    out[i] = b
                    self.tier.put(stream_id, b, marks[i])
        if gone:
            self.tier.discard(stream_id, gone)
        local = [b for b in out if isinstance(b, memoryview)]        # the tier's views; Redis gives bytes
        self.tier.count(hits=len(local), misses=len(todo), local=sum(map(len, local)),
                        remote=sum(len(out[i]) for i in todo if out[i] is not None))
        return out

    def warm(self, stream_id: str, start: float | None = None, end: float | None = None, *, chunk: int = 64) -> int:
        """Copy a window's full records into the tier ahead of the first question; returns frames read."""
        win = self.inner.window(stream_id, start, end)
        n = 0
        for ch in win.chunks(self, chunk, prefetch=False):
            n += len(ch.blobs)
        return n
