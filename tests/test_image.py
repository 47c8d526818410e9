"""Image transforms (squeeze, 1x1 conv, conv coupling, factor-out, learned prior) and the
variational dequantiser: closed forms, structure and error messages. The contract test
certifies all of them through the registry."""

from __future__ import annotations

import math

import pytest
import torch

from exactflow.check import check_transform
from exactflow.errors import ConfigError, ShapeError
from exactflow.export import export_form
from exactflow.testing import CASES
from exactflow.transforms import ActNorm
from exactflow.transforms.dequantization import VariationalDequantization, dequantizer
from exactflow.transforms.image import (
    ConvCoupling,
    FactorOut,
    FrozenConv1x1,
    InvConv1x1,
    LearnedPrior,
    Squeeze,
    Unsqueeze,
)
from helpers import perturb

LOG_2PI = math.log(2 * math.pi)


def test_image_transforms_are_registered():
    names = {c.name for c in CASES}
    ours = (
        "image-squeeze-conv1x1",
        "invconv1x1-dense",
        "invconv1x1-lu",
        "actnorm-image",
        "conv-coupling-checkerboard",
        "conv-coupling-channel",
        "factor-out",
        "learned-prior",
        "variational-dequantization",
    )
    assert set(ours) <= names
    assert all((1, 4, 4) in c.shapes for c in CASES if c.name in ours)


def test_squeeze_layout_and_round_trip():
    x = torch.randn(2, 3, 3, 4, 6)
    sq = Squeeze((3, 4, 6))
    y, ladj = sq(x)
    assert y.shape == (2, 3, 12, 2, 3) and ladj.shape == (2, 3)
    assert torch.equal(ladj, torch.zeros(2, 3))
    for c, i, j, h, w in [(0, 0, 0, 0, 0), (1, 1, 0, 1, 2), (2, 1, 1, 0, 1), (2, 0, 1, 1, 0)]:
        assert torch.equal(y[..., 4 * c + 2 * i + j, h, w], x[..., c, 2 * h + i, 2 * w + j])
    x2, ladj2 = sq.inverse(y)
    assert torch.equal(x2, x) and torch.equal(ladj2, torch.zeros(2, 3))
    un = Unsqueeze((12, 2, 3))
    assert torch.equal(un(y)[0], x) and torch.equal(un.inverse(x)[0], y)


def test_squeeze_bad_shapes():
    with pytest.raises(ShapeError, match="even"):
        Squeeze((1, 5, 4))
    with pytest.raises(ShapeError, match="divisible by 4"):
        Unsqueeze((6, 2, 2))
    with pytest.raises(ShapeError, match="expects input of shape"):
        Squeeze((1, 4, 4))(torch.randn(2, 1, 4, 6))
    with pytest.raises(ShapeError, match="C, H, W"):
        Squeeze((4, 4))


@pytest.mark.parametrize("lu", [True, False])
def test_invconv_logdet_closed_form(lu):
    torch.manual_seed(0)
    conv = perturb(InvConv1x1(5, lu=lu).double())
    w = conv.matrix()
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    z, ladj = conv(x)
    # a 1x1 convolution applies W to every pixel's channel vector
    expected = torch.einsum("oc,bchw->bohw", w, x)
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(
        ladj, torch.full((3,), 24 * torch.linalg.slogdet(w)[1].item(), dtype=torch.float64)
    )
    if lu:
        # H W sum log|u_ii|: the log-det never needs the dense matrix
        torch.testing.assert_close(ladj, 24 * conv.log_s.sum().expand(3))
    torch.testing.assert_close(conv.inverse_matrix() @ w, torch.eye(5, dtype=torch.float64))


