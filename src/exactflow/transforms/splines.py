"""Monotone spline maps on a box ``[-B, B]`` with identity (linear, slope 1) tails.

Two :class:`~exactflow.transforms.ElementwiseMap` kinds, both usable by name in coupling and
autoregressive layers (``resolve_map("rq-spline", bins=8, bound=5.0)``):

* :class:`RationalQuadraticSpline` (``"rq-spline"``, alias ``"spline"``): Durkan et al. 2019,
  "Neural Spline Flows". Closed form in both directions.
* :class:`CubicSpline` (``"cubic-spline"``): a monotone cubic Hermite spline with Steffen
  (1990) knot derivatives, after Durkan et al. 2019, "Cubic-Spline Flows". The inverse is a
  bracketed Newton search with a fixed iteration count (see :func:`monotone_cubic_spline`).

Both are built so that the box and its tails are handled export-safely: the spline is
always evaluated on ``clamp(x, -B, B)`` (so the unused branch of ``torch.where`` can never
produce an inf/NaN value or gradient), the bin is found by counting the knots below the
input (no data-dependent shapes), and ``torch.where`` picks the identity outside the box.

The maths is in the pure functions :func:`rational_quadratic_spline` and
:func:`monotone_cubic_spline`; the classes only hold their configuration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..validation import check_count, check_positive_finite, check_real
from .elementwise import ElementwiseMap, register_map

__all__ = [
    "DERIVATIVE_RANGE",
    "CubicSpline",
    "RationalQuadraticSpline",
    "default_min_size",
    "monotone_cubic_spline",
    "rational_quadratic_spline",
]


def _unit_knots(raw: Tensor, min_size: float | Tensor, dim: int = -1) -> Tensor:
    """Knot positions in unit coordinates of the box (``K + 1`` along ``dim``, from 0 to 1)
    from unconstrained logits (``K`` along ``dim``).

    Bin sizes are ``min_size + (1 - K min_size) softmax(raw)``, so zeros give equal bins;
    ``min_size`` may be a tensor broadcasting against ``raw``. The end knots are exactly 0
    and 1 so an input at the edge of the box lands inside the last bin, never past it; the
    interior knots are the cumulative sizes as they round (a few ulp past 1 at worst).
    """
    k = raw.shape[dim]
    frac = min_size + (1.0 - k * min_size) * torch.softmax(raw, dim=dim)
    inner = torch.cumsum(frac.narrow(dim, 0, k - 1), dim=dim)
    edge = torch.zeros_like(frac.narrow(dim, 0, 1))
    return torch.cat([edge, inner, edge + 1.0], dim=dim)


def _knots(raw: Tensor, bound: float, min_size: float | Tensor, dim: int = -1) -> Tensor:
    """Knot positions (``K + 1`` along ``dim``) on ``[-bound, bound]``: :func:`_unit_knots`
    clamped to ``[0, 1]`` and scaled to the box, end knots exactly ``-bound`` and ``bound``."""
    return bound * (2.0 * _unit_knots(raw, min_size, dim).clamp(0.0, 1.0) - 1.0)


def _min_sizes(
    bins: int, derivatives: str, min_width: float | None, min_height: float | None
) -> tuple[float, float]:
    """The smallest bin width and height, ``None`` taking the rule's default:
    :func:`default_min_size` for ``"bounded"`` (and the cubic spline), 1e-3 for ``"free"``."""
    if derivatives not in ("bounded", "free"):
        raise ConfigError(f"derivatives must be 'bounded' or 'free', got {derivatives!r}")
    fallback = default_min_size(bins) if derivatives == "bounded" else 1e-3
    return (
        fallback if min_width is None else min_width,
        fallback if min_height is None else min_height,
    )


def _locate(v: Tensor, knots: Tensor) -> Tensor:
    """Bin index ``(...)`` of ``v`` in ``[knots[0], knots[K]]``: how many interior knots are
    ``<= v`` (searchsorted by counting, so it exports and never leaves ``[0, K - 1]``)."""
    return (v.unsqueeze(-1) >= knots[..., 1:-1]).sum(dim=-1)


def _take(t: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(t, -1, idx.unsqueeze(-1)).squeeze(-1)


def _check(x: Tensor, params: Tensor, num_params: int, name: str) -> None:
    if params.shape != (*x.shape, num_params):
        raise ShapeError(
            f"{name} expects params of shape x.shape + ({num_params},) = "
            f"{(*x.shape, num_params)}, got {tuple(params.shape)}"
        )


def _check_config(bins: int, bound: float, mins: dict[str, float]) -> dict[str, float]:
    """The checked ``bound`` and minimum sizes (numbers only: ``bound="5"`` is refused)."""
    check_count(bins, "bins", minimum=1)
    check_positive_finite(bound, "bound")
    mins = {key: check_real(value, key) for key, value in mins.items()}
    for key, value in mins.items():
        limit = 1.0 if key == "min_derivative" else 1.0 / bins
        if not 0.0 < value < limit:
            raise ConfigError(f"{key} must lie in (0, {limit:g}) for bins={bins}, got {value!r}")
    return mins


DERIVATIVE_RANGE = (0.5, 4.0)
"""Bounded knot derivatives: ``d_k`` lies in this range times ``min(s_{k-1}, s_k)``.
The upper end trades conditioning for flexibility: (0.5, 2) cost 0.03 nats on 8gaussians
(NSF, 1,500 steps, 2 seeds) against the paper's free rule, (0.5, 4) 0.006-0.010."""


