"""Coupling layers and masks: identity at init, pass-through exactness, O(D) log-det against
autograd, bounded log-scales in deep stacks, event shapes beyond vectors, errors."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from exactflow.errors import ShapeError
from exactflow.nets import ResidualMLP
from exactflow.transforms import (
    Compose,
    Coupling,
    alternating_mask,
    channel_mask,
    checkerboard_mask,
    half_mask,
)
from helpers import perturb


def test_masks():
    assert half_mask(5).tolist() == [True, True, False, False, False]
    assert alternating_mask(4).tolist() == [True, False, True, False]
    assert alternating_mask(4, flip=True).tolist() == [False, True, False, True]
    board = checkerboard_mask((2, 3, 3))
    assert board.shape == (2, 3, 3)
    assert board[0].tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    assert torch.equal(board[0], board[1])
    assert torch.equal(checkerboard_mask((3, 3), flip=True), ~board[0])
    chan = channel_mask((4, 2, 2))
    assert chan[:2].all() and not chan[2:].any()
    with pytest.raises(ShapeError):
        checkerboard_mask((4,))
    with pytest.raises(ShapeError):
        channel_mask((1, 2, 2))
    with pytest.raises(ValueError):
        half_mask(0)


@pytest.mark.parametrize("map", ["additive", "affine"])
def test_identity_at_init(map):
    layer = Coupling(map, alternating_mask(6), (16,), context=2)
    x, c = torch.randn(10, 6), torch.randn(10, 2)
    z, ladj = layer(x, c)
    assert torch.equal(z, x)
    assert torch.equal(ladj, torch.zeros(10))


def test_passthrough_exact_and_logdet_is_sum_of_elementwise_terms():
    torch.manual_seed(0)
    mask = alternating_mask(5)
    layer = Coupling("affine", mask, (16,)).double()
    perturb(layer, 0.5)
    x = torch.randn(4, 5, dtype=torch.float64)
    z, ladj = layer(x)
    assert torch.equal(z[:, mask], x[:, mask])
    jac = jacobian(lambda v: layer(v.unsqueeze(0))[0].squeeze(0), x[0])
    # triangular structure: identity rows for kept features, diagonal block for changed ones
    assert torch.equal(jac[mask][:, mask], torch.eye(3, dtype=torch.float64))
    assert torch.equal(jac[mask][:, ~mask], torch.zeros(3, 2, dtype=torch.float64))
    assert torch.count_nonzero(jac[~mask][:, ~mask] - torch.diag(jac[~mask][:, ~mask].diag())) == 0
    torch.testing.assert_close(ladj[0], jac[~mask][:, ~mask].diag().abs().log().sum())


def test_log_scale_is_bounded_so_deep_stacks_stay_finite():
    torch.manual_seed(0)
    layers = [Coupling("affine", alternating_mask(4, i % 2 == 1), (16,)) for i in range(40)]
    flow = Compose(layers)
    with torch.no_grad():
        for layer in layers:  # a runaway conditioner: log-scale outputs of 1e4
            layer.net.net[-1].bias.fill_(1e4)
    x = torch.randn(8, 4)
    z, ladj = flow(x)
    assert torch.isfinite(z).all() and torch.isfinite(ladj).all()
    # each layer changes two features with |s| < 3 (the soft clamp bound)
    assert (ladj.abs() <= 40 * 2 * 3.0).all()
    x_rec, _ = flow.inverse(torch.randn(8, 4))
    assert torch.isfinite(x_rec).all()


def test_context_only_one_dimensional_coupling():
    layer = Coupling("affine", torch.zeros(1, dtype=torch.bool), (8,), context=2)
    perturb(layer, 0.5)
    x, c = torch.randn(6, 1), torch.randn(6, 2)
    z1, l1 = layer(x, c)
    z2, _ = layer(x, c + 1.0)
    assert not torch.allclose(z1, z2)
    x_rec, l_inv = layer.inverse(z1, c)
    torch.testing.assert_close(x_rec, x, atol=1e-6, rtol=0)
    torch.testing.assert_close(l1, -l_inv)


@pytest.mark.parametrize(
    "mask", [checkerboard_mask((2, 4, 4)), channel_mask((2, 4, 4))], ids=["board", "channel"]
)
def test_image_shaped_events_round_trip(mask):
    layer = Coupling("affine", mask, (16,)).double()
    perturb(layer, 0.3)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    z, ladj = layer(x)
    assert z.shape == x.shape and ladj.shape == (3,)
    assert torch.equal(z[:, mask], x[:, mask])
    x_rec, ladj_inv = layer.inverse(z)
    torch.testing.assert_close(x_rec, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, -ladj_inv)
    jac = jacobian(lambda v: layer(v.unsqueeze(0))[0].reshape(-1), x[0]).reshape(32, 32)
    torch.testing.assert_close(ladj[0], torch.linalg.slogdet(jac)[1])


def test_custom_conditioner():
    layer = Coupling(
        "affine",
        half_mask(6),
        conditioner=lambda n_in, n_out, ctx: ResidualMLP(n_in, n_out, 16, 1, context=ctx),
    )
    assert isinstance(layer.net, ResidualMLP)
    perturb(layer, 0.3)
    x = torch.randn(5, 6)
    z, _ = layer(x)
    torch.testing.assert_close(layer.inverse(z)[0], x, atol=1e-5, rtol=0)


def test_spline_maps_by_name():
    pytest.importorskip("exactflow.transforms.splines")
    for name in ("rq-spline", "cubic-spline"):
        # float64: this checks the wiring; float32 accuracy of the maps is splines.py's test
        kwargs = {"bins": 5, "bound": 3.0}
        layer = Coupling(name, alternating_mask(4), (16,), map_kwargs=kwargs).double()
        perturb(layer, 0.3)
        x = 2.0 * torch.randn(64, 4, dtype=torch.float64)  # inside and outside the box
        z, ladj = layer(x)
        assert not torch.allclose(z, x)
        x_rec, ladj_inv = layer.inverse(z)
        torch.testing.assert_close(x_rec, x, atol=1e-9, rtol=0)
        torch.testing.assert_close(ladj, -ladj_inv, atol=1e-9, rtol=0)


def test_errors():
    with pytest.raises(ValueError, match="True everywhere"):
        Coupling("affine", torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no context"):
        Coupling("affine", torch.zeros(3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"torch\.bool"):
        Coupling("affine", torch.ones(3))
    with pytest.raises(ValueError, match="unknown elementwise map 'nope'"):
        Coupling("nope", 4)
    with pytest.raises(ShapeError, match=r"got \(2, 5\)"):
        Coupling("affine", 4)(torch.randn(2, 5))
