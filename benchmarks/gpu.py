"""GPU benchmark at the 8B shapes with random bfloat16 weights (no checkpoint needed).

    python -m benchmarks.gpu [--cap-gb 24] [--batch-sizes 1,8,32,64] [--frames 1000,10000,20000]
                             [--budget 512] [--chunk 64] [--json] [--out out/bench_gpu.json]
    python -m benchmarks.gpu --tiny          # the same code at toy shapes on the CPU (what the tests run)
    lmstream bench gpu ...

What it does, in order (each section under its own time limit; an out-of-memory error or a
failure is recorded in the JSON and the next section still runs; the JSON is rewritten after
every section, so a run cut short keeps what it measured):

0. setup: caps the process at `--cap-gb` GiB (`torch.cuda.set_per_process_memory_fraction`)
   before anything is allocated; builds `LlavaMiniNet` at `LlavaMiniConfig()` (the 8B config) on
   the meta device and materialises it on the GPU in bfloat16 with random weights (~18.5 GB with
   CLIP ViT-L/14-336); measures pinned host->device bandwidth; checks the Triton kernels against
   their references at the real head shapes (and falls back to the references, saying so, if
   Triton fails).
1. ingest: `encode_frames` frames/s at each batch size, with the CLIP attention set by
   `--clip-attn` (default sdpa) and once more with eager attention (the CPU's path; `from_pretrained`
   loads SDPA on CUDA) at one batch size, the baseline SDPA is measured against.
2. time to first token (`generate(..., max_new_tokens=1)`: fuse + LLM prefill + the pick) at each
   frame count, "exact" and "budget:N". 10,000 frames of 8B keys/values are ~106 GB, which
   neither a 24 GB budget nor host RAM holds, so the keys/values come from ONE pinned host chunk
   of `--chunk` encoded frames (real activations of this model), re-sent for every chunk of the
   question: the timing is the real computation plus host->device copies of the real byte count,
   with the copy of chunk i+1 overlapped with the computation of chunk i (a duck-typed states
   object, `StreamedStates`; `fuse_question` itself is unchanged). Variants:
     * streamed (the headline),
     * resident: the same chunk kept on the GPU, no copies (the computation alone, a lower bound),
     * streamed fp8 K/V (the "fp8" keys/values policy, an approximation: half the bytes),
     * streamed from a local memory-mapped file tier (`MmapKVTier`: `--mmap-frames` frames of K/V written
       once to a file and mapped; `MmapStreamedStates` copies each chunk from the mapping into a pinned
       staging chunk, then to the GPU as the streamed variant does, overlapped with the fusion),
     * engine as shipped: a plain host `FrameStates` (pageable; `select` gathers on the CPU, then a
       synchronous copy), at the smaller frame counts only.
   Peak GPU memory per case, achieved TFLOP/s (causal FLOPs from `benchmarks.formulas`, which the
   flops benchmark checks against FlopCounterMode) and the fraction of `--peak-tflops` (798, the
   H100 figure in DESIGN).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback

import torch

from model.config import LlavaMiniConfig
from model.llava_mini import FusionPolicy, LlavaMini, LlavaMiniNet
from model.states import FrameStates

from . import formulas as F
from .cli import gpu_arguments
from .common import (PREFIX_ROWS, QUESTION_ROWS, clip_vit_l14_336, machine, median, parse_ints,
                     prompt_ids, table, tiny_configs, write_json)

OOM = getattr(torch, "OutOfMemoryError", getattr(torch.cuda, "OutOfMemoryError", RuntimeError))
_STATE_FIELDS = ("keys", "values", "prefix_out", "k_scale", "v_scale")


# ------------------------------------------------------------------ plumbing
class SectionTimeout(Exception):
    pass


_DEADLINES: list[float] = []


def _arm():
    """Point the interval timer at the nearest pending deadline (or disarm it)."""
    if not _DEADLINES:
        signal.setitimer(signal.ITIMER_REAL, 0)
        return
    signal.setitimer(signal.ITIMER_REAL, max(1e-3, min(_DEADLINES) - time.monotonic()))


def _on_alarm(signum, frame):
    raise SectionTimeout("a section or case ran past its time limit")


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise SectionTimeout in the main thread after `seconds`; limits nest (the nearest one fires,
    an outer limit stays armed after an inner one ends). A no-op without SIGALRM or with no limit."""
    if not seconds or seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return
    first = not _DEADLINES
    old = signal.signal(signal.SIGALRM, _on_alarm) if first else None
    _DEADLINES.append(time.monotonic() + seconds)
    _arm()
    try:
        yield
    finally:
        _DEADLINES.pop()
        _arm()
        if first:
            signal.signal(signal.SIGALRM, old)


