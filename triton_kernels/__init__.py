"""Triton kernels for LLaVA-Mini Stream (each with a same-signature PyTorch reference).

* :mod:`.compress_attention` - the LLaVA-Mini compressor (constant-query Resampler) with
  the queries absorbed, fused LayerNorm + scores + online softmax + weighted sum.
* :mod:`.fusion_attention` - question-time pre-fusion attention of the question rows
  over each frame's cached K/V (optionally fp8) plus their own causal rows, GQA.

The ``compress_attention`` / ``fusion_attention`` dispatchers use Triton when the input
is on CUDA, or when ``TRITON_INTERPRET=1`` was set before import (CPU interpreter), and
the PyTorch reference otherwise.
"""

from ._common import HAS_TRITON
from .compress_attention import (
    AbsorbedCompressor,
    absorb_compressor,
    compress_attention,
    compress_attention_reference,
    compress_attention_triton,
    compressor_flops,
    mha_compressor_flops,
)
from .fusion_attention import (
    FP8_E4M3_MAX,
    dequantize_kv_fp8,
    fusion_attention,
    fusion_attention_reference,
    fusion_attention_triton,
    quantize_kv_fp8,
    quantize_kv_fp8_rows,
)

__all__ = [
    "HAS_TRITON",
    "AbsorbedCompressor",
    "absorb_compressor",
    "compress_attention",
    "compress_attention_reference",
    "compress_attention_triton",
    "compressor_flops",
    "mha_compressor_flops",
    "FP8_E4M3_MAX",
    "dequantize_kv_fp8",
    "fusion_attention",
    "fusion_attention_reference",
    "fusion_attention_triton",
    "quantize_kv_fp8",
    "quantize_kv_fp8_rows",
]
