"""Glow and multi-scale RealNVP builders: the density as a sum of its parts, bits/dim in pixel
space, temperature sampling, class conditioning, certification and a short seeded training
run on scikit-learn digits."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from exactflow.check import check_transform
from exactflow.data import bits_per_dim
from exactflow.errors import ConfigError
from exactflow.export import export_form
from exactflow.models import MODELS, Glow, RealNVPImage
from exactflow.models.image import pixel_flow
from exactflow.transforms.image import FactorOut, LearnedPrior
from helpers import perturb


def _initialised(flow, x):
    """Run ActNorm's data-dependent init on ``x``, perturb, and switch to eval mode."""
    with torch.no_grad():
        flow.log_prob(x)
    perturb(flow, 0.1)
    return flow.eval()


def test_models_registered():
    assert MODELS["glow"].builder is Glow and MODELS["realnvp-image"].builder is RealNVPImage
    assert MODELS["glow"].input == MODELS["realnvp-image"].input == "image"


def test_glow_log_prob_is_the_sum_of_its_parts():
    """Walk a 2-level Glow by hand: step log-dets + Gaussian prior of the factored half +
    learned top prior must equal ``flow.log_prob``."""
    torch.manual_seed(0)
    flow = Glow((1, 4, 4), levels=2, transforms=1, hidden=4).double()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    _initialised(flow, x)
    t = flow.transform
    h, total = t[0](x)  # squeeze
    for step in t[1:4]:  # actnorm, 1x1 conv, coupling
        h, ladj = step(h)
        total = total + ladj
    split = t[4]
    assert isinstance(split, FactorOut)
    h_a, h_b = h[:, :2], h[:, 2:]
    loc, log_scale = split.params(h_a, None)
    total = total + Normal(loc, log_scale.exp()).log_prob(h_b).sum(dim=(1, 2, 3))
    inner = split.inner
    g, _ = inner[0](h_a)
    for step in inner[1:4]:
        g, ladj = step(g)
        total = total + ladj
    top = inner[4]
    assert isinstance(top, LearnedPrior)
    loc, log_scale = top._params((5,), None)
    total = total + Normal(loc, log_scale.exp()).log_prob(g).sum(dim=(1, 2, 3))
    torch.testing.assert_close(flow.log_prob(x), total)


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 8, 8)])
def test_glow_transform_certified(shape):
    torch.manual_seed(1)
    flow = Glow(shape, levels=2, transforms=1, hidden=4).double()
    x = torch.randn(4, *shape, dtype=torch.float64)
    _initialised(flow, x)
    report = check_transform(flow.transform, x, jacobian_samples=1)
    assert report.passed, str(report)


@pytest.mark.parametrize("builder", [Glow, RealNVPImage])
def test_spline_coupling_args_reach_every_coupling(builder):
    """``map_kwargs`` configure a map given by name (here 4-bin splines), the flow is
    still certified, and the arguments are refused with a map instance or as a non-dict."""
    from exactflow.transforms.image import ConvCoupling
    from exactflow.transforms.splines import RationalQuadraticSpline

    torch.manual_seed(4)
    kw = {"levels": 2, "hidden": 4, "transforms": 1}
    flow = builder((1, 4, 4), map="rq-spline", map_kwargs={"bins": 4}, **kw).double()
    maps = [m.map for m in flow.modules() if isinstance(m, ConvCoupling)]
    assert maps and all(isinstance(m, RationalQuadraticSpline) for m in maps)
    assert {m.num_params for m in maps} == {3 * 4 - 1}
    x = 2.0 * torch.randn(4, 1, 4, 4, dtype=torch.float64)
    _initialised(flow, x)
    report = check_transform(flow.transform, x, jacobian_samples=1)
    assert report.passed, str(report)
    with pytest.raises(ConfigError, match="map_kwargs apply only"):
        builder((1, 4, 4), map=RationalQuadraticSpline(), map_kwargs={"bins": 4}, **kw)
    with pytest.raises(TypeError, match="map_kwargs must be a dict"):
        builder((1, 4, 4), map="rq-spline", map_kwargs=[4], **kw)


def test_realnvp_image_certified_and_conditional():
    torch.manual_seed(2)
    flow = RealNVPImage((1, 4, 4), levels=2, transforms=1, hidden=4, context=3).double()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    c = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        flow.log_prob(x, c)
    perturb(flow, 0.1).eval()
    report = check_transform(flow.transform, x, c, jacobian_samples=1)
    assert report.passed, str(report)
    assert not torch.allclose(flow.log_prob(x, c), flow.log_prob(x, c + 1.0))


def test_bits_per_dim_in_pixel_space():
    """pixel_flow adds the logit pre-processing log-det by hand-checkable amounts."""
    torch.manual_seed(3)
    model = Glow((1, 4, 4), levels=1, transforms=1, hidden=4)
    flow = pixel_flow(model, levels=17, alpha=0.05)
    y = torch.randint(0, 17, (6, 1, 4, 4)).float() + torch.rand(6, 1, 4, 4)
    flow.log_prob(y)  # ActNorm init
    flow.eval()
    p = 0.05 + 0.9 * y / 17
    s = torch.logit(p)
    logit_ladj = (math.log(0.9 / 17) - torch.log(p) - torch.log1p(-p)).sum(dim=(1, 2, 3))
    expected = model.log_prob(s) + logit_ladj
    log_prob = flow.log_prob(y)
    torch.testing.assert_close(log_prob, expected, atol=1e-4, rtol=1e-5)
    bpd = bits_per_dim(-log_prob, 16)
    torch.testing.assert_close(bpd, -expected / (16 * math.log(2.0)), atol=1e-5, rtol=1e-5)


