"""Input checks shared by the SBI tasks and metrics (named errors, expected vs received)."""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from ..errors import DomainError, DTypeError, ShapeError


def as_rows(t: Tensor, dim: int, name: str, finite: bool = True) -> tuple[Tensor, bool]:
    """``t`` as ``(n, dim)`` rows, and whether it was a single ``(dim,)`` vector.

    Raises DTypeError for a non-tensor or non-float tensor, ShapeError for any other shape and
    DomainError for NaN/inf entries (when ``finite``).
    """
    if not isinstance(t, Tensor):
        raise DTypeError(
            f"{name} must be a torch.Tensor of shape (n, {dim}), got {type(t).__name__}"
        )
    if not t.is_floating_point():
        raise DTypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() == 1 and t.shape[0] == dim:
        single, rows = True, t.unsqueeze(0)
    elif t.dim() == 2 and t.shape[1] == dim:
        single, rows = False, t
    else:
        raise ShapeError(f"{name} must have shape (n, {dim}) or ({dim},), got {tuple(t.shape)}")
    if finite and not torch.isfinite(rows).all():
        raise DomainError(f"{name} contains non-finite value(s) (NaN or inf)")
    return rows, single


def positive_int(n, name: str) -> int:
    """``n`` as a positive ``int`` (DomainError otherwise)."""
    try:
        value = operator.index(n)
    except TypeError:
        value = None
    if isinstance(n, bool) or value is None or value < 1:
        raise DomainError(f"{name} must be a positive integer, got {n!r}")
    return value
