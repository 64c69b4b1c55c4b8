"""Hand-written FLOP and byte formulas: the cross-check for what FlopCounterMode counts.

Convention (the one `torch.utils.flop_counter.FlopCounterMode` uses, so the two columns can be
compared number for number): only matrix products count (mm / addmm / bmm / convolution /
attention), 2 FLOPs per multiply-add; elementwise work (norms, softmax, rotary, activations,
residual adds) is not counted. Attention counts the whole score rectangle, causal or not, as the
counter does (2 * rows * keys * width for the scores and the same for the weighted sum); the
`causal=True` variants halve the square part instead, which is the work a causal kernel
(FlashAttention) actually does, and is what the lower bounds use.

Names: H hidden, nh heads, nkv key/value heads, hd head dim, I MLP width, E CLIP width,
Ic CLIP MLP width, N patches, R = N + 1 CLIP rows, nq vision tokens per frame.
"""
from __future__ import annotations

from dataclasses import dataclass

from model.config import LlavaMiniConfig


@dataclass
class Shapes:
    H: int
    nh: int
    nkv: int
    hd: int
    I: int
    layers: int
    prefusion: int
    vocab: int
    E: int
    Ic: int
    clip_layers: int          # layers the CLIP tower has
    clip_run: int             # layers ours runs (up to the selected one)
    N: int
    patch: int
    comp_heads: int
    nq: int

    @classmethod
    def of(cls, cfg: LlavaMiniConfig, vcfg) -> "Shapes":
        L = vcfg.num_hidden_layers
        sel = cfg.mm_vision_select_layer
        run = L + 1 + sel if sel < 0 else sel
        return cls(H=cfg.hidden_size, nh=cfg.num_attention_heads, nkv=cfg.num_key_value_heads, hd=cfg.head_dim,
                   I=cfg.intermediate_size, layers=cfg.num_hidden_layers, prefusion=cfg.prefusion_layer_num,
                   vocab=cfg.vocab_size, E=vcfg.hidden_size, Ic=vcfg.intermediate_size, clip_layers=L,
                   clip_run=run, N=(vcfg.image_size // vcfg.patch_size) ** 2, patch=vcfg.patch_size,
                   comp_heads=cfg.compressor_heads, nq=cfg.nq)

    @property
    def vision_rows(self) -> int:
        return self.N + self.nq


def _attn(rows: int, keys: int, width: int, causal: bool) -> float:
    """Scores plus weighted sum. causal: rows are the last `rows` of `keys` and see only earlier keys."""
    if not causal:
        return 4.0 * rows * keys * width
    seen = rows * (keys - rows) + rows * (rows + 1) / 2
    return 4.0 * seen * width


def llama_layer(s: Shapes, rows: int, keys: int, causal: bool = False) -> float:
    """One Llama block over `rows` rows that attend to `keys` keys (the rows themselves included)."""
    proj = 2.0 * rows * s.H * (s.nh * s.hd + 2 * s.nkv * s.hd) + 2.0 * rows * s.nh * s.hd * s.H
    mlp = 2.0 * rows * 3 * s.H * s.I
    return proj + mlp + _attn(rows, keys, s.nh * s.hd, causal)


def clip(s: Shapes, layers: int | None = None, causal: bool = False) -> float:
    """Patch convolution plus `layers` encoder layers over R = N + 1 rows (bidirectional: `causal` unused)."""
    R = s.N + 1
    n = s.clip_run if layers is None else layers
    conv = 2.0 * s.N * 3 * s.patch * s.patch * s.E
    layer = 2.0 * R * 4 * s.E * s.E + 2.0 * R * 2 * s.E * s.Ic + _attn(R, R, s.E, False)
    return conv + n * layer


def compressor_absorbed(s: Shapes) -> float:
    """Scores against U (heads*nq x E), weighted sum in E-space, per-head Wv and Wo: 4*HQ*N*E + 4*nq*E^2."""
    HQ = s.comp_heads * s.nq
    return 4.0 * HQ * s.N * s.E + 4.0 * s.nq * s.E * s.E


def compressor_mha(s: Shapes) -> float:
    """nn.MultiheadAttention: q (nq rows), k and v (N rows) projections, attention, out projection."""
    return 2.0 * s.nq * s.E * s.E + 4.0 * s.N * s.E * s.E + 4.0 * s.nq * s.N * s.E + 2.0 * s.nq * s.E * s.E


def projector(s: Shapes, rows: int) -> float:
    return 2.0 * rows * (s.E * s.H + s.H * s.H)


def ingest_frame(s: Shapes, prefix_rows: int, causal: bool = False) -> float:
    """Ours, per frame: CLIP to the selected layer, absorbed compressor, projector on the N + nq rows,
    pre-fusion over C = N + nq + prefix rows."""
    C = s.vision_rows + prefix_rows
    return (clip(s) + compressor_absorbed(s) + projector(s, s.vision_rows)
            + s.prefusion * llama_layer(s, C, C, causal))


def official_frame(s: Shapes, prompt_len: int, causal: bool = False) -> float:
    """Official, per frame and question: every CLIP layer, the MHA compressor, the projector, pre-fusion over
    N + nq + L rows (the placeholder row is computed too, only masked as a key)."""
    rows = s.vision_rows + prompt_len
    return (clip(s, s.clip_layers) + compressor_mha(s) + projector(s, s.vision_rows)
            + s.prefusion * llama_layer(s, rows, rows, causal))


def fuse_frame(s: Shapes, question_rows: int, cached_rows: int) -> float:
    """Ours, per fused frame and question: the question rows through the pre-fusion layers against the
    frame's cached rows plus themselves (the reference scores the S x S square in full)."""
    S = question_rows
    return s.prefusion * (llama_layer(s, S, 0) + _attn(S, cached_rows + S, s.nh * s.hd, False))


def llm_prefill(s: Shapes, tokens: int, causal: bool = False) -> float:
    """All LLM layers over `tokens` rows, then the head on the last row only (first token)."""
    return s.layers * llama_layer(s, tokens, tokens, causal) + 2.0 * s.H * s.vocab


def llm_suffix(s: Shapes, rows: int, tokens: int, causal: bool = False) -> float:
    """All LLM layers over only the last `rows` of `tokens` (the earlier ones' keys/values cached), head on the
    last row. Not a code path of the engine today: the cost of a question if the LLM keys/values of the
    question-independent part of its input ([averaged prefix rows, frame tokens]) were kept between questions."""
    return s.layers * llama_layer(s, rows, tokens, causal) + 2.0 * s.H * s.vocab


# ------------------------------------------------------------------ bytes
def kv_bytes_per_frame(s: Shapes, cached_rows: int, kv_bytes: float = 2.0) -> float:
    """Keys and values of every pre-fusion layer over the cached rows."""
    return 2.0 * s.prefusion * s.nkv * cached_rows * s.hd * kv_bytes
