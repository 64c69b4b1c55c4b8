"""Question-time pre-fusion attention over per-frame caches (grouped-query heads).

For every frame t (T frames), query head h (Hq = Hkv * G heads, kv head kh = h // G) and
question row i (S rows, already projected and RoPE-rotated)::

    keys(t, kh, i)   = [ k_cache[t, kh, 0..C-1] ;  k_new[t, kh, 0..i] ]      (C cached + causal new)
    s[c]             = scale * q[t,h,i] . k_cache[t,kh,c]        c < C
    s[C + j]         = scale * q[t,h,i] . k_new[t,kh,j]          j <= i
    out[t,h,i]       = sum softmax(s) * [ v_cache ; v_new ]

The cache may be float8 e4m3 with per-kv-head float32 scales: k = k_fp8.float() *
k_scale[kh] (same for v).  Since the scale is constant per head it is applied to the
score tile (q . k_fp8 * scale * k_scale) and to the P @ V_fp8 tile (* v_scale) instead
of to every element.

Kernel (ONE launch for all frames): grid = (T, Hkv, cdiv(G*S, BLOCK_M)).  A program
handles the G query heads of one kv head together ("packed GQA"): its BLOCK_M query
rows are rows r = i*G + g of the (S*G, D) matrix, so every K/V tile it loads serves all
G heads, and its rows cover a contiguous range of i (tight causal bound).  It then

  1. loads its query rows (gathered over g and i) once;
  2. loops over the C cached rows in blocks of BLOCK_N: scores, online-softmax update
     (running max m, denominator l, rescale factor alpha, base-2 exponentials with
     log2(e) folded into the scale), accumulate P @ V;
  3. loops over the new rows j < min(S, max_i + 1) in blocks of BLOCK_N with the causal
     mask j <= i, same update;
  4. divides by l and stores in q.dtype.

The caches are never concatenated; accumulation is float32.
"""

from __future__ import annotations

import torch

from ._common import dot_block, interpreting, tl, triton, triton_usable

__all__ = [
    "FP8_E4M3_MAX",
    "dequantize_kv_fp8",
    "fusion_attention",
    "fusion_attention_reference",
    "fusion_attention_triton",
    "quantize_kv_fp8",
]

