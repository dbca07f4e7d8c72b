"""Feature-layer selectors for LAFD (sec. 3.2, eq. 3-4).

``teacher_hidden_states`` holds F^(0..L): F^(0) is the embedding output and F^(l) the residual
stream after decoder layer l, before the final norm. Layers are numbered 1..L.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from edgerazor.hookspecs import hookimpl

if TYPE_CHECKING:  # torch is imported where a function needs it, so listing plugins stays fast
    import torch


def layer_cosines(hidden_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """``c_l = mean_t cos(F^(l)_t, F^(l-1)_t)`` over valid positions, for l = 1..L (returned 0-based)."""
    import torch

    valid = mask.bool()
    cos = [
        torch.nn.functional.cosine_similarity(cur[valid].float(), prev[valid].float(), dim=-1).mean()
        for prev, cur in zip(hidden_states[:-1], hidden_states[1:])
    ]
    return torch.stack(cos)


def adaptive(teacher_hidden_states: Sequence[torch.Tensor], mask: torch.Tensor, k: int = 3, **options) -> list[int]:
    """The k layers whose output changes the residual stream most (lowest c_l), recomputed per batch."""
    import torch

    with torch.no_grad():
        c = layer_cosines(teacher_hidden_states, mask)
    k = min(k, c.numel())
    return sorted(int(i) + 1 for i in torch.topk(-c, k).indices)


def fixed(teacher_hidden_states: Sequence[torch.Tensor], mask: torch.Tensor, layers: Sequence[int] = (1, 2, -1),
          **options) -> list[int]:
    """A configured list (negative counts from the end: -1 is layer L); the paper's baseline is 1, 2, L."""
    num_layers = len(teacher_hidden_states) - 1
    resolved = sorted({layer if layer > 0 else num_layers + 1 + layer for layer in layers})
    bad = [layer for layer in resolved if not 1 <= layer <= num_layers]
    if bad:
        raise ValueError(f"fixed selector: layers {list(layers)} outside 1..{num_layers} (or -{num_layers}..-1)")
    return resolved


@hookimpl
def register_selectors(register):
    register("adaptive", adaptive)
    register("fixed", fixed)
