"""Flow-matching models: CFM, OT-CFM and rectified flow, each an exact-likelihood CNF.

All three share one architecture -- a :class:`~exactflow.matching.VelocityMLP` (the same
layers as FFJORD's ``TimeMLP``) inside a :class:`~exactflow.continuous.CNF` over ``[0, 1]``
with a standard normal base -- and differ in how the velocity is trained:

=================  ===============================================  ===================
builder            path (``t = 0`` data, ``t = 1`` noise)           coupling
=================  ===============================================  ===================
``CFM``            ``(1-t) x0 + (σ + (1-σ) t) x1``                  independent
``OTCFM``          ``(1-t) x0 + t x1 + σ ξ``                        minibatch OT
``RectifiedFlow``  ``(1-t) x0 + t x1``                              independent (+ reflow)
=================  ===============================================  ===================

``sigma`` is each builder's σ (CFM's ``sigma_min=`` is its deprecated name).
"""

from __future__ import annotations

from collections.abc import Sequence

from .._compat import builder
from ..continuous import CNF
from ..distributions import StandardNormal
from ..errors import ConfigError
from ..matching import CondOTPath, LinearPath, MatchingFlow, VelocityMLP
from ..matching.paths import AffinePath

__all__ = ["CFM", "OTCFM", "RectifiedFlow"]


def _build(
    features: int,
    hidden: Sequence[int],
    context: int,
    path: AffinePath,
    pairing: str,
    solver: str,
    atol: float,
    rtol: float,
    steps: int | None,
    trace: str,
    time: str,
    activation: str,
) -> MatchingFlow:
    if isinstance(features, bool) or not isinstance(features, int) or features < 1:
        raise ConfigError(f"features must be a positive int, got {features!r}")
    if trace not in ("exact", "hutchinson"):
        raise ConfigError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
    velocity = VelocityMLP(features, hidden, context, time=time, activation=activation)
    cnf = CNF(
        velocity,
        trace=trace,
        eval_trace=trace,
        solver=solver,
        t1=1.0,
        atol=atol,
        rtol=rtol,
        steps=steps,
        adjoint=False,
    )
    return MatchingFlow(cnf, StandardNormal((features,)), path, pairing)


@builder(sigma_min="sigma")
def CFM(
    features: int,
    *,
    hidden: Sequence[int] = (64, 64, 64),
    context: int = 0,
    sigma: float = 1e-3,
    solver: str = "dopri5",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    steps: int | None = None,
    trace: str = "exact",
    time: str = "gate",
    activation: str = "tanh",
) -> MatchingFlow:
    """Conditional flow matching with independent coupling (Lipman et al. 2023).

    Args:
        features: ``D``.
        hidden: hidden widths of the velocity MLP.
        context: context features (0 = unconditional); the context enters every layer.
        sigma: σ, the width of the conditional path at the data end (``σ_min`` in Lipman
            et al.; ``sigma_min=`` is deprecated).
        solver, atol, rtol, steps: default ODE solver of ``log_prob``/``sample`` (see
            :class:`~exactflow.continuous.CNF`; override per call with ``steps=``/``solver=``).
        trace: ``"exact"`` (default) or ``"hutchinson"`` for ``log_prob``.
        time, activation: see :class:`~exactflow.continuous.TimeMLP`.

    Returns:
        A :class:`~exactflow.matching.MatchingFlow` with event shape ``(features,)``.
    """
    return _build(
        features, hidden, context, CondOTPath(sigma), "independent",
        solver, atol, rtol, steps, trace, time, activation,
    )  # fmt: skip


@builder()
def OTCFM(
    features: int,
    *,
    hidden: Sequence[int] = (64, 64, 64),
    context: int = 0,
    sigma: float = 0.01,
    solver: str = "dopri5",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    steps: int | None = None,
    trace: str = "exact",
    time: str = "gate",
    activation: str = "tanh",
) -> MatchingFlow:
    """OT-CFM (Tong et al. 2023): straight paths between minibatch-OT pairs, smoothed by ``σ``.

    Arguments as :func:`CFM`, with ``sigma`` the constant Gaussian width of the path. Batches
    are paired by an exact ``O(n³)`` assignment (see :mod:`exactflow.matching.pairing`).
    """
    return _build(
        features, hidden, context, LinearPath(sigma), "ot",
        solver, atol, rtol, steps, trace, time, activation,
    )  # fmt: skip


@builder()
def RectifiedFlow(
    features: int,
    *,
    hidden: Sequence[int] = (64, 64, 64),
    context: int = 0,
    solver: str = "dopri5",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    steps: int | None = None,
    trace: str = "exact",
    time: str = "gate",
    activation: str = "tanh",
) -> MatchingFlow:
    """Rectified flow (Liu et al. 2023): straight paths, independent coupling, ``σ = 0``.

    Arguments as :func:`CFM`. Straighten it afterwards with :func:`exactflow.matching.reflow`.
    """
    return _build(
        features, hidden, context, LinearPath(0.0), "independent",
        solver, atol, rtol, steps, trace, time, activation,
    )  # fmt: skip
