"""SQMP row allocations (sec. 3.1, app. A.2): which output rows are high precision (4-bit)."""

from __future__ import annotations

import re
import zlib
from fnmatch import fnmatchcase
from fractions import Fraction
from typing import TYPE_CHECKING

from edgerazor.hookspecs import hookimpl

if TYPE_CHECKING:  # torch is imported where a function needs it, so listing plugins stays fast
    import torch


def super_group_period(rho: float) -> int:
    """``P = round(1 / rho)``: one high-precision row leads every block of P rows."""
    return max(1, round(1.0 / rho))


def super_group(d_out: int, rho: float, **context) -> torch.Tensor:
    """Row i is 4-bit iff ``i % round(1/rho) == 0`` (rho=1: all; rho=0: none)."""
    import torch

    if rho <= 0:
        return torch.zeros(d_out, dtype=torch.bool)
    return torch.arange(d_out) % super_group_period(rho) == 0


def stacked(d_out: int, rho: float, **context) -> torch.Tensor:
    """Ablation: the first ``round(rho * d_out)`` rows are 4-bit."""
    import torch

    mask = torch.zeros(d_out, dtype=torch.bool)
    mask[: round(rho * d_out)] = True
    return mask


def random(d_out: int, rho: float, seed: int = 0, layer_name: str = "", **context) -> torch.Tensor:
    """Ablation: a seeded random subset of ``round(rho * d_out)`` rows, different per layer."""
    import torch

    # torch's CPU generator keeps only the low 32 bits of a seed, so fold seed and layer into 32 bits
    # (crc32 is a bijection of its start value: distinct seeds mod 2**32 give distinct generators).
    generator = torch.Generator().manual_seed(zlib.crc32(layer_name.encode(), seed % 2**32))
    mask = torch.zeros(d_out, dtype=torch.bool)
    mask[torch.randperm(d_out, generator=generator)[: round(rho * d_out)]] = True
    return mask


#: per_tensor: tensor kinds, most sensitive first (llama.cpp's mixes also favour ffn_down and attn_v).
#: A kind's rank sets its phase, so at low rho the most sensitive kinds get the first 4-bit layers.
PER_TENSOR_KINDS = ("down_proj", "v_proj", "o_proj", "k_proj", "q_proj", "up_proj", "gate_proj")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def _per_tensor_phase(kind: str) -> Fraction:
    if kind in PER_TENSOR_KINDS:
        return 1 - Fraction(2 * PER_TENSOR_KINDS.index(kind) + 1, 2 * len(PER_TENSOR_KINDS))
    return Fraction(2 * (zlib.crc32(kind.encode()) % 997) + 1, 2 * 997)  # unknown kinds: a fixed, spread phase


def per_tensor_is_high(layer_name: str, rho: float) -> bool:
    """Whether the whole tensor ``layer_name`` is 4-bit under ``per_tensor`` at ``rho``."""
    if rho <= 0:
        return False
    if rho >= 1:
        return True
    match = _LAYER_INDEX.search(layer_name)
    i = int(match.group(1)) if match else 0
    kind = layer_name.rsplit(".", 1)[-1]
    r, c = Fraction(rho).limit_denominator(10**6), _per_tensor_phase(kind)
    # Bresenham / Beatty rule per kind: of layers 0..L-1, exactly floor(L*rho + c) carry this kind at 4-bit
    return (r * (i + 1) + c).__floor__() > (r * i + c).__floor__()


def per_tensor(d_out: int, rho: float, layer_name: str = "", high_patterns=None, **context) -> torch.Tensor:
    """Whole tensors at 4-bit or ternary (beyond the paper; like llama.cpp's per-tensor mixes).

    Each tensor is all-4-bit or all-ternary, so a GGUF export stores it at its own size (Q4_0 or
    TQ2_0/TQ1_0) instead of a mixed layer's lossless Q4_0. The rule uses the layer name alone:
    for each tensor kind (``q_proj`` ... ``down_proj``), layer ``i`` is 4-bit iff
    ``floor((i+1)*rho + c) > floor(i*rho + c)``, a per-kind phase ``c`` in (0, 1) (most sensitive
    kinds - ``down_proj``, ``v_proj`` - get the largest phase, hence the first 4-bit layers).
    Every kind is then 4-bit in ``floor(L*rho + c)`` of ``L`` layers, so the realised fraction of
    decoder weights at 4-bit is within ``1/L`` of ``rho`` for any mix of tensor sizes, and exactly
    ``rho`` when ``L*rho`` is an integer. Option ``high_patterns`` (list of globs on the module
    name) replaces the rule: matching tensors are 4-bit, the others ternary, whatever ``rho`` is.
    """
    import torch

    if high_patterns is not None:
        if isinstance(high_patterns, str):
            high_patterns = [high_patterns]
        high = any(fnmatchcase(layer_name, p) for p in high_patterns)
    else:
        high = per_tensor_is_high(layer_name, rho)
    return torch.full((d_out,), high, dtype=torch.bool)


@hookimpl
def register_allocations(register):
    register("super_group", super_group)
    register("stacked", stacked)
    register("random", random)
    register("per_tensor", per_tensor)
