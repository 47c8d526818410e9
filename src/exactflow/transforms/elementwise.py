"""Elementwise transforms and the monotone scalar maps that coupling and autoregressive
layers are parameterised by.

Two kinds of object live here:

* :class:`Transform` subclasses that act elementwise with their own (fixed or learnable)
  parameters: :class:`Affine`, :class:`Sigmoid`, :class:`Logit`, :class:`Tanh`,
  :class:`ElementwiseTransform`.
* :class:`ElementwiseMap` objects: stateless monotone maps ``y = tau(x; theta)`` whose
  parameters ``theta`` are *given* per element (by a conditioner network). Coupling and
  autoregressive layers take one of these as an argument, so a new map (affine, spline, ...)
  serves both without a class per combination.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DomainError, DTypeError
from ..validation import (
    as_tensor,
    check_count,
    check_map_kwargs,
    check_positive_finite,
    check_real,
)
from .base import Transform, sum_rightmost

__all__ = [
    "MAPS",
    "AdditiveMap",
    "Affine",
    "AffineMap",
    "ElementwiseMap",
    "ElementwiseTransform",
    "Logit",
    "Sigmoid",
    "Tanh",
    "register_map",
    "resolve_map",
    "soft_clamp",
]


def soft_clamp(x: Tensor, bound: float) -> Tensor:
    """Smoothly squash ``x`` into ``(-bound, bound)``: ``bound * tanh(x / bound)``.

    Identity to first order near 0, so zero-initialised nets still start at the identity,
    while a runaway log-scale can never overflow ``exp`` in deep stacks.
    """
    return bound * torch.tanh(x / bound)


def _as_tensor(value, name: str) -> Tensor:
    t = as_tensor(value, f"Affine {name}")
    if t.dtype == torch.bool or t.is_complex():
        raise DTypeError(f"Affine {name} must be real numbers, got a {t.dtype} tensor")
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _show(t: Tensor) -> str:
    return repr(t.tolist()) if t.numel() <= 6 else f"a tensor of shape {tuple(t.shape)}"


class Affine(Transform):
    """Elementwise affine flow whose generative map is ``x = shift + scale * z``.

    ``forward`` standardises, ``z = (x - shift) / scale``, with ``ladj = -sum log|scale|``;
    so ``Flow(Affine(2.0, 3.0), StandardNormal(()))`` is exactly ``Normal(2, 3)``.

    Args:
        shift, scale: numbers or tensors broadcastable to the event shape. ``scale`` must be
            nonzero (negative values flip the axis).
        learnable: make ``shift`` and ``log|scale|`` parameters (scale then stays positive).
        event_dim: dimensions summed into the log-det; defaults to the parameters' ``ndim``
            (0 for scalars, 1 for vectors).
    """

    def __init__(self, shift=0.0, scale=1.0, learnable: bool = False, event_dim: int | None = None):
        super().__init__()
        shift, scale = _as_tensor(shift, "shift"), _as_tensor(scale, "scale")
        # checked once at build time (never in forward): a NaN or infinite parameter would
        # make every log-density NaN
        for name, value in (("shift", shift), ("scale", scale)):
            if not torch.isfinite(value).all():
                raise DomainError(f"Affine {name} must be finite, got {_show(value)}")
        if not torch.all(scale != 0):
            raise DomainError(f"Affine scale must be nonzero everywhere, got {_show(scale)}")
        self.event_dim = (
            max(shift.dim(), scale.dim())
            if event_dim is None
            else check_count(event_dim, "event_dim")
        )
        if learnable:
            if torch.any(scale < 0):
                raise DomainError("a learnable Affine keeps scale > 0; got a negative scale")
            self.shift = nn.Parameter(shift.clone())
            self.log_scale = nn.Parameter(scale.log())
        else:
            self.register_buffer("shift", shift.clone())
            self.register_buffer("log_scale", scale.abs().log())
            self.register_buffer("sign", scale.sign())
        self.learnable = learnable

    def _scale(self) -> Tensor:
        s = self.log_scale.exp()
        return s if self.learnable else s * self.sign

    def _ladj(self, like: Tensor) -> Tensor:
        ladj = torch.broadcast_to(self.log_scale, like.shape[like.dim() - self.event_dim :] or ())
        return sum_rightmost(ladj, self.event_dim).expand(like.shape[: like.dim() - self.event_dim])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = (x - self.shift) / self._scale()
        return z, -self._ladj(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.shift + self._scale() * z, self._ladj(z)


class _Elementwise(Transform):
    """Parameter-free elementwise bijection; subclasses give the map and log-derivative."""

    def __init__(self, event_dim: int = 1):
        super().__init__()
        self.event_dim = check_count(event_dim, "event_dim")

    def _fwd(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inv(self, y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, logd = self._fwd(x)
        return y, sum_rightmost(logd, self.event_dim)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, logd = self._inv(z)
        return x, sum_rightmost(logd, self.event_dim)


class Sigmoid(_Elementwise):
    """``y = sigmoid(x)``: R -> (0, 1); ``log dy/dx = -softplus(-x) - softplus(x)``."""

    def _fwd(self, x):
        return torch.sigmoid(x), -F.softplus(-x) - F.softplus(x)

    def _inv(self, y):
        # sigmoid rounds to exactly 0 or 1 for |x| > ~17 (float32); clamping keeps the
        # inverse finite there (the largest representable preimage) instead of +-inf
        x = torch.logit(y, eps=torch.finfo(y.dtype).eps)
        return x, F.softplus(-x) + F.softplus(x)


class Logit(_Elementwise):
    """``y = logit(x)``: (0, 1) -> R, the inverse of :class:`Sigmoid` (used after dequantisation)."""

    def _fwd(self, x):
        y = torch.logit(x)
        return y, F.softplus(-y) + F.softplus(y)

    def _inv(self, y):
        return torch.sigmoid(y), -F.softplus(-y) - F.softplus(y)


class Tanh(_Elementwise):
    """``y = tanh(x)``: R -> (-1, 1); ``log dy/dx = 2 (log 2 - x - softplus(-2x))``."""

    def _fwd(self, x):
        return torch.tanh(x), 2.0 * (math.log(2.0) - x - F.softplus(-2.0 * x))

    def _inv(self, y):
        # tanh rounds to exactly +-1 for large |x|; clamp so the inverse stays finite there
        eps = torch.finfo(y.dtype).eps
        x = torch.atanh(y.clamp(-1.0 + eps, 1.0 - eps))
        return x, -2.0 * (math.log(2.0) - x - F.softplus(-2.0 * x))


class ElementwiseMap:
    """A monotone scalar map ``y = tau(x; theta)`` with per-element parameters.

    ``params`` has shape ``x.shape + (num_params,)`` and comes unconstrained (e.g. raw
    network outputs); the map constrains it itself. All-zero parameters must give the
    identity map, so zero-initialised conditioners start every flow at the identity.
    ``forward``/``inverse`` return ``(y, logabsdet)`` with ``logabsdet`` elementwise
    (same shape as ``x``).
    """

    num_params: int = 0

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``y = tau(x; params)`` and ``log|dy/dx|``, both of the shape of ``x``.

        ``params``: ``x.shape + (num_params,)``, unconstrained.
        """
        raise NotImplementedError

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``x = tau^{-1}(y; params)`` and ``log|dx/dy|``, both of the shape of ``y``.

        ``params``: ``y.shape + (num_params,)``, the same as for :meth:`forward`.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class AffineMap(ElementwiseMap):
    """RealNVP's map ``y = x * exp(s) + t`` with ``s = soft_clamp(raw_s, log_scale_bound)``.

    params[..., 0] is ``t``, params[..., 1] the raw log-scale.
    """

    num_params = 2

    def __init__(self, log_scale_bound: float = 3.0):
        # 0 would make soft_clamp divide by zero, inf or NaN make the log-scale NaN
        self.log_scale_bound = check_positive_finite(log_scale_bound, "log_scale_bound")

    def forward(self, x, params):
        t, s = params[..., 0], soft_clamp(params[..., 1], self.log_scale_bound)
        return x * torch.exp(s) + t, s

    def inverse(self, y, params):
        t, s = params[..., 0], soft_clamp(params[..., 1], self.log_scale_bound)
        return (y - t) * torch.exp(-s), -s