def test_sampling_with_temperature():
    torch.manual_seed(4)
    flow = Glow((1, 8, 8), levels=2, transforms=1, hidden=8)
    data = torch.randn(64, 1, 8, 8) * 2 + 1
    _initialised(flow, data)
    g = torch.Generator().manual_seed(0)
    xs = flow.sample(256, generator=g, temperature=0.5)
    assert xs.shape == (256, 1, 8, 8) and torch.isfinite(xs).all()
    z, _ = flow.transform(xs)
    assert abs(float(z.detach().std()) - 0.5) < 0.02  # the latent of a T-sample has std T
    # the same noise, scaled: temperature only scales the base draw
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    expected, _ = flow.transform.inverse(0.7 * noise)
    got = flow.sample(3, generator=torch.Generator().manual_seed(7), temperature=0.7)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="temperature"):
        flow.sample(2, temperature=0.0)
    with pytest.raises(TypeError, match="temperature"):
        flow.sample(2, temperature="hot")


def test_class_conditional_glow():
    torch.manual_seed(5)
    flow = Glow((1, 8, 8), levels=2, transforms=1, hidden=8, context=10)
    x = torch.randn(6, 1, 8, 8)
    labels = torch.nn.functional.one_hot(torch.arange(6) % 10, 10).float()
    with torch.no_grad():
        flow.log_prob(x, labels)
    perturb(flow, 0.1).eval()
    lp = flow.log_prob(x, labels)
    other = torch.nn.functional.one_hot((torch.arange(6) + 1) % 10, 10).float()
    assert not torch.allclose(lp, flow.log_prob(x, other))
    samples = flow.sample(2, context=labels[:3], temperature=0.7)
    assert samples.shape == (2, 3, 1, 8, 8)


def test_export_form_keeps_the_density():
    torch.manual_seed(6)
    flow = Glow((1, 8, 8), levels=2, transforms=1, hidden=8)
    x = torch.randn(4, 1, 8, 8)
    _initialised(flow, x)
    frozen = export_form(flow)
    torch.testing.assert_close(frozen.log_prob(x), flow.log_prob(x), atol=1e-4, rtol=1e-5)


def test_builder_errors():
    with pytest.raises(ConfigError, match="divisible by 8"):
        Glow((1, 28, 28), levels=3)
    with pytest.raises(ConfigError, match="levels must be >= 1"):
        Glow((1, 8, 8), levels=0)
    with pytest.raises(TypeError, match="transforms must be an int"):
        Glow((1, 8, 8), transforms=2.5)
    with pytest.raises(ConfigError, match="divisible by 4"):
        RealNVPImage((1, 6, 6), levels=3)
    with pytest.raises(ValueError, match="C, H, W"):
        Glow((64,))
    with pytest.raises(ValueError, match="C, H, W"):  # a vector model's `features`
        RealNVPImage(64)


def _digits():
    from sklearn.datasets import load_digits

    data = torch.as_tensor(load_digits().data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(0))
    return data[perm[:1400]], data[perm[1400:]]


def _test_bpd(flow, test, g):
    with torch.no_grad():
        y = test + torch.rand(test.shape, generator=g)
        return float(bits_per_dim(-flow.log_prob(y).mean(), 64))


@pytest.mark.parametrize(
    "dequantization", ["uniform", pytest.param("variational", marks=pytest.mark.slow)]
)
def test_short_training_improves_bits_per_dim(dequantization):
    """Seeded, 60 steps of a small Glow on sklearn digits (8x8, 17 levels) lower the test
    bits/dim (measured: 3.72 -> 2.93 uniform, 3.72 -> 2.92 variational bound)."""
    torch.manual_seed(0)
    train, test = _digits()
    kwargs = {"depth": 1, "hidden_channels": 8} if dequantization == "variational" else {}
    flow = pixel_flow(
        Glow((1, 8, 8), levels=2, transforms=1, hidden=16), 17, dequantization, **kwargs
    )
    flow.validate = False
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        flow.log_prob(train[:256] + torch.rand(256, 1, 8, 8, generator=g))  # ActNorm init
    before = _test_bpd(flow, test, torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(60):
        idx = torch.randint(0, train.shape[0], (64,), generator=g)
        y = train[idx] + torch.rand(64, 1, 8, 8, generator=g)
        loss = -flow.log_prob(y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _test_bpd(flow, test, torch.Generator().manual_seed(2))
    assert math.isfinite(after)
    assert after < before - 0.5, (before, after)
    assert after < 3.1, after


def test_dequantization_choice_reaches_the_training_runner():
    """``model_args`` select the dequantiser: the runner's flow puts it before the logit."""
    from exactflow.app.run import build_flow
    from exactflow.data import LogitPreprocess, load_dataset
    from exactflow.transforms.dequantization import VariationalDequantization

    dataset = load_dataset("digits_image", seed=0)
    args = {"levels": 1, "transforms": 1, "hidden": 4}
    for kind, first in (("uniform", LogitPreprocess), ("variational", VariationalDequantization)):
        flow, event_shape = build_flow(
            "glow", {**args, "dequantization": kind}, dataset.meta(), dataset
        )
        assert event_shape == (1, 8, 8) and isinstance(flow.transform[0], first)
        y = dataset.train[:4] + 0.5
        assert torch.isfinite(flow.log_prob(y)).all()
    with pytest.raises(ConfigError, match="unknown dequantization"):
        Glow((1, 8, 8), dequantization="gaussian")
    model = Glow((1, 8, 8), levels=1, transforms=1, dequantization="variational")
    with pytest.raises(ConfigError, match="discrete pixel data"):
        model.with_preprocessing(LogitPreprocess(17, event_dim=3).inv)
