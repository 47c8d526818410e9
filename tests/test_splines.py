"""Spline elementwise maps: robustness at extreme inputs and parameters, identity at zero,
monotonicity, identity tails, log-det vs autograd, and a short seeded fit."""

from __future__ import annotations

import math

import pytest
import torch

import exactflow as ef
from exactflow.errors import ConfigError, ShapeError
from exactflow.transforms import (
    CubicSpline,
    ElementwiseTransform,
    RationalQuadraticSpline,
    resolve_map,
)
from exactflow.transforms.splines import _knots, rational_quadratic_spline

BOUND = 3.0
MAPS = {
    "rq": lambda: RationalQuadraticSpline(bins=8, bound=BOUND),
    "cubic": lambda: CubicSpline(bins=8, bound=BOUND),
}
KINDS = pytest.mark.parametrize("kind", list(MAPS))
ALL_MAPS = {
    **MAPS,
    "rq-free": lambda: RationalQuadraticSpline(bins=8, bound=BOUND, derivatives="free"),
}


def knot_positions(m, params: torch.Tensor, outputs: bool) -> torch.Tensor:
    """The map's own knots ``(..., K + 1)``: x-knots (inputs) or y-knots (outputs)."""
    k = m.bins
    raw = params[..., k : 2 * k] if outputs else params[..., :k]
    return _knots(raw, m.bound, m.min_height if outputs else m.min_width)


def extreme_params(n: int, num_params: int, g: torch.Generator) -> torch.Tensor:
    """Random params at scales up to 50, a tenth of rows saturated at +-50, a tenth zero."""
    scale = 50.0 * torch.rand(n, 1, generator=g)
    p = scale * torch.randn(n, num_params, generator=g)
    sat = n // 10
    p[:sat] = 50.0 * torch.randn(sat, num_params, generator=g).sign()
    p[sat : 2 * sat] = 0.0
    return p


def hard_inputs(m, params: torch.Tensor, outputs: bool, g: torch.Generator) -> torch.Tensor:
    """Inputs in the box, outside it, exactly on (own) knots, at +-B and at +-1e6."""
    n, dt = params.shape[0], params.dtype
    b = m.bound
    x = (2.0 * torch.rand(n, generator=g, dtype=dt) - 1.0) * b
    idx = torch.randperm(n, generator=g)
    q = n // 8
    far = b * (1.0 + 9.0 * torch.rand(q, generator=g, dtype=dt))
    x[idx[:q]] = torch.where(torch.rand(q, generator=g) < 0.5, far, -far)
    knots = knot_positions(m, params[idx[q : 3 * q]], outputs)
    which = torch.randint(0, m.bins + 1, (2 * q,), generator=g)
    x[idx[q : 3 * q]] = knots.gather(-1, which[:, None]).squeeze(-1)
    edge = idx[3 * q : 3 * q + 40]
    x[edge] = torch.tensor([b, -b, 1e6, -1e6], dtype=dt).repeat(10)
    return x


