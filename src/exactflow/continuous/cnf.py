"""Continuous normalizing flows: an ODE solve as a :class:`~exactflow.transforms.Transform`.

The state follows ``dz/dt = f(t, z, context)`` from ``t = 0`` (data) to ``t = t1`` (noise) and,
by the instantaneous change of variables ``d log p(z(t))/dt = -tr ∂f/∂z``, the log-det of the
flow map is integrated alongside it:

    log|det ∂z(t1)/∂x| = ∫_0^{t1} tr ∂f/∂z (t, z(t)) dt.

``inverse`` integrates the same system from ``t1`` back to ``0``. Solves use torchdiffeq
(adaptive ``dopri5`` & co. with ``atol``/``rtol``, or fixed-step ``rk4``/``euler``/... with
``steps``); gradients come from back-propagation through the solver or from the adjoint method.
The trace is exact (``D`` vector-Jacobian products) or a Hutchinson estimate ``εᵀ (∂f/∂z) ε``
with one probe ``ε`` drawn per solve and held fixed for the whole trajectory (FFJORD).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._compat import renamed_kwargs
from ..errors import ConfigError, ContextError, DTypeError, ShapeError
from ..transforms.base import Transform
from .fixed_step import FixedStepCNF, solver_tolerance, unrolled_solve
from .regularization import RNODE, Regularized, time_derivative

try:
    from torchdiffeq import odeint, odeint_adjoint
except ImportError:  # pragma: no cover - exercised only without the optional dependency
    odeint = odeint_adjoint = None

__all__ = [
    "ADAPTIVE_SOLVERS",
    "CNF",
    "FIXED_SOLVERS",
    "TimeMLP",
    "exact_divergence",
    "hutchinson_divergence",
    "sample_probe",
]

ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_SOLVERS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
# fixed-step solvers a compiled CNF runs unrolled (FixedStepCNF's tableaux)
_UNROLLED_SOLVERS = FixedStepCNF.SOLVERS
TRACES = ("auto", "exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
# "auto" picks the exact trace up to this many dimensions: D extra backward passes are then
# cheaper than the variance a Hutchinson estimate adds to the training loss
AUTO_EXACT_MAX_DIM = 8


# -- trace estimators ------------------------------------------------------------------------


def sample_probe(
    like: Tensor, kind: str = "rademacher", generator: torch.Generator | None = None
) -> Tensor:
    """A Hutchinson probe ``ε`` with ``E[ε εᵀ] = I``, same shape/dtype/device as ``like``.

    ``kind="rademacher"``: entries ±1 with equal probability; ``"gaussian"``: N(0, 1).
    """
    if kind == "rademacher":
        return torch.empty_like(like).bernoulli_(0.5, generator=generator).mul_(2.0).sub_(1.0)
    if kind == "gaussian":
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    raise ConfigError(f"probe must be one of {PROBES}, got {kind!r}")


def _grad_or_zeros(out: Tensor, inp: Tensor, grad_out: Tensor, create_graph: bool) -> Tensor:
    if not out.requires_grad:  # f does not depend on anything differentiable
        return torch.zeros_like(inp)
    (g,) = torch.autograd.grad(
        out,
        inp,
        grad_outputs=grad_out,
        create_graph=create_graph,
        retain_graph=True,
        allow_unused=True,
    )
    return torch.zeros_like(inp) if g is None else g


def exact_divergence(f: Tensor, z: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """Exact ``tr ∂f/∂z`` and ``‖∂f/∂z‖²_F`` per sample from ``D`` vector-Jacobian products.

    Args:
        f: ``(N, D)`` output computed from ``z`` with autograd on (rows independent).
        z: ``(N, D)`` input.
        create_graph: keep the graph (needed when the result is differentiated).

    Returns:
        ``(trace, frobenius²)``, each ``(N,)``.
    """
    n, d = z.shape
    if not f.requires_grad:  # f does not depend on anything differentiable
        return z.new_zeros(n), z.new_zeros(n)
    basis = torch.eye(d, dtype=f.dtype, device=f.device).unsqueeze(1).expand(d, n, d)
    try:
        # all D rows in one vmapped backward pass: rows[i] = e_iᵀ ∂f/∂z, (D, N, D)
        (rows,) = torch.autograd.grad(
            f,
            z,
            basis,
            create_graph=create_graph,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
    except RuntimeError:
        # an op without a batching rule in the user's dynamics: one backward pass per row
        rows = torch.stack([_grad_or_zeros(f, z, basis[i], create_graph) for i in range(d)])
    if rows is None:
        return z.new_zeros(n), z.new_zeros(n)
    return torch.diagonal(rows, dim1=0, dim2=2).sum(-1), rows.square().sum(dim=(0, 2))


def hutchinson_divergence(
    f: Tensor, z: Tensor, probe: Tensor, create_graph: bool = False
) -> tuple[Tensor, Tensor]:
    """Unbiased estimates ``εᵀ (∂f/∂z) ε`` of the trace and ``‖εᵀ ∂f/∂z‖²`` of ``‖∂f/∂z‖²_F``.

    One vector-Jacobian product. Args as :func:`exact_divergence` plus ``probe`` ``(N, D)``
    (see :func:`sample_probe`). Returns ``(trace_estimate, frobenius²_estimate)``, each ``(N,)``.
    """
    row = _grad_or_zeros(f, z, probe, create_graph)
    return (row * probe).sum(-1), row.square().sum(-1)


# -- dynamics ----------------------------------------------------------------------------------

_ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "silu": nn.SiLU, "elu": nn.ELU}
TIME_MODES = ("concat", "gate")


class _TimeLinear(nn.Module):
    """A linear layer conditioned on ``c = [t, context]``.

    ``concat``: ``W [h, c] + b``; ``gate``: ``(W h + b) ⊙ σ(G c + g) + H c`` (the
    concat-squash layer of FFJORD).
    """

    def __init__(self, n_in: int, n_out: int, n_cond: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode == "concat":
            self.linear = nn.Linear(n_in + n_cond, n_out)
        else:
            self.linear = nn.Linear(n_in, n_out)
            self.gate = nn.Linear(n_cond, n_out)
            self.shift = nn.Linear(n_cond, n_out, bias=False)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        if self.mode == "concat":
            return self.linear(torch.cat([h, c], dim=-1))
        return self.linear(h) * torch.sigmoid(self.gate(c)) + self.shift(c)

    def zero_output(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        if self.mode == "gate":
            nn.init.zeros_(self.shift.weight)


class TimeMLP(nn.Module):
    """Time-conditioned MLP dynamics ``f(t, z, context) -> dz/dt``.

    Every layer sees ``[t, context]`` (concatenated to its input, or as a sigmoid gate and a
    shift, ``time="gate"``). The output layer is zero-initialised, so ``f = 0`` and the CNF is
    the identity at initialisation.

    Args:
        features: ``D``, size of ``z``.
        hidden: hidden layer widths.
        context: size of the context vector (0 = unconditional).
        time: ``"concat"`` or ``"gate"``.
        activation: ``"tanh"``, ``"softplus"``, ``"silu"`` or ``"elu"`` (smooth, since the
            trace and its gradient need second derivatives).

    Shapes: ``t`` scalar (0-dim tensor or float) or per row ``(N,)``, ``z`` ``(N, D)``,
    ``context`` ``(N, C)``; returns ``(N, D)``.
    """

    @renamed_kwargs(context_features="context")
    def __init__(
        self,
        features: int,
        hidden: Sequence[int] = (64, 64, 64),
        context: int = 0,
        time: str = "gate",
        activation: str = "tanh",
    ):
        super().__init__()
        for name, v in (("features", features), ("context", context)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise DTypeError(f"{name} must be an int, got {type(v).__name__}")
        if features < 1 or context < 0:
            raise ConfigError(f"need features >= 1 and context >= 0, got {features} and {context}")
        hidden = tuple(hidden)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ConfigError(f"hidden widths must be positive ints, got {hidden}")
        if time not in TIME_MODES:
            raise ConfigError(f"time must be one of {TIME_MODES}, got {time!r}")
        if activation not in _ACTIVATIONS:
            raise ConfigError(
                f"activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}"
            )
        self.features = features
        self.context_features = context
        dims = (features, *hidden, features)
        self.layers = nn.ModuleList(
            _TimeLinear(a, b, 1 + context, time) for a, b in itertools.pairwise(dims)
        )
        self.act = _ACTIVATIONS[activation]()
        self.layers[-1].zero_output()

    def forward(self, t: Tensor | float, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``dz/dt`` ``(N, D)`` at time ``t`` and state ``z`` ``(N, D)``.

        ``t`` is one time for every row (a float or a 1-element tensor, as an ODE solve
        passes it) or one per row, ``(N,)`` or ``(N, 1)`` (as flow matching regresses it).
        """
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        rows = tuple(z.shape[:-1])
        if t.numel() == 1:
            c = t.reshape(1).expand(*rows, 1)
        elif tuple(t.shape) in (rows, (*rows, 1)):
            c = t.reshape(*rows, 1)
        else:
            raise ShapeError(
                f"t must be a scalar or have the batch shape {rows}, got {tuple(t.shape)}"
            )
        if self.context_features:
            if context is None:
                raise ContextError(
                    f"these dynamics need a context of {self.context_features} features"
                )
            if context.shape[-1] != self.context_features:
                raise ShapeError(
                    f"context must have {self.context_features} features, got shape "
                    f"{tuple(context.shape)}"
                )
            c = torch.cat([c, context.expand(*rows, self.context_features)], dim=-1)
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(h, c)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h

    def forward_with_trace(
        self, t: float, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(f, tr ∂f/∂z)`` with the Jacobian built by the chain rule, without autograd.

        ``∂f/∂z = W_L A_{L-1} W_{L-1} ··· A_1 W_1`` where ``W_i`` is layer ``i``'s weight on
        ``h`` (row-scaled by its time gate in ``"gate"`` mode) and ``A_i = diag(act'(pre_i))``;
        it is carried as an ``(N, H_i, D)`` product, so this costs ``O(N D Σ H_i H_{i-1})``
        and exports to ONNX (which has no autograd). Used by the export form of a CNF.

        Shapes: ``t`` a Python float, ``z`` ``(N, D)``, ``context`` ``(N, C)``; returns
        ``(N, D)`` and ``(N,)``.
        """
        c = z.new_full((z.shape[0], 1), float(t))
        if self.context_features:
            if context is None:
                raise ContextError(
                    f"these dynamics need a context of {self.context_features} features"
                )
            c = torch.cat([c, context], dim=-1)
        # the Jacobian is carried transposed, jac[n, d, j] = ∂h_j/∂z_d, so each layer is one
        # (N·D, H_in) @ (H_in, H_out) matmul rather than N small ones
        h, jac = z, None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            pre = layer(h, c)
            # ∂pre/∂h = row_scale ⊙ W_h, the gate (a function of t and context only) scaling rows
            w = layer.linear.weight[:, : h.shape[-1]]
            scale = torch.sigmoid(layer.gate(c)) if layer.mode == "gate" else None
            if i < last:
                h = self.act(pre)
                slope = _activation_slope(self.act, pre, h)
                scale = slope if scale is None else slope * scale
            else:
                h = pre
            if i == last:
                # only the diagonal is needed: Σ_k W_dk jac[n, d, k] for each output d
                if jac is None:  # no hidden layer: ∂f/∂z is the (gated) weight itself
                    jac = torch.eye(w.shape[0], dtype=z.dtype, device=z.device)
                diag = (jac * w).sum(-1)  # (D,) or (N, D)
                diag = diag if scale is None else diag * scale
                trace = diag.expand(z.shape[0], -1).sum(-1)
            else:
                jac = w.T if jac is None else torch.matmul(jac, w.T)  # (D, H) or (N, D, H)
                jac = jac if scale is None else scale.unsqueeze(-2) * jac
        return h, trace


def _activation_slope(act: nn.Module, pre: Tensor, out: Tensor) -> Tensor:
    """``act'(pre)`` elementwise, given ``out = act(pre)`` (the activations of :class:`TimeMLP`)."""
    if isinstance(act, nn.Tanh):
        return 1.0 - out.square()
    if isinstance(act, nn.Softplus):
        # torch's softplus is linear above the threshold, so its slope there is exactly 1
        scaled = act.beta * pre
        return torch.where(scaled > act.threshold, torch.ones_like(pre), torch.sigmoid(scaled))
    if isinstance(act, nn.SiLU):
        sig = torch.sigmoid(pre)
        return sig * (1.0 + pre * (1.0 - sig))
    if isinstance(act, nn.ELU):
        return torch.where(pre > 0, torch.ones_like(pre), out + act.alpha)
    raise ConfigError(f"no analytic slope for activation {type(act).__name__}")


# -- the transform -----------------------------------------------------------------------------


class _UniformGrid:
    """torchdiffeq ``grid_constructor``: ``steps`` equal steps between the end points."""

    def __init__(self, steps: int):
        self.steps = steps

    def __call__(self, func, y0: Tensor, t: Tensor) -> Tensor:
        frac = torch.arange(self.steps, dtype=t.dtype, device=t.device) / self.steps
        # the last point is the end point itself, not a rounded sum
        return torch.cat([t[0] + (t[-1] - t[0]) * frac, t[-1:]])


class _StateNorm:
    """Adaptive-step error norm over the state and log-det columns only: the regulariser
    columns are integrated along but do not decide the step size, so switching RNODE on does
    not by itself change the solver's NFE."""

    def __init__(self, width: int):
        self.width = width

    def __call__(self, v: Tensor) -> Tensor:
        return v[..., : self.width].square().mean().sqrt()


class _Augmented:
    """Right-hand side of the augmented ODE ``d/dt [z, ℓ, r] = [f, tr ∂f/∂z, penalties]``.

    One instance per solve: it holds the context and the Hutchinson probe fixed for the solve
    (and for its adjoint backward pass) and counts evaluations on its CNF.
    """

    def __init__(self, cnf: CNF, context, probe, exact: bool, terms, derivative: str, d: int):
        self.cnf = cnf
        self.context = context
        self.probe = probe
        self.exact = exact
        self.terms = terms
        self.derivative = derivative
        self.d = d
        self.backward = False  # set once the forward solve has returned

    def __call__(self, t: Tensor, state: Tensor) -> Tensor:
        if self.backward:
            self.cnf.nfe_backward += 1
        else:
            self.cnf.nfe_forward += 1
        # graphs are only needed when someone will differentiate this evaluation: direct
        # backprop (grad mode on) or the adjoint's backward pass (which turns grad mode on)
        need_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            z = state[:, : self.d]
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            smooth = "smoothness" in self.terms
            if smooth and not t.requires_grad:
                t = t.detach().requires_grad_(True)
            dyn = self.cnf.dynamics
            f = dyn(t, z) if self.context is None else dyn(t, z, context=self.context)
            if not isinstance(f, Tensor) or f.shape != z.shape:
                raise ShapeError(
                    f"dynamics must return dz/dt of the state's shape {tuple(z.shape)}, got "
                    f"{tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__}"
                )
            if self.exact:
                div, frob = exact_divergence(f, z, create_graph=need_graph)
            else:
                div, frob = hutchinson_divergence(f, z, self.probe, create_graph=need_graph)
            cols = [f, div.unsqueeze(-1)]
            for name in self.terms:
                if name == "kinetic":
                    cols.append(f.square().sum(-1, keepdim=True))
                elif name == "jacobian":
                    cols.append(frob.unsqueeze(-1))
                else:
                    dfdt = time_derivative(f, t, z, self.derivative, need_graph)
                    cols.append(dfdt.square().sum(-1, keepdim=True))
            out = torch.cat(cols, dim=-1)
        return out if need_graph else out.detach()


class CNF(Transform, Regularized):
    """Continuous normalizing flow ``dz/dt = f(t, z, context)`` over ``[0, t1]`` (FFJORD).

    ``forward(x) -> (z(t1), ∫ tr ∂f/∂z dt)`` (data -> noise), ``inverse`` solves back from
    ``t1`` to ``0``. ``Flow(CNF(...), StandardNormal((D,)))`` is FFJORD.

    Args:
        dynamics: any ``nn.Module`` with ``dynamics(t, z) -> dz/dt`` (``t`` a 0-dim tensor,
            ``z`` ``(N, D)``), called as ``dynamics(t, z, context=c)`` when there is a context;
            e.g. :class:`TimeMLP`.
        trace: ``"exact"`` (D vector-Jacobian products), ``"hutchinson"`` (one, unbiased),
            or ``"auto"`` (exact for ``D <= 8``) -- used in training mode.
        probe: Hutchinson probe, ``"rademacher"`` (lower variance) or ``"gaussian"``.
        eval_trace: trace used in eval mode (default ``"exact"``, so reported likelihoods are
            exact up to solver tolerance); ``None`` means the same as ``trace``.
        solver: a torchdiffeq method: adaptive :data:`ADAPTIVE_SOLVERS` or fixed-step
            :data:`FIXED_SOLVERS`.
        t1: integration time ``> 0``.
        atol, rtol: adaptive solver tolerances.
        steps: number of equal steps for a fixed-step solver (default 20).
        adjoint: gradients by the adjoint method (memory O(1) in the number of steps, one
            more solve backwards) instead of back-propagating through the solver.
        regularization: :class:`~exactflow.continuous.RNODE` weights (or a dict of them);
            the terms are integrated with the state in training mode and exposed after each
            forward call as :attr:`regularization` and :attr:`regularization_loss`, which is
            also the CNF's ``training_penalty()``: :meth:`exactflow.Flow.training_loss` adds it.
        context: size of the context; default ``dynamics.context_features`` or 0.
        features: ``D``, to validate inputs; default ``dynamics.features`` if it exists.

    Attributes:
        nfe_forward: dynamics evaluations made by solves (both directions) since the last
            :meth:`reset_nfe`.
        nfe_backward: evaluations made by adjoint backward passes. Direct back-propagation
            re-evaluates nothing (it differentiates the recorded forward evaluations), so it
            stays 0 without the adjoint.
    """

    event_dim = 1

    @renamed_kwargs(context_features="context")
    def __init__(
        self,
        dynamics: nn.Module,
        *,
        trace: str = "auto",
        probe: str = "rademacher",
        eval_trace: str | None = "exact",
        solver: str = "dopri5",
        t1: float = 1.0,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        steps: int | None = None,
        adjoint: bool = False,
        regularization: RNODE | dict | None = None,
        context: int | None = None,
        features: int | None = None,
    ):
        super().__init__()
        if odeint is None:  # pragma: no cover
            raise ImportError(
                "CNF needs torchdiffeq: pip install 'exactflow[continuous]' (or torchdiffeq)"
            )
        if not isinstance(dynamics, nn.Module):
            raise DTypeError(
                f"dynamics must be an nn.Module f(t, z, context=None), got {type(dynamics).__name__}"
            )
        if trace not in TRACES:
            raise ConfigError(f"trace must be one of {TRACES}, got {trace!r}")
        if eval_trace is not None and eval_trace not in TRACES:
            raise ConfigError(f"eval_trace must be one of {TRACES} or None, got {eval_trace!r}")
        if probe not in PROBES:
            raise ConfigError(f"probe must be one of {PROBES}, got {probe!r}")
        if solver not in ADAPTIVE_SOLVERS + FIXED_SOLVERS:
            raise ConfigError(
                f"unknown solver {solver!r}; adaptive: {', '.join(ADAPTIVE_SOLVERS)}; "
                f"fixed-step: {', '.join(FIXED_SOLVERS)}"
            )
        for name, v in (("t1", t1), ("atol", atol), ("rtol", rtol)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise DTypeError(f"{name} must be a float, got {type(v).__name__}")
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be finite and > 0, got {v}")
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int):
                raise DTypeError(f"steps must be an int, got {type(steps).__name__}")
            if steps < 1:
                raise ConfigError(f"steps must be >= 1, got {steps}")
            if solver in ADAPTIVE_SOLVERS:
                raise ConfigError(
                    f"steps only applies to fixed-step solvers ({', '.join(FIXED_SOLVERS)}); "
                    f"{solver!r} adapts its steps to atol/rtol"
                )
        if not isinstance(adjoint, bool):
            raise DTypeError(f"adjoint must be a bool, got {type(adjoint).__name__}")
        if context is None:
            context = int(getattr(dynamics, "context_features", 0))
        if features is None:
            features = getattr(dynamics, "features", None)
        for name, v in (("context", context), ("features", features)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"{name} must be a non-negative int, got {v!r}")

        self.dynamics = dynamics
        self.trace = trace
        self.eval_trace = eval_trace
        self.probe = probe
        self.solver = solver
        self.t1 = float(t1)
        self.atol = float(atol)
        self.rtol = float(rtol)
        self.steps = steps if steps is not None else 20
        self.adjoint = adjoint
        self.rnode = RNODE.coerce(regularization)
        self.context_features = context
        self.features = features
        self.nfe_forward = 0
        self.nfe_backward = 0
        self._record_terms(None)

    def check_tolerance(self) -> float:
        """The error the solver allows on round trips and log-dets, from its current settings
        (``atol``/``rtol``, or ``t1 / steps`` for fixed-step solvers; see
        :func:`~exactflow.continuous.fixed_step.solver_tolerance`). :mod:`exactflow.check`
        certifies a CNF against this instead of float64 precision."""
        steps = self.steps if self.solver in FIXED_SOLVERS else None
        return solver_tolerance(self.solver, self.t1, steps, self.atol, self.rtol)

    # -- bookkeeping ---------------------------------------------------------------------------
    def reset_nfe(self) -> None:
        """Zero :attr:`nfe_forward` and :attr:`nfe_backward`."""
        self.nfe_forward = 0
        self.nfe_backward = 0

    @property
    def nfe(self) -> dict[str, int]:
        """``{"forward": nfe_forward, "backward": nfe_backward}``."""
        return {"forward": self.nfe_forward, "backward": self.nfe_backward}

    def trace_mode(self, features: int) -> str:
        """The trace used now: ``"exact"`` or ``"hutchinson"`` (depends on train/eval mode)."""
        mode = self.trace if (self.training or self.eval_trace is None) else self.eval_trace
        if mode == "auto":
            mode = "exact" if features <= AUTO_EXACT_MAX_DIM else "hutchinson"
        return mode

    def extra_repr(self) -> str:
        step = (
            f"steps={self.steps}"
            if self.solver in FIXED_SOLVERS
            else f"atol={self.atol:g}, rtol={self.rtol:g}"
        )
        return (
            f"solver={self.solver}, {step}, t1={self.t1:g}, trace={self.trace}, "
            f"probe={self.probe}, adjoint={self.adjoint}"
        )

    # -- export --------------------------------------------------------------------------------
    def export_form(self, solver: str | None = None, steps: int | None = None) -> Transform:
        """An export-safe equivalent: a fixed-step solve unrolled into plain tensor ops.

        torchdiffeq's solvers branch on tensor values, and the exact trace needs autograd,
        which ONNX lacks; the returned :class:`~exactflow.continuous.FixedStepCNF` runs ``steps``
        steps of ``solver`` (``euler``, ``midpoint``, ``heun2`` or ``rk4``, same tableaux and
        time grid as torchdiffeq) with the trace from the dynamics' ``forward_with_trace``
        (analytic for :class:`TimeMLP`). Defaults: this CNF's solver and steps if it is one
        of those, else ``rk4`` with :attr:`steps` steps.
        """
        from .fixed_step import FixedStepCNF

        if solver is None:
            solver = self.solver if self.solver in FixedStepCNF.SOLVERS else "rk4"
        return FixedStepCNF(
            self.dynamics,
            t1=self.t1,
            solver=solver,
            steps=self.steps if steps is None else steps,
            context=self.context_features,
            features=self.features,
        )

    # -- solving -------------------------------------------------------------------------------
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(x, context, reverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(z, context, reverse=True)

    def _check(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if not isinstance(x, Tensor):
            raise DTypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise DTypeError(f"input must be a floating-point tensor, got {x.dtype}")
        if x.dim() < 1 or (self.features is not None and x.shape[-1] != self.features):
            expect = self.features if self.features is not None else "D"
            raise ShapeError(f"input must have shape (*batch, {expect}), got {tuple(x.shape)}")
        if self.context_features == 0:
            return x, None  # an unconditional layer in a conditional stack ignores the context
        if context is None:
            raise ContextError(
                f"this CNF is conditional (context_features={self.context_features}) but no "
                "context was given"
            )
        batch = tuple(x.shape[:-1])
        if context.dim() < 1 or context.shape[-1] != self.context_features:
            raise ShapeError(
                f"context must have shape (*batch, {self.context_features}), got "
                f"{tuple(context.shape)}"
            )
        try:
            context = context.expand(*batch, self.context_features)
        except RuntimeError:
            raise ShapeError(
                f"context batch shape {tuple(context.shape[:-1])} does not broadcast to the "
                f"input batch shape {batch}"
            ) from None
        return x, context.reshape(-1, self.context_features)

    def _unrolls_when_compiled(self, x) -> bool:
        """Whether a compiled solve takes the unrolled fixed-step form (see :meth:`_solve`)."""
        return (
            self.solver in _UNROLLED_SOLVERS
            and callable(getattr(self.dynamics, "forward_with_trace", None))
            and isinstance(x, Tensor)
            and x.dim() >= 1
            and self.trace_mode(x.shape[-1]) == "exact"
            and not (self.training and self.rnode.active)
            and not (self.adjoint and torch.is_grad_enabled())
        )

    def _solve(self, x: Tensor, context: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling() and self._unrolls_when_compiled(x):
            # torchdiffeq's step loop and the autograd-based trace split a compiled graph; a
            # fixed-step solve with an analytic trace is the same sum of the same tableau
            # steps as plain tensor ops (FixedStepCNF's solve), which compiles whole. It
            # counts no NFE. Adaptive solvers, the Hutchinson trace, RNODE terms and the
            # adjoint keep the torchdiffeq path.
            x, ctx = self._check(x, context)
            self._record_terms(None)
            d = x.shape[-1]
            y, ladj = unrolled_solve(
                self.dynamics, x.reshape(-1, d), ctx, t1=self.t1, solver=self.solver,
                steps=self.steps, reverse=reverse,
            )  # fmt: skip
            return y.reshape(x.shape), ladj.reshape(x.shape[:-1])
        if torch.is_inference_mode_enabled():
            # the trace needs autograd, which inference mode switches off even inside
            # enable_grad (the trace would silently be 0): solve on normal copies, no graph kept
            with torch.inference_mode(False), torch.no_grad():
                c = None if context is None else context.clone()
                return self._solve(x.clone(), c, reverse)
        x, ctx = self._check(x, context)
        batch, d = tuple(x.shape[:-1]), x.shape[-1]
        terms = self.rnode.active if self.training else ()
        self._record_terms(None)
        flat = x.reshape(-1, d)
        if flat.shape[0] == 0:
            return x, x.new_zeros(batch)

        exact = self.trace_mode(d) == "exact"
        probe = None if exact else sample_probe(flat, self.probe)
        func = _Augmented(self, ctx, probe, exact, terms, self.rnode.derivative, d)
        state0 = torch.cat([flat, flat.new_zeros(flat.shape[0], 1 + len(terms))], dim=-1)
        ends = (self.t1, 0.0) if reverse else (0.0, self.t1)
        t = torch.tensor(ends, dtype=x.dtype, device=x.device)

        if self.solver in FIXED_SOLVERS:
            options = {"grid_constructor": _UniformGrid(self.steps)}
            adjoint_options = {"grid_constructor": _UniformGrid(self.steps)}
        else:
            options = {"norm": _StateNorm(d + 1)}
            # the adjoint's step control ignores the parameter-gradient integrals (seminorm,
            # Kidger et al. 2021): they need no accuracy to be accurate at the end
            adjoint_options = {"norm": "seminorm"}
        kwargs = dict(rtol=self.rtol, atol=self.atol, method=self.solver, options=options)
        if self.adjoint and torch.is_grad_enabled():
            params = tuple(p for p in self.dynamics.parameters() if p.requires_grad)
            if ctx is not None and ctx.requires_grad:
                params = (*params, ctx)
            sol = odeint_adjoint(
                func, state0, t, adjoint_params=params, adjoint_options=adjoint_options, **kwargs
            )
        else:
            sol = odeint(func, state0, t, **kwargs)
        func.backward = True

        end = sol[-1]
        y = end[:, :d].reshape(x.shape)
        ladj = end[:, d].reshape(batch)
        if terms:
            sign = -1.0 if reverse else 1.0  # a reversed solve integrates t1 -> 0
            self._record_terms({n: sign * end[:, d + 1 + k].mean() for k, n in enumerate(terms)})
        return y, ladj
