"""Per-frame, question-independent state: what `LlavaMini.encode_frames` returns.

DESIGN section 3: pre-fusion is causal and the vision rows come first, so a
frame's vision token and every pre-fusion layer's keys/values over its vision
rows (and over any prompt text before the placeholder) never depend on the
question. They are computed once at ingest and kept here; a question later
runs only its own rows against them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Protocol, runtime_checkable

import torch


@runtime_checkable
class FrameSource(Protocol):
    """What a question reads frames through: `LlavaMini.fuse_question`, `prepare_context` and
    `ask` take any object with these members.

    Implementations: `FrameStates` (everything in memory), `stream.window.CachedFrames` (a
    window of a stream in a frame cache, in-process or Redis, read chunk by chunk with the next
    chunk prefetched) and the GPU benchmark's `StreamedStates` (double-buffered host-to-device
    copies). The question pass never needs all frames' keys/values at once: only one chunk.

    Members:
        n_vision_rows: int. N + nq, the frame's own cached rows.
        n_cached_rows: int. Cached rows per frame (vision rows + unmasked prefix rows).
        prefix_ids: tuple[int, ...]. Prompt tokens fused at ingest.
        kv_policy: str. "exact" or "fp8", or "mixed" for a window whose frames hold different
            forms (retention tiers, `frame_cache.retention`).
        kv_frames (optional): (F,) long tensor of the frames that hold keys/values, or None /
            absent when all do. Questions are fused with (the policy's choice among) these only;
            the LLM still sees every frame's token. A source that has it also has
            kv_description(n_fused, policy) -> str, the answer's `policy` text.
        pts: (T,) float64 tensor or None.
        __len__() -> T.
        vision_tokens(device) -> (T, nq, H): every frame's vision token, for the LLM.
        iter_chunks(frames, size, device) -> FrameStates of `frames` (indices into 0..T-1, in
            order), at most `size` at a time, keys/values included. A source may yield fewer
            frames than asked when some vanished meanwhile (overwritten in a ring): the chunk's
            `meta["frame_index"]` then lists which of `frames` it holds.
    """

    n_vision_rows: int
    prefix_ids: tuple[int, ...]
    kv_policy: str
    pts: torch.Tensor | None

    def __len__(self) -> int: ...

    @property
    def n_cached_rows(self) -> int: ...

    def vision_tokens(self, device) -> torch.Tensor: ...

    def iter_chunks(self, frames: torch.Tensor, size: int, device) -> Iterator["FrameStates"]: ...


@dataclass
class FrameStates:
    """Encoded frames, in time order.

    tokens:     (T, nq, H)          the frames' vision tokens for the LLM
    keys:       (T, P, nkv, C, D)   post-RoPE keys of the C cached rows, per pre-fusion layer P
    values:     (T, P, nkv, C, D)
    n_vision_rows: N + nq, the first rows of C (the frame's own rows)
    prefix_ids: prompt tokens fused at ingest (text before the placeholder); () if none.
                Their unmasked rows are the last C - n_vision_rows cached rows.
    prefix_out: (T, len(prefix_ids), H) fused prefix rows (masked rows hold the raw embedding), or None
    pts:        (T,) float64 presentation times in seconds, or None
    kv_policy:  "exact" (keys/values in the model dtype) or "fp8" (e4m3, scales below)
    k_scale, v_scale: (T, P, nkv) float32 dequantisation scales under "fp8", else None
    """

    tokens: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    n_vision_rows: int
    prefix_ids: tuple[int, ...] = ()
    prefix_out: torch.Tensor | None = None
    pts: torch.Tensor | None = None
    kv_policy: str = "exact"
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_cached_rows(self) -> int:
        return self.keys.shape[3]

    @property
    def nbytes(self) -> int:
        ts = [self.tokens, self.keys, self.values, self.prefix_out, self.pts, self.k_scale, self.v_scale]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def _map(self, fn) -> "FrameStates":
        opt = lambda t: None if t is None else fn(t)
        return replace(self, tokens=fn(self.tokens), keys=fn(self.keys), values=fn(self.values),
                       prefix_out=opt(self.prefix_out), pts=opt(self.pts),
                       k_scale=opt(self.k_scale), v_scale=opt(self.v_scale))

    def select(self, index) -> "FrameStates":
        """Frames by slice, list or index tensor (time order is the caller's)."""
        if isinstance(index, list):
            index = torch.tensor(index, dtype=torch.long)
        return self._map(lambda t: t[index])

    def to(self, device) -> "FrameStates":
        return self._map(lambda t: t.to(device))

    def vision_tokens(self, device) -> torch.Tensor:
        """(T, nq, H) every frame's vision token on `device` (`FrameSource`)."""
        return self.tokens.to(device)

    def iter_chunks(self, frames: torch.Tensor, size: int, device) -> "Iterator[FrameStates]":
        """The states of `frames` (indices, in order), `size` frames at a time, on `device`.

        The question pass reads frames only through this method (see `FrameSource`)."""
        device = torch.device(device)
        for i in range(0, len(frames), size):
            st = self.select(frames[i:i + size])
            if device.type == "cuda" and st.keys.device.type == "cpu":   # pinned, asynchronous copy
                st = st._map(lambda t: t.pin_memory().to(device, non_blocking=True))
            yield st.to(device)

    def window(self, start: float | None, end: float | None) -> "FrameStates":
        """Frames whose pts lies in [start, end), like the decoder's window (needs pts)."""
        if self.pts is None:
            raise ValueError("these states carry no timestamps; a time window needs them")
        keep = torch.ones(len(self), dtype=torch.bool)
        if start is not None:
            keep &= self.pts >= start
        if end is not None:
            keep &= self.pts < end
        return self.select(keep.nonzero().flatten())

    @staticmethod
    def cat(parts: list["FrameStates"]) -> "FrameStates":
        if not parts:
            raise ValueError("expected at least one FrameStates to concatenate, got none")
        first = parts[0]
        for p in parts[1:]:
            if (p.prefix_ids, p.n_vision_rows, p.kv_policy) != (first.prefix_ids, first.n_vision_rows, first.kv_policy):
                raise ValueError("expected FrameStates encoded with the same prefix, rows and policy")
        cat = lambda name: (None if getattr(first, name) is None
                            else torch.cat([getattr(p, name) for p in parts]))
        return replace(first, tokens=cat("tokens"), keys=cat("keys"), values=cat("values"),
                       prefix_out=cat("prefix_out"), pts=cat("pts"), k_scale=cat("k_scale"),
                       v_scale=cat("v_scale"))