@pytest.mark.parametrize("kind", list(ALL_MAPS))
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_finite_everywhere_float32(kind, direction):
    """10^4 float32 inputs incl. tails, knots, +-B and +-1e6 with params up to +-50:
    outputs, log-dets and gradients w.r.t. inputs and params are all finite."""
    m = ALL_MAPS[kind]()
    g = torch.Generator().manual_seed(0 if direction == "forward" else 1)
    n = 10_000
    params = extreme_params(n, m.num_params, g).requires_grad_(True)
    x = hard_inputs(m, params.detach(), direction == "inverse", g).requires_grad_(True)
    y, ld = getattr(m, direction)(x, params)
    assert y.dtype == torch.float32 and y.shape == x.shape and ld.shape == x.shape
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    (y.sum() + ld.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(params.grad).all()
    # gradients of y alone must be finite too (a NaN could hide behind the sum otherwise)
    x.grad = None
    params.grad = None
    y2, _ = getattr(m, direction)(x, params)
    y2.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(params.grad).all()
    assert (x.grad >= 0).all()  # monotone increasing map


@KINDS
@pytest.mark.parametrize("bound", [3.0, 5.0])
def test_round_trip_float32_extreme(kind, bound):
    """Round trips inside the box in float32 with extreme params (issue #3): both
    x -> z -> x and z -> x -> z within 1e-4 everywhere, because the default parameterisation
    keeps the slope in the box within [0.0093, 86] at K = 8 (see default_min_size)."""
    m = MAPS[kind]()
    m.bound = bound
    g = torch.Generator().manual_seed(2)
    n = 10_000
    params = extreme_params(n, m.num_params, g)
    x = hard_inputs(m, params, False, g)
    x = torch.where(x.abs() <= m.bound, x, x / 1e6)
    y, ld = m.forward(x, params)
    assert ld.exp().min() > 0.0093 and ld.exp().max() < 90.0
    x2, _ = m.inverse(y, params)
    assert (x2 - x).abs().max() < 1e-4
    z = (2.0 * torch.rand(n, generator=g) - 1.0) * m.bound
    xz, _ = m.inverse(z, params)
    z2, _ = m.forward(xz, params)
    assert (z2 - z).abs().max() < 1e-4


def test_free_derivatives_are_finite_but_can_be_flat():
    """The paper's free knot derivatives stay finite at extreme params, but the map can
    be so flat (slope < 1e-5) that float32 cannot invert it: why "bounded" is the default."""
    m = RationalQuadraticSpline(bins=8, bound=BOUND, derivatives="free")
    g = torch.Generator().manual_seed(2)
    params = extreme_params(10_000, m.num_params, g)
    x = hard_inputs(m, params, False, g)
    y, ld = m.forward(x, params)
    x2, _ = m.inverse(y, params)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all() and torch.isfinite(x2).all()
    assert ld.exp().min() < 1e-5


@KINDS
def test_round_trip_float64_extreme(kind):
    """Same inputs and params in float64: round trips and log-det consistency are tight."""
    m = MAPS[kind]()
    g = torch.Generator().manual_seed(3)
    params = extreme_params(10_000, m.num_params, g).double()
    x = hard_inputs(m, params, False, g)
    x = torch.where(x.abs() <= m.bound, x, x / 1e6)
    y, ld = m.forward(x, params)
    x2, ld2 = m.inverse(y, params)
    err_x = (x2 - x).abs()
    assert (err_x * ld.exp().clamp(max=1.0)).max() < 1e-12
    assert err_x[ld > math.log(1e-2)].max() < 1e-10
    # the inverse's log-det is minus the forward one at the point it returns (away from
    # +-B, where the cubic's slope may jump to the tails' 1: see CubicSpline)
    _, ld_back = m.forward(x2, params)
    interior = x2.abs() < m.bound - 1e-9
    assert (ld2 + ld_back)[interior].abs().max() < 1e-8


@KINDS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_at_zero_params(kind, dtype):
    m = resolve_map({"rq": "rq-spline", "cubic": "cubic-spline"}[kind], bins=8, bound=5.0)
    g = torch.Generator().manual_seed(4)
    x = 4.0 * torch.randn(2000, generator=g, dtype=dtype)
    x[:4] = torch.tensor([5.0, -5.0, 0.0, 1e6], dtype=dtype)
    params = torch.zeros(*x.shape, m.num_params, dtype=dtype)
    tol = 8 * torch.finfo(dtype).eps * 5.0
    for direction in (m.forward, m.inverse):
        y, ld = direction(x, params)
        assert (y - x).abs().max() <= tol
        assert ld.abs().max() <= tol
    # a zero-initialised ElementwiseTransform is the identity too
    t = ElementwiseTransform(m, (3,), init_scale=0.0).to(dtype)
    z, ladj = t(x[:12].reshape(4, 3))
    torch.testing.assert_close(z, x[:12].reshape(4, 3), atol=tol, rtol=0)
    assert ladj.abs().max() <= 3 * tol


@KINDS
def test_monotone(kind):
    m = MAPS[kind]()
    g = torch.Generator().manual_seed(5)
    grid = torch.linspace(-1.5 * m.bound, 1.5 * m.bound, 3001, dtype=torch.float64)
    for scale in (1.0, 5.0, 20.0):
        p = scale * torch.randn(m.num_params, generator=g, dtype=torch.float64)
        params = p.expand(*grid.shape, -1)
        kx = knot_positions(m, params[:1], False)[0]
        ky = knot_positions(m, params[:1], True)[0]
        for direction, knots in ((m.forward, kx), (m.inverse, ky)):
            pts, _ = torch.sort(torch.cat([grid, knots]))
            y, _ = direction(pts, p.expand(*pts.shape, -1))
            steps = y.diff()[pts.diff() > 0]
            assert (steps > 0).all(), f"not increasing at scale {scale}"


@KINDS
def test_tails_are_identity(kind):
    m = MAPS[kind]()
    g = torch.Generator().manual_seed(6)
    n = 2000
    params = extreme_params(n, m.num_params, g)
    mag = m.bound * (1.0 + 10.0 * torch.rand(n, generator=g))
    mag[:2] = 1e6
    x = torch.where(torch.rand(n, generator=g) < 0.5, mag, -mag)
    x = torch.where(x.abs() > m.bound, x, 2 * x)  # strictly outside
    for direction in (m.forward, m.inverse):
        y, ld = direction(x, params)
        assert torch.equal(y, x)
        assert torch.equal(ld, torch.zeros_like(ld))
    # the box edges are fixed points, so the tails join the spline continuously
    edges = torch.tensor([-m.bound, m.bound]).repeat(n // 2)
    for direction in (m.forward, m.inverse):
        y, _ = direction(edges, params)
        assert (y - edges).abs().max() <= 1e-6 * m.bound


@KINDS
def test_logdet_matches_autograd(kind):
    """log|dy/dx| from the map equals the log of the autograd derivative, elementwise."""
    m = MAPS[kind]()
    g = torch.Generator().manual_seed(7)
    n = 3000
    params = 3.0 * torch.randn(n, m.num_params, generator=g, dtype=torch.float64)
    params[: n // 3] *= 5.0
    x = 1.3 * m.bound * (2.0 * torch.rand(n, generator=g, dtype=torch.float64) - 1.0)
    x[:20] = knot_positions(m, params[:20], False)[:, 3]
    for direction in (m.forward, m.inverse):
        xi = x.clone().requires_grad_(True)
        y, ld = direction(xi, params)
        (dydx,) = torch.autograd.grad(y.sum(), xi)
        assert (dydx > 0).all()
        torch.testing.assert_close(ld, dydx.log(), atol=1e-9, rtol=1e-9)


@KINDS
def test_fits_bimodal_density(kind):
    """A single learnable spline on N(0, 1) fits a two-Gaussian mixture (seeded, 100 steps);
    the best Gaussian (affine flow) is ~0.67 nats off, the identity start ~0.9."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(8)

    def draw(n):
        sign = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.5, 1.5)
        return sign + 0.4 * torch.randn(n, 1, generator=g)

    def true_nll(x):
        comp = torch.distributions.Normal(torch.tensor([-1.5, 1.5]), 0.4)
        return -(comp.log_prob(x).logsumexp(-1) - math.log(2)).mean()

    flow = ef.Flow(ElementwiseTransform(MAPS[kind](), (1,)), ef.StandardNormal((1,)))
    train, test = draw(1000), draw(2000)
    start = -flow.log_prob(test).mean().item()
    opt = torch.optim.Adam(flow.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        loss = -flow.log_prob(train).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        nll = -flow.log_prob(test).mean().item()
    target = true_nll(test).item()
    assert start - target > 0.5  # the identity start is far off
    assert nll - target < 0.06, (nll, target)


def test_resolve_map_names_and_kwargs():
    m = resolve_map("rq-spline", bins=8, bound=5.0)
    assert isinstance(m, RationalQuadraticSpline) and m.num_params == 23 and m.bound == 5.0
    assert isinstance(resolve_map("spline", bins=4), RationalQuadraticSpline)
    c = resolve_map("cubic-spline", bins=6, bound=2.0)
    assert isinstance(c, CubicSpline) and c.num_params == 12


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: RationalQuadraticSpline(bins=0), "bins"),
        (lambda: RationalQuadraticSpline(bound=-1.0), "bound"),
        (lambda: RationalQuadraticSpline(bins=8, min_width=0.2), "min_width"),
        (lambda: RationalQuadraticSpline(min_derivative=1.0), "min_derivative"),
        (lambda: CubicSpline(min_height=0.0), "min_height"),
        (lambda: RationalQuadraticSpline(derivative_range=(1.0, 4.0)), "derivative_range"),
        (lambda: RationalQuadraticSpline(derivative_range=(0.5, 0.9)), "derivative_range"),
        (lambda: RationalQuadraticSpline(derivative_range=(0.5,)), "derivative_range"),
        (lambda: RationalQuadraticSpline(derivative_range="ab"), "derivative_range"),
        (lambda: RationalQuadraticSpline(derivative_range=(0.5, math.inf)), "derivative_range"),
        (lambda: CubicSpline(newton_steps=0), "newton_steps"),
    ],
)
def test_bad_config(build, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build()


@KINDS
def test_bad_params_shape(kind):
    m = MAPS[kind]()
    x = torch.zeros(4, 3)
    with pytest.raises(ShapeError, match=rf"\(4, 3, {m.num_params}\)"):
        m.forward(x, torch.zeros(4, 3, m.num_params + 1))
    with pytest.raises(ShapeError, match="params"):
        m.inverse(x, torch.zeros(4, m.num_params))


@pytest.mark.slow
@KINDS
def test_torch_export(kind):
    """No data-dependent shapes or .item(): both directions trace with torch.export
    (slow: ~5 s for the RQ spline, ~15 s for the cubic's unrolled Newton loop)."""
    t = ElementwiseTransform(MAPS[kind](), (3,), init_scale=1.0)
    x = 2.0 * torch.randn(5, 3)
    for fn in (t, ef.transforms.Inverse(t)):
        prog = torch.export.export(fn, (x,))
        y, ld = prog.module()(x)
        y_ref, ld_ref = fn(x)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(ld, ld_ref)


def test_nsf_passes_map_kwargs_to_its_splines():
    """NSF(map_kwargs={"derivatives": "free"}) reaches every spline; the default is bounded."""
    for rule, kwargs in [("bounded", {}), ("free", {"map_kwargs": {"derivatives": "free"}})]:
        flow = ef.models.NSF(3, transforms=2, hidden=(8,), **kwargs)
        maps = [
            m.map
            for m in flow.modules()
            if isinstance(getattr(m, "map", None), RationalQuadraticSpline)
        ]
        assert len(maps) == 2 and all(m.derivatives == rule for m in maps)


@pytest.mark.parametrize("make", [RationalQuadraticSpline, CubicSpline], ids=["rq", "cubic"])
def test_one_bin_spline_round_trips(make):
    """K = 1 (one bin spanning the box) is a valid configuration: knots are exactly +-B."""
    m = make(bins=1, bound=2.0)
    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(64, generator=g, dtype=torch.float64)
    params = torch.randn(64, m.num_params, generator=g, dtype=torch.float64)
    y, ld = m.forward(x, params)
    x2, ld2 = m.inverse(y, params)
    assert (x2 - x).abs().max() < 1e-10 and (ld + ld2).abs().max() < 1e-8
    torch.testing.assert_close(y[x.abs() > 2.0], x[x.abs() > 2.0])


def rq_slope_floor(lo: float, hi: float) -> float:
    """Smallest slope, relative to the bin slope ``s``, of a rational-quadratic bin whose
    knot derivatives are ``a s`` and ``b s`` with ``a, b`` in ``[lo, hi]`` (a grid search of
    ``(b xi^2 + 2 xi(1-xi) + a (1-xi)^2) / (1 + (a + b - 2) xi(1-xi))^2``)."""
    f = torch.logspace(math.log10(lo), math.log10(hi), 81, dtype=torch.float64)
    a, b, xi = torch.meshgrid(f, f, torch.linspace(0, 1, 401, dtype=torch.float64), indexing="ij")
    mix = xi * (1 - xi)
    return ((b * xi**2 + 2 * mix + a * (1 - xi) ** 2) / (1 + (a + b - 2) * mix) ** 2).min().item()


@pytest.mark.parametrize("factors", [(0.5, 4.0), (0.25, 8.0), (0.1, 10.0)])
def test_derivative_range_bounds_the_slope(factors):
    """With knot-derivative factors in ``(lo, hi)`` the slope in the box stays at or above
    :func:`rq_slope_floor` times the smallest possible bin slope at extreme params (float64,
    so the bound itself is tested, not rounding); 0.4 at the default (0.5, 4)."""
    lo, hi = factors
    m = RationalQuadraticSpline(bins=8, bound=BOUND, derivative_range=[lo, hi])
    assert m.derivative_range == (lo, hi)
    g = torch.Generator().manual_seed(9)
    params = extreme_params(10_000, m.num_params, g).double()
    x = hard_inputs(m, params, False, g)
    x = torch.where(x.abs() <= m.bound, x, x / 1e6)
    y, ld = m.forward(x, params)
    smallest_bin_slope = m.min_height / (1.0 - (m.bins - 1) * m.min_width)
    floor = rq_slope_floor(lo, hi) * smallest_bin_slope
    assert ld.exp().min() >= 0.999 * floor  # the grid search overestimates the min slightly
    # extreme params do reach it: a wider range makes the map flatter
    assert ld.exp().min() < 1.5 * floor
    x2, _ = m.inverse(y, params)
    assert (x2 - x).abs().max() < 1e-10 / floor


@pytest.mark.parametrize("derivatives", ["bounded", "free"])
def test_strided_params_give_the_same_spline(derivatives):
    """A params view with any memory layout (MADE hands over a parameter-major one) gives
    the same outputs, log-dets and gradients as the contiguous tensor."""
    g = torch.Generator().manual_seed(3)
    n, d, k = 64, 5, 6
    x = 4.0 * torch.randn(n, d, generator=g, dtype=torch.float64)
    slab = torch.randn(n, 3 * k - 1, d, generator=g, dtype=torch.float64)
    strided = slab.clone().requires_grad_(True)
    dense = slab.transpose(-1, -2).contiguous().requires_grad_(True)
    for inverse in (False, True):
        a = rational_quadratic_spline(
            x, strided.transpose(-1, -2), derivatives=derivatives, inverse=inverse
        )
        b = rational_quadratic_spline(x, dense, derivatives=derivatives, inverse=inverse)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        (ga,) = torch.autograd.grad(a[0].sum() + a[1].sum(), strided)
        (gb,) = torch.autograd.grad(b[0].sum() + b[1].sum(), dense)
        assert torch.equal(ga.transpose(-1, -2), gb)
