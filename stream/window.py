"""A window of a stream in a frame cache, as the question pass reads it (`model.FrameSource`).

    src = CachedFrames(cache, "cam-1", start=600, end=1200)   # cheap: a seq range + the tokens
    answer = model.ask(src, "what changed?")                   # keys/values read chunk by chunk

Two passes over the cache, both chunked, neither holding the window's keys/values:

1. at construction, the token records (vision token, pts, meta: no fused rows, no keys/values) of
   every frame in the window, in chunks: the LLM needs every frame's token. Frames already overwritten when read are
   left out and counted in `dropped_during_read`;
2. per question, `iter_chunks` reads the full records of the frames the policy fuses, one chunk
   ahead (`FrameWindow.chunks` prefetches on a helper thread while the current chunk is fused).
   A frame overwritten in between is skipped (the question is fused with the others) and
   counted; the answer's `policy` says so.

Peak memory is two chunks of records plus T tokens, whatever the window's length.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from itertools import groupby

import torch

from frame_cache import FrameCache, FrameWindow, decode_columns, decode_stacked
from frame_cache.retention import KV_FORMS, kv_state, retention_of
from lmcore.errors import BadArgument, NoFrames

from .ingest import states_from_blobs

__all__ = ["CachedFrames", "DEFAULT_READ_CHUNK"]

#: Frames per cache read when building the token list (token records are small).
DEFAULT_READ_CHUNK = 256


def window_words(start: float | None, end: float | None) -> str:
    """A window in a message: "the window 10:70 s", "the window 29.5:now s" (to the newest frame), "the
    window start:70 s", or "the whole stream"; an open side in words, never -inf/inf."""
    if start is None and end is None:
        return "the whole stream"

    def num(x: float) -> str:
        return f"{x:.3f}".rstrip("0").rstrip(".")
    return f"the window {'start' if start is None else num(start)}:{'now' if end is None else num(end)} s"


def closed_end(start: float | None, end: float | None) -> float | None:
    """The end to ask the cache for the half-open window [start, end): its windows are closed, so asked up to
    the float just below `end`, the frames it counts as overwritten are those of the half-open window too
    ([0, 20) at 1 fps: 20, it said 21). An empty window (end <= start) is left as it is."""
    if end is None or (start is not None and end <= start):
        return end
    return math.nextafter(end, -math.inf)


def stored_span_words(cache: FrameCache, stream_id: str, start: float | None, end: float | None) -> str:
    """Where a window that holds no frame lies against what the stream holds: " (its stored frames span 0-149 s;
    the window starts after the newest)". Empty when the stream holds none (or cannot be asked)."""
    try:
        i = cache.stream_info(stream_id)
    except Exception:                       # noqa: BLE001 - only words for an error already raised
        return ""
    if not i.count or i.oldest_pts is None or i.newest_pts is None:
        return ""
    where = ""
    if start is not None and start > i.newest_pts:
        where = "; the window starts after the newest"
    elif end is not None and end <= i.oldest_pts:
        where = "; the window ends before the oldest"
    elif start is not None or end is not None:
        where = "; none falls in the window: a gap, or a rate under one frame in it"
    return f" (its stored frames span {i.oldest_pts:g}-{i.newest_pts:g} s{where})"


