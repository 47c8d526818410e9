"""Conditioner networks: identity-at-init outputs, context handling, MADE's autoregressive
structure (exact zero pattern and full connectivity of the Jacobian), fused output layer."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from exactflow.errors import ConfigError, ContextError, ShapeError
from exactflow.nets import MADE, MLP, ResidualMLP
from helpers import perturb


@pytest.mark.parametrize("net", [MLP(3, 4, (8, 8), context=2), ResidualMLP(3, 4, 8, context=2)])
def test_output_is_zero_at_init(net):
    x, c = torch.randn(5, 3), torch.randn(5, 2)
    out = net(x, c)
    assert out.shape == (5, 4)
    assert torch.equal(out, torch.zeros(5, 4))


def test_mlp_reads_context_and_works_without_inputs():
    net = MLP(0, 3, (8,), context=2)
    perturb(net, 0.5)
    x = torch.zeros(4, 0)
    c = torch.randn(4, 2)
    assert not torch.allclose(net(x, c), net(x, c + 1.0))


def test_mlp_context_errors():
    net = MLP(3, 2, (8,), context=2)
    with pytest.raises(ContextError, match="needs a context of size 2"):
        net(torch.randn(4, 3))
    with pytest.raises(ShapeError, match=r"\(\*batch, 2\)"):
        net(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ContextError, match="unconditional"):
        MLP(3, 2, (8,))(torch.randn(4, 3), torch.randn(4, 2))


def test_bad_configuration():
    with pytest.raises(ConfigError, match="unknown activation 'nope'"):
        MLP(2, 2, activation="nope")
    with pytest.raises(ValueError, match="hidden width"):
        MLP(2, 2, hidden=(0,))
    with pytest.raises(ValueError, match="order must be a permutation"):
        MADE(3, (8,), 2, order=[0, 0, 1])
    with pytest.raises(ShapeError):
        MADE(3, (8,), 2)(torch.randn(4, 2))


def _made_jacobian(made, d, context=None):
    x = torch.randn(d, dtype=torch.float64)
    return jacobian(lambda v: made(v.unsqueeze(0), context).squeeze(0), x)  # (D, P, D)


@pytest.mark.parametrize("context", [0, 3])
@pytest.mark.parametrize("order", [None, [2, 0, 4, 1, 3]])
def test_made_is_exactly_autoregressive_and_fully_connected(order, context):
    d, p = 5, 3
    # tanh: no dead ReLU units hiding a connection at the test point
    made = MADE(d, (16, 16), p, context=context, order=order, activation="tanh").double()
    perturb(made, 0.5)
    c = torch.randn(1, context, dtype=torch.float64) if context else None
    jac = _made_jacobian(made, d, c)
    assert jac.shape == (d, p, d)
    rank = torch.arange(d) if order is None else torch.tensor(order)
    allowed = rank[None, :] < rank[:, None]  # output i may read input j iff rank j < rank i
    depends = jac.abs().amax(dim=1) > 0
    assert not depends[~allowed].any(), "an output reads a variable it must not see"
    assert depends[allowed].all(), "an allowed dependency is missing (lost connectivity)"


def test_made_context_reaches_every_feature_including_the_first():
    d, c = 4, 2
    made = MADE(d, (12,), 2, context=c, order=[3, 1, 0, 2]).double()
    perturb(made, 0.5)
    x = torch.randn(1, d, dtype=torch.float64)
    ctx = torch.randn(c, dtype=torch.float64)
    jac = jacobian(lambda v: made(x, v.unsqueeze(0)).squeeze(0), ctx)  # (D, P, C)
    assert (jac.abs().amax(dim=(1, 2)) > 0).all()


def test_made_output_is_one_fused_zero_initialised_matmul():
    d, p, h = 6, 4, 32
    made = MADE(d, (h, h), p)
    assert made.weights[-1].shape == (d * p, h)
    assert made.n_layers == 3
    out = made(torch.randn(7, 2, d))
    assert out.shape == (7, 2, d, p)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("d", [3, 9])
def test_made_output_layout_matches_the_feature_major_weights(d):
    """From 8 features on, forward's rows are parameter-major in memory (below, feature-major),
    but the weights (and so the state dict) are feature-major either way: output (i, p) is
    row i * P + p of the output layer."""
    p, h = 3, 16
    made = MADE(d, (h, h), p)
    with torch.no_grad():
        made.weights[-1].normal_()
        made.biases[-1].normal_()
    x = torch.randn(11, d)
    out = made(x)
    assert out.shape == (11, d, p)
    assert out.stride()[-2:] == ((1, d) if d >= 8 else (p, 1))
    w, b = made.output_layer()
    ref = torch.nn.functional.linear(made.hidden(x), w, b).unflatten(-1, (d, p))
    torch.testing.assert_close(out, ref)
    assert "row_order" not in made.state_dict()
