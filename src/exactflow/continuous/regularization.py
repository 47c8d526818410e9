"""RNODE regularisation of continuous flows (Finlay et al. 2020, "How to train your neural ODE").

Three penalties are integrated alongside the state of a :class:`~exactflow.continuous.CNF`
solve, per sample, and averaged over the batch:

* kinetic energy          ``K = ∫_0^T ‖f(t, z)‖² dt``
* Jacobian Frobenius norm ``B = ∫_0^T ‖∂f/∂z‖²_F dt`` (Hutchinson ``‖εᵀ ∂f/∂z‖²`` with the
  trace probe; exact when the exact trace is used)
* time smoothness         ``S = ∫_0^T ‖∂f/∂t‖² dt`` (``derivative="partial"``), or the path's
  acceleration ``‖∂f/∂t + (∂f/∂z) f‖²`` (``derivative="total"``)

A regularised module (:class:`Regularized`, which the CNF is) declares the weighted sum
``Σ w_k · term_k`` of its last forward call as its ``training_penalty()``, so
:meth:`exactflow.Flow.training_loss` -- what :class:`~exactflow.train.Trainer`, the distributed
trainer and the compiled step all minimise -- is ``NLL + penalty`` with nothing to add by hand.
A hand-written loop does the same::

    loss = flow.training_loss(batch)  # -flow.log_prob(batch).mean() + regularization_loss(flow)
    loss.backward()
    print(regularization_terms(flow))  # the unweighted terms, for logging

The terms are only computed in training mode with a positive weight; evaluation
(``flow.eval()``) pays nothing for them.

This module sits below :mod:`.cnf` (which imports the weights and the record from here) and
never imports it: the module walks below find regularised modules by the :class:`Regularized`
base class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DTypeError

__all__ = [
    "RNODE",
    "Regularized",
    "regularization_loss",
    "regularization_terms",
    "time_derivative",
]

DERIVATIVES = ("partial", "total")


@dataclass(frozen=True)
class RNODE:
    """Weights of the RNODE penalties (all ``>= 0``; zero switches a term off entirely).

    Attributes:
        kinetic: weight of ``∫‖f‖² dt``.
        jacobian: weight of ``∫‖∂f/∂z‖²_F dt``.
        smoothness: weight of ``∫‖df/dt‖² dt``.
        derivative: ``"partial"`` (``∂f/∂t``) or ``"total"`` (``∂f/∂t + (∂f/∂z) f``, the
            acceleration along the trajectory) for the smoothness term.
    """

    kinetic: float = 0.0
    jacobian: float = 0.0
    smoothness: float = 0.0
    derivative: str = "partial"

    def __post_init__(self) -> None:
        for name in ("kinetic", "jacobian", "smoothness"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise DTypeError(f"RNODE.{name} must be a float, got {type(w).__name__}")
            if not (math.isfinite(w) and w >= 0.0):
                raise ConfigError(f"RNODE.{name} must be a finite weight >= 0, got {w}")
        if self.derivative not in DERIVATIVES:
            raise ConfigError(
                f"RNODE.derivative must be one of {DERIVATIVES}, got {self.derivative!r}"
            )

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the terms with a positive weight, in state order."""
        return tuple(n for n in ("kinetic", "jacobian", "smoothness") if getattr(self, n) > 0)

    def weight(self, name: str) -> float:
        """The weight of term ``name`` (``"kinetic"``, ``"jacobian"`` or ``"smoothness"``)."""
        return float(getattr(self, name))

    @classmethod
    def coerce(cls, value: RNODE | dict | None) -> RNODE:
        """``None`` -> no regularisation; a dict -> ``RNODE(**dict)``."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"kinetic", "jacobian", "smoothness", "derivative"}
            if unknown:
                raise ConfigError(
                    f"unknown RNODE keys {sorted(unknown)}; valid: kinetic, jacobian, "
                    "smoothness, derivative"
                )
            return cls(**value)
        raise DTypeError(
            f"regularization must be an RNODE, a dict or None, got {type(value).__name__}"
        )


def time_derivative(f: Tensor, t: Tensor, z: Tensor, derivative: str, create_graph: bool) -> Tensor:
    """Per-sample time derivative of the dynamics, exact, by the double-backward trick.

    ``g(u) = uᵀ ∂f/∂t (+ uᵀ (∂f/∂z) f)`` is linear in ``u``, so ``∂g/∂u`` is the wanted
    ``(N, D)`` derivative even though ``t`` is one scalar shared by the batch.

    Args:
        f: ``(N, D)`` dynamics output, computed from ``t`` and ``z`` with autograd on.
        t: the scalar time ``f`` was evaluated at (requires grad).
        z: ``(N, D)`` state ``f`` was evaluated at (requires grad).
        derivative: ``"partial"`` or ``"total"``.
        create_graph: keep the graph so the penalty can be differentiated.

    Returns:
        ``(N, D)`` tensor ``∂f/∂t`` or ``∂f/∂t + (∂f/∂z) f``.
    """
    u = torch.zeros_like(f, requires_grad=True)
    inputs = (t, z) if derivative == "total" else (t,)
    grads = torch.autograd.grad(f, inputs, grad_outputs=u, create_graph=True, allow_unused=True)
    parts = []
    if grads[0] is not None:
        parts.append(grads[0].sum())
    if derivative == "total" and grads[1] is not None:
        parts.append((grads[1] * f).sum())
    g = sum(parts[1:], parts[0]) if parts else None
    if g is None or not g.requires_grad:
        # f does not depend on t (nor on z): the derivative is identically zero
        return torch.zeros_like(f)
    (out,) = torch.autograd.grad(g, u, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(f) if out is None else out


class _LastSolve:
    """Regularisation terms of the last forward call; not copied or pickled with the module
    (they hold an autograd graph)."""

    def __init__(self) -> None:
        self.terms: dict[str, Tensor] = {}
        self.loss: Tensor | None = None

    def __deepcopy__(self, memo) -> _LastSolve:
        return _LastSolve()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class Regularized:
    """Base of a module whose forward pass integrates RNODE terms (:class:`~.cnf.CNF`).

    The subclass sets :attr:`rnode` (the weights) and calls :meth:`_record_terms` once per
    forward call. The weighted sum of the recorded terms is the module's
    :meth:`training_penalty`, the protocol :meth:`exactflow.Flow.training_loss` collects.
    """

    rnode: RNODE
    _last: _LastSolve

    def _record_terms(self, values: dict[str, Tensor] | None) -> None:
        """Replace the record with this forward call's batch-mean terms (None: none computed)."""
        record = _LastSolve()
        if values:
            record.terms = values
            record.loss = sum(self.rnode.weight(n) * v for n, v in values.items())
        self._last = record

    @property
    def regularization(self) -> dict[str, Tensor]:
        """Unweighted RNODE terms (batch means, differentiable) of the last forward call;
        empty when none were computed (eval mode or zero weights)."""
        return self._last.terms

    @property
    def regularization_loss(self) -> Tensor | None:
        """``Σ w_k · term_k`` of the last forward call (None when nothing was computed);
        :meth:`exactflow.Flow.training_loss` adds it to the NLL."""
        return self._last.loss

    def training_penalty(self) -> Tensor | None:
        """The penalty this module declares for the training objective: :attr:`regularization_loss`."""
        return self._last.loss


