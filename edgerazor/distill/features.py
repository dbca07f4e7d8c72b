"""Recording the residual stream F^(0..L) with hooks, independent of ``output_hidden_states``.

transformers replaces the last entry of ``hidden_states`` with the final-norm output; LAFD needs
the pre-norm residual stream after every decoder layer, so we hook the layers themselves.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def record_residual_stream(layers: nn.ModuleList):
    """Yield a list that, after a forward pass, holds F^(0) (input of layer 0) and F^(1..L)."""
    states: dict[int, torch.Tensor] = {}
    handles = []

    def first_input(module, args, kwargs):
        states[0] = args[0] if args else kwargs["hidden_states"]

    def output(index):
        def hook(module, args, out):
            states[index] = out[0] if isinstance(out, (tuple, list)) else out

        return hook

    handles.append(layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(output(i + 1)))
    recorded: list[torch.Tensor] = []
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
    recorded.extend(states[i] for i in range(len(layers) + 1))


def feature_loss(
    teacher_states: list[torch.Tensor],
    student_states: list[torch.Tensor],
    layers: list[int],
    valid: torch.Tensor,
    num_items: torch.Tensor | int,
) -> torch.Tensor:
    """Eq. 5 as a sum over this micro-batch normalised by the global token count:
    ``1/|S| sum_{l in S} 1/(|T| d) sum_t ||F_T - F_S||^2`` with |T| = ``num_items``."""
    if not layers:
        return student_states[0].new_zeros(())
    d = student_states[0].shape[-1]
    total = 0.0
    for layer in layers:
        diff = teacher_states[layer][valid].float() - student_states[layer][valid].float()
        total = total + diff.pow(2).sum()
    return total / (len(layers) * d * num_items)
