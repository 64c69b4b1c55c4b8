"""Configuration of a LLaVA-Mini checkpoint, read from the official config.json.

The released checkpoint (`ICTNLP/llava-mini-llama-3.1-8b`) stores a LlamaConfig
plus the multimodal fields written by the LLaVA-Mini training code. We read
only what the computation needs and check it, so a wrong checkpoint fails here
with a message that names the field, not deep inside a matmul.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmcore.errors import CheckpointError

MODEL_TYPE = "llava_mini_llama"
IMAGE_TOKEN_INDEX = -200          # the <image> placeholder id in input_ids (official constant)
DEFAULT_IMAGE_TOKEN = "<image>"
# Llama 3.1 stop ids: <|eot_id|>, <|eom_id|>, <|end_of_text|> (official generation config)
LLAMA31_STOP_IDS = (128009, 128008, 128001)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "mm_hidden_size",
                  "compressor_size", "prefusion_layer_num", "compressor_heads", "tokenizer_model_max_length")
_POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta")


def _json_kind(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _check_types(kw: dict, source: str) -> None:
    """Each field config.json gives, of the type and range the computation needs, named when it is not."""
    def bad(k, what):
        raise CheckpointError(f"expected {k} in {source} to be {what}, got {kw[k]!r}")
    for k in _POSITIVE_INTS:
        if k in kw and kw[k] is not None and (isinstance(kw[k], bool) or not isinstance(kw[k], int) or kw[k] < 1):
            bad(k, "a positive whole number")
    for k in _POSITIVE_NUMBERS:
        v = kw.get(k)
        if k in kw and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")):
            bad(k, "a positive number")
    v = kw.get("mm_vision_select_layer")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        bad("mm_vision_select_layer", "a whole number (a layer index, -2 in the release)")
    if kw.get("rope_scaling") is not None and not isinstance(kw["rope_scaling"], dict):
        bad("rope_scaling", "an object or null")
    if "mm_vision_tower" in kw and not isinstance(kw["mm_vision_tower"], str):
        bad("mm_vision_tower", "a folder name")
    eos = kw.get("eos_token_id")
    if eos is not None and not (isinstance(eos, int) and not isinstance(eos, bool)) and not (
            isinstance(eos, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in eos)):
        bad("eos_token_id", "a token id or a list of them")
    for k in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if k in kw and not isinstance(kw[k], bool):
            bad(k, "true or false")


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).replace("torch.", "")
    if key not in _DTYPES:
        raise CheckpointError(f"expected dtype one of float32/bfloat16/float16, got {value!r}")
    return _DTYPES[key]


@dataclass
class LlavaMiniConfig:
    """What the LLaVA-Mini computation needs from config.json (8B values as defaults)."""

    vocab_size: int = 128256
    hidden_size: int = 4096                 # H: LLM width, also the projector's output width
    intermediate_size: int = 14336
    num_hidden_layers: int = 32             # LLM layers
    num_attention_heads: int = 32
    num_key_value_heads: int = 8            # grouped-query attention
    head_dim: int | None = None             # derived: hidden_size // heads when absent
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None        # Llama 3.1 uses {"rope_type": "llama3", ...}
    max_position_embeddings: int = 131072
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 128000
    eos_token_id: list[int] = field(default_factory=lambda: list(LLAMA31_STOP_IDS))
    torch_dtype: str | None = "bfloat16"
    # multimodal fields (official names)
    mm_vision_tower: str | None = "openai/clip-vit-large-patch14-336"
    mm_hidden_size: int = 1024              # CLIP width, the compressor's width
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    compressor_size: int | None = 1         # nq = compressor_size ** 2 vision tokens per frame
    prefusion_layer_num: int | None = 4
    resolution_ratio: int = 1
    compressor_heads: int = 8               # hard-wired to 8 in the official Resampler
    tokenizer_model_max_length: int | None = None
    raw: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])

    @property
    def nq(self) -> int:
        """Vision tokens per frame after compression."""
        return self.compressor_size ** 2

    @property
    def max_context(self) -> int:
        """The LLM's context. (The official code silently truncates at tokenizer_model_max_length,
        cutting off the question; we refuse instead, at the model's real limit.)"""
        return self.max_position_embeddings

    def infer_from_weights(self, keys_shapes: dict[str, tuple]) -> None:
        """Fill compressor_size / prefusion_layer_num left out of config.json from the weights."""
        if self.compressor_size is None:
            q = keys_shapes.get("model.compressor.query")
            if q is None:
                raise CheckpointError("expected config.json compressor_size or the key 'model.compressor.query', "
                                      "got neither")
            self.compressor_size = int(round(q[0] ** 0.5))
        if self.prefusion_layer_num is None:
            idx = {int(k.split(".")[2]) for k in keys_shapes if k.startswith("model.prefusion_layers.")}
            if not idx:
                raise CheckpointError("expected keys 'model.prefusion_layers.N.*' (the pre-fusion layers), got none")
            self.prefusion_layer_num = max(idx) + 1

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config.json") -> "LlavaMiniConfig":
        if not isinstance(d, dict):
            raise CheckpointError(f"expected {source} to hold a JSON object, got a JSON {_json_kind(d)}")
        mt = d.get("model_type")
        if mt != MODEL_TYPE:
            raise CheckpointError(
                f"expected {source} with model_type '{MODEL_TYPE}', got {mt!r}")
        if int(d.get("resolution_ratio", 1) or 1) != 1:
            raise CheckpointError(
                f"expected resolution_ratio 1 (one CLIP pass per frame), got {d.get('resolution_ratio')!r} in {source}")
        if d.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise CheckpointError(
                f"expected mm_projector_type 'mlp2x_gelu', got {d.get('mm_projector_type')!r} in {source}")
        if d.get("mm_vision_select_feature", "patch") != "patch":
            raise CheckpointError(
                f"expected mm_vision_select_feature 'patch', got {d.get('mm_vision_select_feature')!r} in {source}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"expected hidden_act 'silu', got {act!r} in {source}")
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"]
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise CheckpointError(f"expected {source} to define {', '.join(missing)}, got them missing or null")
        names = set(cls.__dataclass_fields__) - {"raw"}
        kw = {k: d[k] for k in names if k in d and d[k] is not None}
        if "torch_dtype" not in kw and "dtype" in d:
            kw["torch_dtype"] = d["dtype"]
        if "num_key_value_heads" not in kw:
            kw["num_key_value_heads"] = d["num_attention_heads"]
        # compressor_size / prefusion_layer_num may be absent from a saved config: the loader then
        # reads them off the weights (query rows, prefusion layer indices); see `infer_from_weights`.
        kw.setdefault("compressor_size", None)
        kw.setdefault("prefusion_layer_num", None)
        _check_types(kw, source)
        if "head_dim" not in kw and kw["hidden_size"] % kw["num_attention_heads"]:
            raise CheckpointError(
                f"expected hidden_size divisible by num_attention_heads (or a head_dim) in {source}, got "
                f"{kw['hidden_size']} and {kw['num_attention_heads']}")
        cfg = cls(**kw, raw=dict(d))
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise CheckpointError(
                f"expected num_attention_heads divisible by num_key_value_heads, got "
                f"{cfg.num_attention_heads} and {cfg.num_key_value_heads}")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "LlavaMiniConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"expected a checkpoint folder with config.json, got none at {path}") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"expected valid JSON in {path}, got a parse error: {e}") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        d = dict(self.raw)
        for k in self.__dataclass_fields__:
            if k != "raw":
                d[k] = getattr(self, k)
        d["model_type"] = MODEL_TYPE
        return d
