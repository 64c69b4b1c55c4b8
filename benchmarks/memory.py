"""Memory proof at the 8B shapes: GPU peak of an exact question, host and Redis bytes per stream-hour.

    python -m benchmarks.memory [--frames 10000,20000] [--chunks 32,64,128] [--cap-gb 24] [--json] [--out FILE]
    lmstream bench memory ...

(a) GPU peak. The real question path runs on meta tensors: the engine of `benchmarks.flops`
    (`LlavaMiniNet` at `LlavaMiniConfig()` + CLIP ViT-L/14-336, bf16), asked an exact question over
    T frames through `LlavaMini._prefill` (what `generate` runs before its first token: `fuse_question`
    reading the frames through the FrameSource's `iter_chunks`, then the LLM prefill into a `KVBuffer`
    sized for the answer). The frames come from `benchmarks.gpu.StreamedStates`, the double-buffered
    host-to-GPU source of the GPU benchmark (current chunk + the next one prefetched), over a host chunk
    whose shapes come from `encode_frames` itself (exact or fp8 keys/values). `LiveBytes`, a
    TorchDispatchMode, sees every tensor the code allocates and counts its storage (rounded up to the
    CUDA caching allocator's 512 bytes) until the storage dies: current bytes, peak, and what was alive
    at the peak, by component. Two kernels are replaced by what they allocate on a GPU, because on meta
    tensors they would run their decompositions instead:
      * the question-time fusion attention runs its real Triton launcher (`_launch_fusion_attention`:
        checks, output, fp8 scale copies) with the kernel launch itself skipped;
      * the LLM's `scaled_dot_product_attention` (causal, no mask, bf16, grouped-query heads) is what
        SDPA runs on CUDA there, FlashAttention-2: it allocates its output and a float32
        log-sum-exp per row and head, never the score matrix. A call with a mask (which a CUDA GPU
        would run with the math kernel) is not replaced, so its scores would be counted.
    Weights are the parameter and buffer bytes of the same engine. Not counted: the CUDA context and
    cuBLAS workspaces (outside PyTorch's allocator, and outside the cap `bench gpu` sets), and
    fragmentation between the allocator's segments (`bench gpu` sets expandable_segments).

(b) Bytes per stream-hour at 1 frame/s for retention policies (DESIGN section 9), from real records:
    the states of one frame at the 8B shapes (zeros of the shapes and dtypes `encode_frames` produced
    in (a)) turned into records by `stream.ingest.states_to_records`, older frames' forms made by
    `frame_cache.retention.demote_record`, watches' rows added as the Encoder adds them (`w:<id>`), and
    every record measured as `len(encode_record(...))`. What the Redis backend writes per frame
    (`RedisFrameCache.append_many`): the record, its light copy (`light_record`: the record without
    keys/values; none for a token-only frame, whose record is its own light copy), its token copy
    (`token_record`: the vision token, pts and meta, what a question reads of every frame) and index
    entries (the slot number as a field name in the three hashes, the pts ZSET member `%016d` and its
    8-byte score).
    Two placements:
      * as built: everything in Redis (the ring holds each frame's record in its retained form);
      * split: a local keys/values tier on the Answerer's host (raw key/value bytes, as the mmap tier
        of `bench gpu` stores them), Redis holding each frame's record without keys/values and its
        token copy.
    With `--redis` (default when `redis-server` is installed), a real redis-server also stores a few
    frames of each form and `MEMORY USAGE` of its keys gives the bytes Redis really holds per frame
    (allocator size classes included).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import sys
import time
import weakref

import torch
import torch.nn.functional as TF
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .cli import memory_arguments
from .common import PREFIX_ROWS, QUESTION_ROWS, emit, parse_ints, prompt_ids, reference_kernels, si, table

GiB = float(1 << 30)
#: The CUDA caching allocator rounds every block up to a multiple of 512 bytes.
ALLOC_ROUND = 512
#: The retention policies of the issue (DESIGN section 9), name -> retain dict (None: all exact).
POLICIES = {
    "all exact": None,
    "exact 600 s, then none": {"exact_s": 600, "kv": "none", "kv_stride": 1},
    "exact 600 s, then fp8 every 10th": {"exact_s": 600, "kv": "fp8", "kv_stride": 10},
    "exact 600 s, then exact every 10th": {"exact_s": 600, "kv": "exact", "kv_stride": 10},
    "token-only (exact_s 0, none)": {"exact_s": 0, "kv": "none", "kv_stride": 1},
}
WATCH_ID = "w-0123456789"           # the service's watch ids: "w-" + 10 hex digits (deploy/routes.py)


# ------------------------------------------------------------------ (a) live bytes on meta tensors
class LiveBytes(TorchDispatchMode):
    """Counts the storages of the tensors made while it is active, until each storage dies.

    now / peak: bytes alive (each storage rounded up to `ALLOC_ROUND`); at_peak: bytes alive at the
    peak per label; max_by_label: the most bytes each label held at any time. The label of an
    allocation is the innermost `label(...)` active when it was made. Storages in `ignore` (weights,
    the host chunk) are never counted."""

    def __init__(self, ignore=()):
        super().__init__()
        self.live: dict[int, tuple[int, str]] = {}
        self.now = self.peak = 0
        self.by_label: dict[str, int] = {}
        self.at_peak: dict[str, int] = {}
        self.max_by_label: dict[str, int] = {}
        self.labels = ["other"]
        self.window_peak = 0                                    # max of `now` since the caller last set it
        self.skip = {t.untyped_storage()._cdata for t in ignore}

    @contextlib.contextmanager
    def label(self, name: str):
        self.labels.append(name)
        try:
            yield
        finally:
            self.labels.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type not in ("meta", "cuda"):
            return                                              # host tensors (ids, indices): not GPU memory
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live or key in self.skip:
            return                                              # a view, an in-place result, or not ours
        n = -(-st.nbytes() // ALLOC_ROUND) * ALLOC_ROUND
        lab = self.labels[-1]
        self.live[key] = (n, lab)
        self.now += n
        self.by_label[lab] = self.by_label.get(lab, 0) + n
        self.max_by_label[lab] = max(self.max_by_label.get(lab, 0), self.by_label[lab])
        if self.now > self.peak:
            self.peak, self.at_peak = self.now, dict(self.by_label)
        self.window_peak = max(self.window_peak, self.now)
        weakref.finalize(st, self._free, key)                   # fires when the storage itself dies

    def _free(self, key: int) -> None:
        n, lab = self.live.pop(key)
        self.now -= n
        self.by_label[lab] -= n


class FlashSDPA(TorchFunctionMode):
    """`F.scaled_dot_product_attention` without a mask as FlashAttention-2 runs it on CUDA: an output
    like q and a float32 log-sum-exp (B, heads, rows), freed after the call; no score matrix."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is TF.scaled_dot_product_attention and kwargs.get("attn_mask") is None and len(args) <= 3:
            q = args[0]
            lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)   # (B, nh, L)
            out = torch.empty_like(q)
            del lse
            return out
        return func(*args, **kwargs)


