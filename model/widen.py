"""Widen a demo checkpoint's vision tower and compressor, keeping what the model computes.

    python -m model.widen IN_DIR --out OUT_DIR [--factor 2] [--noise 0.01] [--seed 0]

The frame token is made by the CLIP-like tower (width D), the compressor (width D) and the
projector's first layer (D -> H). Every unit of the tower's residual stream, of its attention
and MLP, and of the compressor is repeated `factor` times (Net2WiderNet, Chen, Goodfellow and
Shlens, ICLR 2016), and the weights that read repeated units are divided by `factor`, so that:

- the residual stream of width k*D holds each old unit k times (concatenated: unit j + i*D is
  unit j), and LayerNorm over it gives the same normalised values (a repeated vector has the
  same mean and variance);
- each attention head keeps its place (same number of heads, k times their width); the query
  and key projections are scaled by k**-1/4 so that the scores, divided by sqrt(k * head dim)
  instead of sqrt(head dim), are the same;
- the MLP's hidden units are repeated too (intermediate size k times as large);
- the compressor's query, position table, LayerNorms and attention are widened the same way
  (its position table is stored in the checkpoint, as the official Resampler's is);
- the projector's first layer reads k*D inputs, each old column divided by k.

With `noise` 0 the widened checkpoint answers exactly as the input does (to float rounding:
`test_widen_keeps_what_the_model_computes`). Repeated units get the same gradients and would
stay copies forever, so by default each widened tensor gets Gaussian noise of `noise` times its
own standard deviation, which moves the frame tokens a little (the log says how far); training
(stage 0t, `train_demo --tower-sets ... --clip-hidden k*D`) then has k times the width to
tell the objects of a crowded frame apart. The pre-fusion layers, the LLM, the tokenizer and
the projector's second layer are copied as they are.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .blend import copy_layout, save_weights, sha16, write_logs

WEIGHT_FILES = ("model.safetensors", "clip-vision/model.safetensors")


class WidenError(ValueError):
    """The checkpoint cannot be widened as asked (the message says why)."""


def _maps(k: int, d: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index maps from the widened units to the old ones: residual (concatenated copies) and
    attention (each head's k*hd units repeat that head's hd units)."""
    res = torch.arange(k * d) % d
    hd = d // heads
    r = torch.arange(k * d)
    att = (r // (k * hd)) * hd + (r % (k * hd)) % hd
    return res, att


def _linear(w: torch.Tensor, b: torch.Tensor | None, out_map, in_map, k_in: int, scale: float = 1.0):
    """A Linear layer whose outputs are repeated by `out_map` and whose inputs, repeated `k_in`
    times each by `in_map`, are each read with 1/k_in of the old weight."""
    w2 = w[out_map][:, in_map] * (scale / k_in) if in_map is not None else w[out_map] * scale
    return w2.contiguous(), (b[out_map] * scale).contiguous() if b is not None else None


def widen_tower(sd: dict[str, torch.Tensor], cfg: dict, k: int) -> dict[str, torch.Tensor]:
    """The CLIP vision tower's state dict (HF `CLIPVisionModel` names) widened k times."""
    d, heads, inter = cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]
    if d % heads:
        raise WidenError(f"clip-vision/config.json: expected hidden_size divisible by num_attention_heads, got "
                         f"{d} and {heads}")
    res, att = _maps(k, d, heads)
    mlp = torch.arange(k * inter) % inter
    alpha = k ** -0.25
    out = {}
    for name, v in sd.items():
        short = name.split("vision_model.", 1)[-1]
        if short.endswith(("layer_norm1.weight", "layer_norm1.bias", "layer_norm2.weight", "layer_norm2.bias",
                           "pre_layrnorm.weight", "pre_layrnorm.bias", "post_layernorm.weight",
                           "post_layernorm.bias", "class_embedding", "patch_embedding.weight")):
            out[name] = v[res].contiguous()
        elif short.endswith("position_embedding.weight"):
            out[name] = v[:, res].contiguous()
        elif short.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            out[name] = _linear(v, None, att, res, k, 1.0 if "v_proj" in short else alpha)[0]
        elif short.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            out[name] = (v[att] * (1.0 if "v_proj" in short else alpha)).contiguous()
        elif short.endswith("out_proj.weight"):
            out[name] = _linear(v, None, res, att, k)[0]
        elif short.endswith(("out_proj.bias", "fc2.bias")):
            out[name] = v[res].contiguous()
        elif short.endswith("fc1.weight"):
            out[name] = _linear(v, None, mlp, res, k)[0]
        elif short.endswith("fc1.bias"):
            out[name] = v[mlp].contiguous()
        elif short.endswith("fc2.weight"):
            out[name] = _linear(v, None, res, mlp, k)[0]
        elif short.endswith("position_ids"):
            out[name] = v
        else:
            raise WidenError(f"clip-vision/model.safetensors: {name} is not a tensor this tool knows how to widen")
    return out


