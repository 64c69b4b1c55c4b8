"""CPU wall clock at a small configuration, every comparison against a baseline timed in the same run.

    python -m benchmarks.cpu [--repeats 5] [--frames 16,64,256,1024] [--official-frames 16,64,256]
                             [--budget 64] [--plot out/bench_cpu.png] [--json] [--out FILE]
    lmstream bench cpu ...

1. Ingest frames/s. Ours: `LlavaMini.encode_frames` at batch 16 and 32 (CLIP up to the selected
   layer, the absorbed compressor, the prefix fused at ingest). Against two per-frame loops:
   * "official-style loop": `OracleLlavaMini._frame` one frame at a time (what the official code
     runs per frame: every CLIP layer, nn.MultiheadAttention, the projector, transformers'
     LlamaDecoderLayer with eager attention and a 4-D mask) over the same rows ours caches
     (the vision rows and the prompt prefix, plus the masked placeholder row);
   * "engine, batch 1": our `encode_frames` with batch_size=1, the MHA compressor and every CLIP
     layer, which isolates what batching alone buys.
   Variants run interleaved (A B C D A B C D ...) and the medians are reported.
2. Question latency (time to the first token) as frames grow: ours exact and ours under a budget
   (`generate(..., max_new_tokens=1)`: fuse + LLM prefill + the first pick), against the official
   path (`OracleLlavaMini.generate`, which re-encodes every frame for the question) at the smaller
   frame counts only. The T-frame states are 64 encoded frames repeated (costs depend on shapes
   only); the official path gets the same 64 frames repeated as pixels.

Threads: one by default. On a machine whose cores are shared with another busy process, torch's
OpenMP workers wait at every operator's barrier for a descheduled sibling; measured here (2 cores,
a training job running) that made every path 15-70x slower, the many-small-operator per-frame
loops most of all, so the batched/per-frame ratio then measures the scheduler, not the code.
One thread measures the computation. `--threads 0` keeps torch's default.

The checkpoint is a random one in the official layout made with `model.tiny.make_tiny_checkpoint`
(float32), large enough that matrix products, not Python, dominate the larger batches.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import formulas as F
from .cli import cpu_arguments
from .common import emit, machine, median, parse_ints, reference_kernels, table

SMALL = dict(hidden=256, layers=8, heads=8, kv_heads=2, inter=896, prefusion=4)
SMALL_CLIP = dict(hidden=256, layers=6, heads=4, image_size=112, patch=14)
QUESTION = ("what is in the video ? describe it . how many objects are there which colour shape "
            "when did appear first and what red green circle square")


def shapes_from(ckpt: Path) -> tuple[dict, dict]:
    """LLM and CLIP sizes of a checkpoint folder (e.g. the demo model), for a random model of its shapes."""
    import json
    c = json.loads((Path(ckpt) / "config.json").read_text())
    v = json.loads((Path(ckpt) / "clip-vision" / "config.json").read_text())
    v = v.get("vision_config", v)
    llm = dict(hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
               kv_heads=c["num_key_value_heads"], inter=c["intermediate_size"],
               prefusion=c.get("prefusion_layer_num", 4))
    clip = dict(hidden=v["hidden_size"], layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
                image_size=v["image_size"], patch=v["patch_size"])
    return llm, clip


def build(folder: Path, seed: int = 0, shapes: tuple[dict, dict] | None = None):
    from model import LlavaMini
    from model.oracle import OracleLlavaMini
    from model.tiny import make_tiny_checkpoint
    from model.vision import VisionTower, load_clip
    llm, clip = shapes or (SMALL, SMALL_CLIP)
    ckpt = make_tiny_checkpoint(folder, seed=seed, clip_kwargs=dict(clip), **llm)
    m = LlavaMini.from_pretrained(ckpt, dtype=torch.float32, batch_size=16)
    clip_dir = ckpt / "clip-vision"
    full = VisionTower(load_clip(clip_dir, torch.float32), m.cfg.mm_vision_select_layer, clip_dir, truncate=False)
    per_frame = LlavaMini(m.net, full, m.cfg, m.tokenizer, m.stop_token_ids, batch_size=1, name="engine-bs1")
    oracle = OracleLlavaMini.from_pretrained(ckpt, dtype=torch.float32)
    return m, per_frame, oracle


def _shapes(m):
    return F.Shapes.of(m.cfg, m.vision.clip.config)


def bench_ingest(m, per_frame, oracle, n_frames: int, repeats: int, log) -> dict:
    from model.config import IMAGE_TOKEN_INDEX
    S = m.vision.image_size
    px = torch.randn(n_frames, 3, S, S, generator=torch.Generator().manual_seed(0))
    prefix = m.default_prefix_ids
    frame_ids = torch.tensor([list(prefix) + [IMAGE_TOKEN_INDEX]])
    comp = m.net.model.compressor

    def official():
        for i in range(n_frames):
            oracle._frame(px[i:i + 1], frame_ids)

    def engine_bs1():
        comp.mode = "mha"
        try:
            per_frame.encode_frames(px, batch_size=1, progress=False)
        finally:
            comp.mode = "absorbed"

    def ours(bs):
        return lambda: m.encode_frames(px, batch_size=bs, progress=False)

    variants = {"official-style loop (batch 1)": official, "engine, batch 1, MHA, all CLIP layers": engine_bs1,
                "ours, batch 16": ours(16), "ours, batch 32": ours(32)}
    s = _shapes(m)
    P = len(prefix)
    C = s.vision_rows + P
    flops = {"official-style loop (batch 1)": F.official_frame(s, P + 1),          # + the masked placeholder row
             "engine, batch 1, MHA, all CLIP layers": (F.clip(s, s.clip_layers) + F.compressor_mha(s)
                                                       + F.projector(s, s.vision_rows)
                                                       + s.prefusion * F.llama_layer(s, C, C)),
             "ours, batch 16": F.ingest_frame(s, P), "ours, batch 32": F.ingest_frame(s, P)}
    with torch.no_grad():
        for fn in variants.values():          # warm-up: allocator, absorbed tables, first-call costs
            fn()
        runs = {k: [] for k in variants}
        for r in range(repeats):
            for name, fn in variants.items():
                t = time.perf_counter()
                fn()
                runs[name].append(n_frames / (time.perf_counter() - t))
            log(f"ingest repeat {r + 1}/{repeats}: " + ", ".join(f"{k.split(',')[0]} {v[-1]:.1f}"
                                                                  for k, v in runs.items()))
    out = {name: {"frames_per_s": median(v), "runs": v, "flops_per_frame": flops[name],
                  "gflops_per_s": median(v) * flops[name] / 1e9} for name, v in runs.items()}
    base = out["official-style loop (batch 1)"]["frames_per_s"]
    base1 = out["engine, batch 1, MHA, all CLIP layers"]["frames_per_s"]
    for name in variants:
        out[name]["speedup_vs_official_loop"] = out[name]["frames_per_s"] / base
        out[name]["speedup_vs_engine_batch1"] = out[name]["frames_per_s"] / base1
    return {"frames_per_measurement": n_frames, "repeats": repeats, "variants": out}


def bench_latency(m, oracle, frames: list[int], official_frames: list[int], budget: int, repeats: int,
                  log) -> dict:
    S = m.vision.image_size
    base_n = 64
    px = torch.randn(base_n, 3, S, S, generator=torch.Generator().manual_seed(1))
    ids = m.prompt_ids(QUESTION)
    with torch.no_grad():
        base = m.encode_frames(px, batch_size=32, progress=False)
    rows = []
    for T in frames:
        idx = torch.arange(T) % base_n
        states = base.select(idx)
        images = px[idx][None, :, None]                 # (1, T, 1, 3, S, S) as the official video call
        res = {"exact": [], "budget": [], "official": [], "exact_fuse": [], "exact_prefill": [],
               "budget_fuse": [], "budget_prefill": [], "context": [], "context_fuse": [], "context_prefill": []}
        with torch.no_grad():
            t = time.perf_counter()
            ctx = m.prepare_context(states, "exact")      # once per video: the LLM over prefix + frame tokens
            prepare_s = time.perf_counter() - t

        def repeated():                                   # a further question over the same frames
            info = {}
            t = time.perf_counter()
            m.generate(ids, ctx, max_new_tokens=1, _info=info)
            res["context"].append(time.perf_counter() - t)
            res["context_fuse"].append(info["fuse_s"])
            res["context_prefill"].append(info["prefill_s"])

        def ours(policy, key):
            info = {}
            t = time.perf_counter()
            m.generate(ids, states, max_new_tokens=1, policy=policy, _info=info)
            res[key].append(time.perf_counter() - t)
            res[key + "_fuse"].append(info["fuse_s"])
            res[key + "_prefill"].append(info["prefill_s"])
            return info

        with torch.no_grad():
            ours("exact", "exact")                       # warm-up at this size
            for key in res:
                res[key].clear()
            for _ in range(repeats):
                ours("exact", "exact")
                info = ours(f"budget:{budget}", "budget")
                repeated()
                if T in official_frames:
                    t = time.perf_counter()
                    oracle.generate(ids, images, max_new_tokens=1)
                    res["official"].append(time.perf_counter() - t)
        row = {"frames": T, "llm_tokens": ids.shape[1] - 1 + T, "budget_policy": info["policy"],
               "context_prepare_s": prepare_s}
        row.update({k + "_s": (median(v) if v else None) for k, v in res.items()})
        row["official_over_exact"] = row["official_s"] / row["exact_s"] if row["official_s"] else None
        rows.append(row)
        log(f"latency T={T}: exact {row['exact_s']:.3f} s, budget {row['budget_s']:.3f} s, "
            f"repeated (context) {row['context_s']:.3f} s"
            + (f", official {row['official_s']:.3f} s" if row["official_s"] else ""))
    return {"question_rows": int((ids[0] > 0).sum()) - len(m.default_prefix_ids), "prompt_len": ids.shape[1],
            "budget": budget, "repeats": repeats, "rows": rows}


def plot(lat: dict, path: str | Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = lat["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    T = [r["frames"] for r in rows]
    ax.plot(T, [r["exact_s"] for r in rows], "o-", label="ours, exact")
    ax.plot(T, [r["budget_s"] for r in rows], "s-", label=f"ours, budget:{lat['budget']}")
    if all(r.get("context_s") for r in rows):
        ax.plot(T, [r["context_s"] for r in rows], "d-", label="ours, exact, repeated question (prepared context)")
    off = [(r["frames"], r["official_s"]) for r in rows if r["official_s"]]
    if off:
        ax.plot(*zip(*off), "^-", label="official path (re-encodes every frame)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("frames in the video")
    ax.set_ylabel("time to first token (s)")
    ax.set_title("Question latency, small config, CPU (same run)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    plt.close(fig)
    return str(p)


def render(r: dict) -> str:
    c, mach = r["config"], r["machine"]
    out = [f"CPU: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} ({mach['threads']} threads); "
           f"small config: LLM H={c['hidden']} x {c['layers']} layers ({c['heads']} heads, {c['kv_heads']} kv), "
           f"MLP {c['intermediate']}, {c['prefusion_layers']} pre-fusion layers; CLIP width {c['clip_width']} x "
           f"{c['clip_layers']} layers, {c['patches']} patches; float32; prefix {c['prefix_rows']} rows.", ""]
    ing = r["ingest"]
    rows = [[k, f"{v['frames_per_s']:.1f}", f"{v['gflops_per_s']:.1f}", f"{v['speedup_vs_official_loop']:.2f}x",
             f"{v['speedup_vs_engine_batch1']:.2f}x", " ".join(f"{x:.1f}" for x in v["runs"])]
            for k, v in ing["variants"].items()]
    out.append(table(rows, ["ingest", "frames/s (median)", "GFLOP/s", "vs official loop", "vs engine bs1", "runs"],
                     f"Ingest, {ing['frames_per_measurement']} frames per measurement, {ing['repeats']} interleaved "
                     f"repeats:"))
    out.append("")
    lat = r["latency"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    rows = [[f"{x['frames']:,}", fmt(x["exact_s"]), f"{fmt(x['exact_fuse_s'])} + {fmt(x['exact_prefill_s'])}",
             fmt(x["budget_s"]), x["budget_policy"], fmt(x.get("context_s")), fmt(x.get("context_prepare_s")),
             fmt(x["official_s"]),
             "-" if x["official_over_exact"] is None else f"{x['official_over_exact']:.1f}x"] for x in lat["rows"]]
    out.append(table(rows, ["frames", "exact (s)", "fuse + prefill", "budget (s)", "budget policy",
                            "repeated, exact (s)", "context once (s)", "official (s)", "official/exact"],
                     f"Time to first token (median of {lat['repeats']}), {lat['question_rows']} question rows, "
                     f"prompt {lat['prompt_len']} tokens:"))
    if r.get("plot"):
        out.append(f"\nplot: {r['plot']}")
    return "\n".join(out)


def measure(repeats: int = 5, frames=(16, 64, 256, 1024), official_frames=(16, 64, 256), budget: int = 64,
            ingest_frames: int = 32, plot_path: str | None = "out/bench_cpu.png", log=None, workdir=None,
            shapes_from_dir: str | None = None) -> dict:
    log = log or (lambda *a: None)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, reference_kernels(), torch.no_grad():
        shapes = shapes_from(Path(shapes_from_dir)) if shapes_from_dir else None
        m, per_frame, oracle = build(Path(workdir or tmp) / "small", shapes=shapes)
        log(f"built the small checkpoint ({time.perf_counter() - t0:.1f} s)")
        s = _shapes(m)
        config = {"hidden": s.H, "layers": s.layers, "heads": s.nh, "kv_heads": s.nkv, "intermediate": s.I,
                  "prefusion_layers": s.prefusion, "clip_width": s.E,
                  "clip_layers": s.clip_layers, "patches": s.N, "prefix_rows": len(m.default_prefix_ids)}
        ingest = bench_ingest(m, per_frame, oracle, ingest_frames, repeats, log)
        lat = bench_latency(m, oracle, list(frames), list(official_frames), budget, max(1, repeats // 2 + 1), log)
    config["shapes_from"] = shapes_from_dir or "benchmarks.cpu.SMALL"
    r = {"machine": machine(), "config": config, "ingest": ingest, "latency": lat,
         "note": "wall clock on a shared machine: compare only numbers from the same run",
         "seconds": time.perf_counter() - t0}
    if plot_path:
        r["plot"] = plot(lat, plot_path)
    return r


def run(args) -> int:
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.repeats, parse_ints(args.frames), parse_ints(args.official_frames), args.budget,
                args.ingest_frames, args.plot or None, log, shapes_from_dir=args.shapes_from)
    emit(r, render(r), args.json, args.out)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu", description=__doc__.splitlines()[0])
    cpu_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
