"""Reporting in the original data space: bits per dimension.

The bijections that pre-process data (dequantisation, logit, whitening) are transforms and live
in :mod:`exactflow.transforms.preprocessing`; they are re-exported here for data code.
"""

from __future__ import annotations

import math

from torch import Tensor

from ..errors import ConfigError
from ..transforms.preprocessing import LogitPreprocess, UniformDequantization, Whiten, dequantize

__all__ = [
    "LogitPreprocess",
    "UniformDequantization",
    "Whiten",
    "bits_per_dim",
    "dequantize",
]


def bits_per_dim(nll_nats: float | Tensor, dims: int) -> float | Tensor:
    """Convert an NLL in nats per data point to bits per dimension: ``nll / (dims ln 2)``."""
    if dims < 1:
        raise ConfigError(f"dims must be positive, got {dims}")
    return nll_nats / (dims * math.log(2.0))
