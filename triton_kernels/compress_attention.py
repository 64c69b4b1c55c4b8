"""LLaVA-Mini compressor (Resampler with constant learned queries) as one fused kernel.

The official module (embed dim E, ``heads`` heads of size dh = E / heads, nq learned
queries, N key rows per frame, LayerNorm eps 1e-5) computes, for x of shape (B, N, E)::

    q0  = ln_q(query) + pos_q                                   # (nq, E), constant
    kv  = ln_kv(x)                                              # LayerNorm over E
    out = MultiheadAttention(q0, kv + pos_kv, kv)               # (B, nq, E)

Absorbing the constant queries
------------------------------
With Q = q0 Wq^T + bq split per head (Q_h[i] is a dh-vector) and Wk_h, Wv_h the head's
(dh, E) slices of the key / value projections::

    s[h,i,n] = Q_h[i] . (Wk_h (kv[n] + pos_kv[n]) + bk_h) / sqrt(dh)
             = kv[n] . U[h,i]  +  S0[h,i,n]  +  const(h,i)           (const cancels in softmax)
    U[h,i]   = Q_h[i] Wk_h / sqrt(dh)                                 (E-vector)
    S0[h,i,n]= U[h,i] . pos_kv[n]                                     (position-bias table)
    a[h,i,:] = softmax_n(s[h,i,:])
    z[h,i]   = sum_n a[h,i,n] kv[n]                                   (E-vector)
    out[i]   = concat_h(z[h,i] Wv_h^T + bv_h) Wo^T + bo               (sum_n a = 1, so bv passes)

so no key or value row is ever materialised: per frame the work is
O(heads*nq*N*E) instead of O(N*E^2) for the key/value projections.

Kernel (one launch for all frames): grid = (B, cdiv(E, BLOCK_EO)).  Program (b, j)
walks the N rows of frame b in blocks of BLOCK_N and for every block

  1. LayerNorm statistics of the rows: mean / M2 per E-chunk, merged over chunks with
     Chan's parallel-variance update (one pass, no E[x^2]-E[x]^2 cancellation);
  2. scores for all heads*nq query vectors: s = U . LN(x)^T + S0 (fp32 dot products,
     accumulated over E-chunks);
  3. online-softmax update of the running max m, denominator l and rescale factor;
  4. accumulates p @ LN(x)[:, chunk j] into a (heads*nq, BLOCK_EO) fp32 accumulator.

Steps 1-2 are recomputed by each E-chunk program (cheap: heads*nq is 8-32 and x is
re-read from L2); in exchange every program keeps only a small accumulator.

The per-head Wv / Wo projections (2 * nq * E^2 flops per frame, independent of N) run in
PyTorch on z: batched over all frames it is a plain GEMM that cuBLAS does well, whereas
fusing it would need every E-chunk program to see the whole z row (a cross-program
reduction) and to stream the E x E matrices once per frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ._common import dot_block, interpreting, tl, triton, triton_usable

__all__ = [
    "AbsorbedCompressor",
    "absorb_compressor",
    "compress_attention",
    "compress_attention_reference",
    "compress_attention_triton",
    "compressor_flops",
    "mha_compressor_flops",
]


# --------------------------------------------------------------------------- kernel
@triton.jit
def _compress_attention_kernel(
    X,  # (B, N, E) any float dtype, arbitrary strides
    U,  # (HQ, E) float32, contiguous: absorbed query-key vectors (scale folded in)
    S0,  # (HQ, N) float32, contiguous: position-bias table U . pos_kv^T
    LN_W,  # (E,) float32 LayerNorm weight
    LN_B,  # (E,) float32 LayerNorm bias
    Z,  # (B, HQ, E) float32 output: softmax-weighted sums of the normalised rows
    N,
    E,
    HQ,
    stride_xb,
    stride_xn,
    stride_xe,
    stride_zb,
    stride_zq,
    stride_ze,
    eps,
    BLOCK_N: tl.constexpr,  # rows of x per step
    BLOCK_E: tl.constexpr,  # E-chunk for statistics and scores
    BLOCK_EO: tl.constexpr,  # E-chunk of the output owned by this program
    BLOCK_HQ: tl.constexpr,  # heads*nq padded to a power of two >= 16
):
    tl.static_assert(BLOCK_HQ >= 16, "tl.dot needs M >= 16")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs N, K >= 16")
    tl.static_assert(BLOCK_E >= 16, "tl.dot needs K >= 16")
    tl.static_assert(BLOCK_EO >= 16, "tl.dot needs N >= 16")

    pid_b = tl.program_id(0)
    pid_e = tl.program_id(1)
    X_b = X + pid_b.to(tl.int64) * stride_xb

    offs_q = tl.arange(0, BLOCK_HQ)
    q_mask = offs_q < HQ
    offs_eo = pid_e * BLOCK_EO + tl.arange(0, BLOCK_EO)
    eo_mask = offs_eo < E
    w_o = tl.load(LN_W + offs_eo, mask=eo_mask, other=0.0)
    b_o = tl.load(LN_B + offs_eo, mask=eo_mask, other=0.0)

    m_i = tl.full([BLOCK_HQ], float("-inf"), tl.float32)  # running max of the scores
    l_i = tl.zeros([BLOCK_HQ], tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_HQ, BLOCK_EO], tl.float32)  # running sum p * LN(x)

    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        row_ptr = X_b + offs_n[:, None] * stride_xn

        # -- step 1: LayerNorm statistics, Chan's merge of per-chunk (mean, M2)
        mean = tl.zeros([BLOCK_N], tl.float32)
        m2 = tl.zeros([BLOCK_N], tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_mask = offs_e < E
            x = tl.load(row_ptr + offs_e[None, :] * stride_xe, mask=n_mask[:, None] & e_mask[None, :], other=0.0)
            x = x.to(tl.float32)  # (interpreter: no arithmetic on bf16 values)
            cnt = tl.sum(e_mask.to(tl.float32), axis=0)
            c_mean = tl.sum(x, axis=1) / cnt
            d = tl.where(e_mask[None, :], x - c_mean[:, None], 0.0)
            c_m2 = tl.sum(d * d, axis=1)
            n_prev = e0 * 1.0
            n_tot = n_prev + cnt
            delta = c_mean - mean
            mean = mean + delta * (cnt / n_tot)
            m2 = m2 + c_m2 + delta * delta * (n_prev * cnt / n_tot)
        rstd = 1.0 / tl.sqrt(m2 / E + eps)

        # -- step 2: scores of all heads*nq query vectors, s = U . LN(x)^T + S0
        s = tl.zeros([BLOCK_HQ, BLOCK_N], tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            e_mask = offs_e < E
            x = tl.load(row_ptr + offs_e[None, :] * stride_xe, mask=n_mask[:, None] & e_mask[None, :], other=0.0)
            w = tl.load(LN_W + offs_e, mask=e_mask, other=0.0)
            b = tl.load(LN_B + offs_e, mask=e_mask, other=0.0)
            xn = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
            u = tl.load(U + offs_q[:, None] * E + offs_e[None, :], mask=q_mask[:, None] & e_mask[None, :], other=0.0)
            s += tl.dot(u, tl.trans(xn), input_precision="ieee")
        s += tl.load(S0 + offs_q[:, None] * N + offs_n[None, :], mask=q_mask[:, None] & n_mask[None, :], other=0.0)
        s = tl.where(n_mask[None, :], s, float("-inf"))

        # -- step 3: online softmax over N
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

        # -- step 4: weighted sum of the normalised rows, this program's E-chunk only
        xo = tl.load(row_ptr + offs_eo[None, :] * stride_xe, mask=n_mask[:, None] & eo_mask[None, :], other=0.0)
        xno = (xo.to(tl.float32) - mean[:, None]) * rstd[:, None] * w_o[None, :] + b_o[None, :]
        acc = acc * alpha[:, None] + tl.dot(p, xno, input_precision="ieee")

    # -- normalise by the softmax denominator and store z
    z = acc / l_i[:, None]
    Z_b = Z + pid_b.to(tl.int64) * stride_zb
    tl.store(Z_b + offs_q[:, None] * stride_zq + offs_eo[None, :] * stride_ze, z, mask=q_mask[:, None] & eo_mask[None, :])


# --------------------------------------------------------------------------- launcher
def _launch_compress_attention(x: torch.Tensor, ab: "AbsorbedCompressor", blocks: dict | None = None) -> torch.Tensor:
    """Check shapes, pick block sizes, launch; returns z of shape (B, heads*nq, E) float32.

    ``blocks`` overrides the chosen sizes (tests use it to run the GPU tiling, with
    several E-chunk programs per frame, under the interpreter).
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, E), got {tuple(x.shape)}")
    B, N, E = x.shape
    HQ = ab.U.shape[0]
    if ab.U.shape != (HQ, E) or ab.S0.shape != (HQ, N):
        raise ValueError(f"x {tuple(x.shape)} does not match U {tuple(ab.U.shape)} / S0 {tuple(ab.S0.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    z = torch.empty((B, HQ, E), device=x.device, dtype=torch.float32)
    if B == 0:
        return z
    U = ab.U.to(device=x.device, dtype=torch.float32).contiguous()
    S0 = ab.S0.to(device=x.device, dtype=torch.float32).contiguous()
    w = ab.ln_weight.to(device=x.device, dtype=torch.float32).contiguous()
    b = ab.ln_bias.to(device=x.device, dtype=torch.float32).contiguous()

    BLOCK_HQ = dot_block(HQ, 1 << 30)
    if interpreting() and not x.is_cuda:
        # Interpreter: cost is per tl op, so use few, large blocks and a single
        # E-chunk program (no recomputation of statistics/scores).
        BLOCK_N = dot_block(N, 128)
        BLOCK_E = dot_block(E, 512)
        BLOCK_EO = dot_block(E, 1024)
        num_warps = 4
    else:
        # GPU: 32 x 128 x-tiles (16 KB fp32 in registers per step); 64-wide output
        # chunks give B * E/64 programs (16 per frame at E=1024) so that even a single
        # streamed frame spreads over several SMs.
        BLOCK_N = 32
        BLOCK_E = dot_block(E, 128)
        BLOCK_EO = dot_block(E, 64)
        num_warps = 4
    if blocks:
        BLOCK_N = blocks.get("BLOCK_N", BLOCK_N)
        BLOCK_E = blocks.get("BLOCK_E", BLOCK_E)
        BLOCK_EO = blocks.get("BLOCK_EO", BLOCK_EO)
    grid = (B, triton.cdiv(E, BLOCK_EO))
    _compress_attention_kernel[grid](
        x, U, S0, w, b, z,
        N, E, HQ,
        x.stride(0), x.stride(1), x.stride(2),
        z.stride(0), z.stride(1), z.stride(2),
        float(ab.eps),
        BLOCK_N=BLOCK_N, BLOCK_E=BLOCK_E, BLOCK_EO=BLOCK_EO, BLOCK_HQ=BLOCK_HQ,
        num_warps=num_warps,
    )
    return z


# --------------------------------------------------------------------------- absorbed parameters
@dataclass
class AbsorbedCompressor:
    """Compressor parameters with the constant queries absorbed (see module docstring).

    U: (heads*nq, E) float32, row h*nq + i = Q_h[i] Wk_h / sqrt(dh)
    S0: (heads*nq, N) float32, S0[h*nq + i, n] = U[h*nq + i] . pos_kv[n]
    Wv, Wo: (E, E); bv, bo: (E,); ln_weight, ln_bias: (E,) of ln_kv; eps of ln_kv.
    """

    U: torch.Tensor
    S0: torch.Tensor
    Wv: torch.Tensor
    bv: torch.Tensor
    Wo: torch.Tensor
    bo: torch.Tensor
    heads: int
    nq: int
    ln_weight: torch.Tensor
    ln_bias: torch.Tensor
    eps: float = 1e-5

    @property
    def embed_dim(self) -> int:
        return self.U.shape[1]

    @property
    def num_rows(self) -> int:
        """N, the number of key rows per frame the position table was built for."""
        return self.S0.shape[1]

    def to(self, device=None) -> "AbsorbedCompressor":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device) if isinstance(v, torch.Tensor) else v
        return AbsorbedCompressor(**kw)


