"""Distillation losses against independent float64 re-computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgerazor.distill.divergence import distill_sums, response_positions, teacher_token_stats
from edgerazor.plugin_manager import get_plugins


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def make_batch(seed=0, B=3, T=7, V=50):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, 5:] = -100  # padding
    labels[2, :] = -100  # a sequence with no response token at all
    labels[2, 0] = 7  # ... except position 0, which nothing predicts
    return student, teacher, labels


def reference(student, teacher, labels, w):
    """Naive per-token loops in numpy float64 with explicit shifting."""
    s, t, y = student.numpy(), teacher.numpy(), labels.numpy()
    f_sum = r_sum = ce_sum = 0.0
    rows = []
    for b in range(y.shape[0]):
        for i in range(y.shape[1] - 1):
            if y[b, i + 1] == -100:
                continue
            ls, lt = np_log_softmax(s[b, i]), np_log_softmax(t[b, i])
            fkl = (np.exp(lt) * (lt - ls)).sum()
            rkl = (np.exp(ls) * (ls - lt)).sum()
            f_sum += w * fkl
            r_sum += (1 - w) * rkl
            ce_sum += -ls[y[b, i + 1]]
            rows.append((b, i, -(np.exp(lt) * lt).sum(), np.exp(lt[y[b, i + 1]])))
    return np.array([f_sum, r_sum, ce_sum]), rows


def test_shift_positions():
    _, _, labels = make_batch()
    pos = response_positions(labels)
    # sequence 0: labels 3..6 are response -> positions 2..5; sequence 1: labels 0..4 -> positions 0..3
    assert pos.index.tolist() == [2, 3, 4, 5, 7 + 0, 7 + 1, 7 + 2, 7 + 3]
    assert pos.target.tolist() == labels[0, 3:].tolist() + labels[1, 1:5].tolist()
    assert pos.num_sequences == 2


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_chunked_equals_naive_float64_with_gradients(chunk):
    student, teacher, labels = make_batch()
    pos = response_positions(labels)
    w = 0.3
    expected, _ = reference(student, teacher, labels, w)
    s = student.clone().requires_grad_(True)
    sums = distill_sums(s, teacher, pos, torch.tensor(w, dtype=torch.float64), chunk_size=chunk)
    np.testing.assert_allclose(sums.detach().numpy(), expected, rtol=1e-12)
    weights = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
    (sums * weights).sum().backward()

    # naive autograd reference in float64: full log-softmax over everything, then mask
    s2 = student.clone().requires_grad_(True)
    ls, lt = torch.log_softmax(s2[:, :-1], -1), torch.log_softmax(teacher[:, :-1], -1)
    valid = labels[:, 1:] != -100
    fkl = (lt.exp() * (lt - ls)).sum(-1)[valid].sum() * w
    rkl = (ls.exp() * (ls - lt)).sum(-1)[valid].sum() * (1 - w)
    ce = -ls.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)[valid].sum()
    (weights[0] * fkl + weights[1] * rkl + weights[2] * ce).backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-10, atol=1e-12)
    assert s.grad[2].abs().max() == 0  # nothing flows to positions without a response target


def test_per_token_weights_and_vocab_mismatch():
    student, teacher, labels = make_batch(seed=1)
    pos = response_positions(labels)
    w = torch.linspace(0, 1, pos.index.numel(), dtype=torch.float64)
    sums = distill_sums(student, teacher, pos, w)
    one = distill_sums(student, teacher, pos, 1.0)
    zero = distill_sums(student, teacher, pos, 0.0)
    assert sums[2] == one[2] == zero[2]
    assert zero[0] == 0 and one[1] == 0
    with pytest.raises(ValueError, match="vocabularies differ: student logits have 50 entries, teacher 49"):
        distill_sums(student, teacher[..., :49], pos, 1.0)


def test_teacher_stats_and_mixers_against_reference():
    student, teacher, labels = make_batch(seed=2, B=4, T=9, V=40)
    teacher = teacher * torch.linspace(0.1, 3, 4, dtype=torch.float64)[:, None, None]  # varied entropies
    pos = response_positions(labels)
    stats = teacher_token_stats(teacher, pos, chunk_size=2)
    _, rows = reference(student, teacher, labels, 0.5)
    np.testing.assert_allclose(stats.entropy.numpy(), [r[2] for r in rows], rtol=1e-12)
    np.testing.assert_allclose(stats.label_prob.numpy(), [r[3] for r in rows], rtol=1e-12)

    mixers = get_plugins().registry("kl_mixers")
    for K in (16, 4):
        per_seq = {}
        for b, _, h, _ in rows:
            per_seq.setdefault(b, []).append(min(h, math.log(K)) / math.log(K))
        lam = np.mean([np.mean(v) for v in per_seq.values()])
        assert float(mixers.get("eakld")(stats, K=K)) == pytest.approx(lam, rel=1e-12)
    gamma = np.mean([np.mean([r[3] for r in rows if r[0] == b]) for b in sorted({r[0] for r in rows})])
    assert float(mixers.get("cakld")(stats)) == pytest.approx(1 - gamma, rel=1e-12)
    assert float(mixers.get("forward")(stats)) == 1.0 and float(mixers.get("reverse")(stats)) == 0.0


def test_eakld_clip_binding_and_not_binding():
    """With log K above every entropy the clip does nothing; below, every token saturates at 1."""
    _, teacher, labels = make_batch(seed=3, V=30)
    pos = response_positions(labels)
    stats = teacher_token_stats(teacher, pos)
    eakld = get_plugins().get("kl_mixers", "eakld")
    assert stats.entropy.max() < math.log(30)
    big_k = 10**6
    unclipped = float(eakld(stats, K=big_k))
    h = stats.entropy.numpy() / math.log(big_k)
    seqs = stats.seq_index.numpy()
    assert unclipped == pytest.approx(np.mean([h[seqs == b].mean() for b in np.unique(seqs)]), rel=1e-12)
    assert float(eakld(stats, K=2)) == pytest.approx(1.0)  # min(H, log 2)/log 2 = 1 for these high entropies
    # the clip is per token: a mixed batch gives a value a final-weight clamp would not
    stats.entropy[0] = 10.0
    clipped = float(eakld(stats, K=16))
    raw_mean = float(eakld(stats, K=big_k)) * math.log(big_k) / math.log(16)
    assert clipped < min(raw_mean, 1.0)


def test_eakld_has_no_gradient():
    _, teacher, labels = make_batch(seed=4)
    teacher.requires_grad_(True)
    stats = teacher_token_stats(teacher, response_positions(labels))
    assert not get_plugins().get("kl_mixers", "eakld")(stats).requires_grad
