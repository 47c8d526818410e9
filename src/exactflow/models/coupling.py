"""Coupling-flow builders: NICE (Dinh et al., 2015) and RealNVP (Dinh et al., 2017).

Shared argument checks and base-distribution choice for every builder live here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .._compat import builder
from ..distributions import BaseDistribution, StandardNormal
from ..errors import ConfigError, DTypeError
from ..flow import Flow
from ..transforms import (
    ActNorm,
    Affine,
    BatchNormFlow,
    Compose,
    Coupling,
    Transform,
    alternating_mask,
)

__all__ = ["NICE", "RealNVP"]

NORMS = ("batchnorm", "actnorm")


def norm_from_flag(on: bool) -> str | None:
    """The ``norm`` choice that replaces the old ``batch_norm=on`` flag."""
    return "batchnorm" if on else None


def norm_layer(norm: str | None, shape) -> Transform | None:
    """The normalisation layer ``norm`` names, on events of ``shape`` (``None``: no layer).

    Every builder with a normalisation option spells it ``norm``: ``"batchnorm"``
    (:class:`~exactflow.transforms.BatchNormFlow`, running statistics: sample in eval mode),
    ``"actnorm"`` (:class:`~exactflow.transforms.ActNorm`, data-initialised affine) or ``None``.
    """
    if check_norm(norm) is None:
        return None
    return BatchNormFlow(shape) if norm == "batchnorm" else ActNorm(shape)


def check_norm(norm) -> str | None:
    """``norm`` if it is ``None`` or one of :data:`NORMS`, else a :class:`ConfigError`."""
    if norm is not None and norm not in NORMS:
        raise ConfigError(
            f"norm must be one of {', '.join(map(repr, NORMS))} or None, got {norm!r}"
        )
    return norm


def check_args(features, transforms, context) -> tuple[int, int, int]:
    """Validate the arguments every builder shares; returns them as ints."""
    for name, value, low in (("features", features, 1), ("transforms", transforms, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise DTypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    if isinstance(context, bool) or not isinstance(context, int):
        raise DTypeError(f"context must be an int (number of context features), got {context!r}")
    if context < 0:
        raise ConfigError(f"context must be >= 0, got {context}")
    return features, transforms, context


def standard_base(features: int) -> BaseDistribution:
    """The base of every builder: N(0, I) on ``(features,)``."""
    return StandardNormal((features,))


def coupling_mask(features: int, layer: int, context: int, flip: bool = True):
    """Alternating mask for coupling layer ``layer`` (flipped on odd layers when ``flip``).

    A single feature has nothing to condition on: allowed only with a context, where the
    layer becomes a context-conditioned elementwise map.
    """
    if features == 1:
        if context == 0:
            raise ConfigError(
                "a coupling flow needs features >= 2 (or a context to condition a 1-D flow on)"
            )
        return torch.zeros(1, dtype=torch.bool)
    return alternating_mask(features, flip=flip and layer % 2 == 1)


def _couplings(
    map: str,
    features: int,
    transforms: int,
    hidden,
    context: int,
    activation,
    map_kwargs: dict,
    norm: str | None,
) -> list[Transform]:
    check_norm(norm)
    layers: list[Transform] = []
    for i in range(transforms):
        mask = coupling_mask(features, i, context)
        layers.append(Coupling(map, mask, hidden, context, activation, map_kwargs=map_kwargs))
        if i < transforms - 1 and (layer := norm_layer(norm, features)) is not None:
            layers.append(layer)
    return layers


@builder()
def NICE(
    features: int,
    *,
    transforms: int = 4,
    hidden: Sequence[int] | int = (128, 128),
    context: int = 0,
    activation: str | Callable[[], nn.Module] = "relu",
) -> Flow:
    """NICE: additive couplings with alternating masks, then a learned diagonal scaling.

    ``z = S * g_T(... g_1(x))``, ``log|det| = sum log S`` (the couplings preserve volume).

    Args:
        features: D.
        transforms: number of additive coupling layers.
        hidden: conditioner hidden widths.
        context: context size (0 = unconditional).
        activation: conditioner activation.
    """
    features, transforms, context = check_args(features, transforms, context)
    layers = _couplings("additive", features, transforms, hidden, context, activation, {}, None)
    zeros = torch.zeros(features)
    layers.append(Affine(zeros, zeros + 1.0, learnable=True))
    return Flow(Compose(layers), standard_base(features))


@builder(batch_norm=("norm", norm_from_flag))
def RealNVP(
    features: int,
    *,
    transforms: int = 5,
    hidden: Sequence[int] | int = (128, 128),
    context: int = 0,
    activation: str | Callable[[], nn.Module] = "relu",
    log_scale_bound: float = 3.0,
    norm: str | None = None,
) -> Flow:
    """RealNVP: affine couplings ``z_b = x_b exp(s(x_a)) + t(x_a)`` with alternating masks.

    The log-scale is soft-clamped to ``(-log_scale_bound, log_scale_bound)``, so deep stacks
    cannot overflow.

    Args:
        features: D.
        transforms: number of coupling layers (masks alternate between layers).
        hidden: conditioner hidden widths.
        context: context size (0 = unconditional).
        activation: conditioner activation.
        log_scale_bound: bound of each layer's log-scale.
        norm: normalisation layer between couplings (see :func:`norm_layer`):
            ``"batchnorm"`` as in the paper (then sample in eval mode), ``"actnorm"`` or
            ``None``. Replaces ``batch_norm=True`` (deprecated).
    """
    features, transforms, context = check_args(features, transforms, context)
    layers = _couplings(
        "affine",
        features,
        transforms,
        hidden,
        context,
        activation,
        {"log_scale_bound": log_scale_bound},
        norm,
    )
    return Flow(Compose(layers), standard_base(features))
