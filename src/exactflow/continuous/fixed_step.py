"""A CNF solved with a fixed number of explicit Runge-Kutta steps, unrolled: the export form of
:class:`~exactflow.continuous.CNF` (plain tensor ops, a static graph for ONNX)."""

from __future__ import annotations

import itertools
import math

from torch import Tensor, nn

from .._compat import renamed_kwargs
from ..errors import ConfigError, ContextError, DTypeError, ShapeError
from ..transforms.base import Transform

__all__ = ["FixedStepCNF", "solver_tolerance", "unrolled_solve"]

# convergence orders of torchdiffeq's fixed-grid methods; the Adams methods start at order 1
_ORDERS = {
    "euler": 1,
    "midpoint": 2,
    "heun2": 2,
    "heun3": 3,
    "rk4": 4,
    "explicit_adams": 1,
    "implicit_adams": 1,
}


def solver_tolerance(
    solver: str, t1: float, steps: int | None = None, atol: float = 0.0, rtol: float = 0.0
) -> float:
    """The round-trip and log-det error a CNF solve may have, for ``check_tolerance()``.

    Adaptive solvers control each step's local error to ``atol + rtol |z|``; the global error
    of a round trip (two solves) is a few tens of that (measured on FFJORD and CFM at
    ``atol = rtol`` from 1e-9 to 1e-4: at most 30x at parameter scale 0.1, 100x at scale 1), so
    the tolerance is ``1000 max(atol, rtol)``. A fixed-step method of order ``p`` with step
    ``h = t1 / steps`` errs by ``O(h^p)``; the tolerance is ``1000 h^p``. Either is far below
    the O(1) error of a wrong log-det or inverse.
    """
    if steps is None:
        return 1e3 * max(float(atol), float(rtol))
    return 1e3 * (float(t1) / int(steps)) ** _ORDERS.get(solver, 1)


