"""Conditional probability paths between data and noise, with their target velocities.

Time convention (the one of :class:`~exactflow.continuous.CNF`): ``t = 0`` is data, ``t = 1``
is noise, so the learnt velocity is the CNF's forward dynamics (data -> noise) and sampling is
the CNF's inverse (an ODE solve from ``t = 1`` back to ``t = 0``). This is the reverse of the
papers' ``x_0 ~ noise, x_1 ~ data``; with ``s = 1 - t`` every formula maps over unchanged up to
the sign of the velocity.

Every path here is affine in its end points ``x0`` (data) and ``x1`` (noise):

    x_t = a(t) x0 + b(t) x1 + σ ξ,     ξ ~ N(0, I),
    u_t = a'(t) x0 + b'(t) x1                    (the regression target).

Regressing ``v(t, x_t)`` on ``u_t`` over ``t ~ U(0, 1)`` and any coupling of ``(x0, x1)``
recovers the marginal velocity ``E[u_t | x_t]`` whose flow carries the data marginal at
``t = 0`` to the noise marginal at ``t = 1`` (Lipman et al. 2023; Tong et al. 2023).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._compat import renamed_kwargs
from ..errors import ConfigError, DTypeError, ShapeError

__all__ = ["AffinePath", "CondOTPath", "LinearPath", "sample_time"]


def _sigma(name: str, value: float, upper: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DTypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and 0.0 <= value < upper):
        raise ConfigError(f"{name} must be in [0, {upper}), got {value!r}")
    return float(value)


def sample_time(
    n: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` times ``t ~ U(0, 1)``, shape ``(n,)``, drawn with ``generator`` on its device."""
    t = torch.rand(n, generator=generator, dtype=dtype, device=_gen_device(generator))
    return t.to(device) if device is not None else t


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


class AffinePath:
    """Base class of paths ``x_t = a(t) x0 + b(t) x1 + σ ξ`` (see the module docstring).

    Subclasses define :meth:`coefficients`; :attr:`sigma` is the constant extra noise.
    """

    sigma: float = 0.0

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(a, b, a', b')`` at times ``t`` (any shape, same shape out)."""
        raise NotImplementedError

    def mean_std(self, t: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``a(t) x0`` and std ``sqrt(b(t)² + σ²)`` of ``p_t(x | x0)`` for ``x1 ~ N(0, I)``.

        ``t`` ``(N,)``, ``x0`` ``(N, D)``; returns ``(N, D)`` and ``(N, 1)``.
        """
        a, b, _, _ = self.coefficients(t)
        return a.unsqueeze(-1) * x0, (b.square() + self.sigma**2).sqrt().unsqueeze(-1)

    def sample(
        self, x0: Tensor, x1: Tensor, t: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """A point on the path and its target velocity.

        Args:
            x0: ``(N, D)`` data end (``t = 0``).
            x1: ``(N, D)`` noise end (``t = 1``), paired row by row with ``x0``.
            t: ``(N,)`` times in ``[0, 1]``.
            generator: draws ``ξ`` when ``σ > 0``.

        Returns:
            ``(x_t, u_t)``, each ``(N, D)``.
        """
        if x0.shape != x1.shape or x0.dim() != 2:
            raise ShapeError(
                f"x0 and x1 must both be (N, D), got {tuple(x0.shape)} and {tuple(x1.shape)}"
            )
        if t.shape != x0.shape[:1]:
            raise ShapeError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
        a, b, da, db = (c.unsqueeze(-1) for c in self.coefficients(t))
        xt = a * x0 + b * x1
        if self.sigma > 0:
            noise = torch.randn(
                x0.shape, generator=generator, dtype=x0.dtype, device=_gen_device(generator)
            )
            xt = xt + self.sigma * noise.to(x0.device)
        return xt, da * x0 + db * x1


class LinearPath(AffinePath):
    """Straight line ``x_t = (1 - t) x0 + t x1 + σ ξ``, target ``u_t = x1 - x0``.

    ``σ = 0`` is rectified flow (Liu et al. 2023); ``σ > 0`` is the Gaussian-smoothed path of
    I-CFM / OT-CFM (Tong et al. 2023), which blurs the data end by ``N(0, σ² I)`` -- and the
    noise end too, to ``N(0, (1 + σ²) I)`` for standard normal ``x1``, off the base by
    ``KL = (σ² - log(1 + σ²)) / 2 ≈ σ⁴ / 4`` nats per dimension (2.5e-9 at the models' default
    ``σ = 0.01``); :class:`CondOTPath` ends exactly at ``N(0, I)``.
    """

    def __init__(self, sigma: float = 0.0):
        self.sigma = _sigma("sigma", sigma, math.inf)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        one = torch.ones_like(t)
        return 1.0 - t, t, -one, one

    def __repr__(self) -> str:
        return f"LinearPath(sigma={self.sigma:g})"


class CondOTPath(AffinePath):
    """Lipman et al.'s optimal-transport conditional path, time-reversed to data -> noise.

    ``x_t = (1 - t) x0 + (σ_min + (1 - σ_min) t) x1`` with ``x1 ~ N(0, I)``: given ``x0`` the
    path is ``N((1 - t) x0, (σ_min + (1 - σ_min) t)² I)``, a point mass blurred by ``σ_min``
    at ``t = 0`` and the standard normal at ``t = 1``; ``u_t = (1 - σ_min) x1 - x0``.

    Args:
        sigma: ``σ_min`` in [0, 1), kept as :attr:`sigma_min` (``sigma_min=`` is the
            argument's deprecated name).
    """

    @renamed_kwargs(sigma_min="sigma")
    def __init__(self, sigma: float = 1e-3):
        # stored as sigma_min: AffinePath.sigma is the extra noise, zero on this path
        self.sigma_min = _sigma("sigma", sigma, 1.0)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s = self.sigma_min
        one = torch.ones_like(t)
        return 1.0 - t, s + (1.0 - s) * t, -one, (1.0 - s) * one

    def conditional_velocity(self, t: Tensor, x: Tensor, x0: Tensor) -> Tensor:
        """The field ``u_t(x | x0) = -x0 + (1 - σ_min) (x - (1 - t) x0) / σ_t`` generating
        ``p_t(· | x0)``; ``t`` ``(N,)``, ``x`` and ``x0`` ``(N, D)``, returns ``(N, D)``."""
        a, b, da, db = (c.unsqueeze(-1) for c in self.coefficients(t))
        return da * x0 + db * (x - a * x0) / b

    def __repr__(self) -> str:
        return f"CondOTPath(sigma={self.sigma_min:g})"
