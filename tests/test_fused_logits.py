"""The fused lm_head + logit loss against the unfused chunked path and a naive float64 recomputation."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
from torch import nn
from transformers import Qwen3ForCausalLM

import edgerazor
from edgerazor.distill.divergence import response_positions
from edgerazor.distill.fused import _dot_block, _row_dot, fused_distill, fused_teacher_stats, fused_unsupported
from edgerazor.distill.objective import ModelOutputs, distillation_loss
from edgerazor.distill.trainer import DistillationTrainer, training_arguments
from edgerazor.quant.modules import ActivationFakeQuant, QuantLinear
from edgerazor.recipe import recipe_from_dict
from tests.helpers import tiny_qwen3_config

B, T, H, V = 3, 9, 16, 40


def labels_with_masks(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, 6:] = -100  # padding
    labels[2, :] = -100  # no response token ...
    labels[2, 0] = 5  # ... except position 0, which nothing predicts
    return labels


def heads(seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    student, teacher = nn.Linear(H, V, bias=bias).double(), nn.Linear(H, V, bias=bias).double()
    with torch.no_grad():
        for lin, scale in ((student, 1.0), (teacher, 1.7)):
            lin.weight.copy_(torch.randn(V, H, generator=g, dtype=torch.float64) * scale)
            if bias:
                lin.bias.copy_(torch.randn(V, generator=g, dtype=torch.float64))
    h_s = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    # varied teacher entropies (some above log 16, some below) so EAKLD's per-token clip binds
    h_t = torch.randn(B, T, H, generator=g, dtype=torch.float64) * torch.linspace(0.05, 1.5, T, dtype=torch.float64)[:, None]
    return student, teacher, h_s, h_t


def naive(h_s, w_s, b_s, h_t, w_t, b_t, labels, mixer, alpha_task, alpha_logit, n):
    """Full float64 logits, log-softmax, mixer weight from first principles, plain autograd."""
    ls = torch.log_softmax(nn.functional.linear(h_s, w_s, b_s)[:, :-1], -1)
    lt = torch.log_softmax(nn.functional.linear(h_t, w_t, b_t)[:, :-1], -1)
    valid = labels[:, 1:] != -100
    seqs = [b for b in range(B) if valid[b].any()]
    if mixer == "eakld":
        ratio = (-(lt.exp() * lt).sum(-1)).clamp(max=torch.log(torch.tensor(16.0, dtype=torch.float64)))
        ratio = ratio / torch.log(torch.tensor(16.0, dtype=torch.float64))
        w = torch.stack([ratio[b][valid[b]].mean() for b in seqs]).mean()
    elif mixer == "cakld":
        p_label = lt.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1).exp()
        w = 1 - torch.stack([p_label[b][valid[b]].mean() for b in seqs]).mean()
    else:
        w = torch.tensor(1.0 if mixer == "forward" else 0.0, dtype=torch.float64)
    w = w.detach()
    fkl = (lt.exp() * (lt - ls)).sum(-1)[valid].sum() * w
    rkl = (ls.exp() * (ls - lt)).sum(-1)[valid].sum() * (1 - w)
    ce = -ls.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)[valid].sum()
    return (alpha_task * ce + alpha_logit * (fkl + rkl)) / n


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mixer", ["eakld", "forward", "reverse", "cakld"])
def test_fused_equals_chunked_and_naive_float64(mixer, bias):
    head_s, head_t, h_s, h_t = heads(seed=1, bias=bias)
    labels = labels_with_masks()
    cfg = recipe_from_dict({"distill": {"kl_mixer": mixer, "kl_mixer_options": {"K": 16} if mixer == "eakld" else {},
                                        "alpha_task": 0.3, "alpha_feature": 0.0, "alpha_logit": 2.0,
                                        "chunk_size": 3}}).distill
    n = torch.tensor(11)  # a global token count larger than this micro-batch's (gradient accumulation)
    params = [p for p in head_s.parameters()]
    h1 = h_s.clone().requires_grad_(True)
    fused = distillation_loss(ModelOutputs(None, [], h1, head_s), ModelOutputs(None, [], h_t, head_t),
                              {"labels": labels}, cfg, n)
    h2 = h_s.clone().requires_grad_(True)
    unfused = distillation_loss(ModelOutputs(head_s(h2), []), ModelOutputs(head_t(h_t).detach(), []),
                                {"labels": labels}, cfg, n)
    h3 = h_s.clone().requires_grad_(True)
    ref = naive(h3, head_s.weight, head_s.bias, h_t, head_t.weight, head_t.bias, labels, mixer, 0.3, 2.0, 11)

    assert 0 < fused.kl_weight < 1 or mixer in ("forward", "reverse")
    assert fused.kl_weight == pytest.approx(unfused.kl_weight, rel=1e-13, abs=1e-15)
    torch.testing.assert_close(fused.total, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(unfused.total, ref, rtol=1e-12, atol=0)
    for name in ("loss_task", "loss_logit", "loss_fkl", "loss_rkl"):
        torch.testing.assert_close(fused.terms[name], unfused.terms[name].detach(), rtol=1e-12, atol=1e-15)
    g_fused = grads(fused.total, h1, *params)
    g_unfused = grads(unfused.total, h2, *params)
    g_ref = grads(ref, h3, *params)
    for a, b, c in zip(g_fused, g_unfused, g_ref):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-13)
    assert g_fused[0][2, 1:].abs().max() == 0  # positions predicting nothing get no gradient
    assert g_fused[0][0, 2].abs().max() > 0


def test_teacher_stats_and_gradient_scaling():
    head_s, head_t, h_s, h_t = heads(seed=2)
    labels = labels_with_masks(seed=2)
    pos = response_positions(labels)
    x_t = h_t.reshape(-1, H)[pos.index]
    stats = fused_teacher_stats(x_t, head_t.weight, None, pos, chunk_size=2)
    lt = torch.log_softmax(head_t(x_t), -1)
    torch.testing.assert_close(stats.entropy, -(lt.exp() * lt).sum(-1), rtol=1e-13, atol=0)
    torch.testing.assert_close(stats.label_prob, lt.gather(-1, pos.target[:, None]).squeeze(-1).exp(),
                               rtol=1e-13, atol=0)

    x_s = h_s.reshape(-1, H)[pos.index].requires_grad_(True)
    coef = torch.tensor([0.5, 2.0, -1.5], dtype=torch.float64)
    w = torch.linspace(0, 1, pos.index.numel(), dtype=torch.float64)  # a per-token mixer weight
    loss, sums = fused_distill(x_s, head_s.weight, None, x_t, head_t.weight, None, pos, w, coef, chunk_size=4)
    (3.0 * loss).backward()  # an upstream gradient other than 1 (loss scaling) scales every gradient
    ls = torch.log_softmax(head_s(x_s.detach().requires_grad_(True)), -1)
    fkl = (w * (lt.exp() * (lt - ls)).sum(-1)).sum()
    rkl = ((1 - w) * (ls.exp() * (ls - lt)).sum(-1)).sum()
    ce = -ls.gather(-1, pos.target[:, None]).sum()
    torch.testing.assert_close(sums, torch.stack((fkl, rkl, ce)).detach(), rtol=1e-12, atol=0)
    assert not sums.requires_grad
    x_ref = x_s.detach().clone().requires_grad_(True)
    head_ref = copy.deepcopy(head_s)
    ls = torch.log_softmax(head_ref(x_ref), -1)
    ref = 3.0 * (coef[0] * (w * (lt.exp() * (lt - ls)).sum(-1)).sum()
                 + coef[1] * ((1 - w) * (ls.exp() * (ls - lt)).sum(-1)).sum()
                 + coef[2] * -ls.gather(-1, pos.target[:, None]).sum())
    ref.backward()
    torch.testing.assert_close(x_s.grad, x_ref.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(head_s.weight.grad, head_ref.weight.grad, rtol=1e-10, atol=1e-13)
    with pytest.raises(RuntimeError, match="backward already ran"):
        loss.backward()


def collate(rows):
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")}


def tiny_pair():
    torch.manual_seed(0)
    teacher = Qwen3ForCausalLM(tiny_qwen3_config(num_hidden_layers=2)).double()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # teacher and student differ before quantization too
    return teacher, student


def trainer_for(tmp_path, teacher, student, recipe):
    rows = [{"input_ids": [1, 2], "labels": [1, 2]}]
    return DistillationTrainer(model=student, teacher=teacher, recipe=recipe,
                               args=training_arguments(recipe, tmp_path, use_cpu=True),
                               train_dataset=datasets.Dataset.from_list(rows), data_collator=collate)


@pytest.mark.parametrize("mixer", ["eakld", "cakld"])
def test_trainer_fused_equals_unfused_on_quantized_tied_a8_model(tmp_path, mixer):
    """W1.88-A8 student with a 4-bit, A8 lm_head tied to its embedding: the fused loss equals the model's own logits'."""
    recipe = recipe_from_dict({"quant": {"scheme": "1.88-8-8", "weight": {"group_size": 64}},
                               "distill": {"alpha_task": 0.5, "alpha_feature": 1.0, "alpha_logit": 2.0,
                                           "kl_mixer": mixer, "kl_mixer_options": {}, "chunk_size": 5}})
    teacher, student = tiny_pair()
    edgerazor.quantize(student, recipe)
    head = student.get_output_embeddings()
    assert isinstance(head, QuantLinear) and isinstance(head.input_quant, ActivationFakeQuant)
    assert head.weight is student.get_input_embeddings().weight  # tied
    trainer = trainer_for(tmp_path, teacher, student, recipe)
    assert trainer.fused_logits
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 512, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 9:] = -100
    batch = {"input_ids": ids, "labels": labels}

    results = {}
    for fused in (True, False):
        trainer.fused_logits = fused
        student.zero_grad(set_to_none=True)
        out = trainer._forward(student, batch)
        assert (out.logits is None) == fused
        with torch.no_grad():
            t_out = trainer._forward(teacher, batch)
        loss = distillation_loss(out, t_out, batch, recipe.distill, torch.tensor(17))
        loss.total.backward()
        results[fused] = (loss, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    (fl, fg), (ul, ug) = results[True], results[False]
    assert fl.layers == ul.layers and len(fl.layers) == 2
    torch.testing.assert_close(fl.total, ul.total, rtol=1e-12, atol=0)
    torch.testing.assert_close(fl.terms["loss_logit"], ul.terms["loss_logit"].detach(), rtol=1e-12, atol=0)
    assert fl.kl_weight == pytest.approx(ul.kl_weight, rel=1e-12)
    assert fg.keys() == ug.keys() and "model.embed_tokens.weight" in fg
    for name in fg:
        torch.testing.assert_close(fg[name], ug[name], rtol=1e-9, atol=1e-12, msg=name)


def test_trainer_falls_back_where_not_exact(tmp_path, caplog):
    teacher, student = tiny_pair()
    base = {"quant": {"weight": {"group_size": 64}}}
    off = recipe_from_dict({**base, "distill": {"fused_logits": False}})
    assert recipe_from_dict(base).distill.fused_logits  # on by default
    assert not trainer_for(tmp_path, teacher, student, off).fused_logits
    capped = copy.deepcopy(student)
    capped.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in fused_unsupported(capped)
    with caplog.at_level("WARNING"):
        assert not trainer_for(tmp_path, teacher, capped, recipe_from_dict(base)).fused_logits
    assert "using the unfused logit loss" in caplog.text


@pytest.mark.parametrize("v, block", [(4800, 2400), (8192, 4096), (4099, None), (40, None)])
def test_row_dot_blocks_equal_plain_sum(v, block):
    """Blocked dots (no [rows, V] temporary) equal the elementwise sum; vocabularies without a divisor fall back."""
    g = torch.Generator().manual_seed(v)
    a, b = torch.randn(3, v, generator=g, dtype=torch.float64), torch.randn(3, v, generator=g, dtype=torch.float64)
    assert _dot_block(v) == block
    torch.testing.assert_close(_row_dot(a, b), (a * b).sum(-1), rtol=1e-12, atol=1e-12)
