"""Shared fixtures: tiny checkpoints in the official layout, made once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Triton kernels run on the CPU through the interpreter in tests (no GPU here).
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from model.tiny import make_tiny_checkpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from model import LlavaMini
    return LlavaMini.from_pretrained(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_oracle(tiny_ckpt):
    from model.oracle import OracleLlavaMini
    return OracleLlavaMini.from_pretrained(tiny_ckpt, dtype=torch.float32)


def frames(T: int, size: int = 56, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, 3, size, size, generator=g)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, what: str = ""):
    """Like torch.testing.assert_close, but says where and by how much."""
    diff = (actual.float() - expected.float()).abs()
    bound = atol + rtol * expected.float().abs()
    bad = diff > bound
    if bad.any():
        i = int(diff.flatten().argmax())
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), diff.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {diff.numel()} elements differ beyond atol={atol} rtol={rtol}; "
            f"max abs diff {diff.max().item():.3e} at {idx}: actual {actual.flatten()[i].item():.6f} "
            f"expected {expected.flatten()[i].item():.6f}")
