"""Certification of transforms and flows: the checks every exactflow transform passes.

``check_transform`` verifies, in float64 on a copy of the transform:

* round trip both ways, ``inverse(forward(x)) == x`` and ``forward(inverse(z)) == z``;
* the returned log-det against ``log|det J|`` of the brute-force autograd Jacobian
  (``torch.autograd.functional.jacobian``), in both directions;
* ``ladj_forward(x) + ladj_inverse(z) == 0``;
* finite gradients for every parameter through both directions.

It works on any user-defined :class:`~exactflow.transforms.Transform` too.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.functional import jacobian

from .errors import CheckFailed, ShapeError
from .transforms.base import Transform
from .validation import as_tensor

__all__ = ["CheckReport", "FlowReport", "check_flow", "check_transform", "sample_domain"]


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
    raise ValueError(f"unknown domain {domain!r}; expected 'real', 'unit' or 'ball'")


@dataclass
class CheckReport:
    """Worst-case errors measured by :func:`check_transform` (float64)."""

    roundtrip_forward: float = math.nan  # max |inverse(forward(x)) - x|
    roundtrip_inverse: float = math.nan  # max |forward(inverse(z)) - z|
    ladj_error_forward: float = math.nan  # max |ladj - log|det J_forward||
    ladj_error_inverse: float = math.nan
    ladj_sum_error: float = math.nan  # max |ladj_forward + ladj_inverse|
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
    atol_ladj: float = 1e-8,
    atol_roundtrip: float = 1e-10,
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
        atol_ladj: tolerance on log-det errors (relative to ``max(1, |log det|)``).
        atol_roundtrip: tolerance on round-trip errors (relative to ``max(1, |x|)``).
        jacobian_samples: how many batch elements get a brute-force Jacobian.
        raise_on_failure: raise :class:`~exactflow.errors.CheckFailed` if any check fails.

    Returns:
        A :class:`CheckReport`.
    """
    if not isinstance(transform, Transform):
        raise TypeError(f"check_transform needs a Transform, got {type(transform).__name__}")
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
    report = CheckReport()

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
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when the transform's checks and the flow-level checks all passed."""
        return self.transform.passed and not self.failures

    def __str__(self) -> str:
        s = str(self.transform)
        if self.integral is not None:
            s += f"\nintegral of p over grid {self.integral:.5f}"
        if self.failures:
            s += "\nFAILED: " + "; ".join(self.failures)
        return s


def _grid_integral(flow, context: Tensor | None, dim: int, points: int, generator) -> float:
    with torch.no_grad():
        samples = flow.sample(4000, context, generator=generator).reshape(4000, -1).double()
    lo = samples.min(0).values - 3.0 * samples.std(0)
    hi = samples.max(0).values + 3.0 * samples.std(0)
    axes = [
        torch.linspace(float(lo[j]), float(hi[j]), points, dtype=torch.float64) for j in range(dim)
    ]
    mesh = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, dim)
    cell = math.prod(float(a[1] - a[0]) for a in axes)
    f64 = copy.deepcopy(flow).double().eval()
    with torch.no_grad():
        pts = mesh.reshape(-1, *f64.event_shape) if f64.event_shape else mesh.reshape(-1)
        ctx = None if context is None else context.double().expand(pts.shape[0], -1)
        logp = torch.cat([f64.log_prob(p, None if c is None else c) for p, c in _chunks(pts, ctx)])
    return float(logp.exp().sum() * cell)


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
    generator: torch.Generator | None = None,
    raise_on_failure: bool = True,
    **kwargs,
) -> FlowReport:
    """Certify a :class:`~exactflow.Flow`: its transform (see :func:`check_transform`) on ``x``
    (default: 64 samples from the flow) and, for 1-D/2-D event shapes, that ``exp(log_prob)``
    integrates to 1 within ``atol_integral`` on a grid covering the samples.

    ``context`` is a single context vector ``(C,)`` for conditional flows.
    """
    if context is not None and context.dim() != 1:
        raise ValueError(
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
        points = grid_points or (4000 if dim == 1 else 400)
        report.integral = _grid_integral(flow, context, dim, points, generator)
        if not abs(report.integral - 1.0) <= atol_integral:
            report.failures.append(f"density integrates to {report.integral:.4f}, not 1")
    if raise_on_failure and not report.passed:
        raise CheckFailed(f"flow failed certification:\n{report}")
    return report
