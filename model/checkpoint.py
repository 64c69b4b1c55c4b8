"""Reading the official checkpoint layout from a local folder, strictly.

Layout (HF): config.json (model_type llava_mini_llama), weights as one
`model.safetensors` or shards listed in `model.safetensors.index.json`,
tokenizer files, optional generation_config.json. Every expected key must be
present with the expected shape; unknown keys are named in the error. Keys of
a vision tower saved inside the checkpoint (`model.vision_tower.*`) are
tolerated and ignored: the tower loads from its own folder, as officially.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lmcore.errors import CheckpointError
from lmcore.weights import weight_files      # torch-free: `lmstream serve` checks them before Ray starts

# Saved by the official code but unused by LLaVA-Mini's computation: the tower loads from its own
# folder; image_newline exists only for 'unpad' patch merging, which LLaVA-Mini does not use.
IGNORED_PREFIXES = ("model.vision_tower.", "model.image_newline")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_state_dict(ckpt: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, converted to `dtype` (integer tensors kept as they are)."""
    from safetensors import safe_open
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(ckpt):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    if k.startswith(IGNORED_PREFIXES):
                        continue
                    t = sf.get_tensor(k)
                    out[k] = t.to(dtype) if t.is_floating_point() else t
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"expected a readable safetensors file at {f}, got: {e}") from None
    return out


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], *, source: str,
                optional: set[str] = frozenset()) -> None:
    """Copy `sd` into `module`: every parameter present with its shape, no unknown keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd and k not in optional]
    unknown = [k for k in sd if k not in own and not k.endswith(IGNORED_SUFFIXES)]
    if missing:
        raise CheckpointError(f"expected key {missing[0]!r} in {source}, it is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unknown:
        raise CheckpointError(f"expected only LLaVA-Mini keys in {source}, got unknown key {unknown[0]!r}"
                              + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    for k, p in own.items():
        if k not in sd:
            continue
        if tuple(sd[k].shape) != tuple(p.shape):
            raise CheckpointError(
                f"expected {k!r} of shape {tuple(p.shape)} (from config.json), got {tuple(sd[k].shape)} in {source}")
    with torch.no_grad():
        for k, p in own.items():
            if k in sd:
                p.copy_(sd[k])


def stop_ids(ckpt: Path, cfg_eos: list[int], vocab: int) -> list[int]:
    """Generation stop ids as HF generate takes them: generation_config.json, else config.json."""
    ids = list(cfg_eos)
    gc = ckpt / "generation_config.json"
    if gc.exists():
        v = json.loads(gc.read_text()).get("eos_token_id")
        if v is not None:
            ids = [v] if isinstance(v, int) else list(v)
    return [i for i in ids if 0 <= i < vocab]


def load_tokenizer(ckpt: Path):
    """The checkpoint's tokenizer, offline; None when the folder has none. Raises CheckpointError
    when files are there but unreadable (the caller decides whether that is fatal)."""
    if not any((ckpt / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    import transformers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    transformers.logging.set_verbosity_error()
    # tokenizer.json is read directly: AutoTokenizer would consult config.json, whose
    # model_type (llava_mini_llama) transformers does not know.
    cls = PreTrainedTokenizerFast if (ckpt / "tokenizer.json").exists() else AutoTokenizer
    try:
        return cls.from_pretrained(str(ckpt), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"expected a loadable tokenizer in {ckpt}, got: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
