"""Invertible transforms. Direction: ``forward`` = data -> noise (see :mod:`.base`)."""

from .base import Compose, Inverse, Transform, sum_rightmost
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
from .linear import Linear, LULinear, Permutation, RandomPermutation, Reverse
from .planar import Planar, Radial

__all__ = [
    "MAPS",
    "AdditiveMap",
    "Affine",
    "AffineMap",
    "Compose",
    "ElementwiseMap",
    "ElementwiseTransform",
    "Inverse",
    "LULinear",
    "Linear",
    "Logit",
    "Permutation",
    "Planar",
    "Radial",
    "RandomPermutation",
    "Reverse",
    "Sigmoid",
    "Tanh",
    "Transform",
    "register_map",
    "resolve_map",
    "soft_clamp",
    "sum_rightmost",
]
