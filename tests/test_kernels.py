"""Tests for triton_kernels: compressor and pre-fusion attention.

Runs on the CPU through the Triton interpreter (TRITON_INTERPRET=1, set below before
triton is imported); on a CUDA machine the same tests also run the compiled kernels
when CUDA tensors are used (see the ``gpu`` tests).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

triton = pytest.importorskip("triton")

from triton_kernels import (  # noqa: E402
    FP8_E4M3_MAX,
    absorb_compressor,
    compress_attention,
    compress_attention_reference,
    compress_attention_triton,
    compressor_flops,
    dequantize_kv_fp8,
    fusion_attention,
    fusion_attention_reference,
    fusion_attention_triton,
    mha_compressor_flops,
    quantize_kv_fp8,
)
from triton_kernels._common import interpreting  # noqa: E402

# the submodules (the package re-exports functions with the same names)
ca_mod = importlib.import_module("triton_kernels.compress_attention")
fa_mod = importlib.import_module("triton_kernels.fusion_attention")
CAN_RUN_TRITON = interpreting() or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not CAN_RUN_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if (torch.cuda.is_available() and not interpreting()) else "cpu"

DTYPE_ROWS = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 2e-2, 2e-2, id="bf16"),
]


# --------------------------------------------------------------------------- helpers
def assert_close(actual, expected, atol, rtol, what="output"):
    """Like torch.testing.assert_close, but says WHERE and HOW MUCH the tensors differ.

    Returns the max abs difference so callers can print it.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    diff = (a - e).abs()
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    excess = diff - (atol + rtol * e.abs())
    bad = (excess > 0) | nan_mismatch
    max_abs = diff.max().item() if diff.numel() else 0.0
    if bad.any():
        flat = int(torch.argmax(torch.where(nan_mismatch, torch.full_like(excess, math.inf), excess)))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
        amax_flat = int(torch.argmax(diff))
        amax_idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(amax_flat), a.shape))
        rel = (diff / e.abs().clamp_min(1e-12)).max().item()
        msg = (
            f"{what}: {int(bad.sum())}/{a.numel()} elements outside atol={atol:g} + rtol={rtol:g}*|expected|\n"
            f"  worst (vs tolerance) at index {idx}: actual {a[idx].item():.8g}, expected {e[idx].item():.8g}, "
            f"abs diff {diff[idx].item():.3g}\n"
            f"  max abs diff {max_abs:.3g} at index {amax_idx}: actual {a[amax_idx].item():.8g}, "
            f"expected {e[amax_idx].item():.8g}; max rel diff {rel:.3g}; "
            f"max |expected| {e.abs().max().item():.4g}"
        )
        pytest.fail(msg)
    return max_abs


def rand(*shape, dtype=torch.float32, scale=1.0, gen=None):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


# --------------------------------------------------------------------------- compressor
class CompressorModule(nn.Module):
    """Literal LLaVA-Mini compressor: ln_q(query) + pos_q attends to ln_kv(x) + pos_kv."""

    def __init__(self, E, heads, nq, N, gen):
        super().__init__()
        self.query = nn.Parameter(torch.randn(nq, E, generator=gen) * 0.5)
        self.pos_q = nn.Parameter(torch.randn(nq, E, generator=gen) * 0.2)
        self.pos_kv = nn.Parameter(torch.randn(N, E, generator=gen) * 0.2)
        self.ln_q = nn.LayerNorm(E, eps=1e-5)
        self.ln_kv = nn.LayerNorm(E, eps=1e-5)
        self.attn = nn.MultiheadAttention(E, heads, batch_first=True)
        with torch.no_grad():  # non-trivial affine params and biases
            for ln in (self.ln_q, self.ln_kv):
                ln.weight.copy_(1 + 0.2 * torch.randn(E, generator=gen))
                ln.bias.copy_(0.2 * torch.randn(E, generator=gen))
            self.attn.in_proj_weight.copy_(torch.randn(3 * E, E, generator=gen) * (1.5 / math.sqrt(E)))
            self.attn.in_proj_bias.copy_(0.1 * torch.randn(3 * E, generator=gen))
            self.attn.out_proj.bias.copy_(0.1 * torch.randn(E, generator=gen))
        self.heads, self.nq = heads, nq

    def forward(self, x):
        B, N, E = x.shape
        q0 = self.ln_q(self.query) + self.pos_q
        kv = self.ln_kv(x)
        out, _ = self.attn(q0.expand(B, self.nq, E), kv + self.pos_kv, kv)
        return out

    def absorbed(self):
        return absorb_compressor(
            self.query, self.pos_q, self.ln_q.weight, self.ln_q.bias,
            self.attn.in_proj_weight, self.attn.in_proj_bias,
            self.attn.out_proj.weight, self.attn.out_proj.bias,
            self.ln_kv.weight, self.ln_kv.bias, self.pos_kv, self.heads,
        )


