"""Learning-rate schedule: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(
    step: int, total: int, base_lr: float, warmup: int = 0, final_ratio: float = 0.0
) -> float:
    """Learning rate at optimisation step ``step`` (0-based) of ``total``.

    ``lr = base_lr * (step + 1) / warmup`` during warm-up, then
    ``lr = base_lr * (r + (1 - r) (1 + cos(pi t)) / 2)`` with ``t`` going from 0 to 1 over
    the remaining steps and ``r = final_ratio``. A pure function of the step, so resuming
    needs no scheduler state beyond the step counter.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return base_lr * (final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)))
