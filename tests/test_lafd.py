"""LAFD: the layer selectors and the feature loss (eq. 3-5) on hand-made hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgerazor.distill.features import feature_loss, record_residual_stream
from edgerazor.plugin_manager import get_plugins


def hand_made_states(L=6, B=2, T=5, d=8, big=(2, 4, 5)):
    """Each layer adds a small update, except the layers in ``big`` that rotate the stream a lot."""
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(B, T, d, generator=g)]
    for layer in range(1, L + 1):
        scale = 3.0 if layer in big else 0.05
        states.append(states[-1] + scale * torch.randn(B, T, d, generator=g))
    return states


def test_adaptive_picks_lowest_cosine_layers():
    states = hand_made_states()
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert get_plugins().get("selectors", "adaptive")(states, mask, k=3) == [2, 4, 5]
    assert get_plugins().get("selectors", "adaptive")(states, mask, k=1)[0] in (2, 4, 5)


def test_adaptive_ignores_padding_positions():
    states = hand_made_states(big=())
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 3:] = False
    # garbage at padded positions of layer 1 would make it the lowest-cosine layer if counted
    states[1][:, 3:] = -states[0][:, 3:] * 100
    picked = get_plugins().get("selectors", "adaptive")(states, mask, k=1)
    assert picked != [1]
    mask[:, 3:] = True
    assert get_plugins().get("selectors", "adaptive")(states, mask, k=1) == [1]



def test_layer_cosines_reference():
    from edgerazor.plugins.selectors import layer_cosines

    states = hand_made_states(L=3)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    got = layer_cosines(states, mask).numpy()
    s = [x.double().numpy() for x in states]
    m = mask.numpy()
    for l in range(1, 4):
        a, b = s[l][m], s[l - 1][m]
        ref = np.mean((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))
        assert got[l - 1] == pytest.approx(ref, rel=1e-5)


def test_fixed_selector_resolves_negative_layers_and_rejects_out_of_range():
    states = hand_made_states(L=6)
    mask = torch.ones(2, 5, dtype=torch.bool)
    fixed = get_plugins().get("selectors", "fixed")
    assert fixed(states, mask) == [1, 2, 6]  # the paper's baseline: first, second, last
    assert fixed(states, mask, layers=[3, -2]) == [3, 5]
    with pytest.raises(ValueError, match=r"outside 1..6"):
        fixed(states, mask, layers=[7])


def test_feature_loss_formula():
    teacher = hand_made_states(L=3)
    student = [s + 0.1 * torch.randn_like(s) for s in teacher]
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    layers = [1, 3]
    got = float(feature_loss(teacher, student, layers, valid, num_items=int(valid.sum())))
    T = int(valid.sum())
    d = teacher[0].shape[-1]
    ref = np.mean([
        ((teacher[l][valid].double() - student[l][valid].double()) ** 2).sum().item() / (T * d) for l in layers
    ])
    assert got == pytest.approx(ref, rel=1e-6)
    assert float(feature_loss(teacher, student, [], valid, T)) == 0.0


def test_recorder_captures_pre_norm_residual_stream(tiny_qwen3):
    ids = torch.randint(0, 512, (2, 6))
    tiny_qwen3(ids, output_hidden_states=True)  # let transformers install its own capture hooks first
    before = [(len(h._forward_hooks), len(h._forward_pre_hooks)) for h in tiny_qwen3.model.layers]
    with record_residual_stream(tiny_qwen3.model.layers) as states:
        out = tiny_qwen3(ids, output_hidden_states=True)
    L = tiny_qwen3.config.num_hidden_layers
    assert len(states) == L + 1
    torch.testing.assert_close(states[0], out.hidden_states[0], rtol=0, atol=0)  # embedding output
    for l in range(1, L):
        torch.testing.assert_close(states[l], out.hidden_states[l], rtol=0, atol=0)
    # transformers' last entry is after the final norm; ours is the residual stream before it
    torch.testing.assert_close(tiny_qwen3.model.norm(states[L]), out.hidden_states[L], rtol=0, atol=0)
    assert not torch.allclose(states[L], out.hidden_states[L])
    assert [(len(h._forward_hooks), len(h._forward_pre_hooks)) for h in tiny_qwen3.model.layers] == before