# (B, N, E, heads, nq): odd N, E not a multiple of the block, nq 1 and 4
COMPRESS_SHAPES = [
    pytest.param(2, 1, 64, 8, 1, id="N1-E64"),
    pytest.param(3, 7, 64, 8, 4, id="N7-E64-nq4"),
    pytest.param(2, 123, 96, 4, 1, id="N123-E96-h4"),
    pytest.param(2, 576, 256, 8, 1, id="N576-E256"),
    pytest.param(1, 577, 200, 8, 4, id="N577-E200-nq4"),
    pytest.param(2, 576, 1024, 8, 1, id="N576-E1024-llava"),  # the real shape; ~0.5 s
]


def _compressor_case(B, N, E, heads, nq, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mod = CompressorModule(E, heads, nq, N, gen).to(DEVICE)
    x = (torch.randn(B, N, E, generator=gen) * 1.5 + 0.3).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        expected = mod(x.float())  # ground truth on the same (possibly bf16-rounded) input
        ab = mod.absorbed()
    return mod, x, ab, expected


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_ROWS)
@pytest.mark.parametrize("B,N,E,heads,nq", COMPRESS_SHAPES)
def test_compress_reference_matches_module(B, N, E, heads, nq, dtype, atol, rtol):
    _, x, ab, expected = _compressor_case(B, N, E, heads, nq, dtype)
    out = compress_attention_reference(x, ab)
    assert out.dtype == dtype and out.shape == (B, nq, E)
    assert_close(out, expected, atol, rtol, "reference vs nn.MultiheadAttention")


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_ROWS)
@pytest.mark.parametrize("B,N,E,heads,nq", COMPRESS_SHAPES)
def test_compress_triton_matches_module(B, N, E, heads, nq, dtype, atol, rtol):
    _, x, ab, expected = _compressor_case(B, N, E, heads, nq, dtype)
    out = compress_attention_triton(x, ab)
    assert out.dtype == dtype and out.shape == (B, nq, E)
    d = assert_close(out, expected, atol, rtol, "triton vs nn.MultiheadAttention")
    print(f"compress {dtype} B={B} N={N} E={E} heads={heads} nq={nq}: max abs diff {d:.3g}")


@needs_triton
@pytest.mark.parametrize(
    "blocks",
    [dict(BLOCK_N=32, BLOCK_E=128, BLOCK_EO=64), dict(BLOCK_N=16, BLOCK_E=32, BLOCK_EO=128)],
    ids=["gpu-tiling", "tiny-tiles"],
)
def test_compress_triton_small_tiles(blocks):
    """The GPU tiling (several E-chunk programs per frame, several N and E steps)."""
    B, N, E, heads, nq = 2, 123, 200, 4, 4
    _, x, ab, expected = _compressor_case(B, N, E, heads, nq, torch.float32, seed=1)
    z = ca_mod._launch_compress_attention(x, ab, blocks=blocks)
    out = ca_mod._project_heads(z, ab)
    assert_close(out, expected, 1e-5, 1e-5, f"triton {blocks} vs module")


@needs_triton
def test_compress_noncontiguous_and_offset_input():
    """Rows with a stride (every other patch of a bigger tensor) and a shifted mean."""
    B, N, E, heads, nq = 2, 37, 72, 8, 1
    mod, _, ab, _ = _compressor_case(B, N, E, heads, nq, torch.float32, seed=2)
    big = rand(B, 2 * N, E + 8, scale=3.0) + 20.0  # large mean: tests the LN statistics
    x = big[:, ::2, 4 : 4 + E]
    assert not x.is_contiguous()
    with torch.no_grad():
        expected = mod(x.contiguous())
    assert_close(compress_attention_triton(x, ab), expected, 1e-5, 1e-5, "strided x")


