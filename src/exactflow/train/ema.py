"""Exponential moving average of a module's parameters (evaluation weights)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError

__all__ = ["EMA"]


class EMA:
    """Shadow copy ``theta_ema <- d theta_ema + (1 - d) theta`` of a module's parameters.

    The effective decay ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates lets the
    average follow the fast early changes instead of remembering the initialisation.
    Buffers are not averaged; the module's own buffers are used.

    Args:
        module: the module whose floating-point parameters are tracked.
        decay: the long-run decay in ``[0, 1)``.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = module
        self.decay = float(decay)
        self.updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().clone() for name, p in module.named_parameters()
        }

    @torch.no_grad()
    def update(self) -> None:
        """Move the shadow towards the current parameters."""
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        names = list(self.shadow)
        params = dict(self.module.named_parameters())
        # one multi-tensor pass: shadow += (1 - d) (p - shadow)
        torch._foreach_lerp_(
            [self.shadow[n] for n in names], [params[n].detach() for n in names], 1.0 - d
        )

    @contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into the module."""
        params = dict(self.module.named_parameters())
        backup = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])

    def state_tensors(self) -> dict[str, Tensor]:
        """The averaged parameters by name, for a checkpoint."""
        return dict(self.shadow)

    def load_tensors(self, tensors: dict[str, Tensor], updates: int) -> None:
        """Restore the averages saved by :meth:`state_tensors` and the update count."""
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise DataError(f"EMA state lacks {sorted(missing)[:3]}")
        for name in self.shadow:
            self.shadow[name] = tensors[name].to(self.shadow[name]).clone()
        self.updates = int(updates)
