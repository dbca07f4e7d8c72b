"""Chunked full-vocabulary divergences for logit distillation.

For 151,936-token vocabularies, ``B*T*V`` float32 logits do not fit twice in memory. The
functions here walk the response positions in chunks of ``chunk_size`` tokens: each chunk is
gathered, log-softmaxed in (at least) float32, reduced, and dropped; the backward pass
recomputes each chunk and writes its gradient straight into the logits' gradient. Extra peak
memory is therefore one chunk, not a copy of the batch's logits.

Next-token prediction is shifted: logits at position ``t`` predict ``labels[t + 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class ResponsePositions:
    """Flat indices (into ``[B*T]`` logits rows) of the positions that predict a response token."""

    index: torch.Tensor  # [N] long, b * T + t
    target: torch.Tensor  # [N] long, the label token predicted there
    seq_index: torch.Tensor  # [N] long, which sequence each position belongs to
    num_sequences: int  # sequences with at least one response token


def response_positions(labels: torch.Tensor) -> ResponsePositions:
    """Shift for next-token prediction: position t is used iff ``labels[:, t + 1] != -100``."""
    batch, length = labels.shape
    valid = torch.zeros_like(labels, dtype=torch.bool)
    valid[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    b, t = valid.nonzero(as_tuple=True)
    index = b * length + t
    target = labels[b, t + 1]
    return ResponsePositions(index, target, b, int(torch.unique(b).numel()))


@dataclass
class TokenStats:
    """Per-response-token teacher statistics handed to KL mixer plugins."""

    entropy: torch.Tensor  # [N] teacher entropy H_i in nats (full vocabulary)
    label_prob: torch.Tensor  # [N] teacher probability of the label token
    seq_index: torch.Tensor  # [N] sequence of each token
    num_sequences: int


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _rows(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # advanced indexing, not index_select: on CPU index_select of wide rows is ~30x slower
    return logits.reshape(-1, logits.shape[-1])[index].to(_compute_dtype(logits))


@torch.no_grad()
def teacher_token_stats(teacher_logits: torch.Tensor, pos: ResponsePositions, chunk_size: int = 1024) -> TokenStats:
    """Entropy and label probability of the teacher at every response position, chunked."""
    entropy, label_prob = [], []
    for start in range(0, pos.index.numel(), chunk_size):
        idx = pos.index[start : start + chunk_size]
        log_p = torch.log_softmax(_rows(teacher_logits, idx), dim=-1)
        entropy.append(-(log_p.exp() * log_p).sum(-1))
        label_prob.append(log_p.gather(-1, pos.target[start : start + chunk_size, None]).squeeze(-1).exp())
    empty = teacher_logits.new_zeros(0, dtype=_compute_dtype(teacher_logits))
    return TokenStats(
        torch.cat(entropy) if entropy else empty,
        torch.cat(label_prob) if label_prob else empty,
        pos.seq_index,
        pos.num_sequences,
    )


class _ChunkedDistill(torch.autograd.Function):
    """Sums over response tokens of [w * FKL, (1 - w) * RKL, CE] with chunked recomputation.

    FKL_i = sum_v p_T (log p_T - log p_S); RKL_i = sum_v p_S (log p_S - log p_T);
    CE_i = -log p_S(label). Gradients w.r.t. the student logits z (per token):
    dFKL = p_S - p_T; dRKL = p_S * (log p_S - log p_T - RKL_i); dCE = p_S - onehot(label).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, index, target, w_forward, chunk_size):
        ctx.save_for_backward(student_logits, teacher_logits, index, target, w_forward)
        ctx.chunk_size = chunk_size
        dtype = _compute_dtype(student_logits)
        sums = torch.zeros(3, dtype=dtype, device=student_logits.device)
        for start in range(0, index.numel(), chunk_size):
            sl = slice(start, start + chunk_size)
            log_s = torch.log_softmax(_rows(student_logits, index[sl]), -1)
            log_t = torch.log_softmax(_rows(teacher_logits, index[sl]), -1)
            w = w_forward[sl].to(dtype)
            fkl = (log_t.exp() * (log_t - log_s)).sum(-1)
            rkl = (log_s.exp() * (log_s - log_t)).sum(-1)
            ce = -log_s.gather(-1, target[sl, None]).squeeze(-1)
            sums += torch.stack(((w * fkl).sum(), ((1 - w) * rkl).sum(), ce.sum()))
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        student_logits, teacher_logits, index, target, w_forward = ctx.saved_tensors
        dtype = _compute_dtype(student_logits)
        grad = torch.zeros_like(student_logits)
        flat_grad = grad.view(-1, grad.shape[-1])
        g_f, g_r, g_ce = grad_sums.to(dtype)
        for start in range(0, index.numel(), ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            log_s = torch.log_softmax(_rows(student_logits, index[sl]), -1)
            log_t = torch.log_softmax(_rows(teacher_logits, index[sl]), -1)
            w = w_forward[sl].to(dtype)[:, None]
            # grad = p_S * (g_f w + g_ce + g_r (1 - w) (diff - RKL)) - g_f w p_T, built in place so a
            # chunk costs four [chunk, V] buffers (the vocabulary is large, this loop is memory-bound)
            p_s = log_s.exp()
            diff = log_s.sub_(log_t)  # log p_S - log p_T, reusing log_s
            rkl = (p_s * diff).sum(-1, keepdim=True)
            chunk_grad = diff.sub_(rkl).mul_(g_r * (1 - w)).add_(g_f * w + g_ce).mul_(p_s)
            chunk_grad.sub_(log_t.exp_().mul_(g_f * w))  # - g_f w p_T, reusing log_t
            chunk_grad.scatter_add_(-1, target[sl, None], torch.full_like(chunk_grad[:, :1], -1.0) * g_ce)
            flat_grad[index[sl]] = chunk_grad.to(grad.dtype)  # positions are unique
        return grad, None, None, None, None, None


def per_token_weights(w_forward: torch.Tensor | float, n: int, device) -> torch.Tensor:
    """The KL mixer's forward-KL weight as a constant ``[n]`` tensor (a scalar weight is broadcast)."""
    w = torch.as_tensor(w_forward, device=device).detach()
    return w.expand(n).contiguous() if w.dim() == 0 else w


def distill_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    pos: ResponsePositions,
    w_forward: torch.Tensor | float,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``[sum_i w_i FKL_i, sum_i (1 - w_i) RKL_i, sum_i CE_i]`` over response tokens (not normalised).

    ``w_forward`` is the KL mixer's forward-KL weight (scalar or per token), treated as a constant.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"teacher and student vocabularies differ: student logits have {student_logits.shape[-1]} "
            f"entries, teacher {teacher_logits.shape[-1]}; distillation needs the same tokenizer"
        )
    w = per_token_weights(w_forward, pos.index.numel(), student_logits.device)
    return _ChunkedDistill.apply(student_logits, teacher_logits.detach(), pos.index, pos.target, w, chunk_size)