def _check_range(factors: Sequence[float] | None) -> tuple[float, float]:
    """``factors`` as a ``(lo, hi)`` pair of floats with ``0 < lo < 1 < hi`` (``None``:
    :data:`DERIVATIVE_RANGE`); ``f(0) = 1`` needs 1 strictly inside."""
    if factors is None:
        return DERIVATIVE_RANGE
    is_pair = (
        isinstance(factors, Sequence)
        and not isinstance(factors, (str, bytes))
        and len(factors) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in factors)
    )
    if not is_pair:
        raise ConfigError(f"derivative_range must be a (lo, hi) pair, got {factors!r}")
    lo, hi = float(factors[0]), float(factors[1])
    if not (0.0 < lo < 1.0 < hi < math.inf):
        raise ConfigError(f"derivative_range must satisfy 0 < lo < 1 < hi < inf, got {factors!r}")
    return lo, hi


def _derivative_factor(raw_d: Tensor, factors: tuple[float, float]) -> Tensor:
    """``f(p)`` onto ``factors = (lo, hi)`` with ``f(0) = 1`` and unit slope of ``log f``
    at 0 (as the free rule's softplus): ``log f = a tanh(p / a)``, ``a = log hi`` for
    ``p > 0`` and ``-log lo`` below (it replaced a sigmoid; docs/guide/vi.md compares the
    two rules)."""
    lo, hi = factors
    up, down = math.log(hi), -math.log(lo)
    return torch.where(
        raw_d > 0, up * torch.tanh(raw_d / up), down * torch.tanh(raw_d / down)
    ).exp()


def default_min_size(bins: int) -> float:
    """The default smallest bin (fraction of the box) of the bounded parameterisation:
    ``min(0.02, 0.5 / K)``, so at K = 8 the smallest bin slope is 0.02 / 0.86 = 0.023.

    Halving it (or widening :data:`DERIVATIVE_RANGE`) halves the slope floor and did not fit
    the default moons NSF measurably better (benchmarks/README.md, "Spline variants, and 8
    fresh seeds")."""
    return min(0.02, 0.5 / bins)


