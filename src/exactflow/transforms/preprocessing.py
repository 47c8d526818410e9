"""Dequantisation and the pre-processing transforms that carry their log-dets.

Discrete data ``x`` in ``{0, ..., K-1}^D`` (pixels, counts) has no density. Uniform
dequantisation ``y = x + u``, ``u ~ U[0, 1)^D`` gives continuous data whose model density
``p(y)`` bounds the discrete likelihood (the unit cube around ``x`` has volume 1):

    log P(x) >= E_u[ log p(x + u) ].

The flow usually works on ``z = logit(alpha + (1 - 2 alpha) y / K)``; :class:`LogitPreprocess`
is that map as a :class:`~exactflow.transforms.Transform`, so prepending it to a flow gives
``log p(y)`` in pixel space *including* the scaling and logit log-dets. NLL in nats per
image and bits per dimension are then reported in the original data space:

    bits/dim = -E_u[ log p(x + u) ] / (D ln 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .base import Transform, sum_rightmost, zeros_like_batch

__all__ = [
    "FrozenWhiten",
    "LogitPreprocess",
    "UniformDequantization",
    "Whiten",
    "dequantize",
]


def dequantize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation ``x + u``, ``u ~ U[0, 1)`` elementwise, same shape as ``x``.

    Integer tensors are converted to float32; float tensors keep their dtype.
    """
    if not x.is_floating_point():
        x = x.to(torch.float32)
    u = torch.rand(
        x.shape,
        generator=generator,
        dtype=x.dtype,
        device=generator.device if generator is not None else x.device,
    )
    return x + u.to(x.device)


class UniformDequantization(Transform):
    """Uniform dequantisation as a (stochastic, non-bijective) transform.

    ``forward(x) = x + u`` with ``u ~ U[0, 1)`` and ``ladj = 0`` (the uniform noise has
    density 1, so ``log p(x + u)`` is directly the lower bound on ``log P(x)``);
    ``inverse(y) = clamp(floor(y), 0, levels - 1)`` returns the integer level. Not
    certifiable as a bijection; use :class:`LogitPreprocess` after it.

    Args:
        levels: number of discrete levels K (17 for sklearn digits, 256 for 8-bit images).
        event_dim: 1 for vectors, 3 for images.
    """

    def __init__(self, levels: int, event_dim: int = 1):
        super().__init__()
        self.levels = _check_levels(levels)
        self.event_dim = int(event_dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = x + torch.rand_like(x)
        return y, zeros_like_batch(x, self.event_dim)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = torch.clamp(torch.floor(z), 0.0, float(self.levels - 1))
        return x, zeros_like_batch(z, self.event_dim)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


def _check_levels(levels: int) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ConfigError(f"levels must be an int >= 2, got {levels!r}")
    return levels


class LogitPreprocess(Transform):
    """Dequantised pixels ``y`` in ``(0, K)`` to logit space, with the exact log-det.

    ``z = logit(p)``, ``p = alpha + (1 - 2 alpha) y / K``;
    ``log|dz/dy| = log((1 - 2 alpha) / K) - log p - log(1 - p)`` per element.
    ``alpha`` keeps ``p`` away from 0 and 1 (RealNVP uses 0.05); ``alpha = 0`` is the plain
    logit of ``y / K``.

    Args:
        levels: K, the number of discrete levels (the data range is ``[0, K)``).
        alpha: boundary margin in ``[0, 0.5)``.
        event_dim: dimensions summed into the log-det (1 vectors, 3 images).
    """

    def __init__(self, levels: int, alpha: float = 0.05, event_dim: int = 1):
        super().__init__()
        self.levels = _check_levels(levels)
        if not 0.0 <= float(alpha) < 0.5:
            raise ConfigError(f"alpha must be in [0, 0.5), got {alpha!r}")
        self.alpha = float(alpha)
        self.event_dim = int(event_dim)
        self._log_scale = math.log((1.0 - 2.0 * self.alpha) / self.levels)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        p = self.alpha + (1.0 - 2.0 * self.alpha) / self.levels * x
        z = torch.logit(p)
        # -log p - log(1 - p) written through z so it stays finite where p rounds to 0 or 1
        logd = self._log_scale + F.softplus(-z) + F.softplus(z)
        return z, sum_rightmost(logd, self.event_dim)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        p = torch.sigmoid(z)
        x = (p - self.alpha) * (self.levels / (1.0 - 2.0 * self.alpha))
        logd = -self._log_scale - F.softplus(-z) - F.softplus(z)
        return x, sum_rightmost(logd, self.event_dim)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, alpha={self.alpha}, event_dim={self.event_dim}"


class Whiten(Transform):
    """Fixed whitening with the training covariance: ``z = L^{-1} (x - mean)``, ``S = L L^T``.

    ``log|det dz/dx| = -sum log diag L``. A flow that starts at the identity on whitened data
    is exactly the maximum-likelihood full-covariance Gaussian of the training split, so
    training (with validation from step 0 and best-weight selection) can only improve on it.

    Args:
        mean: ``(D,)`` training mean.
        scale_tril: ``(D, D)`` lower-triangular Cholesky factor L of the training covariance.
    """

    def __init__(self, mean: Tensor, scale_tril: Tensor):
        super().__init__()
        if mean.dim() != 1 or tuple(scale_tril.shape) != (mean.shape[0], mean.shape[0]):
            raise ConfigError(
                f"Whiten needs mean (D,) and scale_tril (D, D), got {tuple(mean.shape)} and "
                f"{tuple(scale_tril.shape)}"
            )
        if not bool((scale_tril.diagonal() > 0).all()):
            raise ConfigError("Whiten needs a Cholesky factor with a positive diagonal")
        dtype = mean.dtype if mean.is_floating_point() else torch.float32
        self.register_buffer("mean", mean.to(dtype).clone())
        self.register_buffer("scale_tril", torch.tril(scale_tril).to(dtype).clone())
        self.event_dim = 1

    def _log_det(self) -> Tensor:
        return self.scale_tril.diagonal().log().sum()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # a triangular solve in the working dtype keeps float64 round trips exact
        centred = (x - self.mean).unsqueeze(-1)
        z = torch.linalg.solve_triangular(self.scale_tril, centred, upper=False).squeeze(-1)
        return z, (-self._log_det()).expand(x.shape[:-1])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = z @ self.scale_tril.T + self.mean
        return x, self._log_det().expand(z.shape[:-1])

    def export_form(self) -> FrozenWhiten:
        """The same map with ``L^{-1}`` precomputed (ONNX has no triangular solve)."""
        return FrozenWhiten(self)


class FrozenWhiten(Transform):
    """:class:`Whiten` with ``L^{-1}`` precomputed, since ONNX
    has no triangular solve: rows map as ``z = (x - mean) L^{-T}``, ``x = z L^T + mean``, with
    the constant log-det ``∓ Σ log diag L``."""

    event_dim = 1

    def __init__(self, whiten: Whiten):
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