FP8_E4M3_MAX = 448.0
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- kernel
@triton.jit
def _fusion_attention_kernel(
    Q,  # (T, Hq, S, D)
    KC,  # (T, Hkv, C, D) q.dtype or float8_e4m3fn
    VC,  # (T, Hkv, C, D)
    KN,  # (T, Hkv, S, D) q.dtype
    VN,  # (T, Hkv, S, D)
    O,  # (T, Hq, S, D) q.dtype
    K_SCALE,  # (T, Hkv) float32 (frame stride 0 for per-head scales), read only when HAS_SCALE
    V_SCALE,  # (T, Hkv) float32, read only when HAS_SCALE
    stride_sct,  # frame stride of the scales: Hkv per frame, 0 when shared by all frames
    S,
    C,
    G,
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_qs, stride_qd,
    stride_kct, stride_kch, stride_kcc, stride_kcd,
    stride_vct, stride_vch, stride_vcc, stride_vcd,
    stride_knt, stride_knh, stride_kns, stride_knd,
    stride_vnt, stride_vnh, stride_vns, stride_vnd,
    stride_ot, stride_oh, stride_os, stride_od,
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D padded to a power of two >= 16
    BLOCK_M: tl.constexpr,  # packed (i, g) query rows per program
    BLOCK_N: tl.constexpr,  # key rows per step
    HAS_SCALE: tl.constexpr,  # fp8 cache with per-head scales
    NATIVE_DOT: tl.constexpr,  # dot in the 16-bit input dtype (GPU) instead of float32
):
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs M >= 16")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs N >= 16")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs K >= 16")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "head dim must fit in one tile")

    pid_t = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    pid_m = tl.program_id(2)

    # -- step 1: gather the packed query rows r = i*G + g (head h = kvh*G + g)
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_r < S * G
    offs_i = offs_r // G
    offs_h = kvh * G + offs_r % G
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_ptr = Q + pid_t * stride_qt + offs_h[:, None] * stride_qh + offs_i[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(q_ptr, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if not NATIVE_DOT:
        q = q.to(tl.float32)  # interpreter / fp32: no bf16 arithmetic, ieee fp32 dots

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (base-2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running P @ V

    # -- step 2: the C cached rows of frame t, kv head kvh
    if HAS_SCALE:
        k_sc = tl.load(K_SCALE + pid_t * stride_sct + kvh)
        v_sc = tl.load(V_SCALE + pid_t * stride_sct + kvh)
        sc_cache = qk_scale * k_sc
    else:
        v_sc = 1.0
        sc_cache = qk_scale
    KC_b = KC + pid_t * stride_kct + kvh * stride_kch
    VC_b = VC + pid_t * stride_vct + kvh * stride_vch
    for c0 in range(0, C, BLOCK_N):
        offs_c = c0 + tl.arange(0, BLOCK_N)
        c_mask = offs_c < C
        kv_mask = c_mask[:, None] & d_mask[None, :]
        k = tl.load(KC_b + offs_c[:, None] * stride_kcc + offs_d[None, :] * stride_kcd, mask=kv_mask, other=0.0)
        k = k.to(q.dtype)  # fp8 -> bf16/fp16 is exact; no-op otherwise
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * sc_cache
        s = tl.where(c_mask[None, :], s, float("-inf"))
        # online softmax update
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        v = tl.load(VC_b + offs_c[:, None] * stride_vcc + offs_d[None, :] * stride_vcd, mask=kv_mask, other=0.0)
        v = v.to(q.dtype)
        pv = tl.dot(p.to(q.dtype), v, input_precision="ieee")
        if HAS_SCALE:
            pv = pv * v_sc
        acc = acc * alpha[:, None] + pv

    # -- step 3: the question's own rows, causal j <= i (rows of this block have i <= i_hi)
    i_hi = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, S * G) - 1) // G
    n_hi = tl.minimum(S, i_hi + 1)
    KN_b = KN + pid_t * stride_knt + kvh * stride_knh
    VN_b = VN + pid_t * stride_vnt + kvh * stride_vnh
    for j0 in range(0, n_hi, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        j_mask = offs_j < S
        kv_mask = j_mask[:, None] & d_mask[None, :]
        k = tl.load(KN_b + offs_j[:, None] * stride_kns + offs_d[None, :] * stride_knd, mask=kv_mask, other=0.0)
        k = k.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        causal = (offs_j[None, :] <= offs_i[:, None]) & j_mask[None, :]
        s = tl.where(causal, s, float("-inf"))
        # online softmax update (every row already saw a finite score: cache or j = 0)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        v = tl.load(VN_b + offs_j[:, None] * stride_vns + offs_d[None, :] * stride_vnd, mask=kv_mask, other=0.0)
        v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision="ieee")

    # -- step 4: normalise and store
    out = acc / l_i[:, None]
    o_ptr = O + pid_t * stride_ot + offs_h[:, None] * stride_oh + offs_i[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------- launcher
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_fusion_args(q, k_cache, v_cache, k_new, v_new, k_scale, v_scale):
    """Shape / dtype checks shared by the Triton and reference paths; returns dims."""
    if q.dim() != 4:
        raise ValueError(f"q must be (T, Hq, S, D), got {tuple(q.shape)}")
    T, Hq, S, D = q.shape
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q dtype {q.dtype} not supported")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} must match, (T, Hkv, C, D)")
    Tc, Hkv, C, Dc = k_cache.shape
    if Tc != T or Dc != D:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    if k_new.shape != (T, Hkv, S, D) or v_new.shape != (T, Hkv, S, D):
        raise ValueError(f"k_new/v_new must be {(T, Hkv, S, D)}, got {tuple(k_new.shape)} / {tuple(v_new.shape)}")
    if k_new.dtype != q.dtype or v_new.dtype != q.dtype:
        raise TypeError("k_new / v_new must have q's dtype")
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8:
        if v_cache.dtype != k_cache.dtype or k_scale is None or v_scale is None:
            raise TypeError("a float8_e4m3fn cache needs v_cache in fp8 too and k_scale / v_scale")
        for sc in (k_scale, v_scale):
            if tuple(sc.shape) not in ((Hkv,), (T, Hkv)):
                raise ValueError(f"k_scale / v_scale must be ({Hkv},) or ({T}, {Hkv}), got {tuple(sc.shape)}")
    elif k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"cache dtype {k_cache.dtype} must be q's dtype {q.dtype} or float8_e4m3fn")
    return T, Hq, Hkv, S, C, D, fp8