def time_left() -> float:
    return min(_DEADLINES) - time.monotonic() if _DEADLINES else float("inf")


def log(msg: str) -> None:
    print(f"[bench gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory(device) -> dict:
    if device.type != "cuda":
        return {}
    return {"allocated_gb": torch.cuda.memory_allocated(device) / 1e9,
            "peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def error_record(e: BaseException, device) -> dict:
    kind = "OOM" if isinstance(e, OOM) else type(e).__name__
    rec = {"error": kind, "detail": (str(e).splitlines() or [""])[0][:500], **memory(device)}
    if kind not in ("OOM", "SectionTimeout"):
        rec["traceback"] = traceback.format_exc(limit=6)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


# ------------------------------------------------------------------ the model, random weights, on the device
def build_engine(cfg: LlavaMiniConfig, vcfg, device, dtype, clip_attn: str, chunk: int, std: float = 0.02,
                 seed: int = 0) -> LlavaMini:
    from transformers import CLIPVisionModel

    from model.compressor import sincos_pos_embed_2d
    from model.llama import Rotary
    from model.vision import VisionTower
    with torch.device("meta"):
        net = LlavaMiniNet(cfg, vcfg.hidden_size)
    net = net.to(dtype=dtype).to_empty(device=device)       # allocated once, in `dtype`, on the device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("compressor.pos_embed"):
                p.copy_(torch.from_numpy(sincos_pos_embed_2d(vcfg.hidden_size, cfg.compressor_size)))
            elif p.dim() == 1 and name.endswith("weight"):  # RMSNorm / LayerNorm scales
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=gen)
    net.rotary = Rotary(cfg).to(device)                     # a buffer to_empty left uninitialised
    net.requires_grad_(False)
    torch.manual_seed(seed + 1)
    vcfg._attn_implementation = "eager"
    clip = CLIPVisionModel(vcfg).to(device=device, dtype=dtype).eval().requires_grad_(False)   # ~0.3 B, CPU init
    clip.config._attn_implementation = clip_attn            # read at every forward
    vt = VisionTower(clip, cfg.mm_vision_select_layer)
    return LlavaMini(net, vt, cfg, batch_size=32, question_chunk=chunk, name="random-8b")


_KERNEL_TOL = 0.1      # bf16 outputs of unit-scale inputs: a real bug gives O(1) errors or NaN


def check_kernels(m: LlavaMini, device, dtype) -> dict:
    """Triton against the references at the real head shapes; on failure, use the references."""
    import importlib

    from triton_kernels.fusion_attention import fusion_attention_reference
    ca = importlib.import_module("triton_kernels.compress_attention")   # the module (the package exports a function of that name)
    out = {}
    cfg = m.cfg
    g = torch.Generator(device=device).manual_seed(3)
    T, S, C = 3, QUESTION_ROWS, m.vision.n_patches + cfg.nq + PREFIX_ROWS
    q = torch.randn(T, cfg.num_attention_heads, S, cfg.head_dim, device=device, dtype=dtype, generator=g)
    kc, vc = (torch.randn(T, cfg.num_key_value_heads, C, cfg.head_dim, device=device, dtype=dtype, generator=g)
              for _ in range(2))
    kn, vn = (torch.randn(T, cfg.num_key_value_heads, S, cfg.head_dim, device=device, dtype=dtype, generator=g)
              for _ in range(2))
    scale = cfg.head_dim ** -0.5
    try:
        a = m.fusion_attention(q, kc, vc, kn, vn, scale=scale)
        b = fusion_attention_reference(q, kc, vc, kn, vn, scale=scale)
        sync(device)
        from triton_kernels._common import HAS_TRITON
        diff = float((a.float() - b.float()).abs().max())
        out["fusion_attention"] = {"used": "triton" if (q.is_cuda and HAS_TRITON) else "reference",
                                   "max_abs_diff_vs_reference": diff}
        if not diff <= _KERNEL_TOL:
            raise AssertionError(f"fusion_attention differs from its reference by {diff}")
    except Exception as e:  # noqa: BLE001 - any failure means: fall back, and say so
        m.fusion_attention = fusion_attention_reference
        out["fusion_attention"] = {"used": "fusion_attention_reference (fallback)", **error_record(e, device)}
    comp = m.net.model.compressor
    x = torch.randn(T, m.vision.n_patches, m.vision.width, device=device, dtype=dtype, generator=g)
    try:
        ab = comp.absorbed(x.shape[1])
        a = comp(x)
        b = ca.compress_attention_reference(x, ab)
        sync(device)
        diff = float((a.float() - b.float()).abs().max())
        out["compress_attention"] = {"used": "triton" if ca.triton_usable(x, ca._compress_attention_kernel)
                                     else "reference", "max_abs_diff_vs_reference": diff}
        if not diff <= _KERNEL_TOL:
            raise AssertionError(f"compress_attention differs from its reference by {diff}")
    except Exception as e:  # noqa: BLE001
        ca._compress_attention_kernel = None            # the dispatcher then takes the reference
        out["compress_attention"] = {"used": "compress_attention_reference (fallback)", **error_record(e, device)}
    return out


def h2d_bandwidth(device, nbytes: int) -> dict:
    if device.type != "cuda":
        return {}
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    sync(device)
    t = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    sync(device)
    gbps = 3 * nbytes / (time.perf_counter() - t) / 1e9
    del src, dst
    return {"pinned_h2d_gb_per_s": gbps, "bytes": nbytes}


# ------------------------------------------------------------------ streamed frame states
class _Ready:
    def __init__(self, st: FrameStates):
        self.st = st

    def to(self, device):
        return self.st


class StreamedStates:
    """T frames for `LlavaMini.fuse_question` whose per-frame tensors come from one pinned host chunk.

    Duck-typed: fuse_question reads len(), prefix_ids, n_cached_rows, n_vision_rows, kv_policy,
    tokens and takes the frames through `iter_chunks` (one `select(idx).to(device)` per chunk, in order). Each call returns the
    chunk's keys/values/prefix rows in a device buffer (two buffers, alternating) and starts the
    copy of the next chunk on a side stream, after the compute stream has finished with that buffer
    (double buffering: the copy of chunk i+1 overlaps the computation of chunk i). Frame t's content
    is the host chunk's row (t mod chunk): the bytes moved and the work done are those of T distinct
    frames. copy=False keeps the chunk resident and copies nothing (the computation alone).
    `begin(n)` must be called with the number of frames the policy fuses before each question.
    """

    def __init__(self, host: FrameStates, T: int, tokens: torch.Tensor, device, copy: bool = True):
        self.host = host
        self.device = torch.device(device)
        self.chunk = len(host)
        self.prefix_ids, self.n_vision_rows, self.kv_policy = host.prefix_ids, host.n_vision_rows, host.kv_policy
        self.n_cached_rows = host.n_cached_rows
        self.tokens = tokens                                            # (T, nq, H) on the device
        self._T = T
        self.copy = copy
        self.fields = [f for f in _STATE_FIELDS if getattr(host, f) is not None]
        self.frame_bytes = sum(getattr(host, f)[0].numel() * getattr(host, f).element_size() for f in self.fields)
        self.buffers: list[dict | None] = [None, None]
        if not copy:
            for slot in range(2):
                for f in self.fields:
                    self._buffer(slot)[f].copy_(getattr(host, f))
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.begin(T)

    def __len__(self) -> int:
        return self._T

    def begin(self, n_fused: int) -> "StreamedStates":
        self._total, self._issued, self._i = n_fused, 0, 0
        self._events = [None, None]
        self.bytes_copied = 0
        return self

    def _buffer(self, slot: int) -> dict:
        if self.buffers[slot] is None:        # allocated on the compute stream, written on the copy stream
            self.buffers[slot] = {f: torch.empty_like(getattr(self.host, f), device=self.device)
                                  for f in self.fields}
        return self.buffers[slot]

    def _stage(self, slot: int, n: int) -> dict:
        """The host tensors the next n frames are copied from (`MmapStreamedStates` stages them from a file)."""
        return {f: getattr(self.host, f)[:n] for f in self.fields}

    def _issue(self, slot: int, n: int) -> None:
        self._issued += n
        if not self.copy:
            return
        buf = self._buffer(slot)
        src = self._stage(slot, n)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))   # the buffer's last user is done
            with torch.cuda.stream(self.stream):
                for f in self.fields:
                    buf[f][:n].copy_(src[f], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            self._events[slot] = ev
        else:
            for f in self.fields:
                buf[f][:n].copy_(src[f])
        self.bytes_copied += n * self.frame_bytes

    def vision_tokens(self, device) -> torch.Tensor:
        return self.tokens.to(device)

    def iter_chunks(self, frames, size: int, device):
        """The engine's hook (`FrameStates.iter_chunks`): chunks in order, double-buffered."""
        for i in range(0, len(frames), size):
            yield self.select(frames[i:i + size]).to(device)
        if self.copy:
            # every chunk's work is queued: the buffers go back to the allocator (in stream order) instead of
            # being held through the LLM prefill
            self.buffers = [None, None]

    def select(self, idx) -> _Ready:
        n = len(idx)
        if n > self.chunk:
            raise ValueError(f"expected at most {self.chunk} frames per select (the question chunk), got {n}")
        slot = self._i % 2
        if self._i == 0:
            self._issue(slot, n)
        nxt = min(self.chunk, self._total - self._issued)
        if nxt > 0:
            self._issue(1 - slot, nxt)                                         # prefetch the next chunk
        elif self.copy:
            # last chunk: the other buffer's last reader is already queued on the compute stream and its
            # copy was waited for, so it can go back to the allocator now (it is reused in stream order)
            # instead of being held through the LLM prefill.
            self.buffers[1 - slot] = None
        if self._events[slot] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._events[slot])
        self._i += 1
        buf = self._buffer(slot)
        kw = {f: buf[f][:n] for f in self.fields}
        return _Ready(FrameStates(tokens=self.tokens[:n], n_vision_rows=self.n_vision_rows,
                                  prefix_ids=self.prefix_ids, kv_policy=self.kv_policy, **kw))


