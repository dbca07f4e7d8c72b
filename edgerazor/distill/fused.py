"""The logit loss with the lm_head fused in: final hidden states in, no ``[tokens, V]`` logits held.

At V=151,936 the chunked divergence still needs both models' full logits (0.6 GB per 1,024 tokens
in fp32, per model, plus their gradient). Here each chunk of response rows is projected through
the lm_heads, reduced and dropped:

1. a no-grad pass over the teacher's chunks gives its entropy and label probability (the KL
   mixer needs the whole batch's statistics before any token's weight is known);
2. one pass over both models' chunks gives ``[sum w FKL, sum (1-w) RKL, sum CE]`` *and*, because
   the loss's coefficients are constants known now, the gradients w.r.t. the student hidden
   states and lm_head weight, accumulated chunk by chunk;
3. backward only scales those gradients by the incoming scalar gradient.

This is five ``[N, H] x [H, V]`` products against the unfused path's four, but no pass over full
logits. Peak extra memory is a few ``[chunk, V]`` buffers plus one ``[V, H]`` weight gradient.
The fake-quantized weight ``W_q`` (and the lm_head's input fake-quant) are applied outside the
autograd Function, so their straight-through estimators are plain autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgerazor.distill.divergence import ResponsePositions, TokenStats, per_token_weights
from edgerazor.quant.modules import QuantLinear

#: config fields that change logits after the lm_head matmul: the fused loss would not be exact
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def fused_unsupported(model: nn.Module) -> str | None:
    """Why the fused loss cannot reproduce ``model``'s logits exactly, or None if it can."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return f"{type(model).__name__} has no nn.Linear output layer"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in _LOGIT_POSTPROCESSING:
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"{type(model).__name__} post-processes its logits ({name})"
    return None


def head_operands(head: nn.Module, hidden: torch.Tensor, index: torch.Tensor):
    """``(x, W, b)`` with ``head(hidden).flatten(0, -2)[index] == F.linear(x, W, b)``.

    ``x`` is the selected rows of the lm_head input after the head's own activation fake-quant
    (per token, so selecting rows first gives the same values); ``W`` the fake-quantized weight
    through the STE, so gradients w.r.t. ``W`` reach the latent (possibly tied) Parameter.
    """
    x = hidden.reshape(-1, hidden.shape[-1])[index]
    if isinstance(head, QuantLinear):
        if head.input_quant is not None:
            x = head.input_quant(x)
        return x, head.weight_quant(head.weight), head.bias
    return x, head.weight, head.bias


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return F.linear(h, weight, bias).to(dtype)


def _log_softmax_(z: torch.Tensor) -> torch.Tensor:
    return z.sub_(torch.logsumexp(z, -1, keepdim=True))