class AdditiveMap(ElementwiseMap):
    """NICE's volume-preserving map ``y = x + t`` (params[..., 0] is ``t``)."""

    num_params = 1

    def forward(self, x, params):
        return x + params[..., 0], torch.zeros_like(x)

    def inverse(self, y, params):
        return y - params[..., 0], torch.zeros_like(y)


class ElementwiseTransform(Transform):
    """An :class:`ElementwiseMap` with its own learnable, unconditional parameters.

    Args:
        map: the elementwise map (e.g. ``AffineMap()`` or a spline map).
        shape: the event shape, e.g. ``(features,)``.
        init_scale: standard deviation of the random initial parameters (0 = identity).
    """

    def __init__(self, map: ElementwiseMap, shape, init_scale: float = 0.0):
        super().__init__()
        if not isinstance(map, ElementwiseMap):
            raise DTypeError(
                f"ElementwiseTransform needs an ElementwiseMap, got {type(map).__name__}; "
                "resolve a name with resolve_map"
            )
        if isinstance(shape, (list, tuple, torch.Size)):
            shape = tuple(check_count(s, "shape entry", minimum=1) for s in shape)
        else:
            shape = (check_count(shape, "shape", minimum=1),)
        init_scale = check_real(init_scale, "init_scale", nonnegative=True)
        self.map = map
        self.event_dim = len(shape)
        self.params = nn.Parameter(init_scale * torch.randn(*shape, map.num_params))

    def _params(self, x: Tensor) -> Tensor:
        return self.params.expand(*x.shape, self.map.num_params)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, logd = self.map.forward(x, self._params(x))
        return y, sum_rightmost(logd, self.event_dim)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, logd = self.map.inverse(z, self._params(z))
        return x, sum_rightmost(logd, self.event_dim)


