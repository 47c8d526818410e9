"""Certification of transforms and flows: the checks every exactflow transform passes.

``check_transform`` verifies, in float64 on a copy of the transform:

* round trip both ways, ``inverse(forward(x)) == x`` and ``forward(inverse(z)) == z``;
* the returned log-det against ``log|det J|`` of the brute-force autograd Jacobian
  (``torch.autograd.functional.jacobian``), in both directions;
* ``ladj_forward(x) + ladj_inverse(z) == 0``;
* finite gradients for every parameter through both directions.

It works on any user-defined :class:`~exactflow.transforms.Transform` too.

Tolerances default to float64 precision for exact bijections. A module whose maps are exact
only up to a numerical method (an ODE solve) declares how close they are with a method
``check_tolerance() -> float`` (see :func:`declared_tolerance`); the checks then allow that
error, so ``exactflow check ffjord`` measures the model against its own solver settings
instead of against 1e-10. :func:`check_flow` integrates the density on an adaptively refined
grid and widens its tolerance by the grid's own error estimate.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.functional import jacobian

from .errors import CheckFailed, ConfigError, DTypeError, ShapeError
from .transforms.base import Transform
from .validation import as_tensor

__all__ = [
    "CheckReport",
    "FlowReport",
    "check_flow",
    "check_transform",
    "declared_tolerance",
    "sample_domain",
]

# defaults for exact bijections in float64
ATOL_LADJ = 1e-8
ATOL_ROUNDTRIP = 1e-10


def sample_domain(
    domain: str, shape, generator: torch.Generator | None = None, dtype=None
) -> Tensor:
    """Random test inputs for a transform's domain: ``real`` (N(0, 1)), ``unit`` (0, 1) or
    ``ball`` (-1, 1) (open intervals, kept away from the ends)."""
    x = torch.randn(shape, generator=generator, dtype=dtype or torch.float64)
    if domain == "real":
        return x
    if domain == "unit":
        return 0.05 + 0.9 * torch.sigmoid(x)
    if domain == "ball":
        return 0.9 * torch.tanh(x)
    raise ConfigError(f"unknown domain {domain!r}; expected 'real', 'unit' or 'ball'")


def declared_tolerance(transform: torch.nn.Module) -> float:
    """The largest numerical tolerance that ``transform`` or any of its submodules declares.

    A module that is a bijection only up to a numerical method declares it with a method
    ``check_tolerance() -> float``: the absolute error (relative to ``max(1, |value|)``, in
    float64) its round trips and log-dets may have, e.g. a CNF derives it from its solver's
    ``atol``/``rtol`` or step size. Exact bijections declare nothing; the result is then 0.
    """
    tol = 0.0
    for module in transform.modules():
        declare = getattr(module, "check_tolerance", None)
        if callable(declare):
            tol = max(tol, float(declare()))
    return tol


@dataclass
class CheckReport:
    """Worst-case errors measured by :func:`check_transform` (float64)."""

    roundtrip_forward: float = math.nan  # max |inverse(forward(x)) - x|
    roundtrip_inverse: float = math.nan  # max |forward(inverse(z)) - z|
    ladj_error_forward: float = math.nan  # max |ladj - log|det J_forward||
    ladj_error_inverse: float = math.nan
    ladj_sum_error: float = math.nan  # max |ladj_forward + ladj_inverse|
    atol_roundtrip: float = math.nan  # the tolerances the errors were held to
    atol_ladj: float = math.nan
    nonfinite_grads: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every check passed (no failures recorded)."""
        return not self.failures

    def __str__(self) -> str:
        lines = [
            f"round trip   forward {self.roundtrip_forward:.3e}   inverse {self.roundtrip_inverse:.3e}",
            f"log-det err  forward {self.ladj_error_forward:.3e}   inverse {self.ladj_error_inverse:.3e}",
            f"ladj_f + ladj_i      {self.ladj_sum_error:.3e}",
            f"tolerances   round trip {self.atol_roundtrip:.0e}   log-det {self.atol_ladj:.0e}",
            f"non-finite gradients {self.nonfinite_grads or 'none'}",
            "PASSED" if self.passed else "FAILED: " + "; ".join(self.failures),
        ]
        return "\n".join(lines)


