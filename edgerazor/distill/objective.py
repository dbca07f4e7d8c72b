"""Eq. 1: the distillation objective assembled from plugins for one micro-batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edgerazor.distill.divergence import distill_sums, response_positions, teacher_token_stats
from edgerazor.distill.features import feature_loss
from edgerazor.distill.fused import fused_distill, fused_teacher_stats, head_operands
from edgerazor.plugin_manager import get_plugins
from edgerazor.recipe import DistillSection


@dataclass
class ModelOutputs:
    """What the objective and loss plugins see of a model's forward pass."""

    logits: torch.Tensor | None  # None on the fused path: the loss projects head_input itself
    hidden_states: list[torch.Tensor]  # F^(0..L), pre-norm residual stream
    head_input: torch.Tensor | None = None  # what the lm_head receives (after the final norm)
    head: torch.nn.Module | None = None  # the lm_head applied to head_input (fake-quantized for a student)


@dataclass
class LossBreakdown:
    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, for logging
    kl_weight: float = 0.0  # the mixer's forward-KL weight (lambda for EAKLD)
    layers: list[int] = field(default_factory=list)


def check_vocabularies(student_vocab: int, teacher_vocab: int) -> None:
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"teacher and student vocabularies differ ({teacher_vocab} vs {student_vocab} logits): "
            "logit distillation needs the same tokenizer and output layer size"
        )


def distillation_loss(
    student: ModelOutputs,
    teacher: ModelOutputs,
    batch: dict[str, torch.Tensor],
    cfg: DistillSection,
    num_items: torch.Tensor | int | None = None,
) -> LossBreakdown:
    """``a_task*CE + a_feature*L_feature + a_logit*L_logit + sum_k w_k * extra_k``.

    CE and the KL terms are sums over response tokens divided by ``num_items`` (the number of
    response tokens in the global, accumulated batch), so gradient accumulation and data
    parallelism leave the loss scale unchanged.
    """
    fused = student.logits is None
    if fused and (student.head_input is None or teacher.head_input is None):
        raise ValueError("ModelOutputs without logits need head_input and head (the fused logit loss)")
    if fused and cfg.extra_losses:
        raise ValueError("distill.extra_losses read logits: run them with the unfused path (logits given)")
    ref = student.head_input if fused else student.logits
    if fused:
        check_vocabularies(student.head.out_features, teacher.head.out_features)
    else:
        check_vocabularies(student.logits.shape[-1], teacher.logits.shape[-1])
    plugins = get_plugins()
    labels = batch["labels"]
    pos = response_positions(labels)
    n = num_items if num_items is not None else max(pos.index.numel(), 1)
    if isinstance(n, torch.Tensor):
        n = n.to(ref.device).clamp(min=1)

    if fused:
        h_s, w_s, b_s = head_operands(student.head, student.head_input, pos.index)
        with torch.no_grad():
            h_t, w_t, b_t = head_operands(teacher.head, teacher.head_input, pos.index)
        stats = fused_teacher_stats(h_t, w_t, b_t, pos, cfg.chunk_size)
        w_forward = plugins.get("kl_mixers", cfg.kl_mixer)(stats, **cfg.kl_mixer_options)
        scale = 1 / torch.as_tensor(n, dtype=torch.promote_types(w_s.dtype, torch.float32), device=ref.device)
        coef = torch.stack((cfg.alpha_logit * scale, cfg.alpha_logit * scale, cfg.alpha_task * scale))
        fused_loss, sums = fused_distill(h_s, w_s, b_s, h_t, w_t, b_t, pos, w_forward, coef, cfg.chunk_size)
        sums = sums / n  # for logging; the gradient flows through fused_loss
    else:
        stats = teacher_token_stats(teacher.logits, pos, cfg.chunk_size)
        w_forward = plugins.get("kl_mixers", cfg.kl_mixer)(stats, **cfg.kl_mixer_options)
        sums = distill_sums(student.logits, teacher.logits, pos, w_forward, cfg.chunk_size) / n
    logit_loss = sums[0] + sums[1]
    task_loss = sums[2]

    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != -100  # the positions whose outputs are distilled
    layers: list[int] = []
    feat = ref.new_zeros((), dtype=sums.dtype)
    if cfg.alpha_feature > 0:
        selector = plugins.get("selectors", cfg.selector)
        layers = list(selector(teacher.hidden_states, valid, **cfg.selector_options))
        feat = feature_loss(teacher.hidden_states, student.hidden_states, layers, valid, n)

    if fused:
        total = fused_loss + cfg.alpha_feature * feat
    else:
        total = cfg.alpha_task * task_loss + cfg.alpha_feature * feat + cfg.alpha_logit * logit_loss
    terms = {"loss_task": task_loss, "loss_feature": feat, "loss_logit": logit_loss,
             "loss_fkl": sums[0], "loss_rkl": sums[1]}
    for name, weight in cfg.extra_losses.items():
        value = plugins.get("losses", name)(student, teacher, batch)
        terms[f"loss_{name}"] = value
        total = total + weight * value
    w = float(w_forward.float().mean()) if isinstance(w_forward, torch.Tensor) else float(w_forward)
    return LossBreakdown(total, terms, w, layers)
