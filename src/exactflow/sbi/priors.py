"""Priors of the SBI tasks: a box-uniform and a diagonal Gaussian.

Both share one small interface: ``sample(n, generator=None, dtype=None) -> (n, dim)``,
``log_prob(theta) -> (n,)`` for ``theta`` of shape ``(n, dim)`` (or ``(dim,)`` -> ``()``),
``dim``, and ``bounds``: the support as ``(low, high)`` tensors for a bounded prior, ``None``
for an unbounded one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import DomainError
from ._validate import as_rows, positive_int

__all__ = ["BoxUniform", "NormalPrior", "Prior"]


def _vector(value, dim: int) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    return torch.broadcast_to(t, (dim,)).clone()


class Prior:
    """Interface of SBI priors; see the module docstring.

    Attributes:
        dim: number of parameters.
        validate: check ``log_prob`` inputs for NaN/inf (switch off in tight loops).
    """

    dim: int = 0
    validate: bool = True

    @property
    def bounds(self) -> tuple[Tensor, Tensor] | None:
        """The support ``(low, high)`` (float64, shape ``(dim,)``), or ``None`` if unbounded."""
        return None

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """``n`` independent draws, shape ``(n, dim)``, in ``dtype`` (default: torch's)."""
        raise NotImplementedError

    def log_prob(self, theta: Tensor) -> Tensor:
        """``log p(theta)`` of shape ``(n,)`` for ``theta`` ``(n, dim)`` (``()`` for ``(dim,)``)."""
        rows, single = as_rows(theta, self.dim, "theta", finite=self.validate)
        out = self._log_prob(rows)
        return out[0] if single else out

    def _log_prob(self, theta: Tensor) -> Tensor:
        raise NotImplementedError


class BoxUniform(Prior):
    """Uniform prior on the box ``[low, high]^dim``: ``log p = -sum log(high - low)`` inside,
    ``-inf`` outside.

    Args:
        low, high: numbers or ``(dim,)`` tensors with ``low < high``.
        dim: number of parameters.
    """

    def __init__(self, low, high, dim: int):
        self.dim = positive_int(dim, "dim")
        self.low = _vector(low, self.dim)
        self.high = _vector(high, self.dim)
        if not bool((self.high > self.low).all()):
            raise DomainError(f"BoxUniform needs low < high, got low={low!r}, high={high!r}")
        self._log_volume = float(torch.log(self.high - self.low).sum())

    @property
    def bounds(self) -> tuple[Tensor, Tensor]:
        """The box ``(low, high)``, float64 tensors of shape ``(dim,)``."""
        return self.low.clone(), self.high.clone()

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """``n`` uniform draws in the box, shape ``(n, dim)``."""
        n = positive_int(n, "n")
        u = torch.rand((n, self.dim), generator=generator, dtype=torch.float64)
        out = self.low + (self.high - self.low) * u
        return out.to(dtype or torch.get_default_dtype())

    def _log_prob(self, theta: Tensor) -> Tensor:
        low, high = self.low.to(theta), self.high.to(theta)
        inside = ((theta >= low) & (theta <= high)).all(dim=-1)
        value = torch.full_like(theta[..., 0], -self._log_volume)
        return torch.where(inside, value, torch.full_like(value, -math.inf))


class NormalPrior(Prior):
    """Gaussian prior ``N(loc, diag(scale^2))``; unbounded (``bounds`` is ``None``).

    Args:
        loc, scale: numbers or ``(dim,)`` tensors (``scale > 0``, the standard deviation).
        dim: number of parameters.
    """

    def __init__(self, loc, scale, dim: int):
        self.dim = positive_int(dim, "dim")
        self.loc = _vector(loc, self.dim)
        self.scale = _vector(scale, self.dim)
        if not bool((self.scale > 0).all()):
            raise DomainError(f"NormalPrior needs scale > 0, got {scale!r}")

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """``n`` Gaussian draws, shape ``(n, dim)``."""
        n = positive_int(n, "n")
        eps = torch.randn((n, self.dim), generator=generator, dtype=torch.float64)
        return (self.loc + self.scale * eps).to(dtype or torch.get_default_dtype())

    def _log_prob(self, theta: Tensor) -> Tensor:
        loc, scale = self.loc.to(theta), self.scale.to(theta)
        u = (theta - loc) / scale
        return (-0.5 * u.square() - scale.log() - 0.5 * math.log(2 * math.pi)).sum(dim=-1)
