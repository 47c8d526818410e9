"""Variational dequantisation (Flow++, Ho et al. 2019) as a bijection on dequantised data.

Uniform dequantisation trains a density ``p`` on ``y = x + v``, ``v ~ U[0, 1)^D``, and
``E_v[log p(x + v)]`` bounds the discrete ``log P(x)``. Variational dequantisation replaces
``v`` by ``u ~ q(u | x)`` and optimises ``E_q[log p(x + u) - log q(u | x)]``, a tighter bound.

Design: ``q(u | x)`` is the push-forward of ``U[0, 1)^D`` through a conditional bijection
``g(.; x)`` of the unit cube (conditional spline couplings, Flow++ uses logistic-mixture
CDFs to the same end). The map

    T(y) = floor(y) + g(y - floor(y); floor(y))

is then a bijection of the dequantised space (unit cube by unit cube) with
``log|det dT/dy| = -log q(u | x)`` at ``u = g(v; x)`` (``v`` uniform has density 1). So

    log p(T(y)) + log|det dT/dy| = log p(x + u) - log q(u | x),

the single-sample variational bound, is just the ``log_prob`` of a flow with
:class:`VariationalDequantization` prepended, fed with *uniformly* dequantised data. The
trainer, the seeded evaluation noise and the reported NLL need no special case, the
dequantiser trains jointly with the model through the same loss, and the bits/dim reported
is the variational bound. :func:`dequantizer` selects ``"uniform"`` (identity) or
``"variational"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from .base import Compose, Transform
from .image import ConvNet, image_shape
from .splines import RationalQuadraticSpline

__all__ = ["DEQUANTIZATIONS", "VariationalDequantization", "dequantizer"]

DEQUANTIZATIONS = ("uniform", "variational")


class _FeatureNet(nn.Module):
    """Features of the integer image ``x`` that every coupling of ``g`` reads."""

    def __init__(self, channels: int, hidden: int, levels: int):
        super().__init__()
        self.levels = levels
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        batch = tuple(x.shape[:-3])
        # pixel levels scaled to about [-1, 1]
        h = self.net((2.0 * x / (self.levels - 1) - 1.0).reshape(-1, *x.shape[-3:]))
        return h.reshape(*batch, *h.shape[-3:])


class VariationalDequantization(Transform):
    """``T(y) = floor(y) + g(frac(y); floor(y))``: uniform noise -> learned ``q(u | x)``.

    ``g`` maps the unit cube onto itself: on ``w = 2 v - 1`` it applies checkerboard
    couplings (alternating parity) with rational-quadratic splines on ``[-1, 1]`` whose
    parameters come from conv nets reading the masked noise and features of
    ``x = floor(y)``; then ``u = (w' + 1) / 2``. Spline end slopes are 1, so ``g`` never
    saturates near the faces of the cube (a logit/sigmoid parameterisation would push ``u``
    to within rounding of 1, where ``floor(x + u)`` jumps to the next level). Output convs
    are zero-initialised: ``T`` starts as the identity, i.e. uniform dequantisation.

    ``ladj = log|det dT/dy| = -log q(u | x)`` (the two affine rescalings cancel).

    Args:
        shape: image event shape ``(C, H, W)``.
        levels: number of pixel levels K (pixels are ``0..K-1``).
        depth: number of couplings in ``g``.
        hidden_channels: width of the conditioning and coupling nets.
        bins: spline bins per coupling.
    """

    event_dim = 3

    def __init__(
        self,
        shape: Sequence[int],
        levels: int,
        depth: int = 4,
        hidden_channels: int = 32,
        bins: int = 8,
    ):
        super().__init__()
        c, h, w = self.shape = image_shape(shape)
        for name, value, low in (("levels", levels, 2), ("depth", depth, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(hidden_channels, bool) or not isinstance(hidden_channels, int):
            raise ConfigError(f"hidden_channels must be an int, got {hidden_channels!r}")
        if hidden_channels < 1:
            raise ConfigError(f"hidden_channels must be positive, got {hidden_channels}")
        self.levels = levels
        self.map = RationalQuadraticSpline(bins=bins, bound=1.0)
        self.features = _FeatureNet(c, hidden_channels, levels)
        board = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == 0
        masks = torch.stack([board if i % 2 == 0 else ~board for i in range(depth)])
        self.register_buffer("masks", masks[:, None])  # (depth, 1, H, W)
        # input: masked noise, the mask, features of x; output: spline parameters
        n_out = c * self.map.num_params
        self.nets = nn.ModuleList(
            ConvNet(c + 1 + hidden_channels, n_out, hidden_channels) for _ in range(depth)
        )

    def _coupling(self, i: int, w: Tensor, feats: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        keep = self.masks[i]
        mask = keep.to(w.dtype)
        batch = tuple(w.shape[:-3])
        cond = torch.cat([w * mask, mask.expand(*batch, *mask.shape), feats], dim=-3)
        out = self.nets[i](cond).unflatten(-3, (self.shape[0], self.map.num_params))
        tau = self.map.inverse if inverse else self.map.forward
        y, logd = tau(w, out.movedim(-3, -1))
        keep = keep.expand_as(w)
        y = torch.where(keep, w, y)
        return y, torch.where(keep, torch.zeros_like(logd), logd).sum(dim=(-3, -2, -1))

    def _g(self, y: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        if y.dim() < 3 or tuple(y.shape[-3:]) != self.shape:
            raise ShapeError(
                f"VariationalDequantization expects input of shape (*batch, {self.shape}), "
                f"got {tuple(y.shape)}"
            )
        x = torch.floor(y)
        feats = self.features(x)
        w = 2.0 * (y - x) - 1.0
        ladj = torch.zeros(y.shape[:-3], dtype=y.dtype, device=y.device)
        order = reversed(range(len(self.nets))) if inverse else range(len(self.nets))
        for i in order:
            w, logd = self._coupling(i, w, feats, inverse)
            ladj = ladj + logd
        return x + 0.5 * (w + 1.0), ladj

    def forward(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._g(y, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._g(z, inverse=True)

    def log_q(self, x: Tensor, u: Tensor) -> Tensor:
        """``log q(u | x)`` for integer images ``x`` and noise ``u`` in [0, 1), shape batch."""
        _, ladj = self.inverse(x + u)
        return ladj

    def extra_repr(self) -> str:
        return f"shape={self.shape}, levels={self.levels}, depth={len(self.nets)}"


def dequantizer(kind: str, shape: Sequence[int], levels: int, **kwargs) -> Transform:
    """The transform to prepend (before the logit pre-processing) for a dequantisation kind.

    ``"uniform"``: the identity (the data are already ``x + v``, ``v ~ U[0, 1)``);
    ``"variational"``: a :class:`VariationalDequantization` built with ``kwargs``.
    Either way the flow's ``log_prob`` on uniformly dequantised data is a lower bound on
    ``log P(x)`` (see the module docstring).
    """
    if kind not in DEQUANTIZATIONS:
        raise ConfigError(f"unknown dequantization {kind!r}; valid: {', '.join(DEQUANTIZATIONS)}")
    if kind == "uniform":
        if kwargs:
            raise ConfigError(f"uniform dequantization takes no options, got {sorted(kwargs)}")
        identity = Compose([])
        identity.event_dim = len(image_shape(shape))  # its zero log-det has the batch shape
        return identity
    return VariationalDequantization(shape, levels, **kwargs)
