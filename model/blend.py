"""Blend two demo checkpoints in weight space: a fine-tune and the checkpoint it started from.

    python -m model.blend --base BASE_DIR --tuned TUNED_DIR --weight 0.5 --out DIR

Every tensor of the output is `(1 - weight) * base + weight * tuned` (weight 0: the base, 1: the
fine-tune); a tensor the two hold bit for bit the same is copied as it is. This is weight-space
ensembling of a fine-tune with its starting point (WiSE-FT, Wortsman et al., CVPR 2022): where a
fine-tune gains one skill and loses a little of another, a point on the line between the two
often keeps most of the gain and most of what was lost. It only makes sense for two checkpoints
of the same architecture where one was trained from the other (`train_demo --init-from`), so
the tool refuses anything else by name: other configs, other tokenizers, other tensor names,
shapes or dtypes.

The output is a complete checkpoint in the official layout (the fine-tune's config, tokenizer
and CLIP folder, the CLIP tower blended the same way). Its `training_log.json` is the
fine-tune's log with a `blend` entry naming both inputs (path and model.safetensors sha256),
the weight, how many tensors were blended and how many copied, and the output's sha256; the
fine-tune's own `weights_sha256_16` moves into that entry, since it no longer names these
weights.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from .tiny import write_safetensors

WEIGHT_FILES = ("model.safetensors", "clip-vision/model.safetensors")
SAME_FILES = ("config.json", "tokenizer.json", "clip-vision/config.json")
SKIP = set(WEIGHT_FILES) | {"training_log.json", "train.log"}


class BlendError(ValueError):
    """The two checkpoints cannot be blended (the message says what differs)."""


def sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def copy_layout(src: Path, out: Path, skip: set[str]) -> None:
    """Copy `src`'s files into `out` (folders made), all but the relative paths in `skip` and
    `history/` (earlier checkpoints' logs stay with the checkpoint they belong to)."""
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src).as_posix()
        if f.is_file() and rel not in skip and not rel.startswith("history/"):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out / rel)


def save_weights(sd: dict[str, torch.Tensor], like: Path, path: Path) -> None:
    """Save `sd` at `path` as safetensors with the metadata of the file `like`."""
    from safetensors import safe_open
    with safe_open(str(like), "pt") as fh:
        meta = fh.metadata()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(sd, path, meta)


def write_logs(out: Path, log: dict, prior_train_log: Path, line: str) -> None:
    """`out`'s training_log.json (`log`) and train.log (`prior_train_log`'s text, if any, then
    `line`), and `line` on stderr."""
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    (out / "train.log").write_text((prior_train_log.read_text() if prior_train_log.is_file() else "") + line)
    sys.stderr.write(line)


def check_folder(d: Path, role: str) -> None:
    if not d.is_dir():
        raise BlendError(f"--{role} {d}: expected a checkpoint folder, found no folder there")
    missing = [f for f in WEIGHT_FILES + SAME_FILES if not (d / f).is_file()]
    if missing:
        raise BlendError(f"--{role} {d}: expected the demo checkpoint layout, missing {', '.join(missing)}")


def blend_tensors(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], weight: float,
                  what: str) -> tuple[dict[str, torch.Tensor], int, int]:
    """(1 - weight) * base + weight * tuned per tensor; equal tensors copied. Returns the blended
    tensors, how many were blended and how many copied."""
    if set(base) != set(tuned):
        only_b = sorted(set(base) - set(tuned))[:5]
        only_t = sorted(set(tuned) - set(base))[:5]
        raise BlendError(f"{what}: expected the same tensor names in both, base alone has {only_b}, "
                         f"tuned alone has {only_t}")
    out, blended, copied = {}, 0, 0
    for k in sorted(base):
        a, b = base[k], tuned[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise BlendError(f"{what}: {k} expected the same shape and dtype, base {tuple(a.shape)} {a.dtype}, "
                             f"tuned {tuple(b.shape)} {b.dtype}")
        if torch.equal(a, b):
            out[k] = a
            copied += 1
        else:
            if not a.is_floating_point():
                raise BlendError(f"{what}: {k} differs but is {a.dtype}, which cannot be blended")
            out[k] = ((1 - weight) * a + weight * b).contiguous()
            blended += 1
    return out, blended, copied


def blend(base: Path, tuned: Path, weight: float, out: Path) -> dict:
    """Write the blended checkpoint to `out` and return its `blend` log entry."""
    from safetensors.torch import load_file
    if not 0.0 <= weight <= 1.0:
        raise BlendError(f"--weight: expected a number from 0 to 1, got {weight}")
    check_folder(base, "base")
    check_folder(tuned, "tuned")
    if out.resolve() in (base.resolve(), tuned.resolve()):
        raise BlendError(f"--out {out}: expected a new folder, not one of the inputs")
    for f in SAME_FILES:
        if json.loads((base / f).read_text()) != json.loads((tuned / f).read_text()):
            raise BlendError(f"{f}: expected the same in both checkpoints (a fine-tune of the base), they differ")
    # every tensor blended (and so every check passed) before anything is written to `out`
    blends = {f: blend_tensors(load_file(str(base / f)), load_file(str(tuned / f)), weight, f) for f in WEIGHT_FILES}
    logs = {d: json.loads((d / "training_log.json").read_text()) if (d / "training_log.json").is_file() else {}
            for d in (base, tuned)}
    entry = {"formula": "(1 - weight) * base + weight * tuned per tensor; equal tensors copied", "weight": weight}
    for role, d in (("base", base), ("tuned", tuned)):
        entry[role] = {"path": str(d), "model_safetensors_sha256_16": sha16(d / "model.safetensors"),
                       "weights_sha256_16": logs[d].get("weights_sha256_16")}
    entry["files"] = {}
    out.mkdir(parents=True, exist_ok=True)
    copy_layout(tuned, out, SKIP)
    for f, (sd, blended, copied) in blends.items():
        save_weights(sd, tuned / f, out / f)
        entry["files"][f] = {"blended": blended, "copied": copied, "sha256_16": sha16(out / f)}
    entry["model_safetensors_sha256_16"] = entry["files"]["model.safetensors"]["sha256_16"]
    log = logs[tuned]
    log["blend"] = entry
    log["weights_sha256_16"] = None          # the fine-tune's hash is entry["tuned"]["weights_sha256_16"]
    line = (f"[blend] {out}: {weight:g} x {tuned} + {1 - weight:g} x {base}; "
            + "; ".join(f"{f}: {v['blended']} tensors blended, {v['copied']} equal" for f, v in entry["files"].items())
            + f"; model.safetensors sha256 {entry['model_safetensors_sha256_16']}\n")
    write_logs(out, log, tuned / "train.log", line)
    return entry


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.blend", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="the checkpoint the fine-tune started from")
    p.add_argument("--tuned", type=Path, required=True, help="the fine-tune (train_demo --init-from BASE)")
    p.add_argument("--weight", type=float, default=0.5, help="the fine-tune's share, 0 to 1 (default 0.5)")
    p.add_argument("--out", type=Path, required=True, help="the blended checkpoint's folder")
    a = p.parse_args(argv)
    try:
        blend(a.base, a.tuned, a.weight, a.out)
    except BlendError as e:
        print(f"python -m model.blend: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