class _NoLaunch:
    """Stands for `_fusion_attention_kernel`: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *a, **k: None


@contextlib.contextmanager
def launcher_without_kernel():
    """The fusion attention's real Triton launcher, the kernel launch skipped (meta tensors): what it
    allocates is what the GPU path allocates. Without Triton: an output like q (the same bytes)."""
    import importlib

    from triton_kernels._common import HAS_TRITON
    fa = importlib.import_module("triton_kernels.fusion_attention")   # the package exports a function of that name
    if not HAS_TRITON:
        yield lambda q, *a, **k: torch.empty_like(q)
        return
    old = fa._fusion_attention_kernel
    fa._fusion_attention_kernel = _NoLaunch()
    try:
        yield fa.fusion_attention_triton
    finally:
        fa._fusion_attention_kernel = old


@contextlib.contextmanager
def _labelled(lb: LiveBytes, obj, attr: str, name: str):
    """obj.attr(...) runs under lb.label(name) (an instance attribute shadowing the method)."""
    fn = getattr(obj, attr)

    def wrapped(*a, **k):
        with lb.label(name):
            return fn(*a, **k)
    setattr(obj, attr, wrapped)
    try:
        yield
    finally:
        delattr(obj, attr)


def _shape_key(x):
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype, x.device.type)
    if hasattr(x, "keys") and hasattr(x, "kv_policy"):                        # FrameStates
        return tuple(_shape_key(getattr(x, f)) for f in ("tokens", "keys", "values", "prefix_out", "k_scale",
                                                         "v_scale")) + (x.kv_policy,)
    if isinstance(x, (int, float, str, bool, type(None))):
        return x
    return type(x).__name__


@contextlib.contextmanager
def _replayed(lb: LiveBytes, obj, attr: str, name: str, stats: dict, memo: dict):
    """obj.attr(...) under lb.label(name), replayed once it is steady: the call's memory depends only on the
    shapes of its arguments, so after two real calls with the same shapes that allocated the same way, a
    further call allocates what they did (their output, and at the same moment the most transient bytes
    they held beyond it) and returns an output of the same shape, without running the operators again.
    `question_peak(..., replay=False)` runs every call; the tests check both give the same figures."""
    fn = getattr(obj, attr)

    def wrapped(*a, **k):
        key = (attr, _shape_key(a), tuple((kk, _shape_key(v)) for kk, v in sorted(k.items())))
        seen = memo.get(key)
        with lb.label(name):
            if seen is not None and seen[0] >= 2:
                stats["replayed"] = stats.get("replayed", 0) + 1
                _, extra, shape, dtype, device = seen
                out = torch.empty(shape, dtype=dtype, device=device)
                if extra > 0:
                    tmp = torch.empty(extra, dtype=torch.uint8, device=device)
                    del tmp
                return out
            base, outer = lb.now, lb.window_peak
            lb.window_peak = base
            out = fn(*a, **k)
            stats["run"] = stats.get("run", 0) + 1
            own = lb.live.get(out.untyped_storage()._cdata, (0, ""))[0]
            extra = lb.window_peak - base - own
            lb.window_peak = max(outer, lb.window_peak)
            sig = (extra, tuple(out.shape), out.dtype, out.device)
            if own != out.untyped_storage().nbytes() and own != -(-out.untyped_storage().nbytes() // ALLOC_ROUND) \
                    * ALLOC_ROUND:
                sig = None                                  # an output that is a view of something else: never replay
            if seen is None or seen[1:] != sig:
                memo[key] = (1, *sig) if sig is not None else (-(1 << 30),)
            else:
                memo[key] = (seen[0] + 1, *sig)
            return out
    setattr(obj, attr, wrapped)
    try:
        yield
    finally:
        delattr(obj, attr)


def _storages_bytes(tensors) -> int:
    seen, n = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st._cdata not in seen:
            seen.add(st._cdata)
            n += st.nbytes()
    return n


def weights(m) -> dict:
    """Parameter and buffer bytes of the engine, by part (bf16 at the 8B shapes)."""
    mm = m.net.model
    part = lambda *mods: _storages_bytes([t for mod in mods for t in list(mod.parameters()) + list(mod.buffers())])
    out = {"LLM (32 layers, embeddings, norm, head)": part(mm.embed_tokens, mm.layers, mm.norm, m.net.lm_head,
                                                             m.net.rotary),
           "pre-fusion layers (4)": part(mm.prefusion_layers),
           "projector + compressor": part(mm.mm_projector, mm.compressor),
           "CLIP ViT-L/14-336": part(m.vision)}
    every = list(m.net.parameters()) + list(m.net.buffers()) + list(m.vision.parameters()) + list(m.vision.buffers())
    assert sum(out.values()) == _storages_bytes(every), "the weight parts must cover every parameter once"
    return out


COMPONENTS = ("vision tokens", "K/V chunk buffers", "fusion activations", "fusion sums + LLM input",
              "LLM KV buffer", "LLM activations", "logits", "other")


def question_peak(m, ids, host, T: int, chunk: int, max_new_tokens: int, replay: bool = True) -> dict:
    """Live bytes of an exact question over T frames, chunk frames per fusion pass (see module doc)."""
    from .gpu import StreamedStates
    S = int(m._question_rows(ids[0], host)[0].numel())
    per_frame = 4 * max(1, S) * (3 * m.cfg.intermediate_size + 8 * m.cfg.hidden_size)   # frames_per_pass's rule
    default_mem = m.question_mem_bytes
    m.question_chunk, m.question_mem_bytes = chunk, max(default_mem, chunk * per_frame)
    try:
        assert m.frames_per_pass(S) == chunk
        hc = host.select(torch.arange(chunk) % len(host))               # the host chunk (pinned host memory)
        host_tensors = [t for t in (hc.tokens, hc.keys, hc.values, hc.prefix_out, hc.k_scale, hc.v_scale)
                        if t is not None]
        lb = LiveBytes(ignore=list(m.net.parameters()) + list(m.net.buffers()) + list(m.vision.parameters())
                       + host_tensors)
        import torch.fx.experimental._config as fx_config
        with launcher_without_kernel() as fusion, contextlib.ExitStack() as stack:
            m.fusion_attention = fusion
            stack.enter_context(reference_kernels())
            stack.enter_context(torch.no_grad())
            stack.enter_context(fx_config.patch(meta_nonzero_assume_all_nonzero=True))
            stack.enter_context(lb)
            stack.enter_context(FlashSDPA())
            with lb.label("vision tokens"):
                tokens = torch.empty(T, m.cfg.nq, m.cfg.hidden_size, dtype=m.dtype, device=m.device)
            states = StreamedStates(hc, T, tokens, m.device)
            for obj, attr, name in ((states, "_buffer", "K/V chunk buffers"),
                                    (m, "_prefill", "LLM KV buffer"),
                                    (m, "fuse_question", "fusion sums + LLM input"),
                                    (m, "_llm", "LLM activations"),
                                    (m.net.lm_head, "forward", "logits")):
                stack.enter_context(_labelled(lb, obj, attr, name))
            replays: dict = {}
            memo: dict = {}                                 # shared: every LLM layer allocates alike
            steady = [(m, "_fuse_chunk", "fusion activations")] + [(layer, "decode", "LLM activations")
                                                                   for layer in m.net.model.layers]
            for obj, attr, name in steady:
                if replay:
                    stack.enter_context(_replayed(lb, obj, attr, name, replays, memo))
                elif attr == "_fuse_chunk":
                    stack.enter_context(_labelled(lb, obj, attr, name))
            fq = m.fuse_question                            # the peak up to the end of the fusion pass
            phase = {}

            def fuse_then_note(*a, **k):
                out = fq(*a, **k)
                phase["fusion"] = lb.peak
                return out
            m.fuse_question = fuse_then_note
            logits, buf, info = m._prefill(ids, states.begin(T), "exact", max_new_tokens)
            m.fuse_question = fq
            assert tuple(logits.shape) == (1, m.cfg.vocab_size) and info["frames_fused"] == T
            kv_capacity = buf.capacity
            h2d = states.bytes_copied
            del logits, buf, states, tokens
    finally:
        m.question_chunk, m.question_mem_bytes = 2048, default_mem
        from triton_kernels.fusion_attention import fusion_attention_reference
        m.fusion_attention = fusion_attention_reference
    import gc
    gc.collect()
    assert lb.now == 0, f"{lb.now} bytes still alive after the question"
    return {"frames": T, "chunk": chunk, "kv": host.kv_policy, "question_rows": S, "llm_tokens": info["llm_tokens"],
            "kv_buffer_tokens": kv_capacity, "bytes_host_to_device": h2d, "peak_live": lb.peak,
            "peak_live_fusion_phase": phase["fusion"],
            "at_peak": {c: lb.at_peak.get(c, 0) for c in COMPONENTS},
            "max_by_component": {c: lb.max_by_label.get(c, 0) for c in COMPONENTS},
            "frames_per_pass_at_default_mem": min(chunk, default_mem // per_frame),
            "calls_run_and_replayed": replays}


def gpu_peak(frames, chunks, kvs=("exact", "fp8"), cap_gib: float = 24.0, max_new_tokens: int = 64, cfg=None,
             vcfg=None, log=None) -> dict:
    from .flops import build_meta_engine, count
    log = log or (lambda *a: None)
    m = build_meta_engine(cfg, vcfg)
    prefix, ids = prompt_ids(PREFIX_ROWS, QUESTION_ROWS, m.cfg.vocab_size)
    S = m.vision.image_size
    px = torch.empty(1, 3, S, S, device="meta")
    hosts = {}
    for kv in kvs:                                          # one frame through encode_frames: the real shapes
        hosts[kv], _, _ = count(lambda: m.encode_frames(px, prefix_ids=prefix, batch_size=1, kv_policy=kv))
    w = weights(m)
    wsum = sum(w.values())
    cases = []
    for T in frames:
        for kv in kvs:
            for c in chunks:
                t = time.perf_counter()
                r = question_peak(m, ids, hosts[kv], T, c, max_new_tokens)
                r["weights"] = wsum
                r["total"] = wsum + r["peak_live"]
                r["total_fusion_phase"] = wsum + r["peak_live_fusion_phase"]
                r["total_gib"] = r["total"] / GiB
                r["under_cap"] = r["total_gib"] < cap_gib
                r["headroom_gib"] = cap_gib - r["total_gib"]
                r["seconds"] = time.perf_counter() - t
                cases.append(r)
                log(f"T={T} {kv} chunk {c}: peak {r['total_gib']:.2f} GiB ({r['seconds']:.1f} s)")
    return {"cap_gib": cap_gib, "weights": w, "weights_total": wsum, "max_new_tokens": max_new_tokens,
            "prompt": {"prefix_rows": PREFIX_ROWS, "question_rows": QUESTION_ROWS, "prompt_len": ids.shape[1]},
            "cases": cases, "states": hosts}


# ------------------------------------------------------------------ (b) bytes per stream-hour
def _zeros_like(st, n: int = 1):
    """One frame's states on the CPU, zeros of the shapes and dtypes of `st` (meta)."""
    z = lambda t: None if t is None else torch.zeros((n, *t.shape[1:]), dtype=t.dtype)
    return st.__class__(tokens=z(st.tokens), keys=z(st.keys), values=z(st.values), n_vision_rows=st.n_vision_rows,
                        prefix_ids=st.prefix_ids, prefix_out=z(st.prefix_out), kv_policy=st.kv_policy,
                        k_scale=z(st.k_scale), v_scale=z(st.v_scale),
                        pts=torch.full((n,), 43_200.0, dtype=torch.float64))


