"""The fusion policy: how many frames a question is fused with (DESIGN section 3). A plain value that
the CLI and the service parse and check before any model loads (so without importing torch), and that
`model.llava_mini` applies."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import BadArgument

if TYPE_CHECKING:
    import torch


@dataclass
class FusionPolicy:
    """How many frames the question is fused with. "exact" (default): every frame, the
    official numbers. "budget": at most `max_fused_frames`, evenly spaced in time; the LLM
    still sees every frame's token, only the fused-text average is taken over fewer frames."""

    name: str = "exact"
    max_fused_frames: int | None = None

    @classmethod
    def parse(cls, spec: "str | FusionPolicy | None") -> "FusionPolicy":
        if spec is None or isinstance(spec, FusionPolicy):
            return spec or cls()
        s = str(spec).strip().lower()
        if s == "exact":
            return cls()
        head, _, n = s.partition(":")
        if head.strip() == "budget":             # ("budgetx:5" was read as budget:5)
            try:
                k = int(n or 512)
            except ValueError:
                k = 0
            if k < 1:
                raise BadArgument(f"expected a fusion policy 'budget:N' with N >= 1, got {spec!r}")
            return cls("budget", k)
        raise BadArgument(f"expected fusion policy 'exact' or 'budget:N', got {spec!r}")

    def frames(self, T: int) -> torch.Tensor:
        import torch                                 # here: parsing a policy needs no torch
        if self.name == "exact" or self.max_fused_frames is None or T <= self.max_fused_frames:
            return torch.arange(T)
        return torch.linspace(0, T - 1, self.max_fused_frames).round().long().unique()

    def describe(self, T: int) -> str:
        n = len(self.frames(T))
        return "exact" if n == T else f"budget:{self.max_fused_frames} (fused {n} of {T} frames)"
