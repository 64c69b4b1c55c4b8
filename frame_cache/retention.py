"""Retention tiers: what each stored frame keeps as it ages (docs/design.md section 9).

    retain = Retention.parse({"exact_s": 600, "kv": "fp8", "kv_stride": 10})
    runner = RetentionRunner(cache, "cam-1", retain)
    runner.apply()        # after each append: demotes the frames that left the hot window

Every frame keeps, for all its life in the ring: pts, vision token, fused prompt-prefix rows and
every watch's fused rows (``w:<id>`` tensors). What varies is its pre-fusion keys/values:

* hot window (``exact_s``): frames whose pts is less than ``exact_s`` seconds behind the stream's
  newest frame keep them in full, so any question there is exact;
* older frames: those with ``seq % kv_stride == 0`` keep them in the form ``kv`` ("exact": as
  encoded, "fp8": e4m3 with per-(layer, head) scales, exactly what encoding with the fp8 policy
  gives), the others keep none ("none" drops them for every older frame).

``exact_s = None`` (the default everywhere) keeps every frame exact: today's behaviour.

A record's ``meta["kv_policy"]`` says what it holds now: "exact", "fp8" or "none". Its light copy
carries the same meta, so a question learns which frames it can fuse from the light records it
reads anyway. Demotion is a rewrite of frames still in the ring (`FrameCache.replace_records`):
readers see the old or the new record, never a mix, and frames are never promoted back.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from lmcore.errors import BadArgument

from .record import KV_TENSORS, FrameRecord, decode_record, record_header, record_seq

__all__ = ["Retention", "RetentionRunner", "demote_record", "retention_of", "KV_FORMS", "kv_state"]

#: What older frames may keep of their keys/values.
KV_FORMS = ("exact", "fp8", "none")
_FIELDS = {"exact_s", "kv", "kv_stride"}
_RANK = {"exact": 2, "fp8": 1, "none": 0}


def kv_state(meta: dict) -> str:
    """What a record holds of its keys/values: "exact", "fp8" or "none"."""
    return str(meta.get("kv_policy", "exact"))


@dataclass(frozen=True)
class Retention:
    """A stream's retention policy (see the module docstring)."""

    exact_s: float | None = None
    kv: str = "none"
    kv_stride: int = 1

    @classmethod
    def parse(cls, spec: Any) -> "Retention | None":
        """None, a Retention, a dict, a JSON object string, or the CLI form
        ``exact_s=600,kv=fp8,kv_stride=10``. Raises `BadArgument` naming the field."""
        if spec is None or isinstance(spec, Retention):
            return spec
        if isinstance(spec, str):
            s = spec.strip()
            if s.startswith("{"):
                try:
                    spec = json.loads(s)
                except ValueError as e:
                    raise BadArgument(f"expected retain as a JSON object, got invalid JSON ({e.msg})") from None
            else:
                d = {}
                for part in filter(None, (p.strip() for p in s.split(","))):
                    k, eq, v = part.partition("=")
                    if not eq:
                        raise BadArgument(f"expected retain as key=value pairs (exact_s=600,kv=fp8,kv_stride=10), "
                                          f"got {part!r}")
                    d[k.strip()] = v.strip()
                spec = d
        if not isinstance(spec, dict):
            raise BadArgument(f"expected retain to be an object with exact_s, kv, kv_stride, got "
                              f"{type(spec).__name__}")
        extra = set(spec) - _FIELDS
        if extra:
            raise BadArgument(f"expected retain fields among {sorted(_FIELDS)}, got {sorted(extra)}")
        exact_s = spec.get("exact_s")
        if isinstance(exact_s, str):
            exact_s = None if exact_s.lower() in ("", "none", "null", "all") else _num("exact_s", exact_s)
        if exact_s is not None:
            if isinstance(exact_s, bool) or not isinstance(exact_s, (int, float)) or not math.isfinite(exact_s) \
                    or exact_s < 0:
                raise BadArgument(f"expected retain.exact_s to be a number of seconds >= 0 or null, got {exact_s!r}")
            exact_s = float(exact_s)
        kv = spec.get("kv", "none")
        if kv not in KV_FORMS:
            raise BadArgument(f"expected retain.kv to be one of {list(KV_FORMS)}, got {kv!r}")
        stride = spec.get("kv_stride", 1)
        if isinstance(stride, str):
            stride = _num("kv_stride", stride)
        if isinstance(stride, bool) or not isinstance(stride, (int, float)) or stride != int(stride) or stride < 1:
            raise BadArgument(f"expected retain.kv_stride to be an integer >= 1, got {stride!r}")
        return cls(exact_s, kv, int(stride))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def keeps_everything(self) -> bool:
        return self.exact_s is None or (self.kv == "exact" and self.kv_stride == 1)

    def describe(self) -> str:
        if self.exact_s is None:
            return "exact (all frames keep keys/values)"
        old = "none" if self.kv == "none" else f"{self.kv}" + (f" on one frame in {self.kv_stride}"
                                                                 if self.kv_stride > 1 else "")
        return f"exact for the last {self.exact_s:g} s, then keys/values: {old}"

    def target(self, seq: int, pts: float, newest_pts: float) -> str | None:
        """What frame `seq` should hold now: None while it is hot (keep as is), else a `KV_FORMS` value."""
        if self.exact_s is None or pts > newest_pts - self.exact_s:
            return None
        if self.kv == "none" or seq % self.kv_stride:
            return "none"
        return self.kv