def _bounded_derivatives(
    before: Tensor,
    s: Tensor,
    after: Tensor,
    raw_d: Tensor | None,
    first: Tensor,
    last: Tensor,
    factors: tuple[float, float] = DERIVATIVE_RANGE,
) -> tuple[Tensor, Tensor]:
    """Knot derivatives ``(d_k, d_{k+1})``, each of shape ``S``, at the two ends of the input's
    bin ``k``, tied to the adjacent bin slopes.

    ``before``, ``s``, ``after`` are the slopes of bins ``k - 1``, ``k``, ``k + 1`` (any finite
    value where that bin is past the box: ``first``/``last`` mark ``k = 0``/``k = K - 1``), and
    ``raw_d`` ``(2, *S)`` the pre-activations of knots ``k`` and ``k + 1`` (``None`` for one
    bin, whose two knots are both end knots).

    Interior ``d_k = min(s_{k-1}, s_k) f(p_k)`` with ``f`` from :func:`_derivative_factor`
    in ``factors`` (default :data:`DERIVATIVE_RANGE`);
    the end knots take ``min(1, s)`` of the edge bin (the identity tails are bins of slope
    1). A knot derivative far above the bin slope is what makes a rational-quadratic bin
    nearly flat inside (slope about ``2 s^2 / d``); with this rule the slope everywhere in
    the box stays within ``[c min(s), 2 max(s)]``, so float32 inverses keep their accuracy.
    ``c`` is the smallest in-bin slope over knot derivatives ``a s, b s`` with ``a, b`` in
    ``factors``: 0.4 for the default (0.5, 4) (``a = b = hi``, ``2 / (1 + hi)``), but the
    mixed ``a = hi, b = lo`` is flatter for wider ranges: 0.19 at (0.25, 8), 0.1 at (0.1, 10).
    """
    edge = s.clamp(max=1.0)
    if raw_d is None:
        return edge, edge
    f = _derivative_factor(raw_d, factors)
    d0 = torch.where(first, edge, torch.minimum(before, s) * f[0])
    d1 = torch.where(last, edge, torch.minimum(s, after) * f[1])
    return d0, d1