def _demote(rec, to: str):
    from frame_cache.retention import demote_record
    return demote_record(rec, to) or rec


def frame_forms(exact_states, fp8_states, watches: int, watch_rows: int, seq: int = 43_200,
                capacity: int = 1 << 20) -> dict:
    """Per retained form ("exact", "fp8", "none"): the bytes of the real records of one frame."""
    from frame_cache import encode_record
    from frame_cache.base import light_copy_bytes, token_copy_bytes
    from frame_cache.record import KV_TENSORS
    from stream.ingest import states_to_records
    recs = {}
    for name, st in (("exact", exact_states), ("fp8", fp8_states)):
        r = states_to_records(_zeros_like(st))[0]
        r.seq = seq
        H = r.tensors["token"].shape[-1]
        for i in range(watches):                            # as the Encoder adds them (deploy/serving.py)
            r.tensors[f"w:{WATCH_ID[:-1]}{i}"] = torch.zeros(watch_rows, H, dtype=r.tensors["token"].dtype)
        recs[name] = r
    recs["none"] = _demote(recs["exact"], "none")
    # an fp8 frame made by retention equals one encoded with the fp8 policy (its docstring); both are real
    index = 3 * len(str(seq % capacity)) + len("%016d" % seq) + 8
    out = {}
    for name, r in recs.items():
        full, light = encode_record(r), light_copy_bytes(r)          # a token-only frame is stored once
        tok = token_copy_bytes(r)
        kv_raw = sum(t.numel() * t.element_size() for k, t in r.tensors.items() if k in KV_TENSORS)
        none = encode_record(_demote(r, "none")) if name != "none" else full
        out[name] = {"record": len(full), "light": len(light), "token": len(tok), "index": index, "kv_raw": kv_raw,
                     "record_without_kv": len(none), "kv_policy_meta": r.meta["kv_policy"],
                     "tensors": {k: [list(t.shape), str(t.dtype).replace("torch.", "")] for k, t in r.tensors.items()}}
        out[name]["redis_all"] = len(full) + len(light) + len(tok) + index
        out[name]["redis_split"] = len(none) + len(tok) + index       # records without K/V: no light copy
        out[name]["host_split"] = kv_raw
    return out


