"""Invertible transforms. Direction: ``forward`` = data -> noise (see :mod:`.base`)."""

from .autoregressive import Autoregressive
from .base import Compose, Inverse, Transform, sum_rightmost
from .coupling import Coupling, alternating_mask, channel_mask, checkerboard_mask, half_mask
from .elementwise import (
    MAPS,
    AdditiveMap,
    Affine,
    AffineMap,
    ElementwiseMap,
    ElementwiseTransform,
    Logit,
    Sigmoid,
    Tanh,
    register_map,
    resolve_map,
    soft_clamp,
)
from .image import ConvCoupling, FactorOut, InvConv1x1, LearnedPrior, Squeeze, Unsqueeze
from .linear import Linear, LULinear, Permutation, RandomPermutation, Reverse
from .normalization import ActNorm, BatchNormFlow
from .planar import Planar, Radial
from .splines import CubicSpline, RationalQuadraticSpline

__all__ = [
    "MAPS",
    "ActNorm",
    "AdditiveMap",
    "Affine",
    "AffineMap",
    "Autoregressive",
    "BatchNormFlow",
    "Compose",
    "ConvCoupling",
    "Coupling",
    "CubicSpline",
    "ElementwiseMap",
    "ElementwiseTransform",
    "FactorOut",
    "InvConv1x1",
    "Inverse",
    "LULinear",
    "LearnedPrior",
    "Linear",
    "Logit",
    "Permutation",
    "Planar",
    "Radial",
    "RandomPermutation",
    "RationalQuadraticSpline",
    "Reverse",
    "Sigmoid",
    "Squeeze",
    "Tanh",
    "Transform",
    "Unsqueeze",
    "alternating_mask",
    "channel_mask",
    "checkerboard_mask",
    "half_mask",
    "register_map",
    "resolve_map",
    "soft_clamp",
    "sum_rightmost",
]
