"""Planar and radial flow builders (Rezende & Mohamed, 2015).

The builders are :func:`PlanarFlow` and :func:`RadialFlow`; the single layers are
:class:`exactflow.transforms.Planar` and :class:`exactflow.transforms.Radial`.
"""

from __future__ import annotations

from .._compat import builder
from ..distributions import BaseDistribution, ConditionalGaussian
from ..flow import Flow
from ..transforms import Compose, Inverse, Planar, Radial, Transform
from .coupling import check_args, standard_base

__all__ = ["PlanarFlow", "RadialFlow"]


def _stack(layer_cls, features, transforms, context, for_sampling) -> Flow:
    features, transforms, context = check_args(features, transforms, context)
    layers: list[Transform] = []
    for _ in range(transforms):
        layer = layer_cls(features)
        layers.append(Inverse(layer) if for_sampling else layer)
    # planar/radial layers take no context; a conditional model gets a context-dependent base
    base: BaseDistribution = (
        ConditionalGaussian(features, context) if context else standard_base(features)
    )
    return Flow(Compose(layers), base)


@builder()
def PlanarFlow(
    features: int, *, transforms: int = 8, context: int = 0, for_sampling: bool = False
) -> Flow:
    """A stack of planar layers ``y = x + u tanh(w.x + b)`` on N(0, I).

    Args:
        features: D.
        transforms: number of layers K.
        context: context size; a conditional model uses a
            :class:`~exactflow.distributions.ConditionalGaussian` base (the layers are
            unconditional).
        for_sampling: wrap each layer in ``Inverse`` so the closed-form direction is
            noise -> data (sampling and ``sample_and_log_prob`` for variational inference);
            ``log_prob`` of data then inverts numerically.
    """
    return _stack(Planar, features, transforms, context, for_sampling)


@builder()
def RadialFlow(
    features: int, *, transforms: int = 8, context: int = 0, for_sampling: bool = False
) -> Flow:
    """A stack of radial layers ``y = x + beta (x - x0) / (alpha + |x - x0|)`` on N(0, I).

    Arguments as in :func:`PlanarFlow`.
    """
    return _stack(Radial, features, transforms, context, for_sampling)