def _max_abs(t: Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _jacobian_logdet(fn, point: Tensor) -> Tensor:
    jac = jacobian(fn, point)
    n = point.numel()
    return torch.linalg.slogdet(jac.reshape(n, n))[1]


def check_transform(
    transform: Transform,
    x: Tensor,
    context: Tensor | None = None,
    *,
    atol_ladj: float | None = None,
    atol_roundtrip: float | None = None,
    jacobian_samples: int = 8,
    dtype: torch.dtype = torch.float64,
    raise_on_failure: bool = True,
) -> CheckReport:
    """Certify a transform on inputs ``x`` of shape ``(*batch, *event)``.

    The transform is copied and cast to ``dtype``; the original is untouched. Transforms with
    data-dependent initialisation (ActNorm) are initialised on ``x`` first; the checks then run
    in eval mode so per-sample Jacobians are well defined.

    Args:
        transform: any Transform.
        x: test inputs in the transform's domain.
        context: ``(*batch, C)`` for conditional transforms.
        atol_ladj: tolerance on log-det errors (relative to ``max(1, |log det|)``); default
            ``max(1e-8, declared_tolerance(transform))``.
        atol_roundtrip: tolerance on round-trip errors (relative to ``max(1, |x|)``);
            default ``max(1e-10, declared_tolerance(transform))``.
        jacobian_samples: how many batch elements get a brute-force Jacobian.
        raise_on_failure: raise :class:`~exactflow.errors.CheckFailed` if any check fails.

    Returns:
        A :class:`CheckReport`.
    """
    if not isinstance(transform, Transform):
        raise DTypeError(f"check_transform needs a Transform, got {type(transform).__name__}")
    declared = declared_tolerance(transform)
    atol_ladj = max(ATOL_LADJ, declared) if atol_ladj is None else float(atol_ladj)
    atol_roundtrip = max(ATOL_ROUNDTRIP, declared) if atol_roundtrip is None else atol_roundtrip
    t = copy.deepcopy(transform).to(dtype)
    k = t.event_dim
    x = as_tensor(x, "x", dtype).detach().to(dtype)  # lists and NumPy arrays are accepted
    event = tuple(x.shape[x.dim() - k :]) if k else ()
    x = x.reshape(-1, *event)
    if context is not None:
        context = as_tensor(context, "context", dtype).detach().to(dtype)
        if context.numel() % max(x.shape[0], 1):
            raise ShapeError(
                f"context of shape {tuple(context.shape)} does not give one row per input "
                f"(batch {x.shape[0]})"
            )
        context = context.reshape(x.shape[0], -1)
    report = CheckReport(atol_roundtrip=float(atol_roundtrip), atol_ladj=float(atol_ladj))

    was_training = t.training
    with torch.no_grad():
        try:
            t(x, context)  # data-dependent initialisation, if any
        except RuntimeError as err:  # e.g. a matmul refusing an input of the wrong width
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ShapeError(
                f"{type(transform).__name__} cannot take x of shape {tuple(x.shape)} ({first})"
            ) from err
    t.eval()
    with torch.no_grad():
        z, ladj_f = t(x, context)
        x_rec, ladj_i = t.inverse(z, context)
        z_rec, _ = t(x_rec, context)
    scale_x = max(1.0, _max_abs(x))
    scale_z = max(1.0, _max_abs(z))
    report.roundtrip_forward = _max_abs(x_rec - x)
    report.roundtrip_inverse = _max_abs(z_rec - z)
    report.ladj_sum_error = _max_abs(ladj_f + ladj_i)
    if tuple(ladj_f.shape) != (x.shape[0],) or tuple(ladj_i.shape) != (x.shape[0],):
        report.failures.append(
            f"ladj must have the batch shape ({x.shape[0]},), got forward {tuple(ladj_f.shape)}"
            f" and inverse {tuple(ladj_i.shape)}"
        )
    if not (
        torch.isfinite(z).all() and torch.isfinite(ladj_f).all() and torch.isfinite(ladj_i).all()
    ):
        report.failures.append("non-finite output or log-det")

    err_f, err_i = 0.0, 0.0
    scale_ladj = max(1.0, _max_abs(ladj_f))
    for i in range(min(jacobian_samples, x.shape[0])):
        ctx = None if context is None else context[i : i + 1]
        ld_f = _jacobian_logdet(lambda p, c=ctx: t(p.unsqueeze(0), c)[0].squeeze(0), x[i])
        ld_i = _jacobian_logdet(lambda p, c=ctx: t.inverse(p.unsqueeze(0), c)[0].squeeze(0), z[i])
        err_f = max(err_f, float((ld_f - ladj_f[i]).abs()))
        err_i = max(err_i, float((ld_i - ladj_i[i]).abs()))
    report.ladj_error_forward, report.ladj_error_inverse = err_f, err_i

    if report.roundtrip_forward > atol_roundtrip * scale_x:
        report.failures.append(
            f"forward round trip {report.roundtrip_forward:.3e} > {atol_roundtrip:g}"
        )
    if report.roundtrip_inverse > atol_roundtrip * scale_z:
        report.failures.append(
            f"inverse round trip {report.roundtrip_inverse:.3e} > {atol_roundtrip:g}"
        )
    for name, err in (
        ("forward", err_f),
        ("inverse", err_i),
        ("forward + inverse", report.ladj_sum_error),
    ):
        if not err <= atol_ladj * scale_ladj:  # also catches NaN
            report.failures.append(f"{name} log-det error {err:.3e} > {atol_ladj:g}")

    t.zero_grad(set_to_none=True)
    xg = x.clone()
    z, ladj = t(xg, context)
    x2, ladj2 = t.inverse(z.detach(), context)
    loss = z.square().sum() + ladj.sum() + x2.square().sum() + ladj2.sum()
    if loss.requires_grad:
        loss.backward()
    for name, p in t.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            report.nonfinite_grads.append(name)
    if report.nonfinite_grads:
        report.failures.append(f"non-finite gradients for {report.nonfinite_grads}")
    t.train(was_training)

    if raise_on_failure and not report.passed:
        raise CheckFailed(f"{type(transform).__name__} failed certification:\n{report}")
    return report


@dataclass
class FlowReport:
    """:func:`check_flow`'s result: the transform's report and the integral of the density."""

    transform: CheckReport
    integral: float | None = None  # only for 1-D and 2-D event shapes
    integral_error: float | None = None  # the adaptive grid's own error estimate
    integral_points: int = 0  # density evaluations the grid used
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when the transform's checks and the flow-level checks all passed."""
        return self.transform.passed and not self.failures

    def __str__(self) -> str:
        s = str(self.transform)
        if self.integral is not None:
            s += (
                f"\nintegral of p over grid {self.integral:.5f} ± {self.integral_error:.1e} "
                f"(adaptive, {self.integral_points} points)"
            )
        if self.failures:
            s += "\nFAILED: " + "; ".join(self.failures)
        return s


def _adaptive_integral(
    density,
    lo: Tensor,
    hi: Tensor,
    cells: int,
    max_points: int,
    target: float,
    samples: Tensor | None = None,
    max_count: int = 16,
) -> tuple[float, float, int]:
    """``∫ density`` over the box ``[lo, hi]`` (``d`` = 1 or 2) by adaptive midpoint refinement.

    Each cell's integral is estimated twice, ``vol f(centre)`` and ``vol mean f(child
    centres)`` over its ``2^d`` half-size children; their difference is the cell's error
    estimate. A cell is split (its children's centres are already evaluated, so a split costs
    ``4^d`` new points) when

    * the summed estimate exceeds ``target`` and the cell's exceeds its share of it
      (proportional to its volume), or
    * it holds more than ``max_count`` of ``samples`` (draws from the flow): a feature
      narrower than a cell can slip between the five points of its error estimate, but not
      past the samples, so the cells that carry the mass are refined until each holds a small
      part of it.

    Refinement stops when no cell qualifies or ``max_points`` is spent (then the worst cells go
    first: crowded ones, then by error). A uniform grid misjudges a spline flow with thin bins
    (its cells straddle them); this spends its points where the density is.

    Returns:
        ``(integral, error estimate, points evaluated)``; the integral is the children's
        (finer) estimate, the error the sum of the accepted cells' coarse-vs-fine differences.
    """
    d = lo.numel()
    width = (hi - lo) / cells
    per_axis = cells  # cells per axis at the current level (all active cells share a level)
    axes = [lo[j] + width[j] * (torch.arange(cells, dtype=lo.dtype) + 0.5) for j in range(d)]
    centres = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, d)
    half = torch.tensor([-0.25, 0.25], dtype=lo.dtype)
    offsets = torch.stack(torch.meshgrid(*[half] * d, indexing="ij"), -1).reshape(-1, d)
    box = float(torch.prod(hi - lo))
    per_split = 2**d * 2**d

    def children(c: Tensor, w: Tensor) -> Tensor:
        return (c.unsqueeze(1) + offsets * w).reshape(-1, d)

    def crowded(c: Tensor, w: Tensor, n: int) -> Tensor:
        if samples is None:
            return torch.zeros(c.shape[0], dtype=torch.bool)
        # cells and samples by integer grid coordinates at this level, as one code each
        mult = torch.tensor([n**j for j in range(d)], dtype=torch.long)
        cell_code = (torch.round((c - lo) / w - 0.5).long() * mult).sum(-1)
        k = torch.floor((samples - lo) / w).long().clamp(0, n - 1)
        codes, counts = torch.unique((k * mult).sum(-1), return_counts=True)
        at = torch.searchsorted(codes, cell_code).clamp(max=codes.numel() - 1)
        return (codes[at] == cell_code) & (counts[at] > max_count)

    f_centre = density(centres)
    f_kids = density(children(centres, width)).reshape(-1, 2**d)
    used = centres.shape[0] * (1 + 2**d)
    total, error = 0.0, 0.0
    while centres.shape[0]:
        vol = float(torch.prod(width))
        fine = vol * f_kids.mean(1)
        err = (fine - vol * f_centre).abs()
        split = crowded(centres, width, per_axis)
        if error + float(err.sum()) > target:
            split |= err > target * vol / box
        affordable = (max_points - used) // per_split
        if int(split.sum()) > affordable:  # spend what is left on the worst cells
            priority = torch.where(split, err + split.double() * (1.0 + float(err.max())), err)
            worst = torch.argsort(priority, descending=True)[: max(affordable, 0)]
            split = torch.zeros_like(split)
            split[worst] = True
        total += float(fine[~split].sum())
        error += float(err[~split].sum())
        if not bool(split.any()):
            break
        width, per_axis = width / 2, 2 * per_axis
        centres = children(centres[split], 2 * width)
        f_centre = f_kids[split].reshape(-1)
        f_kids = density(children(centres, width)).reshape(-1, 2**d)
        used += centres.shape[0] * 2**d
    return total, error, used