def absorb_compressor(
    query: torch.Tensor,
    pos_q: torch.Tensor,
    ln_q_weight: torch.Tensor,
    ln_q_bias: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor | None,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    ln_kv_weight: torch.Tensor,
    ln_kv_bias: torch.Tensor,
    pos_kv: torch.Tensor,
    num_heads: int,
    eps: float = 1e-5,
) -> AbsorbedCompressor:
    """Fold the constant queries into U and S0 (once per model).

    The algebra runs in float64 and the results are stored as float32, so the
    absorbed form adds no error beyond float32 rounding of the stored tensors.
    """
    E = in_proj_weight.shape[1]
    if in_proj_weight.shape != (3 * E, E):
        raise ValueError(f"in_proj_weight must be (3E, E), got {tuple(in_proj_weight.shape)}")
    if E % num_heads:
        raise ValueError(f"embed dim {E} not divisible by num_heads {num_heads}")
    dh = E // num_heads
    f64 = dict(dtype=torch.float64)
    query = query.reshape(-1, E).to(**f64)
    nq = query.shape[0]
    pos_q = pos_q.reshape(-1, E).to(**f64)
    pos_kv = pos_kv.reshape(-1, E).to(**f64)
    if in_proj_bias is None:
        in_proj_bias = torch.zeros(3 * E, device=in_proj_weight.device)
    if out_proj_bias is None:
        out_proj_bias = torch.zeros(E, device=out_proj_weight.device)

    # constant queries: q0 = ln_q(query) + pos_q, Q = q0 Wq^T + bq
    q0 = F.layer_norm(query, (E,), ln_q_weight.to(**f64), ln_q_bias.to(**f64), eps) + pos_q
    Wq, Wk, Wv = in_proj_weight.to(**f64).chunk(3, dim=0)
    bq, _bk, bv = in_proj_bias.to(**f64).chunk(3, dim=0)  # bk only shifts scores by a constant
    Q = q0 @ Wq.T + bq  # (nq, E)
    # U[h, i] = Q_h[i] Wk_h / sqrt(dh);  S0 = U pos_kv^T
    Qh = Q.view(nq, num_heads, dh).transpose(0, 1)  # (heads, nq, dh)
    U = torch.einsum("hid,hde->hie", Qh, Wk.view(num_heads, dh, E)) / math.sqrt(dh)
    U = U.reshape(num_heads * nq, E)
    S0 = U @ pos_kv.T  # (heads*nq, N)
    f32 = dict(dtype=torch.float32)
    return AbsorbedCompressor(
        U=U.to(**f32).contiguous(),
        S0=S0.to(**f32).contiguous(),
        Wv=Wv.to(**f32).contiguous(),
        bv=bv.to(**f32).contiguous(),
        Wo=out_proj_weight.to(**f32).contiguous(),
        bo=out_proj_bias.to(**f32).contiguous(),
        heads=num_heads,
        nq=nq,
        ln_weight=ln_kv_weight.to(**f32).contiguous(),
        ln_bias=ln_kv_bias.to(**f32).contiguous(),
        eps=float(eps),
    )


