"""SQMP row allocations (METHOD.md, sec. 3.1 / app. A.2-A.3): patterns, fractions, discrepancy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgerazor.plugin_manager import get_plugins
from edgerazor.quant.modules import WeightFakeQuant

RHOS = (1.0, 1 / 2, 1 / 4, 1 / 8, 0.0)
D_OUTS = (1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 64, 65, 100, 257, 1000, 1001)
LAYER = "model.layers.0.mlp.down_proj"


def allocation(name: str):
    return get_plugins().get("allocations", name)


def rows_of(mask: torch.Tensor) -> np.ndarray:
    return np.flatnonzero(mask.numpy())


def star_discrepancy(points) -> float:
    """Exact star discrepancy D*_N of a finite set in [0, 1] (1-D closed form).

    With the points sorted, p_1 <= ... <= p_N: D* = max_k max(k/N - p_k, p_k - (k-1)/N).
    """
    p = np.sort(np.asarray(points, dtype=np.float64))
    n = len(p)
    if n == 0:
        raise ValueError("empty point set")
    k = np.arange(1, n + 1, dtype=np.float64)
    return float(np.max(np.maximum(k / n - p, p - (k - 1) / n)))


def positions(mask: torch.Tensor, midpoint: bool = False) -> np.ndarray:
    """Position in (0, 1] of each 4-bit row: (r+1)/d_out, or the paper's midpoints (r+0.5)/d_out."""
    d_out = mask.numel()
    return (rows_of(mask) + (0.5 if midpoint else 1.0)) / d_out


# ----------------------------------------------------------------------------------------------
# The discrepancy function itself
# ----------------------------------------------------------------------------------------------


def test_star_discrepancy_known_values():
    assert math.isclose(star_discrepancy([0.3]), 0.7)
    assert math.isclose(star_discrepancy([0.8]), 0.8)
    for n in (1, 2, 5, 64):
        # centred grid: the optimum 1/(2N); right-end grid k/N: 1/N
        assert math.isclose(star_discrepancy((np.arange(n) + 0.5) / n), 1 / (2 * n))
        assert math.isclose(star_discrepancy((np.arange(n) + 1.0) / n), 1 / n)
    # all points at one place
    assert math.isclose(star_discrepancy([0.25] * 4), 0.75)
    # order does not matter
    assert star_discrepancy([0.9, 0.1, 0.5]) == star_discrepancy([0.1, 0.5, 0.9])


def test_star_discrepancy_matches_brute_force_over_anchored_intervals():
    rng = np.random.default_rng(0)
    for n in (1, 3, 10, 40):
        p = rng.random(n)
        # sup over t of |#{p < t}/N - t| and |#{p <= t}/N - t|, checked just around every point
        ts = np.concatenate([p, p - 1e-12, p + 1e-12, [0.0, 1.0]])
        brute = max(
            max(abs(np.mean(p < t) - t), abs(np.mean(p <= t) - t)) for t in ts
        )
        assert math.isclose(star_discrepancy(p), brute, abs_tol=1e-9)


# ----------------------------------------------------------------------------------------------
# super_group
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", RHOS + (0.3, 1 / 3, 1 / 7, 0.15, 0.35, 1 / 16))
@pytest.mark.parametrize("d_out", D_OUTS)
def test_super_group_pattern_and_real_fraction(rho, d_out):
    mask = allocation("super_group")(d_out, rho)
    assert mask.dtype == torch.bool and tuple(mask.shape) == (d_out,)
    if rho == 0:
        assert not mask.any()
        return
    period = round(1 / rho)
    expected = np.array([i % period == 0 for i in range(d_out)])
    np.testing.assert_array_equal(mask.numpy(), expected)
    # the real 4-bit fraction is ceil(d_out / P) / d_out, not rho
    assert int(mask.sum()) == math.ceil(d_out / period)
    assert math.isclose(mask.float().mean().item(), math.ceil(d_out / period) / d_out, rel_tol=1e-6)
    # and it is what the quantized module reports
    wfq = WeightFakeQuant(d_out, 32, None, None, ("int4", "ternary"), 32, mask)
    assert math.isclose(wfq.high_fraction(), math.ceil(d_out / period) / d_out, rel_tol=1e-6)


def test_super_group_endpoints():
    assert allocation("super_group")(100, 1.0).all()
    assert not allocation("super_group")(100, 0.0).any()
    # rho = 1/8 leads every block of 8 rows with one 4-bit row
    assert rows_of(allocation("super_group")(20, 1 / 8)).tolist() == [0, 8, 16]


# ----------------------------------------------------------------------------------------------
# stacked
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", RHOS + (0.3,))
@pytest.mark.parametrize("d_out", D_OUTS)
def test_stacked_is_the_first_rows(rho, d_out):
    mask = allocation("stacked")(d_out, rho)
    assert mask.dtype == torch.bool and tuple(mask.shape) == (d_out,)
    n = round(rho * d_out)
    assert rows_of(mask).tolist() == list(range(n))


