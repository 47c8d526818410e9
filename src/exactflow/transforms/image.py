"""Transforms on image events ``(C, H, W)``: the pieces of Glow and multi-scale RealNVP.

* :class:`Squeeze` / :class:`Unsqueeze`: 2x2 space-to-channel reshuffles (volume preserving).
* :class:`InvConv1x1`: Glow's invertible 1x1 convolution, dense (``slogdet``) or
  LU-parameterised (``log|det| = H W sum log|u_ii|``), with an export form.
* :class:`ConvCoupling`: coupling with a small conv net, checkerboard or channel masks.
* :class:`FactorOut`: multi-scale factor-out with a learned conditional Gaussian prior.
* :class:`LearnedPrior`: Glow's learned (optionally class-conditional) top-level prior.
* Per-channel ActNorm is :class:`~exactflow.transforms.ActNorm` with a ``(C, H, W)`` shape.

How a factored-out half fits the one-tensor contract: every transform here keeps the shape
of its event, so a multi-scale flow returns a full-size ``z`` for a
:class:`~exactflow.distributions.StandardNormal` base. The part leaving at a level, ``x_b``,
gets the Glow prior ``N(mu(x_a), sigma(x_a)^2)`` conditioned on the part that stays, ``x_a``.
That prior is written as the change of variables ``eps = (x_b - mu(x_a)) / sigma(x_a)`` (an
affine coupling, ``ladj = -sum log sigma``), so that ``log N(eps; 0, I) + ladj`` is exactly
``log N(x_b; mu, sigma^2)``. The staying half goes through the next level (``inner``) and the
two are concatenated again; squeezes are undone on the way out, so every level maps
``(C, H, W)`` to ``(C, H, W)``. Sampling at temperature ``T`` scales ``eps`` by ``T``, which
is Glow's ``x_b ~ N(mu, (T sigma)^2)`` at every level at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._compat import renamed_kwargs
from ..errors import ConfigError, ContextError, DTypeError, ShapeError
from .base import Transform, zeros_like_batch
from .elementwise import ElementwiseMap, resolve_map, soft_clamp

__all__ = [
    "ConvCoupling",
    "ConvNet",
    "FactorOut",
    "FrozenConv1x1",
    "InvConv1x1",
    "LearnedPrior",
    "Squeeze",
    "Unsqueeze",
    "image_shape",
]


def image_shape(shape) -> tuple[int, int, int]:
    """Validate an image event shape ``(C, H, W)`` of positive ints and return it."""
    try:
        shape = tuple(shape)
    except TypeError:
        # e.g. a vector model's `features` int passed to an image builder
        raise ShapeError(f"an image shape must be a (C, H, W) tuple, got {shape!r}") from None
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) for s in shape):
        raise ShapeError(f"an image shape must be (C, H, W) of ints, got {shape!r}")
    if min(shape) < 1:
        raise ShapeError(f"an image shape must have positive sizes, got {shape!r}")
    return shape  # type: ignore[return-value]


def _batch(x: Tensor, shape: tuple[int, ...], who: str) -> tuple[int, ...]:
    """Check ``x`` is ``(*batch, *shape)`` and return the batch shape."""
    if x.dim() < 3 or tuple(x.shape[-3:]) != tuple(shape):
        raise ShapeError(f"{who} expects input of shape (*batch, {shape}), got {tuple(x.shape)}")
    return tuple(x.shape[:-3])


def _context_count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"context must be an int >= 0, got {value!r}")
    return value


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


class ConvNet(nn.Module):
    """Glow's coupling network: conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-initialised conv3x3.

    A context vector enters as a per-channel bias of the first hidden layer (a linear map of
    the context added at every position).

    Args:
        in_channels, out_channels: channels of the input and output maps.
        hidden_channels: width of the two hidden layers.
        context: context size (0 = none).
        zero_init: zero the last convolution so the output starts at 0 (identity couplings).

    Shapes: ``x`` ``(*batch, in, H, W)``, ``context`` ``(*batch, context)`` ->
    ``(*batch, out, H, W)``.
    """

    @renamed_kwargs(context_features="context")
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int = 64,
        context: int = 0,
        zero_init: bool = True,
    ):
        super().__init__()
        self.in_channels = _positive(in_channels, "in_channels")
        self.out_channels = _positive(out_channels, "out_channels")
        hidden = _positive(hidden_channels, "hidden_channels")
        self.context_features = _context_count(context)
        self.conv_in = nn.Conv2d(self.in_channels, hidden, 3, padding=1)
        self.conv_mid = nn.Conv2d(hidden, hidden, 1)
        self.conv_out = nn.Conv2d(hidden, self.out_channels, 3, padding=1)
        if zero_init:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)
        self.context_in = nn.Linear(self.context_features, hidden) if context else None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``(*batch, in, H, W)`` (+ context ``(*batch, context)``) -> ``(*batch, out, H, W)``."""
        batch = tuple(x.shape[:-3])
        h = self.conv_in(x.reshape(-1, *x.shape[-3:]))
        if self.context_in is not None:
            if context is None:
                raise ContextError(
                    f"this network needs a context of size {self.context_features}, got None"
                )
            h = h + self.context_in(context.reshape(-1, self.context_features))[..., None, None]
        elif context is not None:
            raise ContextError("this network is unconditional but a context was given")
        h = self.conv_out(F.relu(self.conv_mid(F.relu(h))))
        return h.reshape(*batch, *h.shape[-3:])


