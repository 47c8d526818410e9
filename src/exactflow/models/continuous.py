"""FFJORD (Grathwohl et al. 2019): a continuous normalizing flow with MLP dynamics."""

from __future__ import annotations

from collections.abc import Sequence

from .._compat import builder
from ..continuous import CNF, RNODE, TimeMLP
from ..distributions import StandardNormal
from ..errors import ConfigError
from ..flow import Flow
from ..transforms.base import Compose

__all__ = ["FFJORD"]


@builder(blocks="transforms")
def FFJORD(
    features: int,
    *,
    transforms: int = 1,
    hidden: Sequence[int] = (64, 64, 64),
    context: int = 0,
    trace: str = "hutchinson",
    solver: str = "dopri5",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    adjoint: bool = True,
    t1: float = 1.0,
    steps: int | None = None,
    probe: str = "rademacher",
    eval_trace: str | None = "exact",
    time: str = "gate",
    activation: str = "tanh",
    regularization: RNODE | dict | None = None,
) -> Flow:
    """FFJORD: ``transforms`` CNFs with time-conditioned MLP dynamics over a standard normal.

    ``log p(x) = log N(z(t1); 0, I) + ∫_0^{t1} tr ∂f/∂z dt``. Training uses the Hutchinson
    trace by default; ``log_prob`` in eval mode uses the exact trace.

    Args:
        features: ``D``, the data dimension.
        transforms: number of CNFs stacked (each integrates over ``[0, t1]``); replaces
            ``blocks=`` (deprecated).
        hidden: hidden widths of each CNF's dynamics MLP.
        context: context features (0 = unconditional); the context enters every layer.
        trace, solver, atol, rtol, adjoint, t1, steps, probe, eval_trace, regularization:
            see :class:`~exactflow.continuous.CNF`.
        time: how ``t`` enters the MLP, ``"gate"`` (concat-squash) or ``"concat"``.
        activation: smooth activation of the MLP.

    Returns:
        A :class:`~exactflow.Flow` with event shape ``(features,)``, the identity map at init.
    """
    if isinstance(transforms, bool) or not isinstance(transforms, int) or transforms < 1:
        raise ConfigError(f"transforms must be a positive int, got {transforms!r}")
    if isinstance(features, bool) or not isinstance(features, int) or features < 1:
        raise ConfigError(f"features must be a positive int, got {features!r}")
    cnfs = [
        CNF(
            TimeMLP(features, hidden, context, time=time, activation=activation),
            trace=trace,
            probe=probe,
            eval_trace=eval_trace,
            solver=solver,
            t1=t1,
            atol=atol,
            rtol=rtol,
            steps=steps,
            adjoint=adjoint,
            regularization=regularization,
        )
        for _ in range(transforms)
    ]
    transform = cnfs[0] if transforms == 1 else Compose(cnfs)
    return Flow(transform, StandardNormal((features,)))