def _num(name: str, v: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise BadArgument(f"expected retain.{name} to be a number, got {v!r}") from None


def demote_record(rec: FrameRecord, to: str) -> FrameRecord | None:
    """`rec` with its keys/values in form `to`, or None when it holds that or less already
    (frames are never promoted). "fp8" quantises exactly as `LlavaMini.encode_frames(...,
    kv_policy="fp8")` does, so a demoted frame equals one encoded with that policy."""
    cur = kv_state(rec.meta)
    if to not in KV_FORMS:
        raise BadArgument(f"expected a keys/values form among {list(KV_FORMS)}, got {to!r}")
    if _RANK[to] >= _RANK[cur]:
        return None
    tensors = {k: t for k, t in rec.tensors.items() if k not in KV_TENSORS}
    if to == "fp8":
        from triton_kernels.fusion_attention import quantize_kv_fp8_rows
        k, ks = quantize_kv_fp8_rows(rec.tensors["k"][None])
        v, vs = quantize_kv_fp8_rows(rec.tensors["v"][None])
        tensors.update(k=k[0], v=v[0], k_scale=ks[0], v_scale=vs[0])
    return FrameRecord(seq=rec.seq, pts=rec.pts, meta={**rec.meta, "kv_policy": to}, tensors=tensors)


class RetentionRunner:
    """Applies a stream's `Retention` to the frames that left its hot window, in chunks.

    Keeps a watermark (every seq below it is done), so each call only looks at the frames that
    aged since the last one; a fresh runner (a restarted writer) starts at the ring's oldest frame
    and skips what earlier runs demoted already (read from the light records, which are small).
    Safe to run from several processes at once: a demotion is idempotent and never promotes."""

    def __init__(self, cache, stream_id: str, retain: Retention, *, chunk: int = 64):
        self.cache, self.stream_id, self.retain, self.chunk = cache, stream_id, retain, chunk
        self.done_below = -1            # every seq < done_below has its target form

    def apply(self) -> int:
        """Demote what is due now; returns how many frames were rewritten."""
        if self.retain.keeps_everything:
            return 0
        info = self.cache.stream_info(self.stream_id)
        if info.count == 0:
            return 0
        cutoff = info.newest_pts - self.retain.exact_s
        lo = max(self.done_below, info.oldest_seq)
        win = self.cache.window(self.stream_id, None, cutoff)        # pts <= cutoff: the aged frames
        due = {q: t for q, p in zip(win.seqs(), win.pts_list)
               if q >= lo and (t := self.retain.target(q, p, info.newest_pts)) is not None}
        seqs = list(due)
        if not seqs:
            self.done_below = max(self.done_below, win.last_seq + 1 if len(win) else lo)
            return 0
        n = 0
        for i in range(0, len(seqs), self.chunk):
            part = seqs[i:i + self.chunk]
            # the token records say what each frame holds now: only frames above their target are read whole
            todo = [q for q, b in zip(part, self.cache.read(self.stream_id, part, tokens=True))
                    if b is not None and _RANK[due[q]] < _RANK[kv_state(record_header(b)["meta"])]]
            if not todo:
                continue
            new = []
            for b in self.cache.read(self.stream_id, todo):
                d = demote_record(decode_record(b), due[record_seq(b)]) if b is not None else None
                if d is not None:
                    new.append(d)
            if new:
                n += len(self.cache.replace_records(self.stream_id, new))
        self.done_below = max(self.done_below, seqs[-1] + 1)
        return n


def retention_of(meta: dict) -> Retention | None:
    """The `Retention` stored in a stream's meta (``meta["retain"]``), or None."""
    return Retention.parse(meta.get("retain")) if meta.get("retain") is not None else None
