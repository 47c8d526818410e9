"""How straight a learnt flow is, and how close its samples are to data.

* :func:`straightness` -- Liu et al.'s ``S(v) = ∫_0^1 E |(x(1) - x(0)) - v(t, x(t))|² dt``
  along the ODE trajectories (0 for straight paths at constant speed, where one Euler step is
  exact), and the path-length ratio ``E ∫|v| dt / E |x(1) - x(0)|`` (1 when straight).
* :func:`sliced_wasserstein` -- the sliced Wasserstein-2 distance between two samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError

__all__ = ["sliced_wasserstein", "straightness", "trajectory"]


def _velocity(velocity, t: float, x: Tensor, context: Tensor | None) -> Tensor:
    tt = torch.full((), t, dtype=x.dtype, device=x.device)
    return velocity(tt, x) if context is None else velocity(tt, x, context=context)


@torch.no_grad()
def trajectory(
    velocity, z: Tensor, steps: int = 32, context: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """RK4 solve of ``dx/dt = v(t, x)`` from the noise ``z`` at ``t = 1`` back to ``t = 0``.

    Returns ``(points, velocities)``, each ``(steps + 1, N, D)``, at ``t = 1 - k / steps``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive int, got {steps!r}")
    if z.dim() != 2:
        raise ShapeError(f"z must be (N, D), got {tuple(z.shape)}")
    h = -1.0 / steps
    x = z
    points, vels = [x], []
    for k in range(steps):
        t = 1.0 + k * h
        k1 = _velocity(velocity, t, x, context)
        k2 = _velocity(velocity, t + h / 2, x + h / 2 * k1, context)
        k3 = _velocity(velocity, t + h / 2, x + h / 2 * k2, context)
        k4 = _velocity(velocity, t + h, x + h * k3, context)
        vels.append(k1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        points.append(x)
    vels.append(_velocity(velocity, 0.0, x, context))
    return torch.stack(points), torch.stack(vels)


@torch.no_grad()
def straightness(
    velocity, z: Tensor, steps: int = 32, context: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Straightness ``S`` and path-length ratio of the trajectories starting at noise ``z``.

    Args:
        velocity: ``v(t, x[, context=c])``, data -> noise (``t = 0`` data, ``t = 1`` noise).
        z: ``(N, D)`` noise points (``t = 1`` ends).
        steps: RK4 steps; ``S`` is the trapezoid rule over the ``steps + 1`` grid times.
        context: ``(N, C)`` or ``None``.

    Returns:
        ``(S, ratio)``, two scalars: ``S = mean_t E|(z - x(0)) - v(t, x(t))|²`` and
        ``ratio = E Σ|Δx| / E|z - x(0)|`` (``>= 1``).
    """
    points, vels = trajectory(velocity, z, steps, context)
    displacement = points[0] - points[-1]  # forward (data -> noise) direction
    dev = (displacement.unsqueeze(0) - vels).square().sum(-1).mean(-1)  # (steps + 1,)
    weights = torch.ones_like(dev)
    weights[0] = weights[-1] = 0.5
    s = (dev * weights).sum() / steps
    length = (points[1:] - points[:-1]).norm(dim=-1).sum(0)
    return s, length.mean() / displacement.norm(dim=-1).mean()


def sliced_wasserstein(
    x: Tensor, y: Tensor, projections: int = 256, generator: torch.Generator | None = None
) -> Tensor:
    """Sliced Wasserstein-2 distance ``sqrt(E_θ W2²(θᵀx, θᵀy))`` over random unit directions.

    ``x`` ``(n, D)``, ``y`` ``(m, D)``; the first ``min(n, m)`` rows of each are compared
    (rows must be i.i.d. so a prefix is a sample). Directions are drawn with ``generator``.
    Returns a scalar.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ShapeError(
            f"x and y must be (n, D) and (m, D), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    k = min(x.shape[0], y.shape[0])
    if k < 1:
        raise ShapeError("sliced_wasserstein needs at least one row in each sample")
    x, y = x[:k].double(), y[:k].double().to(x.device)
    dev = generator.device if generator is not None else torch.device("cpu")
    theta = torch.randn(x.shape[1], projections, generator=generator, dtype=x.dtype, device=dev)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)
    px = (x @ theta).sort(dim=0).values
    py = (y @ theta).sort(dim=0).values
    return (px - py).square().mean().sqrt()