class CachedFrames:
    """`model.FrameSource` over ``cache``'s stream ``stream_id``, frames with start <= pts < end.

    The window is half-open like the decoder's (`--window 10:70` = 60 frames at 1 fps); None on
    either side is unbounded. ``max_frames`` keeps only the newest ones. Raises `NoFrames` when
    the window holds no frame and `StreamNotFound` for an unknown stream.
    """

    def __init__(self, cache: FrameCache, stream_id: str, start: float | None = None, end: float | None = None,
                 *, max_frames: int | None = None, read_chunk: int = DEFAULT_READ_CHUNK, prefetch: bool = True,
                 dtype: torch.dtype | None = None):
        self.cache, self.stream_id, self.prefetch = cache, stream_id, prefetch
        win = cache.window(stream_id, start, closed_end(start, end), max_frames=max_frames)
        if end is not None and len(win) and win.pts_list[-1] >= end:      # half-open: drop pts == end
            keep = sum(1 for p in win.pts_list if p < end)
            win = FrameWindow(stream_id, win.first_seq, win.first_seq + keep - 1 if keep else -1,
                              win.pts_list[:keep], win.dropped_before, win.dropped_exact)
        self.window = win
        self.dropped_before = win.dropped_before
        if len(win) == 0:
            raise NoFrames(f"expected stored frames of stream {stream_id!r} in {window_words(start, end)}, got none"
                           + (f" ({win.dropped_before} were overwritten already)" if win.dropped_before else
                              stored_span_words(cache, stream_id, start, end)))
        seqs, pts, toks, kv, meta = [], [], [], [], None
        light = 0
        h = hashlib.blake2b(stream_id.encode(), digest_size=16)
        for ch in win.chunks(cache, read_chunk, tokens=True, prefetch=prefetch):
            for b in ch.blobs:
                light += len(b)
                h.update(len(b).to_bytes(8, "little"))
                h.update(b)
            # a chunk's records checked and their tokens stacked at once (records of one layout share a header)
            _, _, metas, t = decode_stacked(ch.blobs, "token")
            for q, p, m in zip(ch.seqs, ch.pts, metas):
                if meta is None:
                    meta = m
                elif m is not meta and (m["n_vision_rows"], m["prefix_ids"]) != (meta["n_vision_rows"],
                                                                                 meta["prefix_ids"]):
                    raise BadArgument(f"expected the frames of stream {stream_id!r} to come from one model and "
                                      f"prompt prefix, got a mix (frame seq {q})")
                seqs.append(q)
                pts.append(p)
                kv.append(kv_state(m))
            if len(t):
                toks.append(t if dtype is None or t.dtype == dtype else t.to(dtype))
        if not seqs:
            raise NoFrames(f"expected stored frames of stream {stream_id!r} in the window, got none: all "
                           f"{len(win)} were overwritten while being read")
        self.seqs = seqs
        self.dropped_during_read = len(win) - len(seqs)
        self.pts = torch.tensor(pts, dtype=torch.float64)
        self._tokens = torch.cat(toks) if len(toks) > 1 else toks[0]      # (T, nq, H)
        self.n_vision_rows = int(meta["n_vision_rows"])
        self.prefix_ids = tuple(int(i) for i in meta["prefix_ids"])
        self.kv_forms = kv                                                 # each frame's keys/values form
        self.kv_counts = {k: kv.count(k) for k in KV_FORMS if k in kv}
        self.kv_policy = kv[0] if len(self.kv_counts) == 1 else "mixed"
        # None: every frame holds keys/values (the plain path); else the ones that do (retention tiers)
        self.kv_frames = None if "none" not in self.kv_counts else \
            torch.tensor([i for i, k in enumerate(kv) if k != "none"], dtype=torch.long)
        self.retain = retention_of(cache.stream_info(stream_id).meta) if self.kv_frames is not None else None
        self._n_cached = self.n_vision_rows + sum(1 for i in self.prefix_ids if i > 0)
        self.bytes_read = 0
        self.bytes_local = 0                 # of which from a local keys/values tier (frame_cache.local_tier)
        # the token records read here, every frame's (its token, pts and meta; a frame stored before token
        # records existed gives its light record): not keys/values, not in `bytes_read`
        self.light_bytes_read = light
        # what names these very frames: the stream and every token record read (seq, pts, meta with the
        # keys/values form, token). Two sources with the same one hold the same frames in the same forms, so
        # the LLM's keys/values over their [prefix rows, frame tokens] are the same (`model.ContextCache`)
        self.fingerprint = h.hexdigest()

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def n_cached_rows(self) -> int:
        return self._n_cached

    @property
    def time_span(self) -> tuple[float, float]:
        return float(self.pts[0]), float(self.pts[-1])

    def vision_tokens(self, device) -> torch.Tensor:
        return self._tokens.to(device)

    def iter_chunks(self, frames: torch.Tensor, size: int, device) -> Iterator:
        """Full records of `frames` (indices into this source), `size` at a time, as FrameStates."""
        idx = [int(i) for i in frames]
        by_seq = {self.seqs[i]: i for i in idx}
        for ch in self.window.chunks(self.cache, size, seqs=[self.seqs[i] for i in idx], prefetch=self.prefetch):
            self.bytes_read += sum(len(b) for b in ch.blobs)
            self.bytes_local += sum(len(b) for b in ch.blobs if isinstance(b, memoryview))   # a local tier's
            self.dropped_during_read += len(ch.missing)
            if not ch.blobs:
                continue
            metas = decode_columns(ch.blobs, ())[2]                              # the headers, checked
            forms = [kv_state(m) for m in metas]
            # a frame demoted to "none" since its token record was read is left out like an overwritten one
            kept = [i for i, f in enumerate(forms) if f != "none"]
            self.dropped_during_read += len(forms) - len(kept)
            # one pass per run of frames in the same form (exact / fp8), its records decoded together
            for _, run in groupby(kept, key=lambda i: forms[i]):
                run = list(run)
                st = states_from_blobs([ch.blobs[i] for i in run], [metas[i] for i in run])
                if st.n_cached_rows != self._n_cached:
                    raise BadArgument(f"expected {self._n_cached} cached rows per frame, got {st.n_cached_rows}")
                st.meta["frame_index"] = [by_seq[ch.seqs[i]] for i in run]
                yield st.to(device)

    def kv_description(self, n_fused: int, policy, fused=None) -> str:
        """The answer's `policy` for a window whose frames hold different forms of keys/values:
        how many frames of each form, how many the question was fused with (under a budget, which forms
        those were: `fused`, their indices), and the retention."""
        T = len(self)
        names = (("exact", "exact"), ("fp8", "fp8"), ("none", "token-only"))
        parts = [f"{name} {self.kv_counts[k]:,}" for k, name in names if self.kv_counts.get(k)]
        head = "mixed" if policy.name == "exact" else f"{policy.name}:{policy.max_fused_frames}, mixed"
        which = ""
        if policy.name != "exact" and fused is not None:        # a budget picks among them: which forms it took
            got = [self.kv_forms[int(i)] for i in fused]
            which = ": " + ", ".join(f"{name} {got.count(k):,}" for k, name in names if got.count(k))
        ret = f"; retain {self.retain.describe()}" if self.retain is not None else ""
        return f"{head}: {', '.join(parts)} (fused {n_fused:,} of {T:,} frames{which}{ret})"
