"""Tiny checkpoints in the official LLaVA-Mini layout, made here (no weights can be downloaded).

`make_tiny_checkpoint(dir)` writes what the released checkpoint has, at toy
sizes: config.json (model_type llava_mini_llama, the Llama and mm fields),
model.safetensors (or shards with model.safetensors.index.json),
generation_config.json, a word-level tokenizer built with `tokenizers`
(tokenizer.json + tokenizer_config.json with a Llama-3 chat template), and
a CLIP vision tower in its own folder (HF CLIPVisionModel layout). Tests load
these through the real loader; the main job uses one until a trained demo
checkpoint exists, and says its answers are noise.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import MODEL_TYPE
from .prompt import DEFAULT_SYSTEM, LLAMA3_TEMPLATE

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<unk>", "<pad>"]
BASE_WORDS = ("what is in the video ? describe it . how many objects are there which colour shape yes no "
              "when did appear first a an of and or red green blue yellow white circle square triangle "
              "one two three four five system user assistant").split()


def words_of(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def build_tokenizer(out: Path, words: list[str], max_len: int = 4096, join_digits: bool = False) -> dict[str, int]:
    """A word-level tokenizer (lower-cased words and punctuation) in HF fast-tokenizer files. `join_digits`:
    numbers are written one digit a token (the demo's), so decoding joins runs of digits back
    (`"lmstream_join_digits": true` in tokenizer_config.json, read by `LlavaMini.detokenize`)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    vocab: dict[str, int] = {"!": 0}                     # id 0 is a real token, as in Llama 3 ("!")
    for w in SPECIALS + sorted(set(words) | set(BASE_WORDS) | set(words_of(DEFAULT_SYSTEM))):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, vocab[bos])])
    tok.decoder = None
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|eot_id|>",
        "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": max_len,
        "clean_up_tokenization_spaces": False, "chat_template": LLAMA3_TEMPLATE,
        **({"lmstream_join_digits": True} if join_digits else {})}, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": "<|eot_id|>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=1))
    return vocab


def make_clip(folder: Path, *, hidden: int = 64, layers: int = 3, heads: int = 4, image_size: int = 56,
              patch: int = 14, seed: int = 0, dtype=torch.float32) -> Path:
    """A random CLIP vision tower saved in the HF CLIPVisionModel layout."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, image_size=image_size, patch_size=patch,
                          projection_dim=hidden)
    clip = CLIPVisionModel(vc).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    import transformers
    transformers.utils.logging.disable_progress_bar()
    clip.save_pretrained(str(folder), safe_serialization=True)
    readable(folder)
    from .vision import CLIP_MEAN, CLIP_STD
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": image_size, "width": image_size}, "size": {"shortest_edge": image_size},
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_center_crop": True,
        "do_normalize": True, "do_resize": True, "image_processor_type": "CLIPImageProcessor"}, indent=1))
    return folder


def tiny_config(vocab_size: int, *, hidden=64, layers=2, heads=4, kv_heads=2, inter=128, prefusion=4,
                compressor_size=1, vision_width=64, vision_tower="clip-vision", dtype="float32",
                max_pos=8192, bos=None, eos=None, rope_scaling="llama3") -> dict:
    rs = None
    if rope_scaling == "llama3":
        rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 1024}
    return {
        "architectures": ["LlavaMiniLlamaForCausalLM"], "model_type": MODEL_TYPE,
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": rs, "max_position_embeddings": max_pos, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": dtype,
        "pretraining_tp": 1, "use_cache": True,
        "mm_vision_tower": vision_tower, "mm_hidden_size": vision_width, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad", "compressor_size": compressor_size, "prefusion_layer_num": prefusion,
        "resolution_ratio": 1, "tokenizer_model_max_length": max_pos, "tokenizer_padding_side": "right",
        "use_mm_proj": True, "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
    }


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux 4.7+): setting
    it to read it would, for a moment, change the mode of files other threads create."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    import os
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def readable(*paths: Path) -> None:
    """Give written weight files the mode any other file made here gets (0666 less the umask).
    safetensors writes through a private temporary file, so its files came out 0600: a checkpoint
    made by one user (train_demo, blend, widen) could not be served by another (a Ray worker, a
    container user) that reads the rest of the folder. Folders are walked for *.safetensors."""
    import os
    mask = _umask()
    for p in paths:
        for f in (sorted(Path(p).rglob("*.safetensors")) if Path(p).is_dir() else [Path(p)]):
            os.chmod(f, 0o666 & ~mask)


def write_safetensors(sd: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file`, then the file made `readable`: every weight file written here."""
    from safetensors.torch import save_file
    save_file(sd, str(path), metadata=metadata or {"format": "pt"})
    readable(path)


def save_weights(out: Path, sd: dict[str, torch.Tensor], shards: int = 1) -> None:
    sd = {k: v.contiguous() for k, v in sd.items()}
    if shards <= 1:
        write_safetensors(sd, out / "model.safetensors")
        return
    keys = sorted(sd)
    wm = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::shards]}
        write_safetensors(part, out / name)
        wm.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": wm}, indent=1))


def random_state_dict(cfg: dict, seed: int = 0, std: float = 0.08) -> dict[str, torch.Tensor]:
    """Random weights for every key of the official layout (float32)."""
    from .config import LlavaMiniConfig
    from .llava_mini import LlavaMiniNet
    torch.manual_seed(seed)
    net = LlavaMiniNet(LlavaMiniConfig.from_dict(cfg), cfg["mm_hidden_size"])
    sd = {}
    for k, v in net.state_dict().items():
        if k.endswith("compressor.pos_embed"):
            sd[k] = v.clone()                               # the fixed sin-cos table, as trained models keep it
        elif k.endswith(("norm.weight", "layernorm.weight", "ln_q.weight", "ln_kv.weight")):
            sd[k] = 1.0 + 0.1 * torch.randn_like(v)
        elif k.endswith("bias"):
            sd[k] = 0.02 * torch.randn_like(v)
        else:
            sd[k] = std * torch.randn_like(v)
    return sd


def make_tiny_checkpoint(out_dir, *, seed: int = 0, dtype: torch.dtype = torch.float32, shards: int = 1,
                         vision_keys_in_checkpoint: bool = False, clip_kwargs: dict | None = None,
                         words: list[str] | None = None, **cfg_kwargs) -> Path:
    """Write a random tiny LLaVA-Mini in the official layout; returns the folder.

    The vision tower goes to `<out_dir>/clip-vision` and config.json names it there."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out, words or [])
    ck = dict(clip_kwargs or {})
    width = ck.setdefault("hidden", cfg_kwargs.pop("vision_width", 64))
    clip_dir = make_clip(out / "clip-vision", seed=seed + 1, dtype=dtype, **ck)
    dname = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    eos = [vocab["<|eot_id|>"], vocab["<|end_of_text|>"]]
    cfg = tiny_config(len(vocab), vision_width=width, dtype=dname, bos=vocab["<|begin_of_text|>"], eos=eos,
                      vision_tower="clip-vision", **cfg_kwargs)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos, "do_sample": False}, indent=1))
    sd = {k: v.to(dtype) for k, v in random_state_dict(cfg, seed).items()}
    if vision_keys_in_checkpoint:
        from safetensors.torch import load_file
        for k, v in load_file(str(clip_dir / "model.safetensors")).items():
            sd["model.vision_tower.vision_tower." + k] = v
    save_weights(out, sd, shards)
    return out
