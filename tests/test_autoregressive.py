"""Autoregressive layers: the slow D-pass direction agrees with the fast one (MAF sampling,
IAF density), triangular Jacobian in the chosen order, correct gradients through the loop."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

import exactflow as ef
from exactflow.errors import ShapeError
from exactflow.transforms import Autoregressive, Inverse
from helpers import perturb


def test_identity_at_init():
    layer = Autoregressive("affine", 5, (16,), context=2)
    x, c = torch.randn(4, 5), torch.randn(4, 2)
    z, ladj = layer(x, c)
    assert torch.equal(z, x) and torch.equal(ladj, torch.zeros(4))


@pytest.mark.parametrize("order", [None, [3, 0, 4, 1, 2]])
def test_jacobian_is_triangular_in_the_order(order):
    d = 5
    layer = Autoregressive("affine", d, (32,), order=order, activation="tanh").double()
    perturb(layer)
    x = torch.randn(1, d, dtype=torch.float64)
    _, ladj = layer(x)
    jac = jacobian(lambda v: layer(v.unsqueeze(0))[0].squeeze(0), x[0])
    rank = torch.arange(d) if order is None else torch.tensor(order)
    upper = rank[None, :] > rank[:, None]  # z_i must not depend on x_j later in the order
    assert torch.count_nonzero(jac[upper]) == 0
    lower = rank[None, :] < rank[:, None]
    assert (jac[lower] != 0).all()
    torch.testing.assert_close(ladj[0], jac.diag().abs().log().sum())


@pytest.mark.parametrize("context", [0, 3])
def test_maf_sampling_and_iaf_density_agree_with_fast_directions(context):
    """The D-pass directions (MAF inverse, IAF forward) invert the one-pass ones, float32."""
    torch.manual_seed(0)
    d, n = 8, 512
    g = torch.Generator().manual_seed(1)
    c = torch.randn(n, context, generator=g) if context else None
    for model in (ef.models.MAF, ef.models.IAF):
        flow = model(d, transforms=3, hidden=(32, 32), context=context)
        # std 0.1 on every weight moves the flow far from the identity (log-scales O(1))
        # while keeping it well conditioned enough for a float32 round trip
        perturb(flow, 0.1)
        # generative direction (D passes for MAF, one pass for IAF) ...
        x, log_p = flow.sample_and_log_prob(n, c, generator=g) if not context else (None, None)
        if context:
            z0 = torch.randn(n, d, generator=g)
            x, ladj_inv = flow.transform.inverse(z0, c)
            log_p = flow.base.log_prob(z0) - ladj_inv
        # ... against the density direction (one pass for MAF, D passes for IAF)
        with torch.no_grad():
            z, _ = flow.transform(x, c)
            x_back, _ = flow.transform.inverse(z, c)
            log_p_fwd = flow.log_prob(x, c)
        assert (z - x).abs().max() > 0.5, "flow is still near the identity"
        assert (x_back - x).abs().max() < 1e-5, model.__name__
        torch.testing.assert_close(log_p_fwd, log_p.detach(), atol=1e-4, rtol=1e-5)
        # the round trip also holds starting from data: x -> z -> x
        data = torch.randn(n, d, generator=g)
        with torch.no_grad():
            z, _ = flow.transform(data, c)
            rec, _ = flow.transform.inverse(z, c)
        assert (rec - data).abs().max() < 1e-5, model.__name__


def test_gradients_through_the_sequential_inverse():
    """The D-pass inverse differentiates correctly: gradcheck w.r.t. the input, and a
    central finite difference w.r.t. one MADE weight (float64)."""
    layer = Autoregressive("affine", 3, (8,), context=1, activation="tanh").double()
    perturb(layer)
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 1, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z_: layer.inverse(z_, c), (z,))

    def loss() -> torch.Tensor:
        x, ladj = layer.inverse(z.detach(), c)
        return x.square().sum() + ladj.sum()

    weight = layer.made.weights[0]
    layer.zero_grad()
    loss().backward()
    analytic = float(weight.grad[1, 0])
    assert analytic != 0.0
    eps = 1e-6
    with torch.no_grad():
        weight[1, 0] += eps
        up = float(loss())
        weight[1, 0] -= 2 * eps
        down = float(loss())
    assert abs(analytic - (up - down) / (2 * eps)) < 1e-6 * max(1.0, abs(analytic))


def test_iaf_layer_is_inverse_of_autoregressive():
    layer = Autoregressive("affine", 4, (16,))
    perturb(layer)
    iaf = Inverse(layer)
    x = torch.randn(6, 4)
    z_fast, l_fast = layer.inverse(x)  # IAF sampling direction: D passes here ...
    z_iaf, l_iaf = iaf(x)
    assert torch.equal(z_fast, z_iaf) and torch.equal(l_fast, l_iaf)


def test_spline_map_by_name():
    pytest.importorskip("exactflow.transforms.splines")
    layer = Autoregressive("rq-spline", 4, (16,), map_kwargs={"bins": 6, "bound": 4.0}).double()
    perturb(layer)
    x = 2.0 * torch.randn(32, 4, dtype=torch.float64)
    z, ladj = layer(x)
    x_rec, ladj_inv = layer.inverse(z)
    torch.testing.assert_close(x_rec, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(ladj, -ladj_inv, atol=1e-9, rtol=0)


def test_errors():
    with pytest.raises(ShapeError, match=r"\(\*batch, 4\)"):
        Autoregressive("affine", 4, (8,))(torch.randn(3, 5))
    with pytest.raises(ValueError, match="features"):
        Autoregressive("affine", 0, (8,))
