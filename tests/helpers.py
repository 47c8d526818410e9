"""Helpers shared by the test modules (importable as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

import torch


def perturb(
    module: torch.nn.Module,
    scale: float = 0.3,
    seed: int = 0,
    *,
    draw_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Add ``scale * N(0, 1)`` noise to every parameter of ``module`` in place and return it.

    Identity- or zero-initialised layers (couplings, ActNorm, LU-linear, CNF dynamics) are
    then tested away from the identity, where a wrong log-det or inverse shows. The noise comes
    from ``torch.Generator().manual_seed(seed)``, one draw per parameter in
    ``module.parameters()`` order, in ``draw_dtype`` (default: the parameter's dtype) cast to
    the parameter's dtype, so a test is reproducible without touching the global RNG.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=draw_dtype or p.dtype)
            p.add_(scale * noise.to(p.dtype))
    return module


def interrupt_at(trainer, call: int) -> None:
    """Make ``trainer.train_step`` raise ``KeyboardInterrupt`` on its ``call``-th call (1-based),
    as a kill between checkpoints would; earlier calls train normally."""
    real, calls = trainer.train_step, [0]

    def crashing(x, context=None):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return real(x, context)

    trainer.train_step = crashing
