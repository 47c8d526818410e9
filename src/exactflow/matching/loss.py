"""Train-side flow matching: a small fitting loop and the reflow step of rectified flow.

The CLI trains a :class:`~exactflow.matching.MatchingFlow` through the generic
:class:`~exactflow.train.Trainer` (which calls the model's ``training_loss``); :func:`fit`
is the minimal loop for scripts, tests and reflow, where the coupling is a fixed set of
``(data, noise)`` pairs.

Reflow (Liu et al. 2023): solve the learnt ODE from fresh noise ``z`` to ``x = Φ⁻¹(z)`` and
refit the velocity on the straight paths between the pairs ``(x, z)``. The new coupling is
deterministic, so the paths of the refitted flow cross less and are straighter: few-step
(even one-step Euler) sampling gets closer to the model's distribution.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import ConfigError, DTypeError, ShapeError
from .flow import MatchingFlow
from .paths import LinearPath

__all__ = ["FitResult", "fit", "reflow", "reflow_coupling"]


@dataclass
class FitResult:
    """What :func:`fit` did: per-step losses and the wall time in seconds."""

    losses: list[float] = field(default_factory=list)
    wall_time: float = 0.0


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name} must be a positive int, got {v!r}")
    return v


def fit(
    flow: MatchingFlow,
    data: Tensor,
    *,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 2e-3,
    context: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> FitResult:
    """Minimise ``flow.training_loss`` with Adam and a cosine learning-rate decay.

    Args:
        flow: the model (trained in place; left in eval mode).
        data: ``(N, D)`` training rows in data units.
        steps, batch_size, lr: optimisation budget; batches are drawn in shuffled epochs.
        context: ``(N, C)`` rows of context for a conditional model.
        noise: ``(N, D)`` fixed noise partners of ``data`` (a reflow coupling); default: fresh
            noise each batch, paired by the model's pairing.
        generator: batches, times and noise; default a generator seeded with 0.

    Returns:
        A :class:`FitResult`.
    """
    if not isinstance(flow, MatchingFlow):
        raise DTypeError(f"fit needs a MatchingFlow, got {type(flow).__name__}")
    steps, batch_size = _positive_int("steps", steps), _positive_int("batch_size", batch_size)
    if not isinstance(data, Tensor) or data.dim() != 2 or data.shape[0] < 1:
        raise ShapeError(f"data must be a non-empty (N, D) tensor, got {data!r:.60}")
    for name, other in (("context", context), ("noise", noise)):
        if other is not None and (
            not isinstance(other, Tensor) or other.shape[:1] != data.shape[:1]
        ):
            raise ShapeError(
                f"{name} must have one row per data row ({data.shape[0]}), got "
                f"{tuple(getattr(other, 'shape', ()))}"
            )
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    params = [p for p in flow.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.01)
    n, b = data.shape[0], min(batch_size, data.shape[0])
    perm, pos = torch.randperm(n, generator=g), 0
    result = FitResult()
    start = time.perf_counter()
    flow.train()
    try:
        for _ in range(steps):
            if pos + b > n:
                perm, pos = torch.randperm(n, generator=g), 0
            idx = perm[pos : pos + b]
            pos += b
            loss = flow.training_loss(
                data[idx].to(flow.device, flow.dtype),
                None if context is None else context[idx].to(flow.device, flow.dtype),
                g,
                None if noise is None else noise[idx].to(flow.device, flow.dtype),
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            result.losses.append(float(loss.detach()))
    finally:
        flow.eval()
        result.wall_time = time.perf_counter() - start
    return result


@torch.no_grad()
def reflow_coupling(
    flow: MatchingFlow,
    n: int,
    *,
    context: Tensor | None = None,
    generator: torch.Generator | None = None,
    solver: str = "dopri5",
    steps: int | None = None,
    batch_size: int = 4096,
) -> tuple[Tensor, Tensor]:
    """``n`` pairs ``(x, z)`` with ``z`` fresh noise and ``x`` the flow's sample from it.

    Args:
        flow: the trained model.
        n: number of pairs.
        context: ``(n, C)`` one context row per pair, for a conditional model.
        generator: draws the noise.
        solver, steps: how the ODE is solved back to the data (accurately, by default).
        batch_size: rows per solve.

    Returns:
        ``(x, z)``: samples in data units ``(n, D)`` and their noise ``(n, D)`` (the noise is
        in model space, the input of the CNF; pass both to :func:`fit` as ``data``/``noise``).
    """
    n = _positive_int("n", n)
    if context is not None and context.shape[:1] != (n,):
        raise ShapeError(f"context must have {n} rows, got {tuple(context.shape)}")
    was_training = flow.training
    flow.eval()
    xs, zs = [], []
    like = torch.zeros(n, *flow.event_shape, dtype=flow.dtype, device=flow.device)
    z_all = flow._noise(like, generator)
    try:
        with flow.integration(solver=solver, steps=steps):
            for i in range(0, n, batch_size):
                z = z_all[i : i + batch_size]
                c = None if context is None else context[i : i + batch_size]
                x, _ = flow.transform.inverse(z, c)
                xs.append(x)
                zs.append(z)
    finally:
        flow.train(was_training)
    return torch.cat(xs), torch.cat(zs)


def reflow(
    flow: MatchingFlow,
    n: int,
    *,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-3,
    context: Tensor | None = None,
    generator: torch.Generator | None = None,
    solver: str = "dopri5",
) -> FitResult:
    """One reflow: draw ``n`` coupled pairs (:func:`reflow_coupling`) and refit on them.

    Fine-tunes ``flow`` in place on the straight-line path between each sample and its own
    noise (independent of the model's path and pairing, which it keeps for later training).
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    x, z = reflow_coupling(flow, n, context=context, generator=g, solver=solver)
    path = flow.path
    flow.path = LinearPath(0.0)
    try:
        return fit(
            flow,
            x,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            context=context,
            noise=z,
            generator=g,
        )
    finally:
        flow.path = path
