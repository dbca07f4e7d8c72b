"""Logit-distillation mixers (sec. 3.3): the weight of the forward KL, the rest goes to reverse KL.

Each returns a constant (no gradient): ``L_logit = w * KL(P_T||P_S) + (1 - w) * KL(P_S||P_T)``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from edgerazor.hookspecs import hookimpl

if TYPE_CHECKING:  # torch is imported where a function needs it, so listing plugins stays fast
    import torch


def _sequence_mean(values: torch.Tensor, seq_index: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Mean over sequences of each sequence's mean over its response tokens."""
    import torch

    if values.numel() == 0:
        return values.new_zeros(())
    _, dense = torch.unique(seq_index, return_inverse=True)
    sums = torch.zeros(num_sequences, dtype=values.dtype, device=values.device).index_add_(0, dense, values)
    counts = torch.zeros(num_sequences, dtype=values.dtype, device=values.device).index_add_(
        0, dense, torch.ones_like(values)
    )
    return (sums / counts).mean()


def eakld(stats, K: int = 16, **options) -> torch.Tensor:
    """EAKLD (eq. 6-7): lambda = batch mean of per-sequence mean of min(H_i, log K) / log K."""
    log_k = math.log(K)
    ratio = stats.entropy.clamp(max=log_k) / log_k  # the clip is per token
    return _sequence_mean(ratio, stats.seq_index, stats.num_sequences).detach()


def cakld(stats, **options) -> torch.Tensor:
    """BitDistiller's confidence-aware KL: gamma = mean teacher probability of the label token.

    A confident teacher (gamma near 1) favours the mode-seeking reverse KL: forward weight 1 - gamma.
    """
    gamma = _sequence_mean(stats.label_prob, stats.seq_index, stats.num_sequences)
    return (1 - gamma).detach()


def forward(stats, **options) -> torch.Tensor:
    """Forward KL only (FKLD)."""
    import torch

    return torch.ones((), dtype=stats.entropy.dtype)


def reverse(stats, **options) -> torch.Tensor:
    """Reverse KL only."""
    import torch

    return torch.zeros((), dtype=stats.entropy.dtype)


@hookimpl
def register_kl_mixers(register):
    register("eakld", eakld)
    register("cakld", cakld)
    register("forward", forward)
    register("reverse", reverse)