class MmapKVTier:
    """A local keys/values tier: `frames` frames' per-frame tensors (keys, values, fused prefix rows, fp8
    scales), written once to a file and memory-mapped. One contiguous (frames, ...) array per field at a
    4096-byte aligned offset; frame j holds the host chunk's row (j mod len(host)), so `frames` is rounded
    up to a multiple of the chunk and a streamed frame t (file frame t mod frames) has the content the
    other variants give it."""

    def __init__(self, host: FrameStates, frames: int, path):
        from pathlib import Path
        c = len(host)
        self.frames = -(-max(frames, c) // c) * c
        self.path = Path(path)
        self.fields = [f for f in _STATE_FIELDS if getattr(host, f) is not None]
        layout, off = {}, 0
        for f in self.fields:
            t = getattr(host, f)
            off = -(-off // 4096) * 4096
            nb = self.frames * t[0].numel() * t.element_size()
            layout[f] = (off, nb, tuple(t.shape[1:]), t.dtype)
            off += nb
        t0 = time.perf_counter()
        with open(self.path, "wb") as fh:
            fh.truncate(off)
            for f, (o, nb, _, _) in layout.items():
                rows = getattr(host, f).contiguous().view(torch.uint8).reshape(c, -1).numpy().tobytes()
                fh.seek(o)
                for _ in range(self.frames // c):
                    fh.write(rows)
        self.write_s = time.perf_counter() - t0
        self.nbytes = off
        data = torch.from_file(str(self.path), shared=True, size=off, dtype=torch.uint8)   # mmap (MAP_SHARED)
        self.view = {f: data[o:o + nb].view(dt).view(self.frames, *shape) for f, (o, nb, shape, dt) in layout.items()}


class MmapStreamedStates(StreamedStates):
    """`StreamedStates` whose chunks come from an `MmapKVTier`: file frames (t mod tier.frames), copied on the
    CPU out of the mapping (the page cache) into a pinned staging chunk, then to the device buffer exactly as
    `StreamedStates` does (asynchronously, on the side stream, overlapping the current chunk's fusion). The
    CPU copy of chunk i+1 runs when chunk i is handed out, while the GPU still works through the kernels
    already queued; a staging chunk is refilled only after its previous host-to-device copy has finished."""

    def __init__(self, tier: MmapKVTier, host: FrameStates, T: int, tokens: torch.Tensor, device):
        self.tier = tier
        self.staging: list[dict | None] = [None, None]
        super().__init__(host, T, tokens, device, copy=True)

    def begin(self, n_fused: int) -> "MmapStreamedStates":
        super().begin(n_fused)
        self._file_pos, self.bytes_from_file = 0, 0
        return self

    def _stage(self, slot: int, n: int) -> dict:
        if self._events[slot] is not None:
            self._events[slot].synchronize()            # the last copy out of this staging chunk is done
        if self.staging[slot] is None:
            pin = self.device.type == "cuda"
            self.staging[slot] = {f: torch.empty(getattr(self.host, f).shape, dtype=getattr(self.host, f).dtype,
                                                 pin_memory=pin) for f in self.fields}
        st, F = self.staging[slot], self.tier.frames
        for f in self.fields:
            src, done, i = self.tier.view[f], 0, self._file_pos
            while done < n:                                 # wrap around the end of the file
                k = min(n - done, F - i)
                st[f][done:done + k].copy_(src[i:i + k])
                done, i = done + k, (i + k) % F
        self._file_pos = (self._file_pos + n) % F
        self.bytes_from_file += n * self.frame_bytes
        return {f: st[f][:n] for f in self.fields}


def virtual_host_states(host: FrameStates, T: int) -> FrameStates:
    """A plain FrameStates of T frames over one frame's host memory (stride 0 along frames): the
    engine's own `select` then gathers real bytes on the CPU and `.to` copies them (as shipped)."""
    ex = lambda t: None if t is None else t[:1].expand(T, *t.shape[1:])
    return FrameStates(tokens=ex(host.tokens), keys=ex(host.keys), values=ex(host.values),
                       n_vision_rows=host.n_vision_rows, prefix_ids=host.prefix_ids, prefix_out=ex(host.prefix_out),
                       kv_policy=host.kv_policy, k_scale=ex(host.k_scale), v_scale=ex(host.v_scale))


# ------------------------------------------------------------------ sections
def bench_ingest(m: LlavaMini, prefix, batch_sizes, device, dtype, flops_frame: float, peak: float,
                 min_frames: int, eager_batch: int | None) -> list[dict]:
    S = m.vision.image_size
    clip_cfg = m.vision.clip.config
    main_attn = clip_cfg._attn_implementation
    cases = [(bs, main_attn) for bs in batch_sizes]
    if eager_batch and main_attn != "eager":
        cases.append((eager_batch, "eager"))
    rows = []
    for bs, attn in cases:
        rec = {"batch": bs, "clip_attention": attn}
        try:
            clip_cfg._attn_implementation = attn
            px = torch.randn(bs, 3, S, S, device=device, dtype=dtype)
            m.encode_frames(px, prefix_ids=prefix, batch_size=bs, progress=False)     # warm-up
            sync(device)
            reset_peak(device)
            iters = max(2, math.ceil(min_frames / bs))
            t = time.perf_counter()
            for _ in range(iters):
                st = m.encode_frames(px, prefix_ids=prefix, batch_size=bs, progress=False)
                del st
            sync(device)
            dt = time.perf_counter() - t
            fps = iters * bs / dt
            rec.update(frames=iters * bs, seconds=dt, frames_per_s=fps, achieved_tflops=fps * flops_frame / 1e12,
                       fraction_of_peak=fps * flops_frame / 1e12 / peak, **memory(device))
            log(f"ingest batch {bs} ({attn}): {fps:.1f} frames/s, {rec['achieved_tflops']:.0f} TFLOP/s")
        except SectionTimeout:
            raise
        except Exception as e:  # noqa: BLE001
            rec.update(error_record(e, device))
            log(f"ingest batch {bs} ({attn}): {rec['error']} {rec['detail'][:120]}")
        finally:
            clip_cfg._attn_implementation = main_attn
        rows.append(rec)
    return rows


def make_host_chunk(m: LlavaMini, prefix, chunk: int, device, dtype, kv_policy: str) -> FrameStates:
    """`chunk` frames encoded by the engine (real activations), moved to pinned host memory."""
    S = m.vision.image_size
    px = torch.randn(chunk, 3, S, S, device=device, dtype=dtype)
    st = m.encode_frames(px, prefix_ids=prefix, batch_size=min(chunk, 16), kv_policy=kv_policy, progress=False)
    host = st.to("cpu")
    if device.type == "cuda":
        host = host._map(lambda t: t.pin_memory())
    del st
    return host


def question_flops(s: F.Shapes, T: int, n_fused: int, prompt_len: int, question_rows: int, cached_rows: int):
    return n_fused * F.fuse_frame(s, question_rows, cached_rows) + F.llm_prefill(s, prompt_len - 1 + T * s.nq, True)


def bench_ttft(m: LlavaMini, ids, hosts: dict, frames, budget: int, device, s: F.Shapes, peak: float,
               repeats: int, engine_frames: int, per_case_timeout: float, variants, rows: list,
               save=lambda: None) -> list[dict]:
    """Appends one record per case to `rows` (kept by the caller if the section is cut short)."""
    L = ids.shape[1]
    P = len(hosts["exact"].prefix_ids)
    S_rows = L - 1 - P
    C = hosts["exact"].n_cached_rows
    warmed = set()
    for T in frames:
        tokens = torch.randn(T, m.cfg.nq, m.cfg.hidden_size, device=device, dtype=m.dtype)
        for variant in variants:
            policies = ["exact"] if variant in ("streamed-fp8kv", "streamed-mmap") else ["exact", f"budget:{budget}"]
            if variant == "engine-as-shipped" and T > engine_frames:
                continue
            for pol in policies:
                if time_left() <= 1.0:
                    raise SectionTimeout("the time-to-first-token section ran out of time")
                rec = {"frames": T, "variant": variant, "policy": pol}
                n_fused = len(FusionPolicy.parse(pol).frames(T))
                rec["frames_fused"] = n_fused
                states = None
                try:
                    with time_limit(per_case_timeout):
                        host = hosts["fp8" if variant == "streamed-fp8kv" else "exact"]
                        if variant == "engine-as-shipped":
                            states = virtual_host_states(host, T)
                        elif variant == "streamed-mmap":
                            states = MmapStreamedStates(hosts["mmap"], host, T, tokens, device)
                        else:
                            states = StreamedStates(host, T, tokens, device, copy=(variant != "resident"))
                        times, infos = [], []
                        n_runs = repeats + (0 if (variant, pol) in warmed else 1)
                        for r in range(n_runs):
                            if isinstance(states, StreamedStates):
                                states.begin(n_fused)
                            sync(device)
                            reset_peak(device)
                            info = {}
                            t = time.perf_counter()
                            m.generate(ids, states, max_new_tokens=1, policy=pol, _info=info)
                            sync(device)
                            dt = time.perf_counter() - t
                            if r < n_runs - repeats:
                                continue                                   # first call of this kind: warm-up
                            times.append(dt)
                            infos.append(info)
                        warmed.add((variant, pol))
                    fl = question_flops(s, T, n_fused, L, S_rows, C)
                    best = min(times)
                    moved = states.bytes_copied if isinstance(states, StreamedStates) else (
                        n_fused * sum(getattr(host, f)[0].numel() * getattr(host, f).element_size()
                                      for f in _STATE_FIELDS if getattr(host, f) is not None))
                    rec.update(ttft_s=median(times), ttft_min_s=best, runs=times,
                               fuse_s=median([i["fuse_s"] for i in infos]),
                               prefill_s=median([i["prefill_s"] for i in infos]),
                               policy_reported=infos[-1].get("policy"), kv_policy=infos[-1].get("kv_policy"),
                               flops_causal=fl, achieved_tflops=fl / best / 1e12,
                               fraction_of_peak=fl / best / 1e12 / peak, bytes_host_to_device=moved,
                               **memory(device))
                    if isinstance(states, MmapStreamedStates):
                        rec["bytes_from_file"] = states.bytes_from_file
                    log(f"T={T} {variant} {pol}: first token {rec['ttft_s'] * 1e3:.0f} ms "
                        f"(fuse {rec['fuse_s'] * 1e3:.0f} + prefill {rec['prefill_s'] * 1e3:.0f}), "
                        f"peak {rec.get('peak_allocated_gb', 0):.1f} GB")
                except Exception as e:  # noqa: BLE001 - OOM, timeout, anything: record and go on
                    rec.update(error_record(e, device))
                    if isinstance(e, SectionTimeout) and time_left() <= 1.0:
                        rows.append(rec)
                        save()
                        raise
                    log(f"T={T} {variant} {pol}: {rec['error']} {rec['detail'][:160]}")
                finally:
                    with contextlib.suppress(Exception):
                        sync(device)            # no copy may still be writing into buffers about to be freed
                    del states
                rows.append(rec)
                save()
        del tokens
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def self_check(m: LlavaMini, ids, host: FrameStates, device, tier: "MmapKVTier | None" = None) -> dict:
    """The streamed states give the same LLM input as ordinary device-resident states (exact policy)."""
    T = 2 * len(host) + 3
    real = host.select(torch.arange(T) % len(host)).to(device)
    streamed = StreamedStates(host, T, real.tokens, device).begin(T)
    a, _ = m.fuse_question(ids, real, "exact")
    b, _ = m.fuse_question(ids, streamed, "exact")
    out = {"frames": T, "max_abs_diff": float((a.float() - b.float()).abs().max())}
    if tier is not None:                                # frames read back from the memory-mapped file
        c, _ = m.fuse_question(ids, MmapStreamedStates(tier, host, T, real.tokens, device).begin(T), "exact")
        out["mmap_max_abs_diff"] = float((a.float() - c.float()).abs().max())
    sync(device)
    return out


# ------------------------------------------------------------------ main
def render(r: dict) -> str:
    out = [f"device: {r['device']}; cap {r['cap_gb']} GiB; dtype {r['dtype']}; peak reference "
           f"{r['peak_tflops']:.0f} TFLOP/s"]
    if r.get("setup", {}).get("h2d"):
        out.append(f"pinned host->device: {r['setup']['h2d']['pinned_h2d_gb_per_s']:.1f} GB/s; "
                   f"weights {r['setup'].get('weights_gb', 0):.1f} GB")
    ing = r.get("ingest")
    if isinstance(ing, list):
        rows = [[f"{x['batch']} ({x['clip_attention']})",
                 f"{x['frames_per_s']:.1f}" if "frames_per_s" in x else x.get("error"),
                 f"{x.get('achieved_tflops', 0):.3g}", f"{100 * x.get('fraction_of_peak', 0):.0f}%",
                 f"{x.get('peak_allocated_gb', 0):.1f}"] for x in ing]
        out.append(table(rows, ["batch (CLIP attn)", "frames/s", "TFLOP/s", "of peak", "peak GB"], "\nIngest:"))
    elif ing:
        out.append(f"\nIngest: {ing}")
    tt = r.get("ttft")
    if tt:
        rows = []
        for x in tt:
            if "ttft_s" in x:
                rows.append([f"{x['frames']:,}", x["variant"], x["policy"], f"{x['ttft_s'] * 1e3:.0f}",
                             f"{x['fuse_s'] * 1e3:.0f} + {x['prefill_s'] * 1e3:.0f}",
                             f"{x['achieved_tflops']:.3g}", f"{100 * x['fraction_of_peak']:.0f}%",
                             f"{x['bytes_host_to_device'] / 1e9:.1f}", f"{x.get('peak_allocated_gb', 0):.1f}"])
            else:
                rows.append([f"{x['frames']:,}", x["variant"], x["policy"], x.get("error"), "", "", "", "",
                             f"{x.get('peak_allocated_gb', 0):.1f}"])
        out.append(table(rows, ["frames", "variant", "policy", "first token ms", "fuse + prefill ms", "TFLOP/s",
                                "of peak", "H2D GB", "peak GB"], "\nTime to first token:"))
    if r.get("ttft_error"):
        out.append(f"time to first token stopped early: {r['ttft_error']}")
    return "\n".join(out)


def run(args) -> int:
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)       # toy shapes: one thread avoids OpenMP barrier stalls on a busy machine
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")   # before the first allocation
    t_start = time.perf_counter()
    if args.tiny:
        cfg, vcfg = tiny_configs()
        device, dtype = torch.device("cpu"), torch.float32
        if args.frames == "1000,10000,20000":
            args.frames = "24,50"
        if args.batch_sizes == "1,8,32,64":
            args.batch_sizes = "1,4"
        args.budget = min(args.budget, 8)
        args.chunk = min(args.chunk, 8)
        args.min_frames = min(args.min_frames, 4)
        args.eager_batch = min(args.eager_batch, 2)
        args.engine_frames = min(args.engine_frames, 50)
        args.repeats = min(args.repeats, 1)
        args.mmap_frames = min(args.mmap_frames, 3 * args.chunk)     # < the frame counts: the file wraps around
        out_path = args.out
    else:
        if not torch.cuda.is_available():
            from lmcore.errors import DeviceUnavailable
            e = DeviceUnavailable("expected a CUDA GPU for `bench gpu`, got none (use --tiny to check the script "
                                  "on the CPU)")
            print(str(e), file=sys.stderr)        # the code every other command uses for a missing device
            return e.exit_code
        cfg, vcfg = LlavaMiniConfig(), clip_vit_l14_336()
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        out_path = args.out or "out/bench_gpu.json"
    torch.set_grad_enabled(False)
    s = F.Shapes.of(cfg, vcfg)
    prefix, ids = prompt_ids(PREFIX_ROWS, QUESTION_ROWS, cfg.vocab_size)
    r: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (--tiny)",
               "machine": machine(), "dtype": str(dtype).replace("torch.", ""), "cap_gb": args.cap_gb,
               "peak_tflops": args.peak_tflops, "tiny": bool(args.tiny),
               "config": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "clip_width": vcfg.hidden_size,
                          "clip_layers": vcfg.num_hidden_layers, "patches": s.N,
                          "prefix_rows": PREFIX_ROWS, "question_rows": QUESTION_ROWS, "chunk": args.chunk,
                          "clip_attn": args.clip_attn},
               "note": "random weights; K/V per question streamed from one pinned host chunk re-sent per chunk "
                       "(real byte count); FLOPs from benchmarks.formulas (causal attention)"}
    save = lambda: write_json(r, out_path)

    # -- 0. setup
    try:
        with time_limit(args.section_timeout):
            if device.type == "cuda" and args.cap_gb > 0:
                total = torch.cuda.get_device_properties(device).total_memory
                frac = min(1.0, args.cap_gb * 2**30 / total)
                torch.cuda.set_per_process_memory_fraction(frac, device)
                r["cap_fraction"] = frac
            t = time.perf_counter()
            m = build_engine(cfg, vcfg, device, dtype, args.clip_attn, args.chunk)
            sync(device)
            weights = sum(p.numel() * p.element_size() for p in m.net.parameters()) + \
                sum(p.numel() * p.element_size() for p in m.vision.parameters())
            r["setup"] = {"build_s": time.perf_counter() - t, "weights_gb": weights / 1e9, **memory(device)}
            log(f"built: {weights / 1e9:.2f} GB of weights in {r['setup']['build_s']:.1f} s")
            r["setup"]["h2d"] = h2d_bandwidth(device, 1 << 30)
            r["setup"]["kernels"] = check_kernels(m, device, dtype)
            log(f"kernels: {r['setup']['kernels']}")
    except Exception as e:  # noqa: BLE001 - without a model nothing else can run
        r["setup"] = error_record(e, device)
        save()
        log(f"setup failed: {r['setup']}")
        print(render(r))
        return 1
    save()

    # -- 1. ingest
    flops_frame = F.ingest_frame(s, len(prefix), causal=True)
    try:
        with time_limit(args.section_timeout):
            r["ingest"] = bench_ingest(m, prefix, parse_ints(args.batch_sizes), device, dtype, flops_frame,
                                       args.peak_tflops, args.min_frames, args.eager_batch)
    except Exception as e:  # noqa: BLE001
        r["ingest"] = error_record(e, device)
    r["ingest_flops_per_frame_causal"] = flops_frame
    save()

    # -- 2. time to first token
    r["ttft"] = []
    tier_dir = None
    try:
        with time_limit(args.section_timeout * 2):
            reset_peak(device)
            hosts = {"exact": make_host_chunk(m, prefix, args.chunk, device, dtype, "exact")}
            variants = [v for v in args.variants.split(",") if v]
            if "streamed-fp8kv" in variants:
                try:
                    hosts["fp8"] = make_host_chunk(m, prefix, args.chunk, device, dtype, "fp8")
                except Exception as e:  # noqa: BLE001
                    variants.remove("streamed-fp8kv")
                    r["fp8_setup"] = error_record(e, device)
            if "streamed-mmap" in variants:
                try:
                    tier_dir = tempfile.mkdtemp(prefix="lms-kv-tier-", dir=args.mmap_dir)
                    hosts["mmap"] = MmapKVTier(hosts["exact"], args.mmap_frames, os.path.join(tier_dir, "kv.bin"))
                    r["mmap_tier"] = {"frames": hosts["mmap"].frames, "bytes": hosts["mmap"].nbytes,
                                      "write_s": hosts["mmap"].write_s, "dir": tier_dir,
                                      "note": "written just before: its pages sit in the page cache"}
                    log(f"mmap tier: {hosts['mmap'].frames} frames, {hosts['mmap'].nbytes / 1e9:.1f} GB written in "
                        f"{hosts['mmap'].write_s:.1f} s")
                except Exception as e:  # noqa: BLE001
                    variants.remove("streamed-mmap")
                    r["mmap_setup"] = error_record(e, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            r["self_check"] = self_check(m, ids, hosts["exact"], device, hosts.get("mmap"))
            log(f"streamed == resident states: {r['self_check']}")
            bench_ttft(m, ids, hosts, parse_ints(args.frames), args.budget, device, s, args.peak_tflops,
                       args.repeats, args.engine_frames, args.case_timeout, variants, rows=r["ttft"], save=save)
    except Exception as e:  # noqa: BLE001
        r["ttft_error"] = error_record(e, device)
        log(f"time to first token stopped: {r['ttft_error']['error']} {r['ttft_error']['detail'][:160]}")
    if tier_dir is not None:
        shutil.rmtree(tier_dir, ignore_errors=True)
    r["seconds"] = time.perf_counter() - t_start
    save()
    if args.json:
        import json
        sys.stdout.write(json.dumps(r, indent=1, default=str) + "\n")
    else:
        print(render(r))
    if out_path:
        print(f"the JSON is also in {out_path}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    gpu_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