def rational_quadratic_spline(
    x: Tensor,
    params: Tensor,
    *,
    bound: float = 5.0,
    min_width: float | None = None,
    min_height: float | None = None,
    min_derivative: float = 1e-3,
    derivatives: str = "bounded",
    derivative_range: tuple[float, float] = DERIVATIVE_RANGE,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Monotone rational-quadratic spline on ``[-bound, bound]``, identity outside.

    In bin ``k`` with ``xi = (x - x_k) / w_k``, slope ``s_k = h_k / w_k`` and knot
    derivatives ``d_k, d_{k+1}``:
    ``y = y_k + h_k [s_k xi^2 + d_k xi(1-xi)] / [s_k + (d_{k+1} + d_k - 2 s_k) xi(1-xi)]``.
    The inverse solves the quadratic for ``xi`` in closed form (cancellation-free branch).

    Args:
        x: inputs, any shape ``S`` (outputs of the forward map when ``inverse=True``).
        params: ``S + (3K - 1,)`` unconstrained: K width logits, K height logits and the
            ``K - 1`` interior derivative pre-activations; all zeros give the identity.
        bound: half-width ``B`` of the box.
        min_width, min_height: smallest bin as a fraction of ``2 B``; ``None`` picks
            :func:`default_min_size` for ``"bounded"`` and ``1e-3`` for ``"free"``.
        min_derivative: smallest knot derivative (``"free"`` only).
        derivatives: ``"bounded"`` (default) ties each knot derivative to its adjacent bin
            slopes (see :func:`_bounded_derivatives`), so the map's slope in the box is
            bounded below by ``0.4 min_height / (1 - (K-1) min_width)`` (0.0093 at
            K = 8) and float32 round trips stay accurate for any parameters; ``"free"`` is
            the paper's ``d = min_derivative + softplus(p)``, boundary derivatives 1, whose
            slope can fall to ~1e-7 at extreme parameters (where float32 cannot invert).
        derivative_range: ``(lo, hi)``, ``0 < lo < 1 < hi``: the range of the factor
            ``f`` of the ``"bounded"`` rule (ignored by ``"free"``).
        inverse: evaluate the inverse map instead.

    Returns:
        ``(y, logabsdet)``, both of shape ``S``: ``log |dy/dx|`` elementwise (of the inverse
        map when ``inverse=True``).
    """
    k = (params.shape[-1] + 1) // 3
    min_width, min_height = _min_sizes(k, derivatives, min_width, min_height)
    # Bins-first layout (P, *S): every reduction below runs along dim 0 over contiguous
    # slabs, which vectorises; a softmax over a short last dim is ~10x slower on CPU.
    raw_wh, raw_d = params.movedim(-1, 0).contiguous().split([2 * k, k - 1], dim=0)
    mins: float | Tensor = min_width
    if min_width != min_height:  # one rule for both rows: their minimum sizes broadcast
        mins = torch.tensor([min_width, min_height], dtype=params.dtype, device=params.device)
        mins = mins.reshape(2, *([1] * params.dim()))
    # Only the softmax, its cumulative sum and the knot table span all bins; the rest is computed
    # on the few knots gathered at the input's bin (the full knot table, its slopes and
    # derivatives were most of the spline's time). Knots are in unit coordinates of the box.
    table = _unit_knots(raw_wh.unflatten(0, (2, k)), mins, dim=1)  # (2, K + 1, *S)

    # Everything below runs on the clamped input so the discarded branch stays finite.
    inside = (x >= -bound) & (x <= bound)
    v = x.clamp(-bound, bound)
    # bin index: how many interior knots are <= v (counting exports; searchsorted does not).
    # The knots are compared in data units, rounded exactly as x0, x1 (or y0, y1) below: an
    # input on a knot must land at the start of the next bin, not the end of this one (there
    # a tiny knot derivative makes the inverse's discriminant cancel to 0).
    knots = bound * (2.0 * table[1 if inverse else 0, 1:-1] - 1.0)
    idx = (v.unsqueeze(0) >= knots).sum(dim=0)
    bounded = derivatives == "bounded"
    # knot indices idx - 1 .. idx + 2 (the bounded rule needs the neighbouring bins' slopes);
    # clamped, a knot past the box repeats the end knot, so its bin has zero width and height
    t = torch.stack([idx - 1, idx, idx + 1, idx + 2] if bounded else [idx, idx + 1])
    cols = t.clamp(0, k).unsqueeze(0).expand(2, *t.shape)
    at = torch.gather(table, 1, cols).clamp(0.0, 1.0)  # (2, n, *S)
    xk, yk = at.unbind(0)
    mid = 1 if bounded else 0
    x0, x1 = bound * (2.0 * xk[mid] - 1.0), bound * (2.0 * xk[mid + 1] - 1.0)
    y0, y1 = bound * (2.0 * yk[mid] - 1.0), bound * (2.0 * yk[mid + 1] - 1.0)
    w, h = x1 - x0, y1 - y0
    s = h / w
    first, last = idx == 0, idx == k - 1
    # the pre-activations of knots idx and idx + 1 (none with one bin: both are end knots)
    pd = None
    if k > 1:
        pd = torch.gather(raw_d, 0, torch.stack([idx - 1, idx]).clamp(0, k - 2))  # (2, *S)
    if bounded:
        # slopes of bins idx - 1 and idx + 1 (a bin past the box: 0 / 1, never used)
        wu, hu = xk[1:] - xk[:-1], yk[1:] - yk[:-1]
        su = hu / torch.where(wu > 0, wu, torch.ones_like(wu))
        d0, d1 = _bounded_derivatives(su[0], s, su[2], pd, first, last, derivative_range)
    else:
        d0, d1 = torch.ones_like(s), torch.ones_like(s)
        if pd is not None:
            shift = math.log(math.expm1(1.0 - min_derivative))
            inner_d = min_derivative + F.softplus(pd + shift)
            d0 = torch.where(first, d0, inner_d[0])
            d1 = torch.where(last, d1, inner_d[1])

    if inverse:
        # r and r1 = 1 - r straight from the knots: forming 1 - r would cancel near y1.
        r = ((v - y0) / h).clamp(0.0, 1.0)
        r1 = ((y1 - v) / h).clamp(0.0, 1.0)
        # qa xi^2 + qb xi - r s = 0; qa + qb = s exactly, so qa = s - qb > 0 whenever qb < 0.
        qb = d0 * r1 - r * (d1 - 2.0 * s)
        qa = s - qb
        root = (qb.square() + 4.0 * qa * r * s).clamp_min(0.0).sqrt()
        # The same root two ways; each is cancellation-free for one sign of qb.
        pos = qb >= 0
        xi_pos = 2.0 * r * s / torch.where(pos, qb + root, torch.ones_like(qb))
        xi_neg = (root - qb) / torch.where(pos, torch.ones_like(qa), 2.0 * qa)
        xi = torch.where(pos, xi_pos, xi_neg).clamp(0.0, 1.0)
        xi1 = 1.0 - xi
        out = x0 + w * xi
    else:
        xi = ((v - x0) / w).clamp(0.0, 1.0)
        xi1 = ((x1 - v) / w).clamp(0.0, 1.0)

    mix = xi * xi1
    denom = s * (xi.square() + xi1.square()) + (d0 + d1) * mix
    if not inverse:
        out = y0 + h * (s * xi.square() + d0 * mix) / denom
    numer = d1 * xi.square() + 2.0 * s * mix + d0 * xi1.square()
    logd = 2.0 * torch.log(s) + torch.log(numer) - 2.0 * torch.log(denom)
    if inverse:
        logd = -logd
    y = torch.where(inside, out, x)
    return y, torch.where(inside, logd, torch.zeros_like(logd))


def _cubic_value(t: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Normalised Hermite cubic on [0, 1] with u(0)=0, u(1)=1, u'(0)=a, u'(1)=b, in Bernstein
    form ``a t(1-t)^2 + (3-b) t^2(1-t) + t^3`` (all terms >= 0 for b <= 2: no cancellation)."""
    t1 = 1.0 - t
    return t * (a * t1.square() + (3.0 - b) * t * t1 + t.square())


def _cubic_slope(t: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``du/dt = a (1-t)^2 + 2 (3-a-b) t(1-t) + b t^2`` (> 0 on [0, 1] for a, b in (0, 2])."""
    t1 = 1.0 - t
    return a * t1.square() + 2.0 * (3.0 - a - b) * t * t1 + b * t.square()


def monotone_cubic_spline(
    x: Tensor,
    params: Tensor,
    *,
    bound: float = 5.0,
    min_width: float | None = None,
    min_height: float | None = None,
    inverse: bool = False,
    newton_steps: int = 40,
) -> tuple[Tensor, Tensor]:
    """Monotone cubic Hermite spline on ``[-bound, bound]``, identity outside.

    Knot values come from softmax widths and heights as in the rational-quadratic spline.
    Interior knot derivatives follow Steffen (1990), ``d_k = min(2 s_{k-1}, 2 s_k, p_k)`` with
    ``p_k = (s_{k-1} w_k + s_k w_{k-1}) / (w_{k-1} + w_k)`` (bin slopes ``s``); the boundary
    derivatives are ``min(1, 2 s)`` of the edge bin, i.e. 1 (smooth identity tails) unless that
    would break monotonicity. Every knot derivative is then in ``(0, 2 s]`` for both adjacent
    bins, which makes each cubic strictly increasing (Fritsch & Carlson 1980).

    The inverse finds ``t`` in ``[0, 1]`` with ``u(t) = (y - y_k) / h_k`` by ``newton_steps``
    safeguarded Newton iterations without gradient (a Newton step leaving the current bracket
    is replaced by bisection, so it always converges), then takes one more Newton step with
    gradient so that derivatives follow the implicit function theorem.

    Args:
        x: inputs, any shape ``S``.
        params: ``S + (2K,)`` unconstrained: K width logits then K height logits (zeros give
            equal bins, slope 1 everywhere and all derivatives exactly 1: the identity).
        min_width, min_height: smallest bin as a fraction of ``2 B`` (``None``:
            :func:`default_min_size`).
        inverse: evaluate the inverse map instead.
        newton_steps: gradient-free iterations of the inverse's root search.

    Returns:
        ``(y, logabsdet)``, both of shape ``S``.
    """
    k = params.shape[-1] // 2
    min_width, min_height = _min_sizes(k, "bounded", min_width, min_height)
    knots_x = _knots(params[..., :k], bound, min_width)
    knots_y = _knots(params[..., k:], bound, min_height)
    widths = knots_x[..., 1:] - knots_x[..., :-1]
    slopes = (knots_y[..., 1:] - knots_y[..., :-1]) / widths
    sl, sr = slopes[..., :-1], slopes[..., 1:]
    wl, wr = widths[..., :-1], widths[..., 1:]
    parabola = (sl * wr + sr * wl) / (wl + wr)
    inner_d = torch.minimum(torch.minimum(2.0 * sl, 2.0 * sr), parabola)
    first = torch.clamp(2.0 * slopes[..., :1], max=1.0)
    last = torch.clamp(2.0 * slopes[..., -1:], max=1.0)
    derivs = torch.cat([first, inner_d, last], dim=-1)

    inside = (x >= -bound) & (x <= bound)
    v = x.clamp(-bound, bound)
    idx = _locate(v, knots_y if inverse else knots_x)
    x0, y0 = _take(knots_x[..., :-1], idx), _take(knots_y[..., :-1], idx)
    w, s = _take(widths, idx), _take(slopes, idx)
    h = _take(knots_y[..., 1:], idx) - y0
    a = _take(derivs[..., :-1], idx) / s
    b = _take(derivs[..., 1:], idx) / s

    if inverse:
        r = ((v - y0) / h).clamp(0.0, 1.0)
        with torch.no_grad():
            rd, ad, bd = r.detach(), a.detach(), b.detach()
            lo, hi = torch.zeros_like(rd), torch.ones_like(rd)
            t = rd.clone()
            for _ in range(newton_steps):
                f = _cubic_value(t, ad, bd) - rd
                lo = torch.where(f <= 0, t, lo)
                hi = torch.where(f >= 0, t, hi)
                step = t - f / _cubic_slope(t, ad, bd).clamp_min(torch.finfo(t.dtype).tiny)
                ok = (step > lo) & (step < hi)
                t = torch.where(ok, step, 0.5 * (lo + hi))
        t = t - (_cubic_value(t, a, b) - r) / _cubic_slope(t, a, b)
        out = x0 + w * t
        logd = -(torch.log(s) + torch.log(_cubic_slope(t, a, b)))
    else:
        t = ((v - x0) / w).clamp(0.0, 1.0)
        out = y0 + h * _cubic_value(t, a, b)
        logd = torch.log(s) + torch.log(_cubic_slope(t, a, b))
    y = torch.where(inside, out, x)
    return y, torch.where(inside, logd, torch.zeros_like(logd))


class RationalQuadraticSpline(ElementwiseMap):
    """Rational-quadratic spline map (Neural Spline Flows) on ``[-bound, bound]`` with
    identity tails; see :func:`rational_quadratic_spline`.

    Args:
        bins: number of bins K; ``num_params = 3K - 1``.
        bound: half-width of the box; inputs outside it pass through unchanged.
        min_width, min_height: smallest bin size as a fraction of ``2 bound`` (< 1/K);
            ``None`` takes the default of the chosen ``derivatives`` rule.
        min_derivative: smallest knot derivative (< 1), for ``derivatives="free"``.
        derivatives: ``"bounded"`` (default: slope in the box bounded away from 0 and
            infinity, float32-invertible at any parameters) or ``"free"`` (the paper's).
        derivative_range: ``(lo, hi)`` with ``0 < lo < 1 < hi``: the factor range of the
            bounded rule's knot derivatives (``None``: :data:`DERIVATIVE_RANGE`).
    """

    def __init__(
        self,
        bins: int = 8,
        bound: float = 5.0,
        min_width: float | None = None,
        min_height: float | None = None,
        min_derivative: float = 1e-3,
        derivatives: str = "bounded",
        derivative_range: Sequence[float] | None = None,
    ):
        bins = check_count(bins, "bins", minimum=1)
        min_width, min_height = _min_sizes(bins, derivatives, min_width, min_height)
        mins = {"min_width": min_width, "min_height": min_height, "min_derivative": min_derivative}
        _check_config(bins, bound, mins)
        self.derivative_range = _check_range(derivative_range)
        self.bins = bins
        self.bound = float(bound)
        self.min_width = float(min_width)
        self.min_height = float(min_height)
        self.min_derivative = float(min_derivative)
        self.derivatives = derivatives
        self.num_params = 3 * bins - 1

    def _apply(self, x: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        _check(x, params, self.num_params, type(self).__name__)
        return rational_quadratic_spline(
            x,
            params,
            bound=self.bound,
            min_width=self.min_width,
            min_height=self.min_height,
            min_derivative=self.min_derivative,
            derivatives=self.derivatives,
            derivative_range=self.derivative_range,
            inverse=inverse,
        )

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._apply(x, params, False)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._apply(y, params, True)


class CubicSpline(ElementwiseMap):
    """Monotone cubic spline map (after Cubic-Spline Flows) on ``[-bound, bound]`` with
    identity tails; see :func:`monotone_cubic_spline`.

    Differences from the paper, for robustness: knot derivatives are not learned but set by
    Steffen's method (interior, as in the paper) and by the identity tails (boundary, capped
    at twice the edge-bin slope to stay monotone), and the inverse is a bracketed Newton
    search rather than the closed-form cubic root, which is ill-conditioned when the cubic
    degenerates towards a quadratic or a line (e.g. at the identity).

    Args:
        bins: number of bins K; ``num_params = 2K``.
        bound: half-width of the box; inputs outside it pass through unchanged.
        min_width, min_height: smallest bin size as a fraction of ``2 bound`` (< 1/K);
            ``None`` takes :func:`default_min_size`, which keeps the map's slope above about
            half the smallest bin slope (0.0116 at K = 8), so float32 inverses stay accurate.
        newton_steps: gradient-free iterations of the inverse's root search.
    """

    def __init__(
        self,
        bins: int = 8,
        bound: float = 5.0,
        min_width: float | None = None,
        min_height: float | None = None,
        newton_steps: int = 40,
    ):
        bins = check_count(bins, "bins", minimum=1)
        min_width, min_height = _min_sizes(bins, "bounded", min_width, min_height)
        _check_config(bins, bound, {"min_width": min_width, "min_height": min_height})
        newton_steps = check_count(newton_steps, "newton_steps", minimum=1)
        self.bins = bins
        self.bound = float(bound)
        self.min_width = float(min_width)
        self.min_height = float(min_height)
        self.newton_steps = newton_steps
        self.num_params = 2 * bins

    def _apply(self, x: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        _check(x, params, self.num_params, type(self).__name__)
        return monotone_cubic_spline(
            x,
            params,
            bound=self.bound,
            min_width=self.min_width,
            min_height=self.min_height,
            inverse=inverse,
            newton_steps=self.newton_steps,
        )

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._apply(x, params, False)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._apply(y, params, True)


register_map("rq-spline", RationalQuadraticSpline)
register_map("spline", RationalQuadraticSpline)
register_map("cubic-spline", CubicSpline)