def _grid_integral(
    flow, context: Tensor | None, dim: int, cells: int, max_points: int, target: float, generator
) -> tuple[float, float, int]:
    with torch.no_grad():
        samples = flow.sample(4000, context, generator=generator).reshape(4000, -1).double()
    lo = samples.min(0).values - 3.0 * samples.std(0)
    hi = samples.max(0).values + 3.0 * samples.std(0)
    f64 = copy.deepcopy(flow).double().eval()

    def density(points: Tensor) -> Tensor:
        pts = points.reshape(-1, *f64.event_shape) if f64.event_shape else points.reshape(-1)
        ctx = None if context is None else context.double().expand(pts.shape[0], -1)
        with torch.no_grad():
            logp = [f64.log_prob(p, c) for p, c in _chunks(pts, ctx)]
        return torch.cat(logp).exp()

    # leaves holding at most 1/256 of the samples: >= 256 cells resolve the mass
    return _adaptive_integral(density, lo, hi, cells, max_points, target, samples, 4000 // 256)


def _chunks(pts: Tensor, ctx: Tensor | None, size: int = 16384):
    for i in range(0, pts.shape[0], size):
        yield pts[i : i + size], None if ctx is None else ctx[i : i + size]


def check_flow(
    flow,
    x: Tensor | None = None,
    context: Tensor | None = None,
    *,
    atol_integral: float = 1e-2,
    grid_points: int | None = None,
    max_points: int | None = None,
    generator: torch.Generator | None = None,
    raise_on_failure: bool = True,
    **kwargs,
) -> FlowReport:
    """Certify a :class:`~exactflow.Flow`: its transform (see :func:`check_transform`) on ``x``
    (default: 64 samples from the flow) and, for 1-D/2-D event shapes, that ``exp(log_prob)``
    integrates to 1 on a box covering 4000 samples (their range plus 3 standard deviations).

    The integral comes from an adaptively refined midpoint grid that also estimates its own
    error ``e`` (see :func:`_adaptive_integral`, refined until ``e <~ atol_integral / 4`` or
    ``max_points`` is spent); the check passes when ``|integral - 1| <= atol_integral + e``,
    so a density the grid cannot resolve within its budget widens the tolerance visibly (the
    report prints ``e``) instead of failing a correct model.

    Args:
        flow: the :class:`~exactflow.Flow` (any event shape; the integral only for 1-D/2-D).
        x: test inputs for :func:`check_transform`.
        context: a single context vector ``(C,)`` for conditional flows.
        atol_integral: tolerance on ``|integral - 1|`` on top of the grid's error estimate.
        grid_points: points per axis of the initial grid (default 1024 in 1-D, 128 in 2-D).
        max_points: density evaluations the refinement may spend (default 2^16 in 1-D, 2^18
            in 2-D).
        generator: seeds the samples.
        raise_on_failure: raise :class:`~exactflow.errors.CheckFailed` if any check fails.
        kwargs: passed to :func:`check_transform` (``atol_ladj``, ``atol_roundtrip``, ...).
    """
    if context is not None and context.dim() != 1:
        raise ShapeError(
            f"check_flow takes one context vector (C,), got shape {tuple(context.shape)}"
        )
    if x is None:
        with torch.no_grad():
            x = flow.sample(64, context, generator=generator)
    ctx = (
        None if context is None else context.expand(*x.shape[: x.dim() - len(flow.event_shape)], -1)
    )
    report = FlowReport(check_transform(flow.transform, x, ctx, raise_on_failure=False, **kwargs))
    dim = math.prod(flow.event_shape)
    if dim <= 2:
        points = grid_points or (1024 if dim == 1 else 128)
        budget = max_points or (2**16 if dim == 1 else 2**18)
        cells = max(points // 2, 1)
        report.integral, report.integral_error, report.integral_points = _grid_integral(
            flow, context, dim, cells, budget, atol_integral / 4, generator
        )
        if not abs(report.integral - 1.0) <= atol_integral + report.integral_error:
            report.failures.append(
                f"density integrates to {report.integral:.4f} ± {report.integral_error:.1e}, "
                f"not 1 (tolerance {atol_integral:g} + the grid's error)"
            )
    if raise_on_failure and not report.passed:
        raise CheckFailed(f"flow failed certification:\n{report}")
    return report
