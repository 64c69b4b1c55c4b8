"""Llama decoder blocks, written out so the streaming split can reach inside them.

Ordered bottom-up (norm, rotary, attention, MLP, block, language model) in the
style of gpt-fast/nanoGPT. Numerics follow transformers' Llama: RMSNorm in
float32 then cast, rotary tables in float32 then cast to the activation dtype,
softmax in float32. Parameter names equal the official checkpoint's
(`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...), so a state dict
loads with no renaming.

Attention comes in three shapes, one method each:
- `full`: rows attend causally to themselves (ingest of the vision rows, LLM
  prefill); returns the post-RoPE keys/values so they can be cached.
- `cached`: question rows of many frames attend to each frame's cached rows
  plus themselves, causally (`triton_kernels.fusion_attention`).
- `decode`: one new row against a preallocated cache (generation).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import LlavaMiniConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dt)


def rope_inv_freq(cfg: LlavaMiniConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) float32 and attention scaling, for the rope types Llama uses."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in (None, "default"):
        return inv, 1.0
    if kind == "linear":
        return inv / rs["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        lo_wavelen, hi_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < hi_wavelen) * ~(wavelen > lo_wavelen)
        return torch.where(medium, smoothed, inv_l), 1.0
    from lmcore.errors import CheckpointError
    raise CheckpointError(f"expected rope_scaling type default/linear/llama3, got {kind!r}")


class Rotary(nn.Module):
    def __init__(self, cfg: LlavaMiniConfig):
        super().__init__()
        inv, self.scaling = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions (..., L) int -> cos, sin (..., L, head_dim) in `dtype`."""
        freqs = positions.float()[..., None] * self.inv_freq.float()
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rotary(x, cos, sin):
    """x (B, heads, L, D); cos/sin (L, D) or (B, L, D)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlavaMiniConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(H, self.nh * self.hd, bias=b)
        self.k_proj = nn.Linear(H, self.nkv * self.hd, bias=b)
        self.v_proj = nn.Linear(H, self.nkv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.nh * self.hd, H, bias=b)
        self.scale = self.hd ** -0.5

    def _qkv(self, x, cos, sin):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.nh, self.hd).transpose(1, 2)      # (B, nh, L, D)
        k = self.k_proj(x).view(B, L, self.nkv, self.hd).transpose(1, 2)     # (B, nkv, L, D)
        v = self.v_proj(x).view(B, L, self.nkv, self.hd).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _out(self, o):
        B, _, L, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, L, self.nh * self.hd))

    def full(self, x, cos, sin):
        """Causal self-attention over all rows. Returns (out, k, v); k, v (B, nkv, L, D) post-RoPE."""
        q, k, v = self._qkv(x, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                           enable_gqa=self.nh != self.nkv)
        return self._out(o), k, v

    def cached(self, x, cos, sin, k_cache, v_cache, fusion_attn, **kv_kw):
        """Rows x (T, S, H) of T frames attend to k/v_cache (T, nkv, C, D) + themselves, causally."""
        q, k, v = self._qkv(x, cos, sin)
        o = fusion_attn(q, k_cache, v_cache, k, v, scale=self.scale, **kv_kw)
        return self._out(o)

    def decode(self, x, cos, sin, k_buf, v_buf, n: int):
        """x (B, S, H) new rows at cache positions n..n+S-1 of the preallocated k/v_buf (B, nkv, N, D)."""
        S = x.shape[1]
        q, k, v = self._qkv(x, cos, sin)
        k_buf[:, :, n:n + S] = k
        v_buf[:, :, n:n + S] = v
        mask, causal = None, S > 1
        if S > 1 and n > 0:          # several rows after a cached prefix: see the prefix and earlier new rows
            mask = torch.ones(S, n + S, dtype=torch.bool, device=x.device).tril(diagonal=n)
            causal = False
        o = F.scaled_dot_product_attention(q, k_buf[:, :, :n + S], v_buf[:, :, :n + S], attn_mask=mask,
                                           is_causal=causal, scale=self.scale, enable_gqa=self.nh != self.nkv)
        return self._out(o)


class MLP(nn.Module):
    def __init__(self, cfg: LlavaMiniConfig):
        super().__init__()
        H, I, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(H, I, bias=b)
        self.up_proj = nn.Linear(H, I, bias=b)
        self.down_proj = nn.Linear(I, H, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One Llama block; used both as an LLM layer and as a pre-fusion layer."""

    def __init__(self, cfg: LlavaMiniConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def _finish(self, x, a):
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h))

    def full(self, x, cos, sin):
        a, k, v = self.self_attn.full(self.input_layernorm(x), cos, sin)
        return self._finish(x, a), k, v

    def cached(self, x, cos, sin, k_cache, v_cache, fusion_attn, **kv_kw):
        a = self.self_attn.cached(self.input_layernorm(x), cos, sin, k_cache, v_cache, fusion_attn, **kv_kw)
        return self._finish(x, a)

    def decode(self, x, cos, sin, k_buf, v_buf, n):
        return self._finish(x, self.self_attn.decode(self.input_layernorm(x), cos, sin, k_buf, v_buf, n))


class KVBuffer:
    """The one place that allocates the LLM's generation cache: (layers, B, nkv, capacity, D) x 2."""

    def __init__(self, cfg: LlavaMiniConfig, batch: int, capacity: int, dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.n = 0
        self.capacity = capacity
