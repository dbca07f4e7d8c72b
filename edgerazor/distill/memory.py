"""What each rank holds of the models and the optimizer, measured (not estimated), for results.json.

Under DeepSpeed a rank holds a partition of each ZeRO-3 weight (``ds_tensor``), the fp32 master
partition the ZeRO optimizer steps on, and Adam's two moments for that partition; ``edgerazor plan``
estimates the same quantities from the shapes (``plan.resident_model_state_bytes``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """``(held, whole)``: the bytes of ``model``'s parameters this rank holds, and of the whole model
    (a tied weight counts once)."""
    held = whole = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if hasattr(p, "ds_id"):  # a ZeRO-3 partition: the module's tensor is empty outside a forward
            held += p.ds_tensor.numel() * p.ds_tensor.element_size()
            held += p.numel() * p.element_size() if getattr(p, "ds_persist", False) else 0  # kept whole too
            whole += p.ds_numel * p.element_size()
        else:
            held += p.numel() * p.element_size()
            whole += p.numel() * p.element_size()
    return held, whole


def optimizer_bytes(optimizer, model: nn.Module) -> dict[str, int]:
    """``master``: the bytes of the tensors the innermost torch optimizer steps on that do not share storage
    with ``model``'s parameters (DeepSpeed's fp32 partitions; 0 without DeepSpeed, and under ZeRO-3 with
    float32 parameters, which it steps in place); ``adam``: its state tensors (m, v)."""
    inner = optimizer
    while inner is not None and hasattr(inner, "optimizer"):  # accelerate -> ZeRO optimizer -> torch AdamW
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        return {"master": 0, "adam": 0}
    own = set()  # the storages the model's parameters (or their ZeRO-3 partitions) live in
    for p in model.parameters():
        for t in (p.data, getattr(p, "ds_tensor", None)):
            if t is not None and t.numel():
                own.add(t.untyped_storage().data_ptr())
    master = sum(p.numel() * p.element_size() for group in inner.param_groups for p in group["params"]
                 if p.untyped_storage().data_ptr() not in own)
    adam = sum(t.numel() * t.element_size() for state in inner.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)
    return {"master": master, "adam": adam}


def rank_memory(teacher: nn.Module, student: nn.Module, optimizer) -> dict[str, Any]:
    """Every rank's measured bytes (lists indexed by rank; a collective under a launcher)."""
    from edgerazor.ranks import all_gather

    teacher_held, teacher_whole = parameter_bytes(teacher)
    student_held, student_whole = parameter_bytes(student)
    mine = {"teacher_parameters": teacher_held, "student_parameters": student_held,
            **{f"optimizer_{k}": v for k, v in optimizer_bytes(optimizer, student).items()}}
    every = all_gather(mine)
    return {"teacher_whole": teacher_whole, "student_whole": student_whole,
            **{key: [rank[key] for rank in every] for key in mine}}