class FixedStepCNF(Transform):
    """A CNF solved with ``steps`` equal steps of an explicit Runge-Kutta method, unrolled.

    The export form of :class:`~exactflow.continuous.CNF`: plain tensor ops only (no
    adaptive step control, no autograd), so it traces to a static ONNX graph. The log-det
    ``∫ tr ∂f/∂z dt`` is integrated with the same tableau as the state, the trace coming
    from ``dynamics.forward_with_trace(t, z, context) -> (f, trace)`` (exact, analytic for
    :class:`~exactflow.continuous.TimeMLP`). Tableaux and time grid follow torchdiffeq's
    fixed-grid solvers (``rk4`` is its 3/8-rule variant), so the numbers match
    ``CNF(solver=..., steps=...)`` up to float rounding.

    Args:
        dynamics: module with ``forward_with_trace`` (e.g. :class:`TimeMLP`).
        t1: integration time; ``forward`` solves ``0 -> t1``, ``inverse`` ``t1 -> 0``.
        solver: one of :attr:`SOLVERS`.
        steps: number of equal steps (a Python int: the loop is unrolled in the graph).
        context_features, features: as for the CNF (``features=None``: any width).
    """

    SOLVERS = ("euler", "midpoint", "heun2", "rk4")
    event_dim = 1

    @renamed_kwargs(context_features="context")
    def __init__(
        self,
        dynamics: nn.Module,
        *,
        t1: float,
        solver: str = "rk4",
        steps: int = 20,
        context: int = 0,
        features: int | None = None,
    ):
        super().__init__()
        if not callable(getattr(dynamics, "forward_with_trace", None)):
            raise ConfigError(
                f"exporting a CNF needs dynamics with an analytic trace, "
                f"forward_with_trace(t, z, context) -> (f, trace) (TimeMLP, VelocityMLP); "
                f"{type(dynamics).__name__} has none"
            )
        if solver not in self.SOLVERS:
            raise ConfigError(
                f"export solver must be a fixed-step one of {', '.join(self.SOLVERS)}, "
                f"got {solver!r}"
            )
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise DTypeError(f"steps must be a Python int, got {type(steps).__name__}")
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        if not (math.isfinite(t1) and t1 > 0):
            raise ConfigError(f"t1 must be finite and > 0, got {t1}")
        self.dynamics = dynamics
        self.t1 = float(t1)
        self.solver = solver
        self.steps = steps
        self.context_features = context
        self.features = features

    def extra_repr(self) -> str:
        return f"solver={self.solver}, steps={self.steps}, t1={self.t1:g}"

    def check_tolerance(self) -> float:
        """The discretisation error its round trips may have (:func:`solver_tolerance`)."""
        return solver_tolerance(self.solver, self.t1, self.steps)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(x, context, reverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(z, context, reverse=True)

    def _solve(self, x: Tensor, context: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
        if x.dim() < 1 or (self.features is not None and x.shape[-1] != self.features):
            expect = self.features if self.features is not None else "D"
            raise ShapeError(f"input must have shape (*batch, {expect}), got {tuple(x.shape)}")
        batch, d = x.shape[:-1], x.shape[-1]
        ctx = None
        if self.context_features:
            if context is None:
                raise ContextError(
                    f"this CNF is conditional (context_features={self.context_features}) but "
                    "no context was given"
                )
            ctx = context.expand(*batch, self.context_features).reshape(-1, self.context_features)
        y, ladj = unrolled_solve(
            self.dynamics, x.reshape(-1, d), ctx, t1=self.t1, solver=self.solver,
            steps=self.steps, reverse=reverse,
        )  # fmt: skip
        return y.reshape(x.shape), ladj.reshape(batch)


def unrolled_solve(
    dynamics: nn.Module,
    flat: Tensor,
    ctx: Tensor | None,
    *,
    t1: float,
    solver: str,
    steps: int,
    reverse: bool,
) -> tuple[Tensor, Tensor]:
    """``steps`` unrolled steps of ``solver`` (one of :attr:`FixedStepCNF.SOLVERS`) over
    ``[0, t1]`` (``t1 -> 0`` if ``reverse``): ``(y, ∫ tr ∂f/∂z dt)`` for ``(N, D)`` rows ``flat``
    with ``(N, C)`` context ``ctx`` or ``None``, the trace from ``dynamics.forward_with_trace``.
    Plain tensor ops on Python-float times: what :class:`FixedStepCNF` exports and what a
    compiled :class:`~exactflow.continuous.CNF` with a fixed-step solver traces."""
    sign = -1.0 if reverse else 1.0

    def rhs(s: float, y: Tensor) -> tuple[Tensor, Tensor]:
        f, tr = dynamics.forward_with_trace(sign * s, y, ctx)
        return sign * f, sign * tr

    # torchdiffeq integrates a decreasing span in negated time; the grid points are the same
    ends = (-t1, 0.0) if reverse else (0.0, t1)
    grid = [ends[0] + (ends[1] - ends[0]) * k / steps for k in range(steps)] + [ends[1]]
    y, ladj = flat, flat.new_zeros(flat.shape[0])
    for s0, s1 in itertools.pairwise(grid):
        dy, dl = _step(solver, rhs, s0, s1, y)
        y, ladj = y + dy, ladj + dl
    return y, ladj


def _step(solver: str, rhs, s0: float, s1: float, y: Tensor) -> tuple[Tensor, Tensor]:
    """Increments ``(Δy, Δℓ)`` of one step of ``solver`` from ``s0`` to ``s1``."""
    dt = s1 - s0
    f1, l1 = rhs(s0, y)
    if solver == "euler":
        return dt * f1, dt * l1
    if solver == "midpoint":
        f2, l2 = rhs(s0 + 0.5 * dt, y + 0.5 * dt * f1)
        return dt * f2, dt * l2
    if solver == "heun2":
        f2, l2 = rhs(s0 + dt, y + dt * f1)
        return 0.5 * dt * (f1 + f2), 0.5 * dt * (l1 + l2)
    # rk4, the 3/8 rule
    third = 1.0 / 3.0
    f2, l2 = rhs(s0 + dt * third, y + dt * f1 * third)
    f3, l3 = rhs(s0 + dt * (2.0 / 3.0), y + dt * (f2 - f1 * third))
    f4, l4 = rhs(s1, y + dt * (f1 - f2 + f3))
    return (
        (f1 + 3.0 * (f2 + f3) + f4) * dt * 0.125,
        (l1 + 3.0 * (l2 + l3) + l4) * dt * 0.125,
    )
