"""The CLIP vision tower: patch features of layer `mm_vision_select_layer`, CLS dropped.

Loaded from its own folder in the HF `CLIPVisionModel` layout (a full CLIP
folder such as openai/clip-vit-large-patch14-336 also works), offline. Only
the encoder layers up to the selected one run: with select layer -2 the last
layer's output is never used, so it is dropped (the official code computes it
and throws it away).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lmcore.errors import CheckpointError

from .config import LlavaMiniConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _has_weights(folder: Path) -> bool:
    return any((folder / n).exists() for n in (
        "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"))


def find_vision_tower(ckpt_dir: Path, cfg: LlavaMiniConfig, explicit: str | Path | None) -> Path:
    """The CLIP folder: the argument, else `mm_vision_tower` as a local path: absolute; else inside the
    checkpoint folder (as written, its last component, or `vision_tower`); only then relative to the
    current folder (the official config's hub id, `openai/clip-vit-large-patch14-336`, downloaded
    beside). The checkpoint's own tower wins over a same-named folder wherever the command runs."""
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.is_dir():
            raise CheckpointError(f"expected a CLIP vision tower folder, got no folder at {p}")
        if not (p / "config.json").exists() or not _has_weights(p):
            raise CheckpointError(
                f"expected {p} to hold config.json and model.safetensors or pytorch_model.bin "
                f"(HF CLIPVisionModel layout), found: {sorted(x.name for x in p.iterdir())[:10]}")
        return p
    name = cfg.mm_vision_tower
    if not name:
        raise CheckpointError("expected a vision tower: config.json has no mm_vision_tower and none was given")
    p = Path(name).expanduser()
    if p.is_absolute():
        cands = [p, ckpt_dir / p.name, ckpt_dir / "vision_tower"]
    else:
        cands = [ckpt_dir / p, ckpt_dir / p.name, ckpt_dir / "vision_tower", p]
    cands = list(dict.fromkeys(cands))          # one entry each ('clip-vision' is its own last component)
    for c in cands:
        if c.is_dir() and (c / "config.json").exists() and _has_weights(c):
            return c
    raise CheckpointError(
        f"expected the vision tower {name!r} named by config.json mm_vision_tower as a local folder, "
        f"got none (looked in {', '.join(str(c) for c in cands)}); pass vision_tower=DIR / --vision-tower DIR")


def preprocess_settings(folder: Path, image_size: int) -> dict:
    """size, mean and std for frames, from preprocessor_config.json when present (CLIP defaults otherwise)."""
    out = {"size": image_size, "mean": CLIP_MEAN, "std": CLIP_STD}
    f = folder / "preprocessor_config.json"
    if f.exists():
        d = json.loads(f.read_text())
        out["mean"] = tuple(d.get("image_mean", CLIP_MEAN))
        out["std"] = tuple(d.get("image_std", CLIP_STD))
        crop = d.get("crop_size", image_size)
        out["size"] = int(crop["height"] if isinstance(crop, dict) else crop)
    return out


class VisionTower(nn.Module):
    """pixels (B, 3, S, S) CLIP-normalized -> patch features (B, N, Dv), N = (S / patch)^2."""

    def __init__(self, clip: nn.Module, select_layer: int, folder: Path | None = None, truncate: bool = True):
        super().__init__()
        vcfg = clip.config
        n_layers = vcfg.num_hidden_layers
        keep = n_layers + 1 + select_layer if select_layer < 0 else select_layer
        if not 0 <= keep <= n_layers:
            raise CheckpointError(
                f"expected mm_vision_select_layer within the tower's {n_layers} layers, got {select_layer}")
        if truncate:
            enc = getattr(clip, "vision_model", clip).encoder     # transformers 4 nests, 5 does not
            enc.layers = enc.layers[:keep]
            self.index = -1
        else:
            self.index = select_layer
        self.clip = clip
        self.width = vcfg.hidden_size
        self.image_size = vcfg.image_size
        self.n_patches = (vcfg.image_size // vcfg.patch_size) ** 2
        self.preprocess = preprocess_settings(folder, vcfg.image_size) if folder else {
            "size": vcfg.image_size, "mean": CLIP_MEAN, "std": CLIP_STD}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        p = next(self.clip.parameters())
        out = self.clip(pixels.to(device=p.device, dtype=p.dtype), output_hidden_states=True)
        return out.hidden_states[self.index][:, 1:]                    # (B, N, Dv), CLS dropped


def load_clip(folder: Path, dtype: torch.dtype, device=None, attn: str = "eager") -> nn.Module:
    from transformers import CLIPVisionModel
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        clip, info = CLIPVisionModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype,
                                                     attn_implementation=attn, output_loading_info=True)
    except Exception as e:  # transformers raises many kinds; the user needs the one line
        raise CheckpointError(f"expected a loadable CLIP vision model in {folder}, got: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    # transformers fills missing weights with random ones and only logs it: refuse instead.
    bad = list(info.get("missing_keys") or []) + [str(m[0]) if isinstance(m, tuple) else str(m)
                                                   for m in info.get("mismatched_keys") or []]
    if bad:
        raise CheckpointError(f"expected every CLIP vision weight in {folder}, got {len(bad)} missing or "
                              f"mis-shaped, e.g. {bad[0]!r}")
    clip.eval().requires_grad_(False)
    return clip.to(device) if device is not None else clip
