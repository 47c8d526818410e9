"""Autoregressive-flow builders: MAF, IAF and the neural spline flow (NSF, NSFCoupling)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .._compat import builder
from ..errors import ArgumentError, ConfigError
from ..flow import Flow
from ..transforms import (
    Autoregressive,
    Compose,
    Coupling,
    Inverse,
    LULinear,
    Reverse,
    Transform,
)
from .coupling import (
    check_args,
    check_norm,
    coupling_mask,
    norm_from_flag,
    norm_layer,
    standard_base,
)

__all__ = ["IAF", "MAF", "NSF", "NSFCoupling"]


def _affine_stack(
    features, transforms, hidden, context, activation, log_scale_bound, norm, invert
) -> list[Transform]:
    check_norm(norm)
    layers: list[Transform] = []
    for i in range(transforms):
        layer: Transform = Autoregressive(
            "affine",
            features,
            hidden,
            context,
            activation=activation,
            map_kwargs={"log_scale_bound": log_scale_bound},
        )
        layers.append(Inverse(layer) if invert else layer)
        if i < transforms - 1:
            if (norm_l := norm_layer(norm, features)) is not None:
                layers.append(norm_l)
            # reverse the ordering between layers so every variable gets conditioned on all
            layers.append(Reverse(features))
    return layers


@builder(batch_norm=("norm", norm_from_flag))
def MAF(
    features: int,
    *,
    transforms: int = 5,
    hidden: Sequence[int] | int = (128, 128),
    context: int = 0,
    activation: str | Callable[[], nn.Module] = "relu",
    log_scale_bound: float = 3.0,
    norm: str | None = None,
) -> Flow:
    """Masked autoregressive flow (Papamakarios et al., 2017): affine MADE layers with
    reversed orderings in between. Density in one pass per layer; sampling in D passes.

    Args:
        features: D.
        transforms: number of autoregressive layers.
        hidden: MADE hidden widths.
        context: context size (0 = unconditional).
        activation: MADE activation.
        log_scale_bound: soft bound of the log-scales.
        norm: normalisation layer between layers, ``"batchnorm"``, ``"actnorm"`` or
            ``None`` (see :func:`~exactflow.models.coupling.norm_layer`). Replaces
            ``batch_norm=True`` (deprecated).
    """
    features, transforms, context = check_args(features, transforms, context)
    layers = _affine_stack(
        features, transforms, hidden, context, activation, log_scale_bound, norm, False
    )
    return Flow(Compose(layers), standard_base(features))


@builder()
def IAF(
    features: int,
    *,
    transforms: int = 5,
    hidden: Sequence[int] | int = (128, 128),
    context: int = 0,
    activation: str | Callable[[], nn.Module] = "relu",
    log_scale_bound: float = 3.0,
) -> Flow:
    """Inverse autoregressive flow (Kingma et al., 2016): each layer is
    ``Inverse(Autoregressive("affine", ...))``, so sampling (and ``sample_and_log_prob``)
    takes one MADE pass per layer, while ``log_prob`` of external data takes D passes.

    Arguments as in :func:`MAF` (no ``norm``).
    """
    features, transforms, context = check_args(features, transforms, context)
    layers = _affine_stack(
        features, transforms, hidden, context, activation, log_scale_bound, None, True
    )
    return Flow(Compose(layers), standard_base(features))


_NSF_RENAMES = {"spline": "map"}


@builder(**_NSF_RENAMES)
def NSF(
    features: int,
    *,
    transforms: int = 5,
    hidden: Sequence[int] | int = (128, 128),
    context: int = 0,
    map: str = "rq-spline",
    map_kwargs: dict | None = None,
    bins: int = 8,
    bound: float = 5.0,
    autoregressive: bool = True,
    activation: str | Callable[[], nn.Module] = "relu",
    permutation: str = "auto",
) -> Flow:
    """Neural spline flow (Durkan et al., 2019): rational-quadratic spline layers on
    ``[-bound, bound]`` (identity tails), each preceded by an LU-parameterised linear map
    that starts as a permutation of the features.

    Args:
        features: D.
        transforms: number of spline layers.
        hidden: conditioner hidden widths.
        context: context size (0 = unconditional).
        map: registered spline map name (``"rq-spline"`` or ``"cubic-spline"``); replaces
            ``spline=`` (deprecated).
        map_kwargs: extra spline arguments, e.g. ``{"derivatives": "free"}`` for the
            paper's knot derivatives instead of the bounded default (docs: spline flows).
        bins: spline bins K.
        bound: half-width B of the spline box.
        autoregressive: MADE conditioner (RQ-NSF (AR)); ``False`` gives the coupling
            variant (RQ-NSF (C)).
        activation: conditioner activation.
        permutation: what each LU map starts as: ``"random"`` (a new permutation per layer
            from the global torch RNG, so seed it), ``"reverse"``, or ``"auto"`` (reverse for
            D <= 2, where it already alternates the only two orders; random above: the reversal
            gives only two autoregressive orders, and random measured better on digits,
            benchmarks/README.md "Quality (digits)").
    """
    from ..transforms import splines  # noqa: F401  (registers the spline maps by name)

    features, transforms, context = check_args(features, transforms, context)
    if permutation not in ("auto", "random", "reverse"):
        raise ConfigError(f"permutation must be 'auto', 'random' or 'reverse', got {permutation!r}")
    if permutation == "auto":
        permutation = "reverse" if features <= 2 else "random"
    if map_kwargs is not None and not isinstance(map_kwargs, dict):
        raise ConfigError(f"map_kwargs must be a dict, got {type(map_kwargs).__name__}")
    map_kwargs = {"bins": bins, "bound": bound, **(map_kwargs or {})}
    reverse = torch.arange(features - 1, -1, -1)
    layers: list[Transform] = []
    for i in range(transforms):
        if features > 1:
            perm = torch.randperm(features) if permutation == "random" else reverse
            layers.append(LULinear(features, permutation=perm))
        if autoregressive:
            layers.append(
                Autoregressive(
                    map, features, hidden, context, activation=activation, map_kwargs=map_kwargs
                )
            )
        else:
            # the LU map already permutes the features, so the mask stays fixed
            mask = coupling_mask(features, i, context, flip=False)
            layers.append(Coupling(map, mask, hidden, context, activation, map_kwargs=map_kwargs))
    return Flow(Compose(layers), standard_base(features))


def NSFCoupling(features: int, **kwargs) -> Flow:
    """:func:`NSF` with coupling layers (``autoregressive=False``); same other arguments."""
    if "autoregressive" in kwargs:
        raise ArgumentError("NSFCoupling fixes autoregressive=False; use NSF to choose")
    return NSF(features, autoregressive=False, **kwargs)


# NSF's keywords, less the one NSFCoupling fixes, so signature-driven option checks see them
NSFCoupling.__signature__ = inspect.signature(NSF).replace(  # type: ignore[attr-defined]
    parameters=[p for n, p in inspect.signature(NSF).parameters.items() if n != "autoregressive"]
)
NSFCoupling = builder(**_NSF_RENAMES)(NSFCoupling)