def widen_model(sd: dict[str, torch.Tensor], d: int, heads: int, k: int) -> dict[str, torch.Tensor]:
    """model.safetensors widened where it reads the tower: the compressor and mm_projector.0."""
    res, att = _maps(k, d, heads)
    alpha = k ** -0.25
    out = dict(sd)
    c = "model.compressor."
    if c + "pos_embed" not in sd:
        # a checkpoint that leaves the fixed table out (the loader rebuilds it): build it here
        from .compressor import sincos_pos_embed_2d
        sd = {**sd, c + "pos_embed": torch.from_numpy(sincos_pos_embed_2d(d, 1))}
    for n in ("query", "pos_embed"):
        out[c + n] = sd[c + n][:, res].contiguous()
    for n in ("ln_q.weight", "ln_q.bias", "ln_kv.weight", "ln_kv.bias", "attn.out_proj.bias"):
        out[c + n] = sd[c + n][res].contiguous()
    w, b = sd[c + "attn.in_proj_weight"], sd[c + "attn.in_proj_bias"]
    ws, bs = [], []
    for i, scale in enumerate((alpha, alpha, 1.0)):                    # q, k, v stacked
        wi, bi = _linear(w[i * d:(i + 1) * d], b[i * d:(i + 1) * d], att, res, k, scale)
        ws.append(wi), bs.append(bi)
    out[c + "attn.in_proj_weight"], out[c + "attn.in_proj_bias"] = torch.cat(ws), torch.cat(bs)
    out[c + "attn.out_proj.weight"] = _linear(sd[c + "attn.out_proj.weight"], None, res, att, k)[0]
    p = "model.mm_projector.0.weight"
    out[p] = (sd[p][:, res] / k).contiguous()
    return out


def add_noise(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor], noise: float,
              gen: torch.Generator) -> int:
    """Gaussian noise of `noise` times each widened tensor's own standard deviation (in place).
    Returns how many tensors got it. Tensors left as they were, and the fixed position table, do not."""
    n = 0
    for name in sorted(new):
        v = new[name]
        if name.endswith(("pos_embed", "position_ids")) or not v.is_floating_point() or v.numel() < 2:
            continue
        if name in old and old[name].shape == v.shape:
            continue
        new[name] = v + torch.randn(v.shape, generator=gen, dtype=v.dtype) * (noise * float(v.std()))
        n += 1
    return n


def widen(src: Path, out: Path, factor: int = 2, noise: float = 0.01, seed: int = 0) -> dict:
    """Write the widened checkpoint to `out`; returns its `widen` log entry."""
    from safetensors.torch import load_file
    if factor < 2:
        raise WidenError(f"--factor: expected a whole number of 2 or more, got {factor}")
    if noise < 0:
        raise WidenError(f"--noise: expected 0 or more, got {noise}")
    missing = [f for f in WEIGHT_FILES + ("config.json", "clip-vision/config.json") if not (src / f).is_file()]
    if missing:
        raise WidenError(f"{src}: expected the demo checkpoint layout, missing {', '.join(missing)}")
    if out.resolve() == src.resolve():
        raise WidenError(f"--out {out}: expected a new folder, not the input")
    cfg = json.loads((src / "config.json").read_text())
    vcfg = json.loads((src / "clip-vision/config.json").read_text())
    d = vcfg["hidden_size"]
    if cfg.get("mm_hidden_size", d) != d:
        raise WidenError(f"config.json: expected mm_hidden_size equal to the tower's width {d}, got "
                         f"{cfg.get('mm_hidden_size')}")
    if cfg.get("compressor_size", 1) != 1:
        raise WidenError(f"config.json: expected compressor_size 1, got {cfg.get('compressor_size')}")
    heads = int(cfg.get("compressor_heads", 8))
    if d % heads:
        raise WidenError(f"expected the tower's width {d} divisible by the compressor's {heads} heads")
    old_t, old_m = load_file(str(src / WEIGHT_FILES[1])), load_file(str(src / WEIGHT_FILES[0]))
    new_t, new_m = widen_tower(old_t, vcfg, factor), widen_model(old_m, d, heads, factor)
    gen = torch.Generator().manual_seed(seed)
    noisy = add_noise(new_t, old_t, noise, gen) + add_noise(new_m, old_m, noise, gen) if noise else 0
    out.mkdir(parents=True, exist_ok=True)
    copy_layout(src, out, set(WEIGHT_FILES) | {"config.json", "clip-vision/config.json", "training_log.json", "train.log"})
    vcfg.update(hidden_size=factor * d, intermediate_size=factor * vcfg["intermediate_size"],
                projection_dim=factor * vcfg.get("projection_dim", d))
    cfg["mm_hidden_size"] = factor * d
    (out / "clip-vision").mkdir(parents=True, exist_ok=True)
    (out / "clip-vision/config.json").write_text(json.dumps(vcfg, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f, sd in ((WEIGHT_FILES[0], new_m), (WEIGHT_FILES[1], new_t)):
        save_weights(sd, src / f, out / f)
    entry = {"from": str(src), "model_safetensors_sha256_16": sha16(src / WEIGHT_FILES[0]),
             "factor": factor, "width": [d, factor * d], "noise": noise, "seed": seed, "noisy_tensors": noisy,
             "out_model_safetensors_sha256_16": sha16(out / WEIGHT_FILES[0])}
    log_p = src / "training_log.json"
    log = json.loads(log_p.read_text()) if log_p.is_file() else {}
    entry["weights_sha256_16"] = log.get("weights_sha256_16")     # the source's: it no longer names these weights
    log["weights_sha256_16"] = None
    log["widen"] = entry
    line = (f"[widen] {out}: {src}'s tower and compressor {d} -> {factor * d} wide, noise {noise:g} "
            f"({noisy} tensors); model.safetensors sha256 {entry['out_model_safetensors_sha256_16']}\n")
    write_logs(out, log, src / "train.log", line)
    return entry


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.widen", description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="a demo checkpoint folder")
    p.add_argument("--out", type=Path, required=True, help="the widened checkpoint's folder")
    p.add_argument("--factor", type=int, default=2, help="how many times wider (default 2)")
    p.add_argument("--noise", type=float, default=0.01,
                   help="Gaussian noise on each widened tensor, times its standard deviation (0: exact copy)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        widen(a.src, a.out, a.factor, a.noise, a.seed)
    except WidenError as e:
        print(f"python -m model.widen: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