def hour_mix(retain: dict | None, fps: float = 1.0, hours: float = 1.0, start_seq: int = 0) -> dict:
    """How many frames of a stream `hours` long hold each form at its end (pts = seq / fps)."""
    from_frames = int(round(3600 * hours * fps))
    if retain is None or retain.get("exact_s") is None:
        return {"exact": from_frames, "fp8": 0, "none": 0}
    hot = min(from_frames, int(math.floor(retain["exact_s"] * fps)))
    old = from_frames - hot
    stride, kv = int(retain.get("kv_stride", 1)), retain.get("kv", "none")
    kept = 0 if kv == "none" else sum(1 for s in range(start_seq, start_seq + old) if s % stride == 0)
    mix = {"exact": hot, "fp8": 0, "none": old - kept}
    if kept:
        mix[kv] += kept
    return mix


def stream_hours(frames_per_form: dict, caps_gib=(64.0, 512.0), fps: float = 1.0, watches=(0, 1, 4)) -> dict:
    rows = []
    for w in watches:
        forms = frames_per_form[w]
        for name, retain in POLICIES.items():
            first, later = hour_mix(retain, fps, 1.0), hour_mix(retain, fps, 2.0)
            row = {"policy": name, "retain": retain, "watches": w, "first_hour_frames": first}
            for place in ("redis_all", "redis_split", "host_split"):
                b1 = sum(n * forms[f][place] for f, n in first.items())
                b2 = sum(n * forms[f][place] for f, n in later.items())
                row[place] = {"first_hour": b1, "each_further_hour": b2 - b1}
            for place, cap in (("redis_all", caps_gib[0]), ("redis_split", caps_gib[0]), ("host_split", caps_gib[1])):
                b1, bh = row[place]["first_hour"], row[place]["each_further_hour"]
                capb = cap * GiB
                hours = (capb / b1 if capb < b1 else 1 + (capb - b1) / bh) if bh > 0 else (
                    float("inf") if b1 <= capb else capb / b1)
                row[place].update(cap_gib=cap, hours_one_stream=hours,
                                  one_hour_streams=(capb // b1) if b1 else float("inf"))
            rows.append(row)
    return {"fps": fps, "caps_gib": {"redis": caps_gib[0], "host": caps_gib[1]}, "rows": rows}


def measure_redis(forms: dict, n: int = 6) -> dict:
    """Store n frames of each form in a fresh redis-server and read back MEMORY USAGE per frame
    (the record, light and token hashes and the pts ZSET)."""
    import tempfile
    from pathlib import Path

    from frame_cache import RedisFrameCache
    from frame_cache.redis_server import RedisServer
    out = {}
    with tempfile.TemporaryDirectory(prefix="lms-bench-mem-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            cache = RedisFrameCache.from_url(server.url)
            for name, rec in forms.items():
                sid = f"mem-{name}"
                cache.create_stream(sid, 1 << 20)
                import dataclasses
                cache.append_many(sid, [dataclasses.replace(rec, seq=-1, pts=float(i)) for i in range(n)])
                keys = cache._keys(sid)
                c = cache._client
                usage = {part: int(c.memory_usage(k, samples=0) or 0) for part, k in
                         zip(("meta", "slots", "light", "pts", "evicted", "tokens"), keys)}
                per = (usage["slots"] + usage["light"] + usage["tokens"] + usage["pts"]) / n
                out[name] = {"frames": n, "memory_usage": usage, "per_frame": per}
                cache.delete_stream(sid)
            cache.close()
        finally:
            server.stop()
    return out


def stream_bytes(exact_states, fp8_states, watch_rows: int, watches=(0, 1, 4), caps_gib=(64.0, 512.0),
                 redis: bool = False) -> dict:
    per = {w: frame_forms(exact_states, fp8_states, w, watch_rows) for w in watches}
    r = {"per_frame": {str(w): v for w, v in per.items()}, "watch_rows": watch_rows,
         "hours": stream_hours(per, caps_gib, watches=watches)}
    if redis:
        from stream.ingest import states_to_records
        forms = {}
        for name in ("exact", "fp8", "none"):
            rec = states_to_records(_zeros_like(fp8_states if name == "fp8" else exact_states))[0]
            forms[name] = rec if name != "none" else _demote(rec, "none")
        r["redis_measured"] = measure_redis(forms)
        for name, v in r["redis_measured"].items():
            v["payload_per_frame"] = per[watches[0]][name]["redis_all"]
            v["overhead"] = v["per_frame"] / v["payload_per_frame"] - 1
    return r


def design_check(b: dict) -> list[dict]:
    """DESIGN section 9's per-frame figures against the real records (0 watches, 1 watch)."""
    f0, f1 = b["per_frame"]["0"], b["per_frame"]["1"]
    tens = f0["exact"]["tensors"]
    nbytes = lambda shape, dt: math.prod(shape) * {"bfloat16": 2, "float32": 4, "float8_e4m3fn": 1}[dt]
    tok = nbytes(*tens["token"])
    pre = nbytes(*tens["prefix_out"])
    k = tens["k"][0]
    vision_rows_kv = 2 * math.prod(k[:2]) * 577 * k[3] * 2
    rows = [
        ("vision token", 8192, tok, "tensor bytes"),
        ("fused prefix rows", 0.37e6, pre, "tensor bytes"),
        ("pre-fusion K/V bf16, 577 vision rows (DESIGN's count)", 9.45e6, vision_rows_kv, "tensor bytes"),
        (f"pre-fusion K/V bf16, all {k[2]} cached rows (what is stored)", 9.45e6, f0["exact"]["kv_raw"],
         "tensor bytes"),
        (f"pre-fusion K/V fp8 + scales, {k[2]} rows", 4.7e6, f0["fp8"]["kv_raw"], "tensor bytes"),
        ("a watch's fused rows", 0.2e6, f1["none"]["record"] - f0["none"]["record"], "record bytes added"),
        ("a watch in Redis (token-only frame: record only)", 0.2e6, f1["none"]["redis_all"] - f0["none"]["redis_all"],
         "Redis bytes added"),
        ("kept for every frame (token + prefix rows), in Redis", 0.37e6 + 8192, f0["none"]["redis_all"],
         "record + token copy + index"),
    ]
    return [{"what": w, "design": d, "measured": m_, "unit": u, "ratio": m_ / d} for w, d, m_, u in rows]


# ------------------------------------------------------------------ driver and report
def measure(frames=(10_000, 20_000), chunks=(32, 64, 128), cap_gib: float = 24.0, caps_gib=(64.0, 512.0),
            watches=(0, 1, 4), redis: bool = False, max_new_tokens: int = 64, cfg=None, vcfg=None, log=None) -> dict:
    t0 = time.perf_counter()
    g = gpu_peak(frames, chunks, cap_gib=cap_gib, max_new_tokens=max_new_tokens, cfg=cfg, vcfg=vcfg, log=log)
    states = g.pop("states")
    S = g["cases"][0]["question_rows"]
    b = stream_bytes(states["exact"], states["fp8"], S, watches, caps_gib, redis=redis)
    return {"what": "memory at the 8B shapes: GPU peak of an exact question (real code on meta tensors, live "
                    "storages counted), host and Redis bytes per stream-hour (real records)",
            "gpu": g, "stream": b, "design_check": design_check(b), "seconds": time.perf_counter() - t0}


def _g(x: float) -> str:
    return f"{x / GiB:.2f}"


def render(r: dict) -> str:
    g = r["gpu"]
    out = [f"GPU peak of an exact question, bf16, GiB (cap {g['cap_gib']:g} GiB); weights "
           f"{_g(g['weights_total'])} GiB = " + ", ".join(f"{k} {_g(v)}" for k, v in g["weights"].items()),
           f"LLM KV buffer sized for the prompt ({g['prompt']['prompt_len']} ids), the frame tokens and "
           f"{g['max_new_tokens']} answer tokens; components at the moment of the peak "
           "(max over the question in brackets where larger)", ""]
    short = {"vision tokens": "tokens", "K/V chunk buffers": "K/V chunks", "fusion activations": "fusion act.",
             "fusion sums + LLM input": "sums+input", "LLM KV buffer": "LLM KV", "LLM activations": "LLM act.",
             "logits": "logits", "other": "other"}
    rows = []
    for c in g["cases"]:
        cells = []
        for k in COMPONENTS:
            a, mx = c["at_peak"][k], c["max_by_component"][k]
            cells.append(_g(a) + (f" [{_g(mx)}]" if mx > a + (1 << 20) else ""))
        rows.append([f"{c['frames']:,}", c["kv"], c["chunk"], _g(c["weights"]), *cells, _g(c["total"]),
                     _g(c["total_fusion_phase"]), f"{c['headroom_gib']:+.2f}", "yes" if c["under_cap"] else "NO"])
    out.append(table(rows, ["frames", "K/V", "chunk", "weights", *[short[k] for k in COMPONENTS], "peak",
                            "fusion-phase peak", "headroom", "< cap"]))
    c128 = [c for c in g["cases"] if c["chunk"] == 128]
    if c128:
        out.append(f"(chunk 128 needs question_mem_bytes raised: at the engine's default (512 MiB) a pass fuses "
                   f"{c128[0]['frames_per_pass_at_default_mem']} frames)")
    out.append("")
    h = r["stream"]["hours"]
    pf = r["stream"]["per_frame"]
    rows = []
    for w, forms in pf.items():
        for name in ("exact", "fp8", "none"):
            f = forms[name]
            rows.append([w, name, f"{f['record']:,}", f"{f['light']:,}", f"{f['token']:,}", f["index"],
                         f"{f['redis_all']:,}", f"{f['redis_split']:,}", f"{f['host_split']:,}"])
    out.append(table(rows, ["watches", "form", "record B", "light B", "token B", "index B", "Redis (as built) B",
                            "Redis (split) B", "host K/V (split) B"],
                     "Bytes per frame, each = len(encode_record(...)) of a real record at the 8B shapes:"))
    out.append("")
    rows = []
    for x in h["rows"]:
        ra, rs, hs = x["redis_all"], x["redis_split"], x["host_split"]
        rows.append([x["policy"], x["watches"],
                     f"{si(ra['first_hour'], 'B')} / {si(ra['each_further_hour'], 'B')}",
                     f"{ra['hours_one_stream']:,.1f} h ({ra['one_hour_streams']:,.0f})",
                     f"{si(rs['first_hour'], 'B')} / {si(rs['each_further_hour'], 'B')}",
                     f"{rs['hours_one_stream']:,.1f} h ({rs['one_hour_streams']:,.0f})",
                     f"{si(hs['first_hour'], 'B')} / {si(hs['each_further_hour'], 'B')}",
                     f"{hs['hours_one_stream']:,.1f} h ({hs['one_hour_streams']:,.0f})"])
    caps = h["caps_gib"]
    out.append(table(rows, ["retention", "watches", "Redis as built: 1st h / further h",
                            f"in {caps['redis']:g} GiB Redis", "split: Redis 1st / further h",
                            f"in {caps['redis']:g} GiB Redis", "split: host K/V 1st / further h",
                            f"in {caps['host']:g} GiB host"],
                     f"Per stream at {h['fps']:g} frame/s (hot window exact_s, then the older frames' form; "
                     "'in X': hours of history one stream keeps (how many 1-hour streams fit)):"))
    if "redis_measured" in r["stream"]:
        rows = [[k, f"{v['payload_per_frame']:,}", f"{v['per_frame']:,.0f}", f"{100 * v['overhead']:+.1f}%"]
                for k, v in r["stream"]["redis_measured"].items()]
        out.append("")
        out.append(table(rows, ["form (0 watches)", "payload B/frame", "redis-server MEMORY USAGE B/frame",
                                "overhead"], "Measured in a real redis-server (jemalloc size classes included):"))
    out.append("")
    rows = [[d["what"], si(d["design"], "B"), si(d["measured"], "B"), f"{d['ratio']:.2f}x", d["unit"]]
            for d in r["design_check"]]
    out.append(table(rows, ["DESIGN section 9", "DESIGN", "measured", "ratio", "measured as"]))
    out.append(f"\n({r['seconds']:.1f} s on this machine)")
    return "\n".join(out)


def run(args) -> int:
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.json else None
    redis = {"auto": shutil.which("redis-server") is not None, "yes": True, "no": False}[args.redis]
    r = measure(frames=parse_ints(args.frames), chunks=parse_ints(args.chunks), cap_gib=args.cap_gb,
                caps_gib=(args.redis_gb, args.host_gb), watches=tuple(parse_ints(args.watches)), redis=redis,
                max_new_tokens=args.max_new_tokens, log=log)
    emit(r, render(r), args.json, args.out)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    memory_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