def test_compress_dispatch(monkeypatch):
    _, x, ab, expected = _compressor_case(2, 7, 64, 8, 1, torch.float32)
    assert_close(compress_attention(x, ab), expected, 1e-5, 1e-5, "dispatcher")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensor, no interpreter -> reference
    if not x.is_cuda:
        assert not ca_mod.triton_usable(x, ca_mod._compress_attention_kernel)
    assert_close(compress_attention(x, ab), expected, 1e-5, 1e-5, "dispatcher fallback")


def test_compress_shape_checks():
    _, x, ab, _ = _compressor_case(1, 7, 64, 8, 1, torch.float32)
    with pytest.raises(ValueError):
        compress_attention_triton(x[:, :5], ab)  # N does not match pos_kv
    with pytest.raises(ValueError):
        compress_attention_triton(x[0], ab)


def test_compressor_flops():
    absorbed, plain = compressor_flops(576, 1024, 8, 1), mha_compressor_flops(576, 1024, 8, 1)
    # dominant terms: 4*HQ*N*E + 4*nq*E^2 versus 4*N*E^2
    assert 4 * 8 * 576 * 1024 < absorbed < 6 * 8 * 576 * 1024 + 5 * 1024 * 1024
    assert 4 * 576 * 1024 * 1024 < plain
    print(f"compressor per frame: absorbed {absorbed / 1e6:.1f} MFLOP vs MHA {plain / 1e9:.2f} GFLOP "
          f"({plain / absorbed:.0f}x)")
    assert plain / absorbed > 50


# --------------------------------------------------------------------------- fusion attention
def fusion_oracle(q, k_cache, v_cache, k_new, v_new, scale, k_scale=None, v_scale=None):
    """Naive float64 oracle: concatenated K/V, repeated kv heads, explicit causal mask."""
    T, Hq, S, D = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    kc, vc = k_cache.double().cpu(), v_cache.double().cpu()
    if k_scale is not None:
        kc = kc * k_scale.double().cpu().view(1, Hkv, 1, 1)
        vc = vc * v_scale.double().cpu().view(1, Hkv, 1, 1)
    K = torch.cat([kc, k_new.double().cpu()], dim=2).repeat_interleave(G, dim=1)
    V = torch.cat([vc, v_new.double().cpu()], dim=2).repeat_interleave(G, dim=1)
    mask = torch.cat([torch.ones(S, C, dtype=torch.bool), torch.ones(S, S, dtype=torch.bool).tril()], dim=1)
    s = (q.double().cpu() @ K.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ V


def _fusion_inputs(T, Hq, Hkv, S, C, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = rand(T, Hq, S, D, dtype=dtype, gen=gen)
    k_cache = rand(T, Hkv, C, D, dtype=dtype, gen=gen)
    v_cache = rand(T, Hkv, C, D, dtype=dtype, gen=gen)
    k_new = rand(T, Hkv, S, D, dtype=dtype, gen=gen)
    v_new = rand(T, Hkv, S, D, dtype=dtype, gen=gen)
    return q, k_cache, v_cache, k_new, v_new


# (T, Hq, Hkv, S, C, D): every C in {1,7,123,577}, S in {1,5,64}, heads, D in {16,64}
FUSION_SHAPES = [
    pytest.param(1, 4, 4, 1, 1, 16, id="T1-h44-S1-C1-D16"),
    pytest.param(3, 8, 2, 5, 7, 16, id="T3-h82-S5-C7-D16"),
    pytest.param(3, 4, 4, 64, 123, 64, id="T3-h44-S64-C123-D64"),
    pytest.param(1, 8, 2, 64, 577, 64, id="T1-h82-S64-C577-D64"),
    pytest.param(2, 8, 2, 5, 577, 16, id="T2-h82-S5-C577-D16"),
    pytest.param(3, 8, 2, 1, 123, 64, id="T3-h82-S1-C123-D64"),
    pytest.param(2, 4, 4, 64, 7, 16, id="T2-h44-S64-C7-D16"),
    pytest.param(3, 8, 2, 5, 0, 16, id="T3-h82-S5-C0-D16"),
    pytest.param(2, 4, 4, 1, 0, 64, id="T2-h44-S1-C0-D64"),
    pytest.param(2, 6, 2, 37, 123, 24, id="T2-h62-S37-C123-D24"),  # G=3, D not pow2
]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_ROWS)
@pytest.mark.parametrize("T,Hq,Hkv,S,C,D", FUSION_SHAPES)
def test_fusion_reference_matches_oracle(T, Hq, Hkv, S, C, D, dtype, atol, rtol):
    args = _fusion_inputs(T, Hq, Hkv, S, C, D, dtype)
    scale = D**-0.5
    out = fusion_attention_reference(*args, scale=scale)
    assert out.dtype == dtype and out.shape == (T, Hq, S, D)
    assert_close(out, fusion_oracle(*args, scale), atol, rtol, "reference vs float64 oracle")


@needs_triton
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_ROWS)
@pytest.mark.parametrize("T,Hq,Hkv,S,C,D", FUSION_SHAPES)
def test_fusion_triton_matches_reference(T, Hq, Hkv, S, C, D, dtype, atol, rtol):
    args = _fusion_inputs(T, Hq, Hkv, S, C, D, dtype)
    scale = D**-0.5
    out = fusion_attention_triton(*args, scale=scale)
    assert out.dtype == dtype and out.shape == (T, Hq, S, D)
    assert_close(out, fusion_attention_reference(*args, scale=scale), atol, rtol, "triton vs reference")
    assert_close(out, fusion_oracle(*args, scale), atol, rtol, "triton vs float64 oracle")


