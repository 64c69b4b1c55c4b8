"""Shared helpers for the Triton kernels: optional import, dispatch rule, block sizes.

Triton decides at *decoration* time whether ``@triton.jit`` produces a compiled
``JITFunction`` (GPU) or an ``InterpretedFunction`` (CPU interpreter): it reads
``TRITON_INTERPRET`` when the kernel module is imported.  So the dispatch rule is

    use Triton  <=>  triton imported  and  ( x is on CUDA and the kernel is compiled
                                             or  TRITON_INTERPRET=1 now and the kernel
                                                 is interpreted and x is on the CPU )

Interpreter (triton 3.9) facts the kernels rely on / work around:

* loads and stores of float32, float16, bfloat16 and float8_e4m3fn CPU tensors work
  (every one of the 256 e4m3 bit patterns converts to float32 exactly, except the NaN
  patterns 0x7f/0xff, which the interpreter turns into +-480; quantize_kv_fp8 clamps to
  +-448 and never produces them);
* bfloat16 is held as raw ``uint16`` in numpy, so *arithmetic* on bf16 values is wrong
  (``x * x`` gives garbage / NaN) and ``tl.dot`` on bf16 operands multiplies the bit
  patterns.  Workaround: every load is converted with ``.to(tl.float32)`` before any
  arithmetic, and the dot operands stay float32 under the interpreter (constexpr
  ``NATIVE_DOT=False``).  On a GPU, bf16/fp16 operands go to ``tl.dot`` natively
  (tensor cores, fp32 accumulation) and float32 operands use ``input_precision="ieee"``
  so float32 results stay within 1e-5 of the reference (no TF32).
"""

from __future__ import annotations

import os

import torch

try:  # Triton is an optional dependency (extra "kernels").
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    from types import SimpleNamespace

    # Stubs so that the kernel modules still import: ``@triton.jit`` yields None
    # (the dispatchers then fall back to the PyTorch references) and the
    # ``tl.constexpr`` annotations evaluate to something.
    triton = SimpleNamespace(jit=lambda fn=None, **kwargs: None, cdiv=lambda a, b: -(-a // b))
    tl = SimpleNamespace(constexpr=object)
    HAS_TRITON = False


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set in the environment right now."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1``."""
    return type(kernel).__name__ == "InterpretedFunction"


def triton_usable(x: torch.Tensor, kernel) -> bool:
    """The dispatch rule described in the module docstring."""
    if not HAS_TRITON or kernel is None:
        return False
    if kernel_is_interpreted(kernel):
        return interpreting() and not x.is_cuda
    return x.is_cuda


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def dot_block(n: int, cap: int) -> int:
    """A power-of-two block >= 16 (tl.dot's minimum) covering ``n`` up to ``cap``."""
    return max(16, min(cap, next_pow2(n)))
