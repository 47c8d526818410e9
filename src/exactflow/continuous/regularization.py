"""RNODE regularisation of continuous flows (Finlay et al. 2020, "How to train your neural ODE").

Three penalties are integrated alongside the state of a :class:`~exactflow.continuous.CNF`
solve, per sample, and averaged over the batch:

* kinetic energy          ``K = ∫_0^T ‖f(t, z)‖² dt``
* Jacobian Frobenius norm ``B = ∫_0^T ‖∂f/∂z‖²_F dt`` (Hutchinson ``‖εᵀ ∂f/∂z‖²`` with the
  trace probe; exact when the exact trace is used)
* time smoothness         ``S = ∫_0^T ‖∂f/∂t‖² dt`` (``derivative="partial"``), or the path's
  acceleration ``‖∂f/∂t + (∂f/∂z) f‖²`` (``derivative="total"``)

How a training loop uses them: after ``loss = -flow.log_prob(x).mean()`` in train mode, add
``regularization_loss(flow)``, the weighted sum ``Σ w_k · term_k`` over every CNF in the model
(a zero tensor when nothing is regularised), and log ``regularization_terms(flow)``::

    nll = -flow.log_prob(batch).mean()
    loss = nll + regularization_loss(flow)
    loss.backward()

The terms are only computed in training mode with a positive weight; evaluation
(``flow.eval()``) pays nothing for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = [
    "RNODE",
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
                raise TypeError(f"RNODE.{name} must be a float, got {type(w).__name__}")
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
        raise TypeError(
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


def _cnfs(module: nn.Module):
    from .cnf import CNF  # a cycle at import time: cnf.py imports RNODE from here

    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module (a Flow or Transform), got {type(module).__name__}")
    return [m for m in module.modules() if isinstance(m, CNF)]


def regularization_loss(module: nn.Module) -> Tensor:
    """Weighted RNODE penalty ``Σ_k w_k · term_k`` of the last forward pass of every CNF in
    ``module``, a differentiable 0-dim tensor (zero when no CNF computed any term)."""
    total = None
    for cnf in _cnfs(module):
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
    for cnf in _cnfs(module):
        for name, value in cnf.regularization.items():
            out[name] = out.get(name, 0.0) + float(value.detach())
    return out