@needs_triton
def test_fusion_triton_many_frames():
    """T=300 frames in one launch (small C/S/D to keep the interpreter quick)."""
    args = _fusion_inputs(300, 8, 2, 1, 7, 16, torch.float32, seed=3)
    out = fusion_attention_triton(*args, scale=0.25)
    assert_close(out, fusion_attention_reference(*args, scale=0.25), 1e-5, 1e-5, "T=300 triton vs reference")
    assert_close(out, fusion_oracle(*args, 0.25), 1e-5, 1e-5, "T=300 triton vs oracle")


@needs_triton
@pytest.mark.parametrize("blocks", [dict(BLOCK_M=16, BLOCK_N=16), dict(BLOCK_M=32, BLOCK_N=64)], ids=["16x16", "32x64"])
def test_fusion_triton_gpu_tiling(blocks):
    """Several row blocks (packed rows i*G+g split across blocks, G=3), several cache and
    causal steps with the causal bound, as with the GPU block sizes."""
    args = _fusion_inputs(2, 6, 2, 37, 123, 24, torch.float32, seed=4)
    out = fa_mod._launch_fusion_attention(*args, 0.3, None, None, blocks=blocks)
    assert_close(out, fusion_oracle(*args, 0.3), 1e-5, 1e-5, f"triton {blocks} vs oracle")


@needs_triton
def test_fusion_noncontiguous_views():
    """q in (T, S, H, D) layout transposed; caches sliced out of a larger capacity buffer."""
    T, Hq, Hkv, S, C, D = 2, 8, 2, 5, 40, 16
    gen = torch.Generator().manual_seed(5)
    q = rand(T, S, Hq, D, gen=gen).transpose(1, 2)
    kbuf, vbuf = rand(T, Hkv, 64, D, gen=gen), rand(T, Hkv, 64, D, gen=gen)
    k_cache, v_cache = kbuf[:, :, :C], vbuf[:, :, :C]
    k_new = rand(T, S, Hkv, D, gen=gen).transpose(1, 2)
    v_new = rand(T, S, Hkv, D, gen=gen).transpose(1, 2)
    assert not q.is_contiguous() and not k_cache.is_contiguous()
    args = (q, k_cache, v_cache, k_new, v_new)
    assert_close(fusion_attention_triton(*args, scale=0.25), fusion_oracle(*args, 0.25), 1e-5, 1e-5, "views")


