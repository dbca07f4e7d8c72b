"""Per-group symmetric integer quantization machinery (no scheme-specific formulas here).

Groups run along the last (input) dimension and never cross a row or a token. Scales are rounded
to fp16 before use, so the integer codes and scales an exporter writes reproduce the training
forward bit for bit. Quantizer plugins only supply ``scale(groups)`` and ``qmax``.
"""

from __future__ import annotations

from typing import Protocol

import torch

FP16_MAX = float(torch.finfo(torch.float16).max)


class GroupQuantizer(Protocol):
    """What a quantizer plugin provides: a per-group scale and a symmetric integer range."""

    bits: float  # storage bits per weight, counted the paper's way (1.58, 4, 8)
    qmax: int  # codes lie in [-qmax, qmax]

    def scale(self, groups: torch.Tensor) -> torch.Tensor:
        """``groups`` is ``[..., J, G]`` float32; return ``[..., J]`` float32 scales (> 0)."""


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round scales to fp16 (kept as float32) so export stores exactly what training used."""
    return scale.clamp(max=FP16_MAX).to(torch.float16).to(torch.float32)


def to_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[..., D]`` -> ``[..., D // G, G]`` float32; D must be a multiple of G (checked by callers)."""
    if x.shape[-1] % group_size:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of group size {group_size}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def quantize_groups(
    groups: torch.Tensor, scales: torch.Tensor, qmax: torch.Tensor | int
) -> torch.Tensor:
    """Integer codes ``clip(round(g / s), -qmax, qmax)`` as int8, for fp16-rounded ``scales``."""
    q = torch.round(groups / scales.unsqueeze(-1))
    if isinstance(qmax, int):
        q = q.clamp(-qmax, qmax)
    else:
        q = torch.clamp(q, -qmax, qmax)
    return q.to(torch.int8)


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``s * q`` in float32, same shape as the groups."""
    return codes.to(torch.float32) * scales.unsqueeze(-1)


def quantize_tensor(x: torch.Tensor, quantizer: GroupQuantizer, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform quantization of ``[..., D]``: returns (int8 codes ``[..., D]``, scales ``[..., D // G]``)."""
    groups = to_groups(x, group_size)
    scales = round_scale(quantizer.scale(groups))
    codes = quantize_groups(groups, scales, quantizer.qmax)
    return codes.reshape(x.shape), scales


def quantize_rows(
    weight: torch.Tensor,
    mask: torch.Tensor,
    high: GroupQuantizer,
    low: GroupQuantizer | None,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed-precision rows: rows where ``mask`` is True use ``high``, the others ``low``.

    Returns int8 codes ``[d_out, d_in]`` and fp16-rounded float32 scales ``[d_out, d_in // G]``.
    """
    groups = to_groups(weight, group_size)
    if low is None or bool(mask.all()):
        scales = round_scale(high.scale(groups))
        qmax: torch.Tensor | int = high.qmax
    elif not bool(mask.any()):
        scales = round_scale(low.scale(groups))
        qmax = low.qmax
    else:
        row = mask.view(-1, 1).to(groups.device)
        scales = round_scale(torch.where(row, high.scale(groups), low.scale(groups)))
        qmax = torch.where(row, high.qmax, low.qmax).to(groups.dtype).unsqueeze(-1)
    codes = quantize_groups(groups, scales, qmax)
    return codes.reshape(weight.shape), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of ``quantize_rows`` / ``quantize_tensor``: float32 ``[..., D]``."""
    groups = codes.reshape(*codes.shape[:-1], codes.shape[-1] // group_size, group_size)
    return dequantize_groups(groups, scales).reshape(codes.shape)


def straight_through(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Forward exactly ``x_hat``, backward identity to ``x`` (the STE), in ``x``'s dtype.

    ``x_hat + (x - x.detach())`` adds an exact zero, so the forward value is bit-identical to
    ``x_hat``; the textbook ``x + (x_hat - x).detach()`` rounds twice and breaks export exactness.
    """
    return x_hat.detach().to(x.dtype) + (x - x.detach())


def fake_quantize(x: torch.Tensor, quantizer: GroupQuantizer, group_size: int) -> torch.Tensor:
    """Dynamic per-group fake quantization with STE (activations and KV cache)."""
    codes, scales = quantize_tensor(x, quantizer, group_size)
    return straight_through(x, dequantize(codes, scales, group_size))
