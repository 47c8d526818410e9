"""The flow-matching model: a velocity field trained by regression, used as an exact CNF.

:class:`MatchingFlow` is an :class:`~exactflow.Flow` whose last transform is a
:class:`~exactflow.continuous.CNF`. It is trained simulation-free with :meth:`training_loss`
(the conditional flow-matching regression) and evaluated like any CNF: ``log_prob`` solves
the ODE with the exact trace (instantaneous change of variables), ``sample`` solves it back.
Both take solver overrides (``solver``, ``steps``, ``trace``, ``atol``, ``rtol``), e.g.
``flow.sample(1000, steps=1)`` is one Euler step from the noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ..continuous import ADAPTIVE_SOLVERS, CNF, FIXED_SOLVERS, TimeMLP
from ..distributions import BaseDistribution, StandardNormal
from ..errors import ConfigError, DTypeError, ShapeError
from ..flow import Flow
from ..transforms.base import Compose, Transform
from .pairing import resolve_pairing
from .paths import AffinePath, sample_time

__all__ = ["MatchingFlow", "VelocityMLP", "matching_loss"]


class VelocityMLP(TimeMLP):
    """The velocity field of flow matching: a :class:`~exactflow.continuous.TimeMLP`.

    Flow matching evaluates ``v(t_i, x_i)`` at a different ``t_i`` for every row, while an ODE
    solve passes one scalar ``t``; ``TimeMLP`` takes both, so this class adds nothing but its
    name (the models and the docs speak of a velocity field). Same layers and parameters.

    Shapes: ``t`` scalar or ``(N,)``, ``z`` ``(N, D)``, ``context`` ``(N, C)``; returns ``(N, D)``.
    """


def matching_loss(
    velocity,
    x0: Tensor,
    x1: Tensor,
    path: AffinePath,
    context: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The conditional flow-matching loss ``E_t |v(t, x_t) - u_t|²`` on paired rows.

    Args:
        velocity: ``velocity(t, x[, context=c])`` with per-row ``t`` ``(N,)`` (e.g.
            :class:`VelocityMLP`).
        x0: ``(N, D)`` data (``t = 0``); x1: ``(N, D)`` paired noise (``t = 1``).
        path: the conditional path giving ``x_t`` and the target ``u_t``.
        context: ``(N, C)`` or ``None``.
        generator: draws ``t ~ U(0, 1)`` and the path's extra noise.

    Returns:
        A scalar: the batch mean of the squared error summed over the ``D`` coordinates.
    """
    t = sample_time(x0.shape[0], generator, x0.dtype, x0.device)
    xt, ut = path.sample(x0, x1, t, generator)
    v = velocity(t, xt) if context is None else velocity(t, xt, context=context)
    return (v - ut).square().sum(-1).mean()


def _split(transform: Transform) -> tuple[list[Transform], CNF]:
    """``(transforms before the CNF, the CNF)`` of a CNF or a Compose ending in one."""
    if isinstance(transform, CNF):
        return [], transform
    if isinstance(transform, Compose) and len(transform) > 0:
        prefix, cnf = _split(transform[len(transform) - 1])
        return [transform[i] for i in range(len(transform) - 1)] + prefix, cnf
    raise ConfigError(
        "a MatchingFlow's transform must be a CNF or a Compose ending in a CNF, got "
        f"{type(transform).__name__}"
    )


