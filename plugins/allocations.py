"""SQMP row allocations (sec. 3.1, app. A.2): which output rows are high precision (4-bit)."""

from __future__ import annotations

import zlib

import torch

from edgerazor.hookspecs import hookimpl


def super_group_period(rho: float) -> int:
    """``P = round(1 / rho)``: one high-precision row leads every block of P rows."""
    return max(1, round(1.0 / rho))


def super_group(d_out: int, rho: float, **context) -> torch.Tensor:
    """Row i is 4-bit iff ``i % round(1/rho) == 0`` (rho=1: all; rho=0: none)."""
    if rho <= 0:
        return torch.zeros(d_out, dtype=torch.bool)
    return torch.arange(d_out) % super_group_period(rho) == 0


def stacked(d_out: int, rho: float, **context) -> torch.Tensor:
    """Ablation: the first ``round(rho * d_out)`` rows are 4-bit."""
    mask = torch.zeros(d_out, dtype=torch.bool)
    mask[: round(rho * d_out)] = True
    return mask


def random(d_out: int, rho: float, seed: int = 0, layer_name: str = "", **context) -> torch.Tensor:
    """Ablation: a seeded random subset of ``round(rho * d_out)`` rows, different per layer."""
    # torch's CPU generator keeps only the low 32 bits of a seed, so fold seed and layer into 32 bits
    # (crc32 is a bijection of its start value: distinct seeds mod 2**32 give distinct generators).
    generator = torch.Generator().manual_seed(zlib.crc32(layer_name.encode(), seed % 2**32))
    mask = torch.zeros(d_out, dtype=torch.bool)
    mask[torch.randperm(d_out, generator=generator)[: round(rho * d_out)]] = True
    return mask


@hookimpl
def register_allocations(register):
    register("super_group", super_group)
    register("stacked", stacked)
    register("random", random)