class Squeeze(Transform):
    """Space to channels: ``(C, H, W) -> (4 C, H / 2, W / 2)``, each 2x2 block to 4 channels.

    Output channel ``4 c + 2 i + j`` holds pixel ``(2 h + i, 2 w + j)`` of channel ``c``. A
    permutation of the entries, so ``ladj = 0``.

    Args:
        shape: the input event shape ``(C, H, W)``; ``H`` and ``W`` must be even.
    """

    event_dim = 3

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        c, h, w = image_shape(shape)
        if h % 2 or w % 2:
            raise ShapeError(f"Squeeze needs even height and width, got shape {(c, h, w)}")
        self.in_shape = (c, h, w)
        self.out_shape = (4 * c, h // 2, w // 2)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = _batch(x, self.in_shape, "Squeeze")
        c, h, w = self.in_shape
        y = x.reshape(-1, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(*batch, *self.out_shape), zeros_like_batch(x, 3)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = _batch(z, self.out_shape, "Squeeze.inverse")
        c, h, w = self.in_shape
        y = z.reshape(-1, c, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(*batch, *self.in_shape), zeros_like_batch(z, 3)

    def extra_repr(self) -> str:
        return f"{self.in_shape} -> {self.out_shape}"


class Unsqueeze(Transform):
    """Channels to space, the inverse of :class:`Squeeze`: ``(4 C, H, W) -> (C, 2 H, 2 W)``.

    Args:
        shape: the input event shape ``(4 C, H, W)``; channels must be a multiple of 4.
    """

    event_dim = 3

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        c, h, w = image_shape(shape)
        if c % 4:
            raise ShapeError(f"Unsqueeze needs channels divisible by 4, got shape {(c, h, w)}")
        self.squeeze = Squeeze((c // 4, 2 * h, 2 * w))
        self.in_shape = (c, h, w)
        self.out_shape = self.squeeze.in_shape

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.squeeze.inverse(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.squeeze.forward(z)

    def extra_repr(self) -> str:
        return f"{self.in_shape} -> {self.out_shape}"


def _conv1x1(x: Tensor, weight: Tensor) -> Tensor:
    # a 1x1 convolution is the same matrix applied to the channel vector of every pixel
    return torch.einsum("oc,...chw->...ohw", weight, x)


class InvConv1x1(Transform):
    """Glow's invertible 1x1 convolution ``z[:, h, w] = W x[:, h, w]`` on ``(C, H, W)`` events.

    ``log|det dz/dx| = H W log|det W|``. Dense (``lu=False``): ``log|det W|`` by ``slogdet``,
    O(C^3) per call. LU (``lu=True``, default): ``W = P L (U + diag(sign * exp(log_s)))`` with
    a fixed permutation ``P`` and signs, unit lower ``L`` and strictly upper ``U``, so that
    ``log|det W| = sum log_s`` in O(C). Both start at a random rotation (a fixed seed can be
    given). Export replaces either by :class:`FrozenConv1x1` (ONNX has no ``slogdet`` or
    triangular solve).

    Args:
        channels: C.
        lu: LU-parameterise ``W``.
        seed: seed of the random initial rotation (``None``: the global generator).
    """

    event_dim = 3

    def __init__(self, channels: int, lu: bool = True, seed: int | None = None):
        super().__init__()
        c = self.channels = _positive(channels, "channels")
        self.lu = bool(lu)
        gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        q, _ = torch.linalg.qr(torch.randn(c, c, generator=gen, dtype=torch.float64))
        if not self.lu:
            self.weight = nn.Parameter(q.to(torch.get_default_dtype()))
            return
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        dtype = torch.get_default_dtype()
        self.register_buffer("perm", p.to(dtype))
        self.register_buffer("sign", torch.sign(diag).to(dtype))
        self.lower = nn.Parameter(lower.tril(-1).to(dtype))
        self.upper = nn.Parameter(upper.triu(1).to(dtype))
        self.log_s = nn.Parameter(diag.abs().log().to(dtype))

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.channels, dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower.tril(-1) + eye
        upper = self.upper.triu(1) + torch.diag(self.sign * self.log_s.exp())
        return lower, upper

    def matrix(self) -> Tensor:
        """The dense ``(C, C)`` matrix ``W``."""
        if not self.lu:
            return self.weight
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def inverse_matrix(self) -> Tensor:
        """``W^{-1}``: triangular solves for the LU form, a dense solve otherwise."""
        if not self.lu:
            return torch.linalg.inv(self.weight)
        lower, upper = self._factors()
        eye = torch.eye(self.channels, dtype=lower.dtype, device=lower.device)
        # W^-1 = U^-1 L^-1 P^T
        l_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, l_inv @ self.perm.T, upper=True)

    def log_abs_det(self) -> Tensor:
        """``log|det W|`` (per pixel), a scalar."""
        if not self.lu:
            return torch.linalg.slogdet(self.weight)[1]
        return self.log_s.sum()

    def _check(self, x: Tensor) -> tuple[int, ...]:
        if x.dim() < 3 or x.shape[-3] != self.channels:
            raise ShapeError(
                f"InvConv1x1 expects input of shape (*batch, {self.channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        return tuple(x.shape[:-3])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = self._check(x)
        pixels = x.shape[-2] * x.shape[-1]
        return _conv1x1(x, self.matrix()), (pixels * self.log_abs_det()).expand(batch)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = self._check(z)
        pixels = z.shape[-2] * z.shape[-1]
        return _conv1x1(z, self.inverse_matrix()), (-pixels * self.log_abs_det()).expand(batch)

    def export_form(self) -> FrozenConv1x1:
        """Export-ready copy with ``W``, ``W^-1`` and ``log|det W|`` precomputed."""
        with torch.no_grad():
            return FrozenConv1x1(self.matrix())

    def extra_repr(self) -> str:
        return f"channels={self.channels}, lu={self.lu}"


class FrozenConv1x1(Transform):
    """A fixed 1x1 convolution with ``W^-1`` and ``log|det W|`` precomputed in float64.

    Used by :mod:`exactflow.export`: forward and inverse are plain channel matmuls.
    """

    event_dim = 3

    def __init__(self, weight: Tensor):
        super().__init__()
        w64 = weight.detach().double()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("inv_weight", torch.linalg.inv(w64).to(weight.dtype))
        self.register_buffer("logdet", torch.linalg.slogdet(w64)[1].to(weight.dtype))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        pixels = x.shape[-2] * x.shape[-1]
        return _conv1x1(x, self.weight), (pixels * self.logdet).expand(x.shape[:-3])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        pixels = z.shape[-2] * z.shape[-1]
        return _conv1x1(z, self.inv_weight), (-pixels * self.logdet).expand(z.shape[:-3])


MASKS = ("channel", "checkerboard")


class ConvCoupling(Transform):
    """Coupling layer on images with a conv-net conditioner (RealNVP, Glow).

    ``z_a = x_a``, ``z_b = tau(x_b; theta(x_a, context))``, ``ladj = sum_b log tau'(x_b)``.

    Masks: ``"channel"`` conditions on the first ``C // 2`` channels and transforms the rest
    (``flip=True``: conditions on the last ``C - C // 2`` channels, transforms the first
    ``C // 2``); the net sees only the conditioning channels (Glow, RealNVP after a squeeze).
    ``"checkerboard"`` keeps the pixels with even ``h + w`` (odd with ``flip``); the net sees
    ``x * mask`` plus the mask as an extra channel, and ``torch.where`` picks the output per
    pixel (RealNVP at full resolution, works for one channel).

    Args:
        shape: event shape ``(C, H, W)``.
        mask: ``"channel"`` (needs ``C >= 2``) or ``"checkerboard"``.
        flip: swap the roles of the two parts.
        hidden_channels: width of the :class:`ConvNet`.
        context: context size (0 = unconditional).
        map: an :class:`~exactflow.transforms.ElementwiseMap` or registered name
            (``"affine"`` default, ``"additive"``, splines ...).
        map_kwargs: keyword arguments when ``map`` is a name.

    Shapes: ``x`` ``(*batch, C, H, W)``, ``context`` ``(*batch, context_features)``.
    """

    event_dim = 3

    @renamed_kwargs(context_features="context")
    def __init__(
        self,
        shape: Sequence[int],
        mask: str = "channel",
        flip: bool = False,
        hidden_channels: int = 64,
        context: int = 0,
        map: str | ElementwiseMap = "affine",
        map_kwargs: dict | None = None,
    ):
        super().__init__()
        c, h, w = self.shape = image_shape(shape)
        if mask not in MASKS:
            raise ConfigError(f"mask must be one of {MASKS}, got {mask!r}")
        self.mask_type = mask
        self.flip = bool(flip)
        self.context_features = _context_count(context)
        self.map = resolve_map(map, **(map_kwargs or {}))
        p = self.map.num_params
        if mask == "channel":
            if c < 2:
                raise ShapeError(f"a channel mask needs at least 2 channels, got shape {shape}")
            self.sizes = [c // 2, c - c // 2]
            # without flip the first part conditions and the second is transformed
            n_in, n_trans = (self.sizes[1], self.sizes[0]) if self.flip else self.sizes
            self.n_trans = n_trans
            n_out = n_trans * p
        else:
            board = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == int(self.flip)
            self.register_buffer("mask", board.expand(1, h, w).clone())
            n_in, n_out = c + 1, c * p
        self.net = ConvNet(n_in, n_out, hidden_channels, self.context_features)

    def _ctx(self, context: Tensor | None) -> Tensor | None:
        return context if self.context_features else None

    def _params(self, cond: Tensor, context: Tensor | None, channels: int) -> Tensor:
        out = self.net(cond, self._ctx(context))
        # (*b, channels * P, H, W) -> (*b, channels, H, W, P)
        out = out.unflatten(-3, (channels, self.map.num_params))
        return out.movedim(-3, -1)

    def _couple(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        batch = _batch(x, self.shape, "ConvCoupling")
        tau = self.map.inverse if inverse else self.map.forward
        if self.mask_type == "channel":
            first, second = x.split(self.sizes, dim=-3)
            if self.flip:
                y, logd = tau(first, self._params(second, context, self.n_trans))
                return torch.cat([y, second], dim=-3), logd.sum(dim=(-3, -2, -1))
            y, logd = tau(second, self._params(first, context, self.n_trans))
            return torch.cat([first, y], dim=-3), logd.sum(dim=(-3, -2, -1))
        mask = self.mask.to(x.dtype)
        cond = torch.cat([x * mask, mask.expand(*batch, *mask.shape)], dim=-3)
        y, logd = tau(x, self._params(cond, context, self.shape[0]))
        keep = self.mask.expand_as(x)
        z = torch.where(keep, x, y)
        return z, torch.where(keep, torch.zeros_like(logd), logd).sum(dim=(-3, -2, -1))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(z, context, inverse=True)

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, mask={self.mask_type!r}, flip={self.flip}, map={self.map!r}, "
            f"context_features={self.context_features}"
        )


class _GaussianParams(nn.Module):
    """Zero-initialised conv3x3 (plus a zero-initialised context bias) giving a Gaussian's
    mean and log-scale per element; starts at N(0, I)."""

    def __init__(self, in_channels: int, out_channels: int, context_features: int, bound: float):
        super().__init__()
        self.out_channels = out_channels
        self.bound = float(bound)
        self.conv = nn.Conv2d(in_channels, 2 * out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.context = None
        if context_features:
            self.context = nn.Linear(context_features, 2 * out_channels)
            nn.init.zeros_(self.context.weight)
            nn.init.zeros_(self.context.bias)

    def forward(self, h: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        batch = tuple(h.shape[:-3])
        out = self.conv(h.reshape(-1, *h.shape[-3:]))
        if self.context is not None:
            if context is None:
                raise ContextError("this prior is class-conditional but no context was given")
            out = out + self.context(context.reshape(-1, context.shape[-1]))[..., None, None]
        out = out.reshape(*batch, *out.shape[-3:])
        loc, log_scale = out.chunk(2, dim=-3)
        return loc, soft_clamp(log_scale, self.bound)


class FactorOut(Transform):
    """Multi-scale factor-out (split) with Glow's learned conditional Gaussian prior.

    The event ``(C, H, W)`` splits into ``x_a`` (first ``C - C // 2`` channels, which go on
    through ``inner``) and ``x_b`` (last ``C // 2``, which leave for the base)::

        z = cat[ inner(x_a),  (x_b - mu(x_a)) * exp(-s(x_a)) ]
        ladj = ladj_inner - sum s(x_a)

    ``mu``/``s`` come from a zero-initialised conv3x3 of ``x_a`` (``s`` soft-clamped), so the
    prior starts at N(0, I); ``prior="standard"`` drops it (RealNVP's fixed N(0, I) prior).
    With a :class:`~exactflow.distributions.StandardNormal` base the density of ``x_b`` is
    ``N(x_b; mu(x_a), exp(s(x_a))^2)`` (see the module docstring). ``z`` has the shape of
    ``x``, so levels nest.

    Args:
        shape: event shape ``(C, H, W)``, ``C >= 2``.
        inner: transform applied to ``x_a`` (event ``(C - C // 2, H, W)``), or ``None``.
        prior: ``"gaussian"`` (learned, conditional on ``x_a``) or ``"standard"``.
        context: context size for a class-conditional prior (0 = none); the
            context is passed to ``inner`` as well.
        log_scale_bound: soft bound on the prior log-scale.
    """

    event_dim = 3

    @renamed_kwargs(context_features="context")
    def __init__(
        self,
        shape: Sequence[int],
        inner: Transform | None = None,
        prior: str = "gaussian",
        context: int = 0,
        log_scale_bound: float = 5.0,
    ):
        super().__init__()
        self.shape = image_shape(shape)
        c = self.shape[0]
        if c < 2:
            raise ShapeError(f"FactorOut needs at least 2 channels, got shape {self.shape}")
        if prior not in ("gaussian", "standard"):
            raise ConfigError(f"prior must be 'gaussian' or 'standard', got {prior!r}")
        if inner is not None and not isinstance(inner, Transform):
            raise DTypeError(f"inner must be a Transform or None, got {type(inner).__name__}")
        own = _context_count(context)
        self.out_channels = c // 2
        self.keep_channels = c - self.out_channels
        self.inner = inner
        self.prior = prior
        self.params = (
            _GaussianParams(self.keep_channels, self.out_channels, own, log_scale_bound)
            if prior == "gaussian"
            else None
        )
        self.own_context = own
        self.context_features = max(own, inner.context_features if inner is not None else 0)

    def _prior(self, x_a: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.params(x_a, context if self.own_context else None)

    def _inner(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        if self.inner is None:
            return x, zeros_like_batch(x, 3)
        ctx = context if self.inner.context_features else None
        return self.inner.inverse(x, ctx) if inverse else self.inner(x, ctx)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _batch(x, self.shape, "FactorOut")
        x_a, x_b = x.split([self.keep_channels, self.out_channels], dim=-3)
        ladj = zeros_like_batch(x, 3)
        if self.params is not None:
            loc, log_scale = self._prior(x_a, context)
            x_b = (x_b - loc) * torch.exp(-log_scale)
            ladj = -log_scale.sum(dim=(-3, -2, -1))
        z_a, ladj_inner = self._inner(x_a, context, inverse=False)
        return torch.cat([z_a, x_b], dim=-3), ladj + ladj_inner

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _batch(z, self.shape, "FactorOut.inverse")
        z_a, eps = z.split([self.keep_channels, self.out_channels], dim=-3)
        x_a, ladj = self._inner(z_a, context, inverse=True)
        if self.params is not None:
            loc, log_scale = self._prior(x_a, context)
            eps = eps * torch.exp(log_scale) + loc
            ladj = ladj + log_scale.sum(dim=(-3, -2, -1))
        return torch.cat([x_a, eps], dim=-3), ladj

    def extra_repr(self) -> str:
        return f"shape={self.shape}, prior={self.prior!r}, keep={self.keep_channels}"


class LearnedPrior(Transform):
    """Glow's learned top prior as a standardisation ``z = (x - mu) * exp(-s)``.

    ``mu`` and ``s`` are per channel: learned constants plus, with a context (class
    labels), a linear map of it (zero-initialised, so the prior starts at N(0, I)).
    ``ladj = -H W sum_c s_c``.

    Args:
        shape: event shape ``(C, H, W)``.
        context: context size (0 = unconditional).
        log_scale_bound: soft bound on ``s``.
    """

    event_dim = 3

    @renamed_kwargs(context_features="context")
    def __init__(self, shape: Sequence[int], context: int = 0, log_scale_bound: float = 5.0):
        super().__init__()
        self.shape = image_shape(shape)
        c = self.shape[0]
        self.context_features = _context_count(context)
        self.bound = float(log_scale_bound)
        self.loc = nn.Parameter(torch.zeros(c))
        self.log_scale = nn.Parameter(torch.zeros(c))
        self.context_net = None
        if self.context_features:
            self.context_net = nn.Linear(self.context_features, 2 * c)
            nn.init.zeros_(self.context_net.weight)
            nn.init.zeros_(self.context_net.bias)

    def _params(self, batch: tuple[int, ...], context: Tensor | None) -> tuple[Tensor, Tensor]:
        loc, log_scale = self.loc, self.log_scale
        if self.context_net is not None:
            if context is None:
                raise ContextError("this prior is conditional but no context was given")
            d_loc, d_scale = self.context_net(context).chunk(2, dim=-1)
            loc, log_scale = loc + d_loc, log_scale + d_scale
        else:
            loc, log_scale = loc.expand(*batch, -1), log_scale.expand(*batch, -1)
        return loc[..., None, None], soft_clamp(log_scale, self.bound)[..., None, None]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = _batch(x, self.shape, "LearnedPrior")
        loc, log_scale = self._params(batch, context)
        pixels = self.shape[1] * self.shape[2]
        return (x - loc) * torch.exp(-log_scale), -pixels * log_scale.sum(dim=(-3, -2, -1))

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = _batch(z, self.shape, "LearnedPrior.inverse")
        loc, log_scale = self._params(batch, context)
        pixels = self.shape[1] * self.shape[2]
        return z * torch.exp(log_scale) + loc, pixels * log_scale.sum(dim=(-3, -2, -1))