MAPS: dict[str, type[ElementwiseMap]] = {"affine": AffineMap, "additive": AdditiveMap}


def register_map(name: str, cls: type[ElementwiseMap]) -> type[ElementwiseMap]:
    """Make an :class:`ElementwiseMap` selectable by name in coupling/autoregressive layers."""
    if name in MAPS and MAPS[name] is not cls:
        raise ConfigError(f"an elementwise map named {name!r} is already registered")
    MAPS[name] = cls
    return cls


def resolve_map(spec: str | ElementwiseMap, **kwargs) -> ElementwiseMap:
    """An :class:`ElementwiseMap` from an instance or a registered name (``"affine"``,
    ``"additive"``, spline names ...); ``kwargs`` go to the map's constructor.

    Raises:
        ConfigError: an unknown name, or a keyword the map does not take (both listing the
            valid ones); keywords given with a map instance.
    """
    if isinstance(spec, ElementwiseMap):
        if kwargs:
            raise ConfigError(
                f"map_kwargs ({', '.join(kwargs)}) apply only when the map is given by name; "
                f"got a {type(spec).__name__} instance"
            )
        return spec
    if not isinstance(spec, str):
        raise DTypeError(f"map must be a name or an ElementwiseMap, got {type(spec).__name__}")
    if spec not in MAPS:
        raise ConfigError(
            f"unknown elementwise map {spec!r}; valid names: {', '.join(sorted(MAPS))}"
        )
    return MAPS[spec](**check_map_kwargs(MAPS[spec], kwargs))