class MatchingFlow(Flow):
    """A flow-matching model: a :class:`Flow` whose transform ends in a CNF.

    ``log p(x) = log N(z(1); 0, I) + ∫_0^1 tr ∂v/∂z dt`` (exact trace in eval mode by
    default), with the velocity ``v`` trained by :meth:`training_loss`. Transforms before the
    CNF (e.g. standardisation) are fixed pre-processing: the regression runs on their output
    and does not train them.

    Args:
        transform: a :class:`~exactflow.continuous.CNF` with ``t1 = 1`` and dynamics that accept
            one time per row (:class:`VelocityMLP`), or a Compose ending in one.
        base: the noise distribution (``t = 1`` end), normally ``StandardNormal((D,))``.
        path: the conditional probability path (:mod:`exactflow.matching.paths`).
        pairing: ``"independent"``, ``"ot"`` or a pairing object
            (:mod:`exactflow.matching.pairing`).
        validate: as for :class:`Flow`.
    """

    def __init__(
        self,
        transform: Transform,
        base: BaseDistribution,
        path: AffinePath,
        pairing="independent",
        validate: bool = True,
    ):
        super().__init__(transform, base, validate)
        if not isinstance(path, AffinePath):
            raise DTypeError(f"path must be an AffinePath, got {type(path).__name__}")
        _, cnf = _split(transform)
        if cnf.t1 != 1.0:
            raise ConfigError(f"flow matching integrates over [0, 1]; the CNF has t1={cnf.t1}")
        if len(self.event_shape) != 1:
            raise ShapeError(f"flow matching needs vector data (D,), got {self.event_shape}")
        self.path = path
        self.pairing = resolve_pairing(pairing)

    # -- parts ---------------------------------------------------------------------------------
    @property
    def cnf(self) -> CNF:
        """The CNF (last transform)."""
        return _split(self.transform)[1]

    @property
    def velocity(self) -> torch.nn.Module:
        """The velocity field ``v(t, x, context=None)`` (the CNF's dynamics)."""
        return self.cnf.dynamics

    @property
    def nfe(self) -> dict[str, int]:
        """The CNF's evaluation counters since :meth:`reset_nfe`."""
        return self.cnf.nfe

    def reset_nfe(self) -> None:
        """Zero the CNF's function-evaluation counters (see :attr:`nfe`)."""
        self.cnf.reset_nfe()

    def with_preprocessing(self, transform: Transform) -> MatchingFlow:
        """The same model (shared modules) with ``transform`` applied before it."""
        return MatchingFlow(
            Compose([transform, self.transform]), self.base, self.path, self.pairing, self.validate
        )

    def to_model_space(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``x`` pushed through the pre-processing before the CNF (no gradient)."""
        prefix, _ = _split(self.transform)
        with torch.no_grad():
            for t in prefix:
                x, _ = t(x, context)
        return x

    # -- training ------------------------------------------------------------------------------
    def training_loss(
        self,
        x: Tensor,
        context: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """The flow-matching loss on a data batch ``x`` ``(N, D)`` (a scalar to minimise).

        Overrides :meth:`Flow.training_loss` (the NLL), so every trainer that minimises
        ``training_loss`` -- :class:`~exactflow.train.Trainer`, its compiled step, the
        distributed trainer, :func:`~exactflow.matching.fit` -- regresses the velocity instead
        of solving the ODE; validation stays the exact NLL of :meth:`log_prob`.
        Noise rows are drawn from the base with ``generator`` and paired with the data by
        :attr:`pairing`; pass ``noise`` ``(N, D)`` to use a fixed coupling instead (reflow).
        """
        x = self._as_input(x)
        if x.dim() != 2:
            raise ShapeError(f"training batches must be (N, D), got {tuple(x.shape)}")
        context = self._context(context, tuple(x.shape[:1]))
        x0 = self.to_model_space(x, context)
        if noise is None:
            x1 = self._noise(x0, generator)
            x0, x1, context = self.pairing(x0, x1, context, generator)
        else:
            x1 = self._as_input(noise, "noise")
            if x1.shape != x0.shape:
                raise ShapeError(
                    f"noise must have the data's shape {tuple(x0.shape)}, got {tuple(x1.shape)}"
                )
        return matching_loss(self.velocity, x0, x1, self.path, context, generator)

    def _noise(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        if isinstance(self.base, StandardNormal):
            # drawn where the generator lives, so a CPU generator also serves a GPU model
            dev = generator.device if generator is not None else like.device
            return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=dev).to(
                like.device
            )
        return self.base.sample(like.shape[:1], None, generator).to(like)

    # -- solver control ------------------------------------------------------------------------
    @contextmanager
    def integration(
        self,
        solver: str | None = None,
        steps: int | None = None,
        trace: str | None = None,
        atol: float | None = None,
        rtol: float | None = None,
    ) -> Iterator[None]:
        """Temporarily override the CNF's solver settings (``None`` keeps the current one).

        ``steps`` alone selects Euler with that many steps (unless the CNF already uses a
        fixed-step solver); ``steps`` with an adaptive ``solver`` is an error.
        ``trace`` is ``"exact"`` or ``"hutchinson"``.
        """
        cnf = self.cnf
        if solver is not None and solver not in ADAPTIVE_SOLVERS + FIXED_SOLVERS:
            raise ConfigError(
                f"unknown solver {solver!r}; adaptive: {', '.join(ADAPTIVE_SOLVERS)}; "
                f"fixed-step: {', '.join(FIXED_SOLVERS)}"
            )
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int):
                raise DTypeError(f"steps must be an int, got {type(steps).__name__}")
            if steps < 1:
                raise ConfigError(f"steps must be >= 1, got {steps}")
            if solver is None:
                solver = cnf.solver if cnf.solver in FIXED_SOLVERS else "euler"
            elif solver in ADAPTIVE_SOLVERS:
                raise ConfigError(f"steps only applies to fixed-step solvers, not {solver!r}")
        if trace is not None and trace not in ("exact", "hutchinson"):
            raise ConfigError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
        for name, v in (("atol", atol), ("rtol", rtol)):
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"{name} must be a number > 0, got {v!r}")
        new = {
            "solver": solver,
            "steps": steps,
            "trace": trace,
            "eval_trace": trace,
            "atol": None if atol is None else float(atol),
            "rtol": None if rtol is None else float(rtol),
        }
        saved = {k: getattr(cnf, k) for k, v in new.items() if v is not None}
        try:
            for k, v in new.items():
                if v is not None:
                    setattr(cnf, k, v)
            yield
        finally:
            for k, v in saved.items():
                setattr(cnf, k, v)

    def log_prob(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        solver: str | None = None,
        steps: int | None = None,
        trace: str | None = None,
        atol: float | None = None,
        rtol: float | None = None,
    ) -> Tensor:
        """Exact ``log p(x | context)`` (batch shape), with optional solver overrides."""
        with self.integration(solver, steps, trace, atol, rtol):
            return super().log_prob(x, context)

    def rsample(
        self,
        n=1,
        context: Tensor | None = None,
        generator=None,
        *args,
        solver: str | None = None,
        steps: int | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        **kwargs,
    ) -> Tensor:
        """Differentiable samples (see :meth:`Flow.rsample`), with optional solver overrides."""
        with self.integration(solver, steps, None, atol, rtol):
            return super().rsample(n, context, generator, *args, **kwargs)

    def sample(
        self,
        n=1,
        context: Tensor | None = None,
        generator=None,
        *args,
        solver: str | None = None,
        steps: int | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        **kwargs,
    ) -> Tensor:
        """Samples ``(n, *context_batch, D)`` without gradient; ``steps=k`` = ``k`` Euler steps."""
        with self.integration(solver, steps, None, atol, rtol):
            return super().sample(n, context, generator, *args, **kwargs)

    def sample_and_log_prob(
        self,
        n=1,
        context: Tensor | None = None,
        generator=None,
        *,
        solver: str | None = None,
        steps: int | None = None,
        trace: str | None = None,
        atol: float | None = None,
        rtol: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Samples and their log-density in one solve, with optional solver overrides."""
        with self.integration(solver, steps, trace, atol, rtol):
            return super().sample_and_log_prob(n, context, generator)

    # -- reporting -----------------------------------------------------------------------------
    def evaluation_metrics(
        self, data: Tensor, seed: int = 0, n: int = 1000, context: Tensor | None = None
    ) -> dict[str, float]:
        """NFE, straightness and sample quality on up to ``n`` rows of ``data`` (data units).

        Keys: ``nfe_log_prob`` and ``nfe_sample`` (dynamics evaluations of one adaptive solve
        over the batch), ``straightness`` and ``path_length_ratio`` (see
        :func:`~exactflow.matching.metrics.straightness`), ``sw_sample`` and ``sw_1step``
        (sliced Wasserstein-2 distance to the data of adaptive and one-Euler-step samples).
        """
        from .metrics import sliced_wasserstein, straightness

        rows = data[:n].to(self.device, self.dtype)
        ctx = None if context is None else context[:n].to(self.device, self.dtype)
        k = rows.shape[0]
        out: dict[str, float] = {}
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                self.reset_nfe()
                self.log_prob(rows, ctx)
                out["nfe_log_prob"] = float(self.nfe["forward"])
                g = torch.Generator().manual_seed(seed)
                self.reset_nfe()
                samples = self.sample(k if ctx is None else 1, ctx, generator=g)
                out["nfe_sample"] = float(self.nfe["forward"])
                samples = samples.reshape(k, -1)
                one = self.sample(k if ctx is None else 1, ctx, generator=g, steps=1)
                one = one.reshape(k, -1)
                sg = torch.Generator().manual_seed(seed + 1)
                out["sw_sample"] = float(sliced_wasserstein(samples, rows, generator=sg))
                sg = torch.Generator().manual_seed(seed + 1)
                out["sw_1step"] = float(sliced_wasserstein(one, rows, generator=sg))
                z = self._noise(rows, g)
                s, ratio = straightness(self.velocity, z, context=ctx)
                out["straightness"], out["path_length_ratio"] = float(s), float(ratio)
        finally:
            self.train(was_training)
        return out
