"""Shuffled train/validation/test splits of a sample tensor."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError

__all__ = ["DIGITS_SPLIT", "TABLE_SPLIT", "Splits", "split", "split_pairs"]

TABLE_SPLIT = (0.15, 0.2)
"""Default ``(val, test)`` fractions of the continuous tables and user files."""

DIGITS_SPLIT = (0.1, 0.2)
"""Default ``(val, test)`` fractions of scikit-learn's digits in both of its views, the 64-D
table ``digits`` and the 1x8x8 ``digits_image``: 1258/180/359 rows each, the same rows for the
same seed (the split ``exactflow train --data digits`` has always used)."""


class Splits(NamedTuple):
    """Three disjoint parts of one data set, each ``(n_part, *event_shape)``."""

    train: Tensor
    val: Tensor
    test: Tensor


def split(
    data: Tensor,
    val: float = 0.1,
    test: float = 0.1,
    generator: torch.Generator | None = None,
) -> Splits:
    """Shuffle the rows of ``data`` and cut them into train / val / test parts.

    Args:
        data: ``(N, *event_shape)`` samples.
        val, test: fractions of ``N`` in the validation and test parts (each in ``[0, 1)``,
            sum below 1); every non-zero fraction gets at least one row.
        generator: seeds the shuffle.

    Returns:
        :class:`Splits` ``(train, val, test)``; train gets the remaining rows.
    """
    if not isinstance(data, Tensor) or data.dim() < 1:
        raise ShapeError(f"data must be a tensor of shape (N, ...), got {type(data).__name__}")
    for name, f in (("val", val), ("test", test)):
        if not 0.0 <= float(f) < 1.0:
            raise ConfigError(f"{name} fraction must be in [0, 1), got {f}")
    if val + test >= 1.0:
        raise ConfigError(f"val + test fractions must be below 1, got {val} + {test}")
    n = data.shape[0]
    n_val = max(1, round(n * val)) if val > 0 else 0
    n_test = max(1, round(n * test)) if test > 0 else 0
    if n - n_val - n_test < 1:
        raise ShapeError(
            f"cannot split {n} rows into train/val/test with fractions {val}/{test}: "
            "no training rows left"
        )
    perm = torch.randperm(n, generator=generator).to(data.device)
    shuffled = data[perm]
    n_train = n - n_val - n_test
    return Splits(
        shuffled[:n_train],
        shuffled[n_train : n_train + n_val],
        shuffled[n_train + n_val :],
    )


def split_pairs(
    data: Tensor,
    context: Tensor,
    val: float = 0.1,
    test: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Splits, Splits]:
    """:func:`split` of ``data`` and the same rows of ``context`` (``(N, C)``, row ``i`` the
    context of ``data[i]``): one shuffle, so the data's parts are exactly those of
    ``split(data, val, test, generator)`` for the same generator state."""
    if not isinstance(context, Tensor) or context.shape[:1] != data.shape[:1]:
        got = tuple(getattr(context, "shape", ()))
        raise ShapeError(f"context must have one row per data row ({data.shape[0]}), got {got}")
    rows = split(torch.arange(data.shape[0]), val, test, generator)
    return Splits(*(data[i] for i in rows)), Splits(*(context[i] for i in rows))