def _dot_block(v: int) -> int | None:
    """The largest divisor of ``v`` in [256, 4096], or None."""
    return next((d for d in range(min(v, 4096), 255, -1) if v % d == 0), None)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product without a ``[rows, V]`` temporary where the vocabulary allows it.

    One long matmul-accumulated dot over 151,936 fp32 terms drifts (~1e-4 relative); dots over
    blocks of a few thousand, summed, stay near torch.sum's accuracy (~1e-6). Both are views of
    the contiguous rows, so nothing is copied. A vocabulary without such a divisor pays one temporary.
    """
    rows, v = a.shape
    block = _dot_block(v)
    if block is None or not (a.is_contiguous() and b.is_contiguous()):
        return (a * b).sum(-1)
    n = v // block
    return torch.matmul(a.view(rows, n, 1, block), b.view(rows, n, block, 1)).view(rows, n).sum(-1)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


@torch.no_grad()
def fused_teacher_stats(h_t, w_t, b_t, pos: ResponsePositions, chunk_size: int) -> TokenStats:
    """Teacher entropy and label probability per response token, from hidden states, chunked."""
    dtype = _compute_dtype(w_t)
    entropy, label_prob = [], []
    for start in range(0, pos.index.numel(), chunk_size):
        sl = slice(start, start + chunk_size)
        log_t = _log_softmax_(_logits(h_t[sl], w_t, b_t, dtype))
        label_prob.append(log_t.gather(-1, pos.target[sl, None]).squeeze(-1).exp())
        entropy.append(-_row_dot(log_t.exp(), log_t))
    empty = h_t.new_zeros(0, dtype=dtype)
    return TokenStats(torch.cat(entropy) if entropy else empty, torch.cat(label_prob) if label_prob else empty,
                      pos.seq_index, pos.num_sequences)


class _FusedDistill(torch.autograd.Function):
    """``loss = sum_k coef_k * sums_k`` with ``sums = [sum w FKL, sum (1-w) RKL, sum CE]``.

    Per token, d loss / d z = p_S (c_f w + c_ce + c_r (1-w)(log p_S - log p_T - RKL)) - c_f w p_T
    - c_ce onehot(label) (as in ``divergence._ChunkedDistill``); it is multiplied into the hidden
    state and weight gradients chunk by chunk during the forward pass.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, target, w_forward, coef, chunk_size, with_grad):
        dtype = _compute_dtype(w_s)
        c_f, c_r, c_ce = coef.to(dtype)
        sums = torch.zeros(3, dtype=dtype, device=h_s.device)
        dh = torch.zeros_like(h_s) if with_grad else None
        dw = torch.zeros(w_s.shape, dtype=dtype, device=w_s.device) if with_grad else None
        db = torch.zeros(w_s.shape[0], dtype=dtype, device=w_s.device) if with_grad and b_s is not None else None
        for start in range(0, h_s.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            tgt, w = target[sl, None], w_forward[sl].to(dtype)
            log_t = _log_softmax_(_logits(h_t[sl], w_t, b_t, dtype))
            log_s = _log_softmax_(_logits(h_s[sl], w_s, b_s, dtype))
            ce = -log_s.gather(-1, tgt).squeeze(-1)
            p_s = log_s.exp()
            diff = log_s.sub_(log_t)  # log p_S - log p_T, in place of log_s
            rkl = _row_dot(p_s, diff)
            p_t = log_t.exp_()  # in place of log_t
            fkl = -_row_dot(p_t, diff)
            sums += torch.stack(((w * fkl).sum(), ((1 - w) * rkl).sum(), ce.sum()))
            if not with_grad:
                continue
            cw = (c_f * w)[:, None]
            grad = diff.sub_(rkl[:, None]).mul_((c_r * (1 - w))[:, None]).add_(cw + c_ce).mul_(p_s)
            grad.sub_(p_t.mul_(cw))
            grad.scatter_add_(-1, tgt, (-c_ce).expand(tgt.shape).to(dtype))
            del p_s, p_t
            dh[sl] = grad.to(w_s.dtype) @ w_s
            dw.addmm_(grad.T, h_s[sl].to(dtype))
            if db is not None:
                db += grad.sum(0)
        ctx.grads = (dh, dw.to(w_s.dtype) if with_grad else None,
                     db.to(b_s.dtype) if db is not None else None)
        loss = (coef.to(dtype) * sums).sum()
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        if ctx.grads is None or ctx.grads[0] is None:
            raise RuntimeError("fused logit loss: no gradients to give (forward ran without them, or backward "
                               "already ran: the loss's graph cannot be retained)")
        dh, dw, db = ctx.grads
        ctx.grads = None  # handed over (the weight gradient may become the Parameter's .grad itself)
        unit = bool(grad_loss == 1)  # the common case: hand over the buffers, no [V, H] copy

        def scaled(g):
            return g if g is None or unit else g * grad_loss.to(g.dtype)

        return (scaled(dh), scaled(dw), scaled(db), None, None, None, None, None, None, None, None)


def fused_distill(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    b_s: torch.Tensor | None,
    h_t: torch.Tensor,
    w_t: torch.Tensor,
    b_t: torch.Tensor | None,
    pos: ResponsePositions,
    w_forward: torch.Tensor | float,
    coef: torch.Tensor,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, sums)``: ``sums`` as ``distill_sums`` returns for ``F.linear(h, W, b)`` logits
    (no gradient), and ``loss = sum(coef * sums)`` with gradients for ``h_s``, ``w_s`` and ``b_s``.

    ``h_*`` are the ``[N, H]`` lm_head inputs at ``pos`` (see ``head_operands``); ``coef`` holds the
    constant weights of the three sums in the objective.
    """
    if w_s.shape[0] != w_t.shape[0]:
        raise ValueError(
            f"teacher and student vocabularies differ: student lm_head has {w_s.shape[0]} rows, teacher "
            f"{w_t.shape[0]}; distillation needs the same tokenizer"
        )
    w = per_token_weights(w_forward, pos.index.numel(), h_s.device)
    coef = torch.as_tensor(coef, device=h_s.device).detach()
    with_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h_s, w_s, b_s))
    loss, sums = _FusedDistill.apply(h_s, w_s, b_s, h_t.detach(), w_t.detach(),
                                     None if b_t is None else b_t.detach(), pos.target, w, coef, chunk_size, with_grad)
    return loss, sums