def test_fusion_dispatch(monkeypatch):
    args = _fusion_inputs(2, 8, 2, 5, 7, 16, torch.float32)
    expected = fusion_oracle(*args, 0.25)
    assert_close(fusion_attention(*args, scale=0.25), expected, 1e-5, 1e-5, "dispatcher")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert_close(fusion_attention(*args, scale=0.25), expected, 1e-5, 1e-5, "dispatcher fallback")


def test_fusion_shape_checks():
    q, kc, vc, kn, vn = _fusion_inputs(1, 6, 4, 3, 5, 16, torch.float32)  # 6 % 4 != 0
    with pytest.raises(ValueError):
        fusion_attention_reference(q, kc, vc, kn, vn, scale=1.0)
    q, kc, vc, kn, vn = _fusion_inputs(1, 4, 4, 3, 5, 16, torch.float32)
    with pytest.raises(TypeError):  # fp8 cache without scales
        fusion_attention_reference(q, kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn), kn, vn, scale=1.0)
    with pytest.raises(ValueError):
        fusion_attention_reference(q, kc, vc, kn[:, :, :2], vn, scale=1.0)


# --------------------------------------------------------------------------- fp8 cache
def test_fp8_quantize_roundtrip():
    gen = torch.Generator().manual_seed(6)
    x = rand(3, 4, 57, 16, gen=gen) * torch.tensor([0.01, 1.0, 30.0, 1e3], device=DEVICE).view(1, 4, 1, 1)
    xq, scale = quantize_kv_fp8(x)
    assert xq.dtype == torch.float8_e4m3fn and scale.shape == (4,) and scale.dtype == torch.float32
    # per-head amax maps onto the e4m3 maximum
    amax = x.abs().transpose(0, 1).reshape(4, -1).amax(-1)
    torch.testing.assert_close(scale, amax / FP8_E4M3_MAX)
    assert torch.equal(xq.float().abs().transpose(0, 1).reshape(4, -1).amax(-1), torch.full((4,), FP8_E4M3_MAX, device=DEVICE))
    # dequantised values: within half an e4m3 step (3 mantissa bits -> rel 2^-4; subnormal step 2^-9)
    xd = dequantize_kv_fp8(xq, scale)
    bound = x.abs() * 2.0**-4 + scale.view(1, 4, 1, 1) * 2.0**-10
    err = (xd - x).abs()
    worst = (err / bound).max().item()
    print(f"fp8 round trip: max rel err {((err / x.abs().clamp_min(1e-30)).max().item()):.3g}, worst/bound {worst:.3g}")
    assert worst <= 1.0 + 1e-6
    # dequantised values are exactly representable: quantising them again is the identity
    xq2, _ = quantize_kv_fp8(xd, scale=scale)
    assert torch.equal(xq2.view(torch.uint8), xq.view(torch.uint8))
    # all-zero head gets scale 1
    _, s0 = quantize_kv_fp8(torch.zeros(1, 2, 3, 16, device=DEVICE))
    assert torch.equal(s0, torch.ones(2, device=DEVICE))


FP8_CASES = [
    pytest.param(3, 8, 2, 5, 123, 64, torch.float32, id="fp32-C123-D64"),
    pytest.param(2, 4, 4, 64, 577, 16, torch.float32, id="fp32-C577-S64"),
    pytest.param(3, 8, 2, 1, 7, 16, torch.bfloat16, id="bf16-C7-S1"),
    pytest.param(1, 8, 2, 5, 577, 64, torch.bfloat16, id="bf16-C577-D64"),
]