def _launch_fusion_attention(q, k_cache, v_cache, k_new, v_new, scale, k_scale, v_scale, blocks=None):
    """Check shapes, pick block sizes, launch once for all frames."""
    T, Hq, Hkv, S, C, D, fp8 = _check_fusion_args(q, k_cache, v_cache, k_new, v_new, k_scale, v_scale)
    G = Hq // Hkv
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    stride_sct = 0
    if fp8:
        k_scale = k_scale.to(device=q.device, dtype=torch.float32).expand(T, Hkv).contiguous()
        v_scale = v_scale.to(device=q.device, dtype=torch.float32).expand(T, Hkv).contiguous()
        stride_sct = Hkv
    else:  # unused dummies (HAS_SCALE=False), any valid pointer will do
        k_scale = v_scale = out
    interp = interpreting() and not q.is_cuda
    # Native 16-bit dots only on a GPU: the interpreter multiplies bf16 bit patterns.
    native_dot = (not interp) and q.dtype in (torch.bfloat16, torch.float16)

    BLOCK_D = dot_block(D, 1 << 30)
    rows = S * G
    if interp:
        # Interpreter: cost is per op; big tiles mean few loop steps and programs.
        BLOCK_M = dot_block(rows, 128)
        BLOCK_N = dot_block(max(C, S), 128)
        num_warps, num_stages = 4, 1
    else:
        # GPU: BLOCK_M covers G*S (16..64 rows; short questions waste nothing),
        # BLOCK_N 64 keys (32 when D > 64 to bound registers), 4 warps.
        BLOCK_M = dot_block(rows, 64)
        BLOCK_N = 64 if BLOCK_D <= 64 else 32
        num_warps, num_stages = 4, 2
    if blocks:
        BLOCK_M = blocks.get("BLOCK_M", BLOCK_M)
        BLOCK_N = blocks.get("BLOCK_N", BLOCK_N)
    grid = (T, Hkv, triton.cdiv(rows, BLOCK_M))
    _fusion_attention_kernel[grid](
        q, k_cache, v_cache, k_new, v_new, out, k_scale, v_scale, stride_sct,
        S, C, G, float(scale) * _LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *k_new.stride(), *v_new.stride(), *out.stride(),
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        HAS_SCALE=fp8, NATIVE_DOT=native_dot,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


# --------------------------------------------------------------------------- public functions
def fusion_attention_triton(q, k_cache, v_cache, k_new, v_new, *, scale, k_scale=None, v_scale=None):
    """Triton pre-fusion attention, one launch for all T frames. See module docstring."""
    return _launch_fusion_attention(q, k_cache, v_cache, k_new, v_new, scale, k_scale, v_scale)


#: Most float32 score elements the reference holds at once (256 MB): query rows are taken in
#: blocks small enough for this, so a 10,000-token question stays within a fixed memory bound.
REFERENCE_SCORE_BUDGET = 1 << 26


def fusion_attention_reference(q, k_cache, v_cache, k_new, v_new, *, scale, k_scale=None, v_scale=None):
    """Plain PyTorch version (float32): cache scores and causal new-row scores are computed
    separately and merged with a shared max; no concatenated K/V, no expanded kv heads.
    Query rows go in blocks so that scores never exceed `REFERENCE_SCORE_BUDGET` elements
    (one block, the whole question, for ordinary question lengths)."""
    T, Hq, Hkv, S, C, D, fp8 = _check_fusion_args(q, k_cache, v_cache, k_new, v_new, k_scale, v_scale)
    kc = vc = None
    if C > 0:
        kc, vc = k_cache.float(), v_cache.float()
        if fp8:
            kc = kc * k_scale.float().to(q.device).view(-1, Hkv, 1, 1)   # (1|T, Hkv) scales
            vc = vc * v_scale.float().to(q.device).view(-1, Hkv, 1, 1)
    kn, vn = k_new.float(), v_new.float()
    per_row = max(1, T * Hq * (S + C))
    R = max(1, min(S, REFERENCE_SCORE_BUDGET // per_row))
    if R >= S:
        return _reference_rows(q, kc, vc, kn, vn, 0, S, scale).reshape(T, Hq, S, D).to(q.dtype)
    out = torch.empty(T, Hq, S, D, dtype=q.dtype, device=q.device)
    for r0 in range(0, S, R):
        r1 = min(S, r0 + R)
        out[:, :, r0:r1] = _reference_rows(q, kc, vc, kn, vn, r0, r1, scale).to(q.dtype)
    return out


def _reference_rows(q, kc, vc, kn, vn, r0: int, r1: int, scale):
    """Outputs (T, Hq, r1 - r0, D) float32 of question rows r0..r1-1: they see every cached row
    and new rows 0..i (causal)."""
    T, Hq, _, D = q.shape
    Hkv, n = kn.shape[1], r1 - r0
    G = Hq // Hkv
    qf = q[:, :, r0:r1].float().reshape(T, Hkv, G * n, D)  # rows g*n + i share kv head
    kn, vn = kn[:, :, :r1], vn[:, :, :r1]                  # later rows are never visible
    s_new = (qf @ kn.transpose(-1, -2)).view(T, Hkv, G, n, r1) * scale
    causal = torch.ones(n, r1, dtype=torch.bool, device=q.device).tril(diagonal=r0)
    s_new = s_new.masked_fill(~causal, float("-inf"))
    m = s_new.amax(-1)  # (T, Hkv, G, n), finite: j = 0 is always visible
    if kc is not None:
        C = kc.shape[2]
        s_c = (qf @ kc.transpose(-1, -2)).view(T, Hkv, G, n, C) * scale
        m = torch.maximum(m, s_c.amax(-1))
    p_new = torch.exp(s_new - m[..., None])
    l = p_new.sum(-1)
    num = (p_new.reshape(T, Hkv, G * n, r1) @ vn).view(T, Hkv, G, n, D)
    if kc is not None:
        p_c = torch.exp(s_c - m[..., None])
        l = l + p_c.sum(-1)
        num = num + (p_c.reshape(T, Hkv, G * n, C) @ vc).view(T, Hkv, G, n, D)
    return (num / l[..., None]).reshape(T, Hq, n, D)


def fusion_attention(q, k_cache, v_cache, k_new, v_new, *, scale, k_scale=None, v_scale=None):
    """Dispatcher: the Triton kernel on CUDA (or under TRITON_INTERPRET=1), else PyTorch.

    An fp8 cache on a GPU older than sm89 (no e4m3 support in Triton) uses the reference.
    """
    use = triton_usable(q, _fusion_attention_kernel)
    if use and q.is_cuda and k_cache.dtype == torch.float8_e4m3fn:
        use = torch.cuda.get_device_capability(q.device) >= (8, 9)
    fn = fusion_attention_triton if use else fusion_attention_reference
    return fn(q, k_cache, v_cache, k_new, v_new, scale=scale, k_scale=k_scale, v_scale=v_scale)


# --------------------------------------------------------------------------- fp8 cache helpers
def quantize_kv_fp8(x: torch.Tensor, scale: torch.Tensor | None = None):
    """Per-kv-head e4m3 quantisation of a (T, Hkv, C, D) cache.

    scale[h] = amax(|x[:, h]|) / 448 (the e4m3 maximum) unless given; returns
    (x_fp8, scale) with x ~= x_fp8.float() * scale[h].  All-zero heads get scale 1.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (T, Hkv, C, D), got {tuple(x.shape)}")
    xf = x.float()
    Hkv = x.shape[1]
    if scale is None:
        amax = xf.abs().transpose(0, 1).reshape(Hkv, -1).amax(-1) if x.numel() else torch.zeros(Hkv, device=x.device)
        scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    scale = scale.to(device=x.device, dtype=torch.float32).reshape(Hkv)
    xq = (xf / scale.view(1, Hkv, 1, 1)).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return xq, scale


def dequantize_kv_fp8(x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
    """Inverse of quantize_kv_fp8: x_fp8.float() * scale[h], cast to ``dtype``."""
    Hkv = x_fp8.shape[1]
    return (x_fp8.float() * scale.float().to(x_fp8.device).view(1, Hkv, 1, 1)).to(dtype)


def quantize_kv_fp8_rows(x: torch.Tensor):
    """Per-(frame, layer, head) e4m3 quantisation of stacked caches (T, P, Hkv, C, D).

    Returns (x_fp8, scale (T, P, Hkv)): the "fp8" keys/values policy of the engine, where
    each frame is quantised on its own at ingest (no calibration across frames)."""
    if x.dim() != 5:
        raise ValueError(f"expected (T, P, Hkv, C, D), got {tuple(x.shape)}")
    xf = x.float()
    amax = xf.abs().amax(dim=(-1, -2))                                   # (T, P, Hkv)
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    xq = (xf / scale[..., None, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return xq, scale
