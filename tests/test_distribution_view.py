"""``Flow.distribution()``: the ``torch.distributions`` view. ``expand`` (what Pyro's plates
call) broadcasts it exactly; ``mean``, ``variance``, ``entropy`` and ``kl_divergence`` are
Monte-Carlo estimates with a settable sample count and seed, checked against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

import exactflow as ef
from exactflow.distributions import ConditionalGaussian, StandardNormal
from exactflow.errors import ShapeError
from exactflow.transforms import Affine

LOC = torch.tensor([1.0, -2.0])
SCALE = torch.tensor([0.5, 3.0])


def affine_flow() -> ef.Flow:
    """``N(LOC, diag(SCALE^2))`` as a flow, so every estimate has a closed form."""
    return ef.Flow(Affine(LOC, SCALE), StandardNormal((2,)))


def closed_form() -> Independent:
    return Independent(Normal(LOC, SCALE), 1)


def test_moments_and_entropy_are_seeded_monte_carlo_estimates():
    d = affine_flow().distribution(mc_samples=20_000, mc_seed=3)
    se = SCALE / math.sqrt(20_000)
    assert torch.all((d.mean - LOC).abs() < 4 * se)
    # var of a sample variance of a Gaussian: 2 sigma^4 / (n - 1)
    assert torch.all((d.variance - SCALE**2).abs() < 4 * math.sqrt(2 / 20_000) * SCALE**2)
    assert float(d.entropy()) == pytest.approx(float(closed_form().entropy()), abs=0.03)
    # the seed fixes the estimate; another seed or count changes it
    torch.testing.assert_close(d.mean, d.mean, rtol=0, atol=0)
    other = affine_flow().distribution(mc_samples=20_000, mc_seed=4)
    assert not torch.equal(d.mean, other.mean)
    d.mc_samples = 100
    assert not torch.equal(d.mean, other.mean)
    with pytest.raises(ValueError, match="mc_samples"):
        affine_flow().distribution(mc_samples=0)


def test_entropy_is_differentiable():
    flow = ef.Flow(Affine(torch.zeros(2), torch.ones(2), learnable=True), StandardNormal((2,)))
    h = flow.distribution(mc_samples=64).entropy()
    h.backward()
    # H = sum log scale + const exactly, sample by sample: dH/dlog_scale = 1
    torch.testing.assert_close(flow.transform.log_scale.grad, torch.ones(2))


def test_kl_divergence_is_registered_both_ways():
    d = affine_flow().distribution(mc_samples=40_000)
    q = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    exact = float(kl_divergence(closed_form(), q))
    assert float(kl_divergence(d, q)) == pytest.approx(exact, rel=0.05)
    assert float(kl_divergence(q, d)) == pytest.approx(
        float(kl_divergence(q, closed_form())), rel=0.05
    )
    assert float(kl_divergence(d, d)) == pytest.approx(0.0, abs=1e-6)
    # the reverse direction samples q under a forked, seeded generator: reproducible, and the
    # caller's global random stream is untouched
    state = torch.random.get_rng_state()
    assert torch.equal(kl_divergence(q, d), kl_divergence(q, d))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_expand_broadcasts_unconditional_and_conditional_flows():
    d = affine_flow().distribution().expand((3,))
    assert d.batch_shape == (3,) and d.event_shape == (2,)
    x = d.sample((5,))
    assert x.shape == (5, 3, 2)
    assert not torch.allclose(x[:, 0], x[:, 1])  # independent per batch element
    torch.testing.assert_close(d.log_prob(x), closed_form().log_prob(x))
    assert d.mean.shape == (3, 2) and d.entropy().shape == (3,)
    assert d.expand((4, 3)).sample().shape == (4, 3, 2)  # as Pyro's nested plates expand
    with pytest.raises(ShapeError, match="cannot expand"):
        d.expand((2,))

    torch.manual_seed(0)
    flow = ef.Flow(Affine(LOC, SCALE), ConditionalGaussian(2, 4, hidden=(8,)))
    c = torch.randn(4)
    cond = flow.distribution(c).expand((6,))
    assert cond.batch_shape == (6,) and cond.context.shape == (6, 4)
    y = cond.rsample((2,))
    assert y.shape == (2, 6, 2)
    torch.testing.assert_close(cond.log_prob(y), flow.log_prob(y, c))