def test_invconv_starts_as_rotation_and_exports():
    conv = InvConv1x1(4, lu=True, seed=3)
    w = conv.matrix()
    torch.testing.assert_close(w @ w.T, torch.eye(4), atol=1e-5, rtol=0)
    perturb(conv)
    frozen = export_form(conv)
    assert isinstance(frozen, FrozenConv1x1)
    x = torch.randn(2, 4, 3, 3)
    for a, b in zip(conv(x), frozen(x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(conv.inverse(x), frozen.inverse(x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ShapeError, match="4, H, W"):
        conv(torch.randn(2, 3, 3, 3))


def test_actnorm_is_per_channel_on_images():
    x = torch.randn(64, 3, 5, 5) * torch.tensor([1.0, 3.0, 0.2])[:, None, None] + 2.0
    an = ActNorm((3, 5, 5))
    z, ladj = an(x)
    assert an.log_scale.shape == (3, 1, 1)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        z.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(ladj, (-25 * an.log_scale.sum()).expand(64))


@pytest.mark.parametrize("mask", ["channel", "checkerboard"])
def test_conv_coupling_identity_at_init_and_mask(mask):
    layer = ConvCoupling((4, 6, 6), mask, hidden_channels=8)
    x = torch.randn(3, 4, 6, 6)
    z, ladj = layer(x)
    assert torch.equal(z, x) and torch.equal(ladj, torch.zeros(3))
    perturb(layer)
    z, _ = layer(x)
    if mask == "channel":
        kept = torch.zeros(4, 6, 6, dtype=torch.bool)
        kept[:2] = True
    else:
        kept = ((torch.arange(6)[:, None] + torch.arange(6)) % 2 == 0).expand(4, 6, 6)
    assert torch.equal(z[:, kept], x[:, kept])
    assert not torch.allclose(z[:, ~kept], x[:, ~kept])


def test_conv_coupling_errors():
    with pytest.raises(ShapeError, match="at least 2 channels"):
        ConvCoupling((1, 4, 4), "channel")
    with pytest.raises(ValueError, match="mask must be one of"):
        ConvCoupling((2, 4, 4), "stripes")
    layer = ConvCoupling((2, 4, 4), "channel", context=3)
    with pytest.raises(ValueError, match="context"):
        layer(torch.randn(2, 2, 4, 4))


def test_factor_out_is_the_glow_prior():
    """log N(z; 0, I) + ladj equals log N(x_a) + log N(x_b; mu(x_a), sigma(x_a)^2)."""
    torch.manual_seed(0)
    fo = perturb(FactorOut((5, 4, 4), inner=None)).double()
    x = torch.randn(6, 5, 4, 4, dtype=torch.float64)
    z, ladj = fo(x)
    model = (-0.5 * (z.square() + LOG_2PI)).sum(dim=(1, 2, 3)) + ladj
    x_a, x_b = x[:, :3], x[:, 3:]
    loc, log_scale = fo.params(x_a, None)
    prior = torch.distributions.Normal(loc, log_scale.exp()).log_prob(x_b).sum(dim=(1, 2, 3))
    direct = torch.distributions.Normal(0.0, 1.0).log_prob(x_a).sum(dim=(1, 2, 3)) + prior
    torch.testing.assert_close(model, direct)
    assert torch.equal(z[:, :3], x_a)  # the staying part passes on unchanged (no inner)


def test_factor_out_temperature_scales_the_prior_std():
    torch.manual_seed(1)
    fo = perturb(FactorOut((2, 3, 3)))
    z = torch.randn(4, 2, 3, 3)
    x, _ = fo.inverse(z)
    x_half, _ = fo.inverse(torch.cat([z[:, :1], 0.5 * z[:, 1:]], dim=1))
    loc, _ = fo.params(x[:, :1], None)
    torch.testing.assert_close(x_half[:, 1:] - loc, 0.5 * (x[:, 1:] - loc))


def test_factor_out_and_prior_errors():
    with pytest.raises(ShapeError, match="at least 2 channels"):
        FactorOut((1, 4, 4))
    with pytest.raises(ValueError, match="prior must be"):
        FactorOut((2, 4, 4), prior="laplace")
    with pytest.raises(TypeError, match="inner must be a Transform"):
        FactorOut((2, 4, 4), inner=torch.nn.Linear(2, 2))
    prior = LearnedPrior((2, 4, 4), context=3)
    with pytest.raises(ValueError, match="no context"):
        prior(torch.randn(1, 2, 4, 4))


def _cube_points(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 4, (n, *shape), generator=g).double()
    v = 0.02 + 0.96 * torch.rand(n, *shape, generator=g, dtype=torch.float64)
    return x, v


def test_variational_dequantization_certified_across_cubes():
    torch.manual_seed(0)
    deq = perturb(VariationalDequantization((2, 4, 4), levels=4, depth=2, hidden_channels=4))
    x, v = _cube_points((2, 4, 4), 5)
    report = check_transform(deq, x + v, jacobian_samples=2)
    assert report.passed, str(report)
    y, _ = deq.double()(x + v)
    assert torch.equal(torch.floor(y), x)  # noise stays in its unit cube


def test_variational_dequantization_starts_uniform():
    deq = VariationalDequantization((1, 4, 4), levels=17)
    x, v = _cube_points((1, 4, 4), 3)
    y, ladj = deq.double()(x + v)
    torch.testing.assert_close(y, x + v)
    torch.testing.assert_close(ladj, torch.zeros(3, dtype=torch.float64))


def test_variational_dequantization_density_integrates_to_one():
    """q(u | x) is a density on the unit square for a 2-pixel image."""
    torch.manual_seed(2)
    deq = perturb(VariationalDequantization((1, 1, 2), levels=4, depth=2, hidden_channels=4))
    deq = deq.double()
    n = 120
    grid = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    u = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 1, 1, 2)
    for level in (0.0, 3.0):
        x = torch.full_like(u, level)
        with torch.no_grad():
            log_q = deq.log_q(x, u)
        integral = float(log_q.exp().mean())
        assert abs(integral - 1.0) < 5e-3, integral
        assert float(log_q.std()) > 0.05  # not the uniform density


def test_dequantizer_selection():
    ident = dequantizer("uniform", (1, 4, 4), 17)
    y = torch.rand(3, 1, 4, 4)
    z, ladj = ident(y)
    assert torch.equal(z, y) and ladj.shape == (3,)
    assert isinstance(dequantizer("variational", (1, 4, 4), 17, depth=1), VariationalDequantization)
    with pytest.raises(ConfigError, match="unknown dequantization"):
        dequantizer("gaussian", (1, 4, 4), 17)
    with pytest.raises(ConfigError, match="levels"):
        VariationalDequantization((1, 4, 4), levels=1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConvCoupling((3, 8, 8), "checkerboard", hidden_channels=4, context=2),
        lambda: ConvCoupling((3, 8, 8), "channel", True, hidden_channels=4, context=2),
        lambda: FactorOut(
            (3, 8, 8), ConvCoupling((2, 8, 8), "channel", hidden_channels=4), context=2
        ),
        lambda: VariationalDequantization((3, 8, 8), levels=4, depth=2, hidden_channels=4),
    ],
    ids=["checkerboard", "channel-flip", "factor-out", "dequantizer"],
)
def test_net_layers_certified_on_3x8x8(make):
    """The registry certifies these on 1x4x4 and 3x4x4; one 192-dim Jacobian each here."""
    torch.manual_seed(0)
    layer = perturb(make(), scale=0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 8, 8, generator=g, dtype=torch.float64) * 4
    ctx = None if layer.context_features == 0 else torch.randn(3, 2, generator=g).double()
    report = check_transform(layer, x, ctx, jacobian_samples=1)
    assert report.passed, str(report)