@pytest.mark.parametrize("T,Hq,Hkv,S,C,D,dtype", FP8_CASES)
def test_fusion_fp8_cache(T, Hq, Hkv, S, C, D, dtype):
    """fp8 policy: exact same math as dequantise-then-attend; deviation vs the unquantised
    cache is printed and bounded (relative L2 error < 0.1, max abs < 0.1 * max |out|)."""
    q, kc, vc, kn, vn = _fusion_inputs(T, Hq, Hkv, S, C, D, dtype, seed=7)
    scale = D**-0.5
    kq, ks = quantize_kv_fp8(kc)
    vq, vs = quantize_kv_fp8(vc)
    fp8_args = (q, kq, vq, kn, vn)
    use_triton = CAN_RUN_TRITON
    fn = fusion_attention_triton if use_triton else fusion_attention_reference
    out8 = fn(*fp8_args, scale=scale, k_scale=ks, v_scale=vs)
    assert out8.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    # against the dequantised cache (the definition of the fp8 path)
    deq = (q, dequantize_kv_fp8(kq, ks, dtype), dequantize_kv_fp8(vq, vs, dtype), kn, vn)
    assert_close(out8, fusion_attention_reference(*fp8_args, scale=scale, k_scale=ks, v_scale=vs), tol, tol,
                 "fp8 triton vs fp8 reference")
    assert_close(out8, fusion_oracle(*deq, scale), tol, tol, "fp8 vs oracle on dequantised cache")
    # against the exact (unquantised) cache: report and bound the quantisation error
    exact = fusion_oracle(q, kc, vc, kn, vn, scale)
    d = out8.double().cpu() - exact
    max_abs = d.abs().max().item()
    rel_l2 = (d.norm() / exact.norm()).item()
    rel_max = max_abs / exact.abs().max().item()
    print(f"fp8 cache {dtype} T={T} Hq={Hq} Hkv={Hkv} S={S} C={C} D={D}: "
          f"max abs dev {max_abs:.3g}, max abs / max|out| {rel_max:.3g}, rel L2 {rel_l2:.3g}")
    assert rel_l2 < 0.1, f"fp8 relative L2 error {rel_l2:.3g} >= 0.1 (max abs {max_abs:.3g})"
    assert rel_max < 0.1, f"fp8 max abs dev {max_abs:.3g} is {rel_max:.3g} of max |out|"


# --------------------------------------------------------------------------- GPU (compiled kernels)
gpu = pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs CUDA, no interpreter")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_ROWS)
def test_gpu_kernels(dtype, atol, rtol):
    _, x, ab, expected = _compressor_case(4, 576, 1024, 8, 1, dtype)
    assert_close(compress_attention(x, ab), expected, atol, rtol, "gpu compressor")
    args = _fusion_inputs(16, 32, 8, 64, 577, 128, dtype)
    assert_close(fusion_attention(*args, scale=128**-0.5), fusion_oracle(*args, 128**-0.5), atol, rtol,
                 "gpu fusion attention")


def test_fusion_attention_per_frame_fp8_scales():
    """(T, Hkv) scales (one per frame, as the engine quantises at ingest) equal dequantising first."""
    from triton_kernels.fusion_attention import (dequantize_kv_fp8, fusion_attention_reference,
                                                 fusion_attention_triton, quantize_kv_fp8)
    g = torch.Generator().manual_seed(5)
    T, Hq, Hkv, S, C, D = 3, 4, 2, 5, 9, 16
    q = torch.randn(T, Hq, S, D, generator=g)
    kn, vn = torch.randn(T, Hkv, S, D, generator=g), torch.randn(T, Hkv, S, D, generator=g)
    kc = torch.randn(T, Hkv, C, D, generator=g) * torch.tensor([1.0, 3.0, 0.2]).view(T, 1, 1, 1)
    vc = torch.randn(T, Hkv, C, D, generator=g)
    parts = [quantize_kv_fp8(kc[t:t + 1]) for t in range(T)], [quantize_kv_fp8(vc[t:t + 1]) for t in range(T)]
    kq = torch.cat([p[0] for p in parts[0]]); ks = torch.stack([p[1] for p in parts[0]])
    vq = torch.cat([p[0] for p in parts[1]]); vs = torch.stack([p[1] for p in parts[1]])
    kd = torch.cat([dequantize_kv_fp8(kq[t:t + 1], ks[t]) for t in range(T)])
    vd = torch.cat([dequantize_kv_fp8(vq[t:t + 1], vs[t]) for t in range(T)])
    want = fusion_attention_reference(q, kd, vd, kn, vn, scale=D ** -0.5)
    for fn in (fusion_attention_reference, fusion_attention_triton):
        got = fn(q, kq, vq, kn, vn, scale=D ** -0.5, k_scale=ks, v_scale=vs)
        assert_close(got, want, atol=1e-5, rtol=1e-5, what=fn.__name__)
