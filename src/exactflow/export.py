"""Export flows to ONNX: density scoring (``log_prob``), sampling and the raw transform.

Sampling exports take the base noise as an input, so the graph is deterministic; conditional
flows take the context as an input. Parameter-only linear algebra that ONNX lacks (``slogdet``,
triangular solves) is precomputed first: every module offering ``export_form()`` is replaced by
that equivalent frozen module in a copy of the flow. Continuous flows (FFJORD, flow matching)
export as a fixed-step solve unrolled into the graph (:class:`FixedStepCNF`), with the exact
trace computed analytically from the dynamics' weights.

    from exactflow.export import to_onnx
    to_onnx(flow, "model.onnx", what="log_prob")
    to_onnx(cnf_flow, "cnf.onnx", what="sample", solver="rk4", steps=16)
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import itertools
import logging
import math
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import ConfigError, ContextError, ShapeError
from .flow import Flow
from .transforms.base import Transform

__all__ = ["FixedStepCNF", "export_form", "load_onnx", "to_onnx"]

WHATS = ("log_prob", "sample", "transform")


def export_form(module: nn.Module, **options) -> nn.Module:
    """A copy of ``module`` (in eval mode) where every submodule with an ``export_form()``
    method is replaced by what it returns.

    ``options`` (e.g. ``solver="rk4", steps=16`` for CNFs) are passed to the ``export_form``
    methods that take them by name; ``None`` values are dropped.
    """
    options = {k: v for k, v in options.items() if v is not None}
    return _replace(copy.deepcopy(module).eval(), options)


def _replace(module: nn.Module, options: dict) -> nn.Module:
    method = getattr(module, "export_form", None)
    if callable(method):
        accepted = inspect.signature(method).parameters
        return method(**{k: v for k, v in options.items() if k in accepted})
    # a Whiten can only exist once its module is loaded; importing the data package here
    # would make export depend on the training extras
    pre = sys.modules.get(f"{__package__}.data.preprocessing")
    if pre is not None and isinstance(module, pre.Whiten):
        return _FrozenWhiten(module)
    for name, child in list(module.named_children()):
        setattr(module, name, _replace(child, options))
    return module


class _FrozenWhiten(Transform):
    """:class:`~exactflow.data.preprocessing.Whiten` with ``L^{-1}`` precomputed, since ONNX
    has no triangular solve: rows map as ``z = (x - mean) L^{-T}``, ``x = z L^T + mean``, with
    the constant log-det ``∓ Σ log diag L``."""

    event_dim = 1

    def __init__(self, whiten: nn.Module):
        super().__init__()
        tril = whiten.scale_tril.double()
        eye = torch.eye(tril.shape[0], dtype=tril.dtype, device=tril.device)
        # inverted in float64 once, so the exported matmul loses no more than a solve would
        inv = torch.linalg.solve_triangular(tril, eye, upper=False)
        dtype = whiten.scale_tril.dtype
        self.register_buffer("mean", whiten.mean.clone())
        self.register_buffer("inv_t", inv.T.to(dtype).contiguous())
        self.register_buffer("tril_t", whiten.scale_tril.T.clone())
        self.register_buffer("log_det", tril.diagonal().log().sum().to(dtype))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return (x - self.mean) @ self.inv_t, (-self.log_det).expand(x.shape[:-1])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z @ self.tril_t + self.mean, self.log_det.expand(z.shape[:-1])


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

    def __init__(
        self,
        dynamics: nn.Module,
        *,
        t1: float,
        solver: str = "rk4",
        steps: int = 20,
        context_features: int = 0,
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
            raise TypeError(f"steps must be a Python int, got {type(steps).__name__}")
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        if not (math.isfinite(t1) and t1 > 0):
            raise ConfigError(f"t1 must be finite and > 0, got {t1}")
        self.dynamics = dynamics
        self.t1 = float(t1)
        self.solver = solver
        self.steps = steps
        self.context_features = context_features
        self.features = features

    def extra_repr(self) -> str:
        return f"solver={self.solver}, steps={self.steps}, t1={self.t1:g}"

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(x, context, reverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(z, context, reverse=True)

    def _grid(self, reverse: bool) -> list[float]:
        # torchdiffeq integrates a decreasing span in negated time; the grid points are the same
        ends = (-self.t1, 0.0) if reverse else (0.0, self.t1)
        pts = [ends[0] + (ends[1] - ends[0]) * k / self.steps for k in range(self.steps)]
        return [*pts, ends[1]]

    def _solve(self, x: Tensor, context: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
        if x.dim() < 1 or (self.features is not None and x.shape[-1] != self.features):
            expect = self.features if self.features is not None else "D"
            raise ShapeError(f"input must have shape (*batch, {expect}), got {tuple(x.shape)}")
        batch, d = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, d)
        ctx = None
        if self.context_features:
            if context is None:
                raise ContextError(
                    f"this CNF is conditional (context_features={self.context_features}) but "
                    "no context was given"
                )
            ctx = context.expand(*batch, self.context_features).reshape(-1, self.context_features)
        sign = -1.0 if reverse else 1.0

        def rhs(s: float, y: Tensor) -> tuple[Tensor, Tensor]:
            f, tr = self.dynamics.forward_with_trace(sign * s, y, ctx)
            return sign * f, sign * tr

        grid = self._grid(reverse)
        y, ladj = flat, flat.new_zeros(flat.shape[0])
        for s0, s1 in itertools.pairwise(grid):
            dy, dl = self._step(rhs, s0, s1, y)
            y, ladj = y + dy, ladj + dl
        return y.reshape(x.shape), ladj.reshape(batch)

    def _step(self, rhs, s0: float, s1: float, y: Tensor) -> tuple[Tensor, Tensor]:
        """Increments ``(Δy, Δℓ)`` of one step from ``s0`` to ``s1``."""
        dt = s1 - s0
        f1, l1 = rhs(s0, y)
        if self.solver == "euler":
            return dt * f1, dt * l1
        if self.solver == "midpoint":
            f2, l2 = rhs(s0 + 0.5 * dt, y + 0.5 * dt * f1)
            return dt * f2, dt * l2
        if self.solver == "heun2":
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


class _LogProb(nn.Module):
    def __init__(self, flow: Flow):
        super().__init__()
        self.transform, self.base = flow.transform, flow.base
        self.base_ctx = flow.base.context_features > 0

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        z, ladj = self.transform(x, context)
        return self.base.log_prob(z, context if self.base_ctx else None) + ladj


class _Sample(nn.Module):
    def __init__(self, flow: Flow):
        super().__init__()
        self.transform = flow.transform

    def forward(self, noise: Tensor, temperature: Tensor, context: Tensor | None = None) -> Tensor:
        x, _ = self.transform.inverse(noise * temperature, context)
        return x


class _Transform(nn.Module):
    def __init__(self, flow: Flow):
        super().__init__()
        self.transform = flow.transform

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform(x, context)


def to_onnx(
    flow: Flow,
    path: str | os.PathLike,
    what: str = "log_prob",
    example_input: Tensor | None = None,
    example_context: Tensor | None = None,
    dynamic_batch: bool = True,
    opset: int | None = None,
    *,
    solver: str | None = None,
    steps: int | None = None,
) -> Path:
    """Export one direction of ``flow`` to an ONNX file and return its path.

    Args:
        flow: an unconditional or conditional :class:`~exactflow.Flow` (float32 is exported
            as is; cast the flow first for another dtype).
        what: ``"log_prob"`` (inputs ``x[, context]`` -> ``log_prob (B,)``), ``"sample"``
            (inputs ``noise (B, *event), temperature ()[, context]`` -> ``x``; draw the noise
            from the base distribution, e.g. N(0, I) for ``StandardNormal``) or
            ``"transform"`` (``x[, context]`` -> ``z, ladj``).
        example_input: a ``(B, *event)`` batch used for tracing (default: 2 base samples).
        example_context: ``(B, C)`` for conditional flows (default: zeros).
        dynamic_batch: export with a symbolic batch size.
        opset: ONNX opset version (exporter default if None).
        solver, steps: fixed-step solve of continuous flows (see :class:`FixedStepCNF`;
            default: each CNF's own fixed-step solver and steps, else ``rk4``).
    """
    if what not in WHATS:
        raise ConfigError(f"unknown export target {what!r}; valid: {', '.join(WHATS)}")
    if not isinstance(flow, Flow):
        raise TypeError(f"to_onnx needs an exactflow Flow, got {type(flow).__name__}")
    frozen = export_form(flow, solver=solver, steps=steps)
    if example_input is None:
        gen = torch.Generator().manual_seed(0)
        example_input = torch.randn(2, *flow.event_shape, generator=gen)
    batch = example_input.shape[0]
    args: list[Tensor] = [example_input.to(flow.dtype)]
    names = ["noise" if what == "sample" else "x"]
    wrapper: nn.Module = {"log_prob": _LogProb, "sample": _Sample, "transform": _Transform}[what](
        frozen
    )
    if what == "sample":
        args.append(torch.tensor(1.0, dtype=flow.dtype))
        names.append("temperature")
    if flow.context_features > 0:
        if example_context is None:
            example_context = torch.zeros(batch, flow.context_features, dtype=flow.dtype)
        args.append(example_context)
        names.append("context")
    outputs = {"log_prob": ["log_prob"], "sample": ["x"], "transform": ["z", "ladj"]}[what]
    dynamic = None
    if dynamic_batch:
        b = torch.export.Dim("batch", min=1)
        dynamic = tuple({0: b} if n in ("x", "noise", "context") else None for n in names)
    path = Path(path)
    # the exporter prints progress lines and logs a warning per missing optional package
    quiet_log = logging.getLogger("torch.onnx")
    level = quiet_log.level
    quiet_log.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            _export(wrapper, args, path, names, outputs, dynamic, opset)
        except Exception as err:  # the exporter's own error types carry pages of context
            summary = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
            raise ConfigError(
                f"ONNX export of {what} failed ({type(err).__name__}: {summary}); a module "
                "in the flow uses an op ONNX lacks: give it an export_form()"
            ) from err
        finally:
            quiet_log.setLevel(level)
    return path


def _export(wrapper, args, path, names, outputs, dynamic, opset) -> None:
    torch.onnx.export(
        wrapper,
        tuple(args),
        str(path),
        input_names=names,
        output_names=outputs,
        dynamic_shapes=dynamic,
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def load_onnx(path: str | os.PathLike):
    """An ``onnxruntime.InferenceSession`` for an exported file (CPU provider)."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("onnxruntime is not installed: pip install 'exactflow[onnx]'") from e
    if not Path(path).is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