def _project_heads(z: torch.Tensor, ab: AbsorbedCompressor) -> torch.Tensor:
    """out[i] = concat_h(z[h,i] Wv_h^T + bv_h) Wo^T + bo, z: (B, heads*nq, E) float32."""
    B, _, E = z.shape
    H, nq = ab.heads, ab.nq
    dh = E // H
    zh = z.view(B, H, nq, E)
    v = torch.einsum("bhie,hde->bihd", zh, ab.Wv.view(H, dh, E)) + ab.bv.view(H, dh)
    return v.reshape(B, nq, E) @ ab.Wo.T + ab.bo


# --------------------------------------------------------------------------- public functions
def compress_attention_triton(x: torch.Tensor, absorbed: AbsorbedCompressor) -> torch.Tensor:
    """Fused Triton compressor: x (B, N, E) -> (B, nq, E) in x.dtype."""
    z = _launch_compress_attention(x, absorbed)
    ab = absorbed if absorbed.Wv.device == x.device else absorbed.to(x.device)
    return _project_heads(z, ab).to(x.dtype)


def compress_attention_reference(x: torch.Tensor, absorbed: AbsorbedCompressor) -> torch.Tensor:
    """Plain PyTorch version of the absorbed compressor (float32 math), same signature."""
    ab = absorbed if absorbed.U.device == x.device else absorbed.to(x.device)
    E = x.shape[-1]
    kv = F.layer_norm(x.float(), (E,), ab.ln_weight, ab.ln_bias, ab.eps)  # (B, N, E)
    s = kv @ ab.U.T + ab.S0.T  # (B, N, heads*nq)
    a = torch.softmax(s, dim=1)
    z = torch.einsum("bnq,bne->bqe", a, kv)  # (B, heads*nq, E)
    return _project_heads(z, ab).to(x.dtype)


