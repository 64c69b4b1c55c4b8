"""The LLaVA-Mini compressor: nq learned queries attend over a frame's CLIP patches.

Official module (a Resampler), for CLIP features x (B, N, E):
    q0  = ln_q(query) + pos_embed                    # (nq, E), constant per model
    kv  = ln_kv(x)                                    # (B, N, E)
    out = MultiheadAttention(E, 8)(q0, kv + pos_kv, kv)
where pos_kv is `pos_embed` bicubic-interpolated from a compressor_size grid
to the sqrt(N) grid. Parameter names equal the official checkpoint's.

Two ways to compute it, same numbers:
- `mha`: the official `nn.MultiheadAttention` call, kept as the reference.
- `absorbed`: the queries are constants, so they fold into per-head score
  vectors and no keys or values are ever materialized
  (`triton_kernels.compress_attention`, ~10 MFLOP a frame instead of ~2.4 GFLOP).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE 2-D sin-cos table (grid_size**2, embed_dim), float32, as the official code builds it."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float32) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def interpolate_pos(pos: torch.Tensor, n_keys: int) -> torch.Tensor:
    """The official get_abs_pos: (G*G, E) table -> (n_keys, E) by bicubic interpolation on a square grid."""
    src, tgt = int(math.sqrt(pos.size(0))), int(math.sqrt(n_keys))
    if tgt * tgt != n_keys:
        raise ValueError(f"expected a square number of CLIP patches, got {n_keys}")
    if src == tgt:
        return pos
    out = F.interpolate(pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2),
                        size=(tgt, tgt), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)


class Compressor(nn.Module):
    def __init__(self, embed_dim: int, grid_size: int, num_heads: int = 8):
        super().__init__()
        self.nq, self.embed_dim, self.num_heads = grid_size ** 2, embed_dim, num_heads
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_pos_embed_2d(embed_dim, grid_size)),
                                      requires_grad=False)
        self.query = nn.Parameter(torch.zeros(self.nq, embed_dim))
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim)
        self.ln_kv = nn.LayerNorm(embed_dim)
        self.mode = "absorbed"
        self._absorbed: dict[tuple, object] = {}

    # -- official path -------------------------------------------------------------------------
    def forward_mha(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, E) -> (B, nq, E), literally as the official Resampler computes it."""
        pos_kv = interpolate_pos(self.pos_embed, x.size(1)).type_as(x)
        kv = self.ln_kv(x)
        q = self.ln_q(self.query)
        q = (q + self.pos_embed.type_as(x)).unsqueeze(0).expand(x.size(0), q.size(0), q.size(1))
        out, _ = self.attn(q, kv + pos_kv.unsqueeze(0), kv)
        return out

    # -- absorbed path -------------------------------------------------------------------------
    def absorbed(self, n_keys: int):
        """Per-model precomputation for `n_keys` patches (cached; call `invalidate()` after loading weights)."""
        key = (n_keys, self.query.device)
        if key not in self._absorbed:
            from triton_kernels.compress_attention import absorb_compressor
            with torch.no_grad():
                self._absorbed[key] = absorb_compressor(
                    self.query, self.pos_embed, self.ln_q.weight, self.ln_q.bias,
                    self.attn.in_proj_weight, self.attn.in_proj_bias,
                    self.attn.out_proj.weight, self.attn.out_proj.bias,
                    self.ln_kv.weight, self.ln_kv.bias, interpolate_pos(self.pos_embed, n_keys),
                    self.num_heads, eps=self.ln_kv.eps)
        return self._absorbed[key]

    def invalidate(self):
        self._absorbed.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "mha":
            return self.forward_mha(x)
        from triton_kernels.compress_attention import compress_attention
        return compress_attention(x, self.absorbed(x.size(1)))
