"""Coupling layers (NICE, RealNVP, spline coupling) and their masks.

A coupling layer splits the event by a fixed boolean mask: the masked part ``x_a`` passes
through unchanged and conditions an elementwise monotone map of the rest,

    z_a = x_a,    z_b = tau(x_b; theta(x_a, context)),    log|det dz/dx| = sum_b log tau'(x_b).

The map ``tau`` is a parameter (:func:`~exactflow.transforms.elementwise.resolve_map`):
``"additive"`` gives NICE, ``"affine"`` RealNVP (soft-clamped log-scale), spline names the
neural spline flow coupling. The log-det is the O(D) sum of ``tau``'s elementwise
log-derivatives; no Jacobian is ever formed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .._compat import renamed_kwargs
from ..errors import ConfigError, DTypeError, ShapeError
from ..nets import MLP
from .base import Transform
from .elementwise import ElementwiseMap, resolve_map

__all__ = [
    "Coupling",
    "alternating_mask",
    "channel_mask",
    "checkerboard_mask",
    "half_mask",
]


def _positive(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{name} must be a positive int, got {n!r}")
    return n


def _shape(shape, name: str = "shape") -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    for s in shape:
        _positive(s, f"every size in {name}")
    return shape


def half_mask(features: int, flip: bool = False) -> Tensor:
    """``True`` on the first ``features // 2`` features (they condition), ``False`` on the rest.

    ``flip=True`` swaps the roles. Returns a bool tensor of shape ``(features,)``.
    """
    d = _positive(features, "features")
    mask = torch.arange(d) < d // 2
    return ~mask if flip else mask


def alternating_mask(features: int, flip: bool = False) -> Tensor:
    """``True`` on even indices, ``False`` on odd ones (swapped by ``flip``); shape ``(D,)``."""
    d = _positive(features, "features")
    mask = torch.arange(d) % 2 == 0
    return ~mask if flip else mask


def checkerboard_mask(shape: Sequence[int], flip: bool = False) -> Tensor:
    """Checkerboard over the last two dimensions: ``True`` where ``(h + w)`` is even.

    Args:
        shape: ``(H, W)`` or ``(C, H, W)`` (the pattern is the same in every channel).
        flip: swap ``True``/``False``.

    Returns a bool tensor of ``shape``.
    """
    shape = _shape(shape)
    if len(shape) < 2:
        raise ShapeError(f"checkerboard_mask needs (H, W) or (C, H, W), got {shape}")
    h, w = shape[-2:]
    board = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == 0
    board = board.expand(shape).clone()
    return ~board if flip else board


def channel_mask(shape: Sequence[int], flip: bool = False) -> Tensor:
    """``True`` on the first ``C // 2`` channels of a ``(C, ...)`` event (RealNVP's
    channel-wise mask); shape ``shape``."""
    shape = _shape(shape)
    c = shape[0]
    if c < 2:
        raise ShapeError(f"channel_mask needs at least 2 channels, got shape {shape}")
    mask = (torch.arange(c) < c // 2).reshape(c, *([1] * (len(shape) - 1))).expand(shape).clone()
    return ~mask if flip else mask


class Coupling(Transform):
    """Coupling layer ``z_a = x_a``, ``z_b = tau(x_b; theta(x_a, context))`` for any
    elementwise map ``tau``.

    Args:
        map: an :class:`~exactflow.transforms.ElementwiseMap` or a registered name
            (``"additive"``, ``"affine"``, ``"rq-spline"``, ``"cubic-spline"`` ...).
        mask: bool tensor of the event shape, ``True`` where features pass through and
            condition; or an int ``D`` for :func:`half_mask`. At least one entry must be
            ``False``. An all-``False`` mask is allowed with a context (a conditional
            elementwise layer).
        hidden: hidden widths of the conditioner :class:`~exactflow.nets.MLP`.
        context: context size (0 = unconditional).
        activation: conditioner activation (see :class:`~exactflow.nets.MLP`).
        map_kwargs: keyword arguments for the map when it is given by name
            (e.g. ``{"log_scale_bound": 2.0}`` or ``{"bins": 8, "bound": 5.0}``).
        conditioner: optional factory ``(in_features, out_features, context) -> nn.Module``
            replacing the MLP; the module is called as ``net(x_a, context)``.

    The event may have any shape (``event_dim = mask.dim()``); the conditioner sees the
    flattened pass-through features. Selection and recombination use fixed index buffers
    (``torch.cat`` + gather), so forward and inverse trace and export.

    Shapes: ``x`` ``(*batch, *mask.shape)``, ``context`` ``(*batch, context_features)``;
    ``ladj`` ``batch``.
    """

    @renamed_kwargs(context_features="context")
    def __init__(
        self,
        map: str | ElementwiseMap,
        mask: Tensor | int,
        hidden: Sequence[int] | int = (128, 128),
        context: int = 0,
        activation: str | Callable[[], nn.Module] = "relu",
        map_kwargs: dict | None = None,
        conditioner: Callable[[int, int, int], nn.Module] | None = None,
    ):
        super().__init__()
        self.map = resolve_map(map, **(map_kwargs or {}))
        if isinstance(mask, int) and not isinstance(mask, bool):
            mask = half_mask(mask)
        if not isinstance(mask, Tensor):
            raise DTypeError(f"mask must be a bool tensor or an int, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise DTypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
        if mask.dim() < 1:
            raise ShapeError("mask must have at least one dimension (the event shape)")
        if isinstance(context, bool) or not isinstance(context, int):
            raise DTypeError(f"context must be an int, got {context!r}")
        if context < 0:
            raise ConfigError(f"context must be >= 0, got {context}")
        flat = mask.reshape(-1)
        if bool(flat.all()):
            raise ConfigError("mask is True everywhere: the coupling layer would transform nothing")
        if not bool(flat.any()) and context == 0:
            raise ConfigError(
                "mask is False everywhere and there is no context: the conditioner would have "
                "no input; use an ElementwiseTransform instead"
            )
        self.event_dim = mask.dim()
        self.context_features = context
        self.register_buffer("mask", mask.clone())
        keep = torch.nonzero(flat).reshape(-1)
        change = torch.nonzero(~flat).reshape(-1)
        self.register_buffer("keep_idx", keep)
        self.register_buffer("change_idx", change)
        # position of each original feature in cat([x_keep, x_change])
        self.register_buffer("merge_idx", torch.argsort(torch.cat([keep, change])))
        n_out = change.numel() * self.map.num_params
        if conditioner is None:
            self.net = MLP(keep.numel(), n_out, hidden, context, activation)
        else:
            self.net = conditioner(keep.numel(), n_out, context)
            if not isinstance(self.net, nn.Module):
                raise DTypeError(
                    f"conditioner must return an nn.Module, got {type(self.net).__name__}"
                )

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        event = tuple(self.mask.shape)
        if tuple(x.shape[x.dim() - self.event_dim :]) != event or x.dim() < self.event_dim:
            raise ShapeError(f"expected input of shape (*batch, {event}), got {tuple(x.shape)}")
        batch = tuple(x.shape[: x.dim() - self.event_dim])
        flat = x.reshape(*batch, -1)
        # index_select: same values as flat[..., idx], but a much cheaper backward
        return (
            torch.index_select(flat, -1, self.keep_idx),
            torch.index_select(flat, -1, self.change_idx),
        )

    def _params(self, x_keep: Tensor, context: Tensor | None) -> Tensor:
        out = self.net(x_keep, context if self.context_features else None)
        return out.unflatten(-1, (self.change_idx.numel(), self.map.num_params))

    def _merge(self, x_keep: Tensor, y_change: Tensor, like: Tensor) -> Tensor:
        merged = torch.cat([x_keep, y_change], dim=-1)
        return torch.index_select(merged, -1, self.merge_idx).reshape(like.shape)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x_keep, x_change = self._split(x)
        y, logd = self.map.forward(x_change, self._params(x_keep, context))
        return self._merge(x_keep, y, x), logd.sum(-1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z_keep, z_change = self._split(z)
        x, logd = self.map.inverse(z_change, self._params(z_keep, context))
        return self._merge(z_keep, x, z), logd.sum(-1)

    def extra_repr(self) -> str:
        return (
            f"map={self.map!r}, event_shape={tuple(self.mask.shape)}, "
            f"context_features={self.context_features}"
        )