# ----------------------------------------------------------------------------------------------
# random
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", RHOS + (0.3,))
@pytest.mark.parametrize("d_out", (1, 7, 64, 100, 257))
def test_random_has_exactly_round_rho_d_out_rows_and_is_reproducible(rho, d_out):
    fn = allocation("random")
    mask = fn(d_out, rho, seed=3, layer_name=LAYER)
    assert mask.dtype == torch.bool and tuple(mask.shape) == (d_out,)
    assert int(mask.sum()) == round(rho * d_out)
    assert torch.equal(fn(d_out, rho, seed=3, layer_name=LAYER), mask)


def test_random_depends_on_layer_name():
    fn = allocation("random")
    a = fn(256, 0.5, seed=0, layer_name="model.layers.0.self_attn.q_proj")
    b = fn(256, 0.5, seed=0, layer_name="model.layers.0.self_attn.k_proj")
    c = fn(256, 0.5, seed=0, layer_name="model.layers.1.self_attn.q_proj")
    assert not torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(b, c)
    assert torch.equal(a, fn(256, 0.5, seed=0, layer_name="model.layers.0.self_attn.q_proj"))


def test_random_depends_on_seed():
    fn = allocation("random")
    masks = [tuple(rows_of(fn(256, 0.5, seed=seed, layer_name=LAYER))) for seed in range(20)]
    assert len(set(masks)) == 20  # every seed gives its own subset
    # large seeds too (a seed folded into the high bits of a 64-bit value used to be ignored)
    assert not torch.equal(fn(256, 0.5, seed=0, layer_name=LAYER), fn(256, 0.5, seed=2**33 + 1, layer_name=LAYER))


def test_random_is_not_stacked_or_super_group():
    mask = allocation("random")(256, 0.25, seed=0, layer_name=LAYER)
    assert not torch.equal(mask, allocation("stacked")(256, 0.25))
    assert not torch.equal(mask, allocation("super_group")(256, 0.25))


# ----------------------------------------------------------------------------------------------
# Star discrepancy (app. A.3): stacked 1 - rho, super-group Theta(1/N), random O(N^-1/2)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", (1 / 2, 1 / 4, 1 / 8, 3 / 8))
@pytest.mark.parametrize("d_out", (16, 64, 256, 1024))
def test_stacked_discrepancy_is_one_minus_rho(rho, d_out):
    mask = allocation("stacked")(d_out, rho)
    assert int(mask.sum()) == rho * d_out
    assert math.isclose(star_discrepancy(positions(mask)), 1 - rho)
    assert math.isclose(star_discrepancy(positions(mask, midpoint=True)), 1 - rho + 1 / (2 * d_out))


@pytest.mark.parametrize("d_out", (8, 64, 1000))
def test_stacked_midpoint_discrepancy_at_rho_one(d_out):
    mask = allocation("stacked")(d_out, 1.0)
    assert math.isclose(star_discrepancy(positions(mask, midpoint=True)), 1 / (2 * d_out))


@pytest.mark.parametrize("rho", (1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 8, 1 / 16))
def test_super_group_discrepancy_is_order_one_over_n(rho):
    fn = allocation("super_group")
    period = round(1 / rho)
    for d_out in range(1, 700):
        mask = fn(d_out, rho)
        n = int(mask.sum())
        d_star = star_discrepancy(positions(mask))
        assert n * d_star <= 1 + 1e-9, (d_out, n, d_star)
        assert n * d_star >= 0.5 - 1e-9  # the 1/(2N) lower bound of any N-point set
    # closed form when P divides d_out: N * D* = max(1 - 1/P, 1/P)
    for n in (1, 5, 64, 200):
        mask = fn(n * period, rho)
        assert int(mask.sum()) == n
        assert math.isclose(n * star_discrepancy(positions(mask)), max(1 - 1 / period, 1 / period))


def random_scaled_discrepancies(n: int, rho: float, seeds=range(20)) -> list[float]:
    d_out = round(n / rho)
    values = []
    for seed in seeds:
        mask = allocation("random")(d_out, rho, seed=seed, layer_name=LAYER)
        assert int(mask.sum()) == n
        values.append(math.sqrt(n) * star_discrepancy(positions(mask)))
    return values


@pytest.mark.parametrize("rho", (1 / 2, 1 / 4, 1 / 8))
@pytest.mark.parametrize("n", (64, 128, 512))
def test_random_discrepancy_is_order_one_over_sqrt_n_and_far_above_super_group(rho, n):
    values = random_scaled_discrepancies(n, rho)
    mean = float(np.mean(values))
    assert 0.3 < mean < 3.0, values
    assert len(set(values)) > 1  # the seeds really give different subsets
    d_out = round(n / rho)
    super_group = star_discrepancy(positions(allocation("super_group")(d_out, rho)))
    stacked = star_discrepancy(positions(allocation("stacked")(d_out, rho)))
    random_mean = mean / math.sqrt(n)
    assert random_mean > 4 * super_group
    assert stacked > 2 * random_mean  # the ordering of app. A.3: super-group << random << stacked
