"""Quantizers of eq. 8: ternary (1.58-bit) and symmetric absmax n-bit, per group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgerazor.hookspecs import hookimpl

if TYPE_CHECKING:  # torch is imported where a function needs it, so listing plugins stays fast
    import torch

EPS = 1e-5


@dataclass(frozen=True)
class TernaryQuantizer:
    """``s = max(beta / G * sum |W|, eps)``, codes in {-1, 0, 1}; packed as five trits per byte."""

    beta: float = 2.0
    eps: float = EPS
    bits: float = 1.58
    qmax: int = 1
    codec: str = "ternary_base3"

    def scale(self, groups: torch.Tensor) -> torch.Tensor:
        return (self.beta * groups.abs().mean(dim=-1)).clamp(min=self.eps)


@dataclass(frozen=True)
class AbsMaxQuantizer:
    """n-bit symmetric: ``s = max(max |W| / (2^(n-1) - 1), eps)``, codes in [-(2^(n-1)-1), 2^(n-1)-1]."""

    n_bits: int
    eps: float = EPS
    codec: str | None = None  # None: the generic sym{qmax} codec

    @property
    def bits(self) -> float:
        return float(self.n_bits)

    @property
    def qmax(self) -> int:
        return 2 ** (self.n_bits - 1) - 1

    def scale(self, groups: torch.Tensor) -> torch.Tensor:
        return (groups.abs().amax(dim=-1) / self.qmax).clamp(min=self.eps)


@hookimpl
def register_quantizers(register):
    register("ternary", TernaryQuantizer())
    register("int4", AbsMaxQuantizer(4, codec="int4"))  # nibbles (q + 8), as GGUF's Q4_0 stores them
    register("int8", AbsMaxQuantizer(8, codec="int8"))