def _regularized(module: nn.Module) -> list[Regularized]:
    if not isinstance(module, nn.Module):
        raise DTypeError(
            f"expected an nn.Module (a Flow or Transform), got {type(module).__name__}"
        )
    return [m for m in module.modules() if isinstance(m, Regularized)]


def regularization_loss(module: nn.Module) -> Tensor:
    """Weighted RNODE penalty ``Σ_k w_k · term_k`` of the last forward pass of every CNF in
    ``module``, a differentiable 0-dim tensor (zero when no CNF computed any term)."""
    total = None
    for cnf in _regularized(module):
        loss = cnf.regularization_loss
        if loss is not None:
            total = loss if total is None else total + loss
    if total is None:
        p = next(module.parameters(), None)
        total = torch.zeros(
            (), dtype=None if p is None else p.dtype, device=None if p is None else p.device
        )
    return total


def regularization_terms(module: nn.Module) -> dict[str, float]:
    """Unweighted RNODE terms of the last forward pass, summed over the model's CNFs, as
    floats for logging (e.g. ``{"kinetic": 3.1, "jacobian": 12.0}``)."""
    out: dict[str, float] = {}
    for cnf in _regularized(module):
        for name, value in cnf.regularization.items():
            out[name] = out.get(name, 0.0) + float(value.detach())
    return out
