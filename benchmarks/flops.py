"""Machine-independent FLOPs and bytes at the real 8B shapes, counted on meta tensors.

    python -m benchmarks.flops [--frames 1000,10000,20000] [--budget 512] [--json] [--out FILE]
    lmstream bench flops ...

What runs (under `torch.utils.flop_counter.FlopCounterMode`, every tensor on the meta device, so
nothing is allocated and the count does not depend on the machine):

* ours, ingest: `LlavaMini.encode_frames` of the engine built around `LlavaMiniNet` at the 8B
  config (`LlavaMiniConfig()` defaults) and a CLIP ViT-L/14-336 `CLIPVisionModel` made from its
  config, with the standard prompt's prefix fused at ingest (the engine's default);
* ours, question: `LlavaMini.fuse_question` over T frames ("exact" and "budget:N"), then the LLM
  prefill exactly as `generate` runs it (`_llm` into a `KVBuffer`, the head on the last row);
* official, per frame: `OracleLlavaMini._frame` (the monolithic official-style computation:
  every CLIP layer, the nn.MultiheadAttention compressor, the projector, transformers'
  LlamaDecoderLayer over the N + nq vision rows plus all L prompt rows), counted for one frame and
  multiplied by T, plus the same LLM prefill;
* the compressor alone, `Compressor.forward_mha` against the absorbed form.

Workarounds needed on meta tensors (none changes what is computed):
* `encode_frames` selects the prefix rows with a boolean mask (`pemb[keep]`), which on meta needs
  `nonzero`, which has no data-independent meta kernel. torch offers a switch that assumes every
  element is non-zero (`torch.fx.experimental._config.meta_nonzero_assume_all_nonzero`); that is
  exact here because every prefix id is positive (checked). Indexing by a long index computed on
  the CPU (see the report) would need no switch.
* the kernel dispatchers are forced to the PyTorch references (a Triton kernel is not an aten
  op and cannot run on meta); the references do the same products (see `compressor` for the one
  place where the GPU tiling executes more than the algorithm needs).
* the question-time chunk is set to 2048 frames while counting (fewer Python steps; FLOPs do not
  depend on it) and the T-frame states are one encoded frame selected T times (FLOPs and bytes
  depend on shapes only).
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.config import LlavaMiniConfig
from model.llama import KVBuffer
from model.llava_mini import FusionPolicy, LlavaMini, LlavaMiniNet
from model.vision import VisionTower

from . import formulas as F
from .cli import flops_arguments
from .common import (H100_HBM_GBPS, H100_PEAK_TFLOPS, HOST_LINK_GBPS, PREFIX_ROWS, QUESTION_ROWS, clip_vit_l14_336,
                     emit, parse_ints, prompt_ids, reference_kernels, si, table)

DEFAULT_FRAMES = (1000, 10000, 20000)


# ------------------------------------------------------------------ building on meta
def _meta_clip(vcfg, dtype):
    from transformers import CLIPVisionModel
    vcfg._attn_implementation = "eager"           # as model.vision.load_clip loads it
    with torch.device("meta"):
        clip = CLIPVisionModel(vcfg)
    return clip.to(device="meta", dtype=dtype).eval()


def build_meta_engine(cfg: LlavaMiniConfig | None = None, vcfg=None, dtype=torch.bfloat16, batch_size: int = 2,
                      question_chunk: int = 2048) -> LlavaMini:
    """The engine with every parameter on the meta device (no checkpoint, no memory)."""
    from triton_kernels.fusion_attention import fusion_attention_reference
    cfg = cfg or LlavaMiniConfig()
    vcfg = vcfg or clip_vit_l14_336()
    with torch.device("meta"):
        net = LlavaMiniNet(cfg, vcfg.hidden_size)
    net = net.to(device="meta", dtype=dtype)       # the sin-cos table is made from numpy on the CPU: move it too
    vt = VisionTower(_meta_clip(vcfg, dtype), cfg.mm_vision_select_layer)
    m = LlavaMini(net, vt, cfg, batch_size=batch_size, question_chunk=question_chunk, name="meta-8b")
    m.fusion_attention = fusion_attention_reference
    with reference_kernels():                       # per-model precomputation: outside every count
        net.model.compressor.absorbed(vt.n_patches)
    return m


def build_meta_oracle(cfg: LlavaMiniConfig | None = None, vcfg=None, dtype=torch.bfloat16):
    from model.oracle import OracleLlavaMini
    cfg = cfg or LlavaMiniConfig()
    vcfg = vcfg or clip_vit_l14_336()
    clip = _meta_clip(vcfg, dtype)                  # all layers: the official code runs them all
    with torch.device("meta"):
        o = OracleLlavaMini(cfg, clip, vcfg.hidden_size)
    return o.to(device="meta", dtype=dtype).eval()


def count(fn):
    """(result, total FLOPs, {module name: FLOPs}) of fn() under FlopCounterMode."""
    import torch.fx.experimental._config as fx_config
    with reference_kernels(), torch.no_grad(), fx_config.patch(meta_nonzero_assume_all_nonzero=True), \
            FlopCounterMode(display=False) as fc:
        out = fn()
    per = {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}
    return out, fc.get_total_flops(), per


def _mod(per: dict, *names) -> int:
    return sum(per.get(n, 0) for n in names)


def triton_compressor_executed(s: F.Shapes, block_eo: int = 64) -> float:
    """Products (and the elementwise LayerNorm work folded into them) the GPU tiling of
    `_compress_attention_kernel` executes per frame: each of the E / BLOCK_EO programs of a frame
    recomputes the row statistics (~4NE) and the normalised rows and scores (~4NE + 2*HQp*N*E, with
    heads*nq padded to HQp >= 16 for tl.dot), then owns a BLOCK_EO slice of the weighted sum; the
    Wv / Wo projections run after it in PyTorch."""
    HQ = s.comp_heads * s.nq
    HQp = max(16, 1 << (HQ - 1).bit_length())
    programs = math.ceil(s.E / block_eo)
    per_program = 8.0 * s.N * s.E + 2.0 * HQp * s.N * s.E
    return programs * per_program + 2.0 * HQp * s.N * s.E + 4.0 * s.nq * s.E * s.E


# ------------------------------------------------------------------ the measurement
def measure(cfg: LlavaMiniConfig | None = None, vcfg=None, frames=DEFAULT_FRAMES, budget: int = 512,
            prefix_rows: int = PREFIX_ROWS, question_rows: int = QUESTION_ROWS, dtype=torch.bfloat16,
            log=None) -> dict:
    from triton_kernels.compress_attention import compressor_flops, mha_compressor_flops
    log = log or (lambda *a: None)
    cfg = cfg or LlavaMiniConfig()
    vcfg = vcfg or clip_vit_l14_336()
    s = F.Shapes.of(cfg, vcfg)
    t0 = time.perf_counter()
    m = build_meta_engine(cfg, vcfg, dtype)
    prefix, ids = prompt_ids(prefix_rows, question_rows, cfg.vocab_size)
    assert all(i > 0 for i in prefix), "the meta nonzero switch is exact only for an all-positive prefix"
    L = ids.shape[1]
    C = s.vision_rows + prefix_rows
    size = vcfg.image_size
    B = 2
    px = torch.empty(B, 3, size, size, device="meta")

    # -- ingest, per frame
    st, tot, per = count(lambda: m.encode_frames(px, prefix_ids=prefix, batch_size=B))
    assert st.n_cached_rows == C, (st.n_cached_rows, C)
    vis, comp, proj = _mod(per, "VisionTower") / B, _mod(per, "Compressor") / B, _mod(per, "Sequential") / B
    ingest = {"counted": tot / B, "formula": F.ingest_frame(s, prefix_rows),
              "formula_causal": F.ingest_frame(s, prefix_rows, causal=True),
              "breakdown": {"clip": vis, "compressor": comp, "projector": proj,
                            "prefusion": tot / B - vis - comp - proj},
              "rows": {"clip_layers_run": s.clip_run, "prefusion_rows": C}}
    log(f"ingest counted ({time.perf_counter() - t0:.1f} s)")

    # -- official, per frame and question
    oracle = build_meta_oracle(cfg, vcfg, dtype)
    with torch.device("meta"):                      # the oracle builds its masks with factory calls
        _, otot, oper = count(lambda: oracle._frame(torch.empty(1, 3, size, size), ids.to("meta")))
    official_frame = {"counted": otot, "formula": F.official_frame(s, L),
                      "formula_causal": F.official_frame(s, L, causal=True),
                      "breakdown": {"clip": _mod(oper, "CLIPVisionModel"), "compressor": _mod(oper, "Compressor"),
                                    "projector": _mod(oper, "Sequential"),
                                    "prefusion": _mod(oper, "LlamaDecoderLayer")},
                      "rows": {"clip_layers_run": s.clip_layers, "prefusion_rows": s.vision_rows + L}}
    log(f"official frame counted ({time.perf_counter() - t0:.1f} s)")

    # -- the compressor alone, one frame
    c = m.net.model.compressor
    x = torch.empty(1, s.N, s.E, device="meta", dtype=dtype)
    _, mha, _ = count(lambda: c.forward_mha(x))
    _, absorbed, _ = count(lambda: c(x))
    compressor = {
        "mha": {"counted": mha, "formula": F.compressor_mha(s),
                "formula_all_ops": mha_compressor_flops(s.N, s.E, s.comp_heads, s.nq)},
        "absorbed": {"counted": absorbed, "formula": F.compressor_absorbed(s),
                     "formula_all_ops": compressor_flops(s.N, s.E, s.comp_heads, s.nq),
                     "triton_tiling_executed_estimate": triton_compressor_executed(s)},
    }
    compressor["ratio_counted"] = mha / absorbed
    compressor["ratio_all_ops"] = compressor["mha"]["formula_all_ops"] / compressor["absorbed"]["formula_all_ops"]
    compressor["ratio_triton_executed"] = mha / compressor["absorbed"]["triton_tiling_executed_estimate"]

    # -- one question row through the pre-fusion layers, per frame (DESIGN: about 1.78 G)
    one = st.select(torch.zeros(1, dtype=torch.long))
    _, fuse1, _ = count(lambda: m.fuse_question(ids, one, "exact"))

    # -- bytes per frame (from the encoded states' own tensors)
    esz = lambda t: 0 if t is None else t.numel() * t.element_size()
    st8, _, _ = count(lambda: m.encode_frames(px[:1], prefix_ids=prefix, batch_size=1, kv_policy="fp8"))
    per_frame_bytes = {
        "vision_token": esz(st.tokens) / B,
        "kv_bf16": (esz(st.keys) + esz(st.values)) / B,
        "kv_bf16_vision_rows_only": F.kv_bytes_per_frame(s, s.vision_rows),
        "kv_fp8": esz(st8.keys) + esz(st8.values) + esz(st8.k_scale) + esz(st8.v_scale),
        "prefix_out": esz(st.prefix_out) / B,
        "pixels_uint8": 3 * size * size,
    }
    per_frame_bytes["stored_bf16"] = st.nbytes / B
    per_frame_bytes["stored_fp8"] = st8.nbytes
    kv_frame = per_frame_bytes["kv_bf16"] + per_frame_bytes["prefix_out"]   # what fusing one frame reads

    # -- per question
    questions = []
    for T in frames:
        sT = st.select(torch.zeros(T, dtype=torch.long))
        row = {"frames": T, "llm_tokens": L - 1 + T * s.nq}
        pre = count_prefill(m, ids, sT)
        pf = {"counted": pre, "formula": F.llm_prefill(s, L - 1 + T * s.nq),
              "formula_causal": F.llm_prefill(s, L - 1 + T * s.nq, causal=True)}
        row["llm_prefill"] = pf
        row["official"] = {"counted": T * otot + pre,
                           "formula": T * official_frame["formula"] + pf["formula"],
                           "formula_causal": T * official_frame["formula_causal"] + pf["formula_causal"],
                           "frames_encoded": T, "pixel_bytes_read": T * per_frame_bytes["pixels_uint8"]}
        for name, pol in (("exact", "exact"), ("budget", f"budget:{budget}")):
            (_, info), fz, _ = count(lambda: m.fuse_question(ids, sT, pol))
            n = info["frames_fused"]
            ff = n * F.fuse_frame(s, question_rows, C)
            row[name] = {"policy": info["policy"], "frames_fused": n, "fuse_counted": fz, "fuse_formula": ff,
                         "counted": fz + pre, "formula": ff + pf["formula"], "formula_causal": ff + pf["formula_causal"],
                         "cache_bytes_read_bf16": n * kv_frame + T * per_frame_bytes["vision_token"],
                         "cache_bytes_read_fp8kv": n * (per_frame_bytes["kv_fp8"] + per_frame_bytes["prefix_out"])
                         + T * per_frame_bytes["vision_token"]}
            assert n == len(FusionPolicy.parse(pol).frames(T))
        # formula only, not an engine code path: the same question with the LLM keys/values of its
        # question-independent part ([averaged prefix rows, T frame tokens]) kept from an earlier question
        suffix = F.llm_suffix(s, question_rows, L - 1 + T * s.nq, causal=True)
        row["projection_llm_prefix_cache"] = {
            name: {"formula_causal": row[name]["fuse_formula"] + suffix,
                   "h100_compute_s": (row[name]["fuse_formula"] + suffix) / (H100_PEAK_TFLOPS * 1e12)}
            for name in ("exact", "budget")}
        row["projection_llm_prefix_cache"]["llm_rows"] = question_rows
        row["ratio_official_exact"] = row["official"]["counted"] / row["exact"]["counted"]
        row["ratio_official_budget"] = row["official"]["counted"] / row["budget"]["counted"]
        row["ratio_official_exact_causal"] = row["official"]["formula_causal"] / row["exact"]["formula_causal"]
        # lower bounds on an H100 (DESIGN's 798 TFLOP/s, 55 GB/s host link, 3.35 TB/s HBM): causal FLOPs
        for name in ("exact", "budget"):
            r = row[name]
            r["h100_lower_bound_s"] = {
                "compute": r["formula_causal"] / (H100_PEAK_TFLOPS * 1e12),
                "cache_from_host_bf16": r["cache_bytes_read_bf16"] / (HOST_LINK_GBPS * 1e9),
                "cache_from_host_fp8kv": r["cache_bytes_read_fp8kv"] / (HOST_LINK_GBPS * 1e9),
                "cache_from_hbm_bf16": r["cache_bytes_read_bf16"] / (H100_HBM_GBPS * 1e9)}
        questions.append(row)
        log(f"T={T} counted ({time.perf_counter() - t0:.1f} s)")

    return {
        "what": "FLOPs (FlopCounterMode: matrix products, 2 per multiply-add, attention rectangles in full) and "
                "bytes, on meta tensors",
        "config": {"hidden": s.H, "layers": s.layers, "heads": s.nh, "kv_heads": s.nkv, "head_dim": s.hd,
                   "intermediate": s.I, "vocab": s.vocab, "prefusion_layers": s.prefusion, "clip_width": s.E,
                   "clip_layers": s.clip_layers, "clip_layers_run": s.clip_run, "patches": s.N, "nq": s.nq,
                   "compressor_heads": s.comp_heads, "dtype": str(dtype).replace("torch.", "")},
        "prompt": {"prefix_rows": prefix_rows, "question_rows": question_rows, "prompt_len": L,
                   "prefix_fused_at_ingest": True, "cached_rows_per_frame": C,
                   "note": "standard llava_llama_3_1 prompt: 45 rows before <image> (chat header + system text), "
                           "24 after it (\\n, a ~22-token question, <|eot_id|>); synthetic positive ids"},
        "per_frame": {"ingest": ingest, "official_frame": official_frame,
                      "question_row_through_prefusion": {"counted": fuse1 / question_rows,
                                                         "formula": F.fuse_frame(s, question_rows, C) / question_rows}},
        "compressor": compressor,
        "bytes": {"per_frame": per_frame_bytes,
                  "per_question_note": "cache bytes read per question: fused frames x (pre-fusion K/V + fused "
                                       "prefix rows) + all frames' vision tokens; weights not included"},
        "per_question": questions,
        "official_method": "one frame counted (OracleLlavaMini._frame) and multiplied by T, plus the LLM prefill",
        "seconds": time.perf_counter() - t0,
    }


def count_prefill(m: LlavaMini, ids, states) -> float:
    """The LLM part of `generate` up to the first token (`_llm` into a KVBuffer, the head on the last row),
    counted alone: the embeddings come from a cheap fuse outside the counter (their shape does not
    depend on the policy)."""
    with reference_kernels(), torch.no_grad():
        import torch.fx.experimental._config as fx_config
        with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
            embeds, _ = m.fuse_question(ids, states, "budget:1")
    buf = KVBuffer(m.cfg, 1, embeds.shape[1] + 1, m.dtype, m.device)
    _, tot, _ = count(lambda: m._llm(embeds, buf, all_logits=False))
    return tot


# ------------------------------------------------------------------ report
def _rel(a: float, b: float) -> str:
    return f"{100.0 * (a - b) / b:+.2f}%" if b else "-"


def render(r: dict) -> str:
    pf, comp, by = r["per_frame"], r["compressor"], r["bytes"]["per_frame"]
    cfg, pr = r["config"], r["prompt"]
    out = [f"FLOPs at H={cfg['hidden']}, {cfg['layers']} LLM layers, {cfg['prefusion_layers']} pre-fusion layers, "
           f"CLIP width {cfg['clip_width']} x {cfg['clip_layers']} layers ({cfg['patches']} patches), "
           f"counted by FlopCounterMode on meta tensors (matrix products only; attention rectangles in full).",
           f"Prompt: {pr['prefix_rows']} rows before <image> (fused at ingest), {pr['question_rows']} question rows "
           f"after it (L = {pr['prompt_len']}); {pr['cached_rows_per_frame']} cached rows per frame.", ""]
    rows = []
    for name, d in (("ingest one frame (ours)", pf["ingest"]),
                    ("official: one frame per question", pf["official_frame"]),
                    ("one question row x 4 pre-fusion layers, per frame",
                     pf["question_row_through_prefusion"])):
        rows.append([name, si(d["counted"]), si(d["formula"]), _rel(d["counted"], d["formula"])])
    out.append(table(rows, ["per frame", "counted", "hand formula", "diff"]))
    b = pf["ingest"]["breakdown"]
    ob = pf["official_frame"]["breakdown"]
    tot = pf["ingest"]["counted"]
    out.append(f"  ingest breakdown: CLIP {si(b['clip'])} ({pf['ingest']['rows']['clip_layers_run']} layers), "
               f"compressor {si(b['compressor'])}, projector {si(b['projector'])}, pre-fusion {si(b['prefusion'])} "
               f"({100 * b['prefusion'] / tot:.0f} %)")
    out.append(f"  official frame breakdown: CLIP {si(ob['clip'])} ({pf['official_frame']['rows']['clip_layers_run']} "
               f"layers), compressor {si(ob['compressor'])}, projector {si(ob['projector'])}, pre-fusion "
               f"{si(ob['prefusion'])} over {pf['official_frame']['rows']['prefusion_rows']} rows")
    out.append("")
    rows = []
    for q in r["per_question"]:
        rows.append([f"{q['frames']:,}", si(q["official"]["counted"]), si(q["exact"]["counted"]),
                     f"{si(q['budget']['counted'])} ({q['budget']['frames_fused']} fused)",
                     si(q["llm_prefill"]["counted"]),
                     f"{q['ratio_official_exact']:.1f}x", f"{q['ratio_official_budget']:.1f}x",
                     _rel(q["exact"]["counted"], q["exact"]["formula"])])
    out.append(table(rows, ["frames", "official", "ours exact", "ours budget", "of which LLM prefill",
                            "official/exact", "official/budget", "exact vs formula"],
                     "Per question, to the first token (official = one frame counted x T + the LLM prefill):"))
    out.append("")
    m, a = comp["mha"], comp["absorbed"]
    rows = [["nn.MultiheadAttention (official)", si(m["counted"]), si(m["formula"]), si(m["formula_all_ops"]), "-"],
            ["absorbed (ours, reference)", si(a["counted"]), si(a["formula"]), si(a["formula_all_ops"]),
             si(a["triton_tiling_executed_estimate"])],
            ["ratio MHA / absorbed", f"{comp['ratio_counted']:.1f}x", f"{m['formula'] / a['formula']:.1f}x",
             f"{comp['ratio_all_ops']:.1f}x", f"{comp['ratio_triton_executed']:.1f}x"]]
    out.append(table(rows, ["compressor, per frame", "counted", "formula (products)", "compressor_flops (all ops)",
                            "GPU tiling executes"]))
    out.append("")
    rows = [["vision token", si(by["vision_token"], "B")],
            [f"pre-fusion K/V, {pr['cached_rows_per_frame']} rows, bf16", si(by["kv_bf16"], "B")],
            ["pre-fusion K/V, vision rows only, bf16", si(by["kv_bf16_vision_rows_only"], "B")],
            [f"pre-fusion K/V, {pr['cached_rows_per_frame']} rows, fp8 (+ scales)", si(by["kv_fp8"], "B")],
            ["fused prefix rows (prefix_out)", si(by["prefix_out"], "B")],
            ["stored per frame, bf16 / fp8 K/V", f"{si(by['stored_bf16'], 'B')} / {si(by['stored_fp8'], 'B')}"]]
    out.append(table(rows, ["bytes per frame", ""]))
    out.append("")
    rows = []
    for q in r["per_question"]:
        for name in ("exact", "budget"):
            d = q[name]
            lb = d["h100_lower_bound_s"]
            rows.append([f"{q['frames']:,} {name}", si(d["cache_bytes_read_bf16"], "B"),
                         si(d["cache_bytes_read_fp8kv"], "B"), f"{lb['compute'] * 1e3:.0f} ms",
                         f"{lb['cache_from_host_bf16'] * 1e3:.0f} ms", f"{lb['cache_from_host_fp8kv'] * 1e3:.0f} ms",
                         f"{lb['cache_from_hbm_bf16'] * 1e3:.0f} ms"])
    out.append(table(rows, ["per question", "cache read bf16", "fp8 K/V", "H100 compute (causal)",
                            "host link bf16", "host link fp8", "HBM bf16"],
                     f"Bytes read from the frame cache per question, and lower bounds on an H100 "
                     f"({H100_PEAK_TFLOPS:.0f} TFLOP/s, {HOST_LINK_GBPS:.0f} GB/s host link, "
                     f"{H100_HBM_GBPS / 1e3:.2f} TB/s HBM):"))
    rows = []
    for q in r["per_question"]:
        p = q["projection_llm_prefix_cache"]
        rows.append([f"{q['frames']:,}", si(q["exact"]["formula_causal"]), si(p["exact"]["formula_causal"]),
                     f"{p['exact']['h100_compute_s'] * 1e3:.0f} ms", si(q["budget"]["formula_causal"]),
                     si(p["budget"]["formula_causal"]), f"{p['budget']['h100_compute_s'] * 1e3:.0f} ms"])
    out.append("")
    out.append(table(rows, ["frames", "exact (causal)", "exact, LLM prefix cached", "H100 compute",
                            "budget (causal)", "budget, LLM prefix cached", "H100 compute"],
                     "Projection, formula only (not an engine path today): a repeated question over the same frames "
                     "if the LLM keys/values of [prefix rows, frame tokens] were kept, so that only the question's "
                     "rows run through the LLM:"))
    out.append(f"\n({r['seconds']:.1f} s on this machine)")
    return "\n".join(out)


def run(args) -> int:
    from .common import tiny_configs
    cfg, vcfg = tiny_configs() if args.tiny else (None, None)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if not args.json else None
    r = measure(cfg, vcfg, frames=parse_ints(args.frames), budget=args.budget, prefix_rows=args.prefix_rows,
                question_rows=args.question_rows, log=log)
    emit(r, render(r), args.json, args.out)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.flops", description=__doc__.splitlines()[0])
    flops_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