def compress_attention(x: torch.Tensor, absorbed: AbsorbedCompressor) -> torch.Tensor:
    """Dispatcher: the Triton kernel on CUDA (or under TRITON_INTERPRET=1), else PyTorch."""
    if triton_usable(x, _compress_attention_kernel):
        return compress_attention_triton(x, absorbed)
    return compress_attention_reference(x, absorbed)


# --------------------------------------------------------------------------- cost model
def compressor_flops(N: int, E: int, heads: int, nq: int = 1) -> int:
    """Flops per frame of the absorbed compressor (this module).

    LayerNorm ~7NE (mean, centre, square, sum, scale, weight, bias); scores 2*HQ*N*E plus
    the S0 add; softmax ~4*HQ*N; weighted sum 2*HQ*N*E; per-head value projection
    2*nq*E^2 (+bias) and output projection 2*nq*E^2 (+bias), with HQ = heads*nq.
    """
    HQ = heads * nq
    ln = 7 * N * E
    scores = 2 * HQ * N * E + HQ * N
    softmax = 4 * HQ * N
    wsum = 2 * HQ * N * E
    proj = 2 * nq * E * E + nq * E + 2 * nq * E * E + nq * E
    return ln + scores + softmax + wsum + proj


def mha_compressor_flops(N: int, E: int, heads: int, nq: int = 1) -> int:
    """Flops per frame of the plain module: ln_q/ln_kv, q/k/v projections, attention, out proj."""
    ln = 7 * N * E + 7 * nq * E
    pos = N * E + nq * E  # kv + pos_kv, ln_q(query) + pos_q
    q_proj = 2 * nq * E * E + nq * E
    kv_proj = 2 * (2 * N * E * E + N * E)
    scores = 2 * nq * N * E + heads * nq * N  # sum over heads of 2*nq*N*dh, plus scaling
    softmax = 4 * heads * nq * N
    pv = 2 * nq * N * E
    out_proj = 2 * nq * E * E + nq * E
    return ln + pos + q_proj + kv_proj + scores + softmax + pv + out_proj
