"""Variational inference with a flow: fit q to an unnormalised density by reverse KL.

For a target ``p(z) = p~(z) / Z`` known up to ``Z``, minimising
``KL(q || p) = E_q[log q(z) - log p~(z)] + log Z`` over the flow's parameters maximises the
evidence lower bound ``ELBO = E_q[log p~(z) - log q(z)] <= log Z``. The expectation uses
reparameterised samples from :meth:`exactflow.Flow.sample_and_log_prob`, so the flow must be
cheap in its sampling direction (``PlanarFlow(..., for_sampling=True)``, ``RadialFlow(...,
for_sampling=True)``, ``IAF``, or a 2-D ``NSF``/``MAF`` whose inversion takes D passes).

    flow = learnable_base(exactflow.models.PlanarFlow(2, transforms=32, for_sampling=True))
    result = fit_vi(flow, "U1", steps=3000, lr=5e-3, warmup=100, anneal=1000)
    result.elbo, result.log_z, result.log_z_se       # ELBO <= log Z, IS estimate of log Z
    log_z_grid(TARGETS["U1"])                         # reference by quadrature (2-D)

The importance-sampling estimate ``log Z ~ log mean_i p~(z_i) / q(z_i)`` (``z_i ~ q``) is
consistent; its standard error is from the delta method, ``se = std(w / mean w) / sqrt(n)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .distributions import DiagGaussian
from .errors import ConfigError, DTypeError, ShapeError
from .flow import Flow

__all__ = [
    "TARGETS",
    "VIResult",
    "energy_u1",
    "energy_u2",
    "energy_u3",
    "energy_u4",
    "evaluate_vi",
    "fit_vi",
    "learnable_base",
    "log_z_grid",
    "plot_vi",
]

LogDensity = Callable[[Tensor], Tensor]


# -- Rezende & Mohamed (2015), Table 1 ----------------------------------------------------------
def _w1(z: Tensor) -> Tensor:
    return torch.sin(2.0 * math.pi * z[..., 0] / 4.0)


def _w2(z: Tensor) -> Tensor:
    return 3.0 * torch.exp(-0.5 * ((z[..., 0] - 1.0) / 0.6) ** 2)


def _w3(z: Tensor) -> Tensor:
    return 3.0 * torch.sigmoid((z[..., 0] - 1.0) / 0.3)


def _envelope(z: Tensor) -> Tensor:
    # U2-U4 do not decay along z1, so exp(-U) has no finite Z; a flat-topped wall
    # (z1 / 4)^8 / 2 (< 0.05 for |z1| < 3, 0.5 at |z1| = 4) confines them to the paper's window
    return 0.5 * (z[..., 0] / 4.0) ** 8


def _check_2d(z: Tensor) -> None:
    if z.shape[-1] != 2:
        raise ShapeError(
            f"the Rezende-Mohamed energies take z of shape (*batch, 2), got {tuple(z.shape)}"
        )


def energy_u1(z: Tensor) -> Tensor:
    """``U1 = ((|z| - 2) / 0.4)^2 / 2 - log(e^{-((z1-2)/0.6)^2/2} + e^{-((z1+2)/0.6)^2/2})``:
    a ring of radius 2 with two lobes on the z1 axis. ``z (*, 2) -> (*,)``."""
    _check_2d(z)
    ring = 0.5 * ((z.norm(dim=-1) - 2.0) / 0.4) ** 2
    a = -0.5 * ((z[..., 0] - 2.0) / 0.6) ** 2
    b = -0.5 * ((z[..., 0] + 2.0) / 0.6) ** 2
    return ring - torch.logaddexp(a, b)


def energy_u2(z: Tensor) -> Tensor:
    """``U2 = ((z2 - w1(z)) / 0.4)^2 / 2``, ``w1 = sin(2 pi z1 / 4)``: a sine ridge
    (plus the z1 envelope ``(z1/4)^8 / 2`` that makes it normalisable)."""
    _check_2d(z)
    return 0.5 * ((z[..., 1] - _w1(z)) / 0.4) ** 2 + _envelope(z)


def energy_u3(z: Tensor) -> Tensor:
    """``U3 = -log(e^{-((z2-w1)/0.35)^2/2} + e^{-((z2-w1+w2)/0.35)^2/2})``,
    ``w2 = 3 exp(-((z1-1)/0.6)^2/2)``: two ridges that split apart (plus the envelope)."""
    _check_2d(z)
    d = z[..., 1] - _w1(z)
    a = -0.5 * (d / 0.35) ** 2
    b = -0.5 * ((d + _w2(z)) / 0.35) ** 2
    return -torch.logaddexp(a, b) + _envelope(z)


def energy_u4(z: Tensor) -> Tensor:
    """``U4 = -log(e^{-((z2-w1)/0.4)^2/2} + e^{-((z2-w1+w3)/0.35)^2/2})``,
    ``w3 = 3 sigmoid((z1-1)/0.3)``: a ridge and a shifted copy (plus the envelope)."""
    _check_2d(z)
    d = z[..., 1] - _w1(z)
    a = -0.5 * (d / 0.4) ** 2
    b = -0.5 * ((d + _w3(z)) / 0.35) ** 2
    return -torch.logaddexp(a, b) + _envelope(z)


def _negate(energy: Callable[[Tensor], Tensor]) -> LogDensity:
    def log_density(z: Tensor) -> Tensor:
        return -energy(z)

    log_density.__name__ = f"minus_{energy.__name__}"
    log_density.__doc__ = f"``-{energy.__name__}(z)``, the unnormalised log-density."
    return log_density


#: unnormalised 2-D log-densities ``log p~(z) = -U(z)`` by name
TARGETS: dict[str, LogDensity] = {
    "U1": _negate(energy_u1),
    "U2": _negate(energy_u2),
    "U3": _negate(energy_u3),
    "U4": _negate(energy_u4),
}


def _resolve(target: str | LogDensity) -> LogDensity:
    if isinstance(target, str):
        if target not in TARGETS:
            raise ConfigError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
        return TARGETS[target]
    if not callable(target):
        raise DTypeError(f"target must be a name or a callable z -> log p~(z), got {target!r}")
    return target


def learnable_base(flow: Flow) -> Flow:
    """The same transform on a :class:`~exactflow.distributions.DiagGaussian` base with
    learnable mean and per-dimension scale, starting at ``N(0, I)``.

    In VI the base's location and width are the cheapest thing for q to adjust (a target far
    wider than N(0, I) would otherwise have to be stretched by every layer).
    ``flow`` must be unconditional with a vector event shape; its transform is shared.
    """
    if not isinstance(flow, Flow):
        raise DTypeError(f"flow must be an exactflow Flow, got {type(flow).__name__}")
    if flow.context_features:
        raise ConfigError(
            f"learnable_base takes an unconditional flow, got context_features="
            f"{flow.context_features}"
        )
    base = DiagGaussian(flow.event_shape).to(dtype=flow.dtype, device=flow.device)
    return Flow(flow.transform, base, validate=flow.validate)


# -- quadrature reference -----------------------------------------------------------------------
@torch.no_grad()
def log_z_grid(target: str | LogDensity, lim: float = 8.0, n: int = 1201) -> float:
    """``log Z = log int exp(log p~(z)) dz`` over ``[-lim, lim]^2`` by the midpoint rule.

    Args:
        target: a 2-D log-density (or a :data:`TARGETS` name); mass outside the box is lost.
        lim: half-width of the box.
        n: cells per axis (the spacing ``2 lim / n`` should resolve the target's widths).
    """
    fn = _resolve(target)
    h = 2.0 * lim / n
    t = torch.linspace(-lim + h / 2, lim - h / 2, n, dtype=torch.float64)
    rows = []
    for i in range(n):
        z = torch.stack([t[i].expand(n), t], -1)
        rows.append(torch.logsumexp(fn(z).double(), 0))
    return float(torch.logsumexp(torch.stack(rows), 0)) + 2.0 * math.log(h)


# -- fitting -----------------------------------------------------------------------------------
@dataclass
class VIResult:
    """Outcome of :func:`fit_vi` (nats).

    Attributes:
        elbo, elbo_se: Monte Carlo ELBO ``E_q[log p~ - log q]`` and its standard error.
        log_z, log_z_se: importance-sampling estimate of ``log Z`` and its standard error.
        ess: effective sample size fraction ``1 / (n mean(w_norm^2))`` of the weights.
        n_samples: samples behind the estimates.
        steps, wall_time: optimisation steps taken and seconds spent.
        losses: per-step loss (negative annealed ELBO).
    """

    elbo: float
    elbo_se: float
    log_z: float
    log_z_se: float
    ess: float
    n_samples: int
    steps: int = 0
    wall_time: float = 0.0
    losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The summary numbers as a dict (the per-step ``losses`` left out)."""
        return {k: v for k, v in self.__dict__.items() if k != "losses"}


def _log_weights(flow: Flow, fn: LogDensity, n: int, generator, context) -> Tensor:
    z, log_q = flow.sample_and_log_prob(n, context=context, generator=generator)
    return (fn(z) - log_q).double()


@torch.no_grad()
def evaluate_vi(
    flow: Flow,
    target: str | LogDensity,
    n: int = 100_000,
    batch_size: int = 10_000,
    generator: torch.Generator | None = None,
    context: Tensor | None = None,
) -> VIResult:
    """ELBO and importance-sampled ``log Z`` (with standard errors) from ``n`` samples of q."""
    fn = _resolve(target)
    if n < 2:
        raise ConfigError(f"n must be >= 2 samples, got {n}")
    was_training = flow.training
    flow.eval()
    try:
        parts = [
            _log_weights(flow, fn, min(batch_size, n - i), generator, context)
            for i in range(0, n, batch_size)
        ]
    finally:
        flow.train(was_training)
    lw = torch.cat(parts).reshape(-1)
    finite = torch.isfinite(lw)
    # a weight of 0 (log -inf) is fine for log Z; the ELBO is then -inf, reported as NaN
    m = lw.numel()
    elbo = float(lw.mean()) if bool(finite.all()) else float("nan")
    elbo_se = float(lw.std() / math.sqrt(m)) if bool(finite.all()) else float("nan")
    log_z = float(torch.logsumexp(lw, 0) - math.log(m))
    ratio = torch.exp(lw - torch.logsumexp(lw, 0)) * m  # w / mean(w)
    log_z_se = float(ratio.std() / math.sqrt(m))
    ess = float(1.0 / (ratio.square().mean()))
    return VIResult(elbo, elbo_se, log_z, log_z_se, ess, m)


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from 1 down to 0.01."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - 1 - warmup)
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * frac))


def fit_vi(
    flow: Flow,
    target: str | LogDensity,
    steps: int = 5000,
    batch_size: int = 256,
    lr: float = 3e-3,
    warmup: int = 0,
    anneal: int = 0,
    clip_norm: float = 10.0,
    eval_samples: int = 100_000,
    seed: int = 0,
    context: Tensor | None = None,
    log_every: int = 0,
) -> VIResult:
    """Fit ``flow`` (in place) to ``target`` by minimising ``E_q[log q - beta log p~]``.

    Args:
        flow: the variational family q (must sample with reparameterisation).
        target: ``z -> log p~(z)`` (batch-shaped output) or a :data:`TARGETS` name.
        steps: Adam steps.
        batch_size: samples per step.
        lr: peak learning rate: reached linearly over ``warmup`` steps, then cosine-decayed
            to ``lr / 100`` at the last step.
        warmup: learning-rate warm-up steps (0 = none).
        anneal: steps over which the inverse temperature ``beta`` rises linearly from 0.01
            to 1 (Rezende & Mohamed's annealing, helps cover several modes); 0 = off.
        clip_norm: gradient-norm clip (0 = none).
        eval_samples: samples for the final ELBO / ``log Z`` estimates.
        seed: seeds the sampling noise.
        context: fixed context of a conditional flow.
        log_every: print the loss every this many steps (0 = silent).

    Returns:
        a :class:`VIResult`; non-finite steps are skipped (counted as NaN losses).
    """
    fn = _resolve(target)
    if not isinstance(flow, Flow):
        raise DTypeError(f"flow must be an exactflow Flow, got {type(flow).__name__}")
    for name, value, least in (
        ("steps", steps, 1),
        ("batch_size", batch_size, 1),
        ("eval_samples", eval_samples, 2),
        ("warmup", warmup, 0),
        ("anneal", anneal, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} must be an int >= {least}, got {value!r}")
    if warmup >= steps:
        raise ConfigError(f"warmup must be shorter than steps, got warmup={warmup}, steps={steps}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    g = torch.Generator(device=flow.device).manual_seed(int(seed))
    params = [p for p in flow.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    t0 = time.perf_counter()
    losses: list[float] = []
    flow.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step, steps, warmup)
        beta = min(1.0, 0.01 + step / anneal) if anneal > 0 else 1.0
        z, log_q = flow.sample_and_log_prob(batch_size, context=context, generator=g)
        loss = (log_q - beta * fn(z)).mean()
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            losses.append(float("nan"))
            continue
        loss.backward()
        if clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
            if not torch.isfinite(norm):
                losses.append(float("nan"))
                continue
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}: loss {losses[-1]:.4f} (beta {beta:.3f})", flush=True)
    wall = time.perf_counter() - t0
    res = evaluate_vi(flow, fn, eval_samples, generator=g, context=context)
    res.steps, res.wall_time, res.losses = steps, wall, losses
    return res


# -- figures ------------------------------------------------------------------------------------
@torch.no_grad()
def plot_vi(
    flows: dict[str, Flow],
    target: str | LogDensity,
    path: str | Path,
    lim: float = 4.0,
    n: int = 200,
    title: str = "",
) -> None:
    """Heat maps of ``exp(log p~)`` next to each ``q(z)`` on ``[-lim, lim]^2``."""
    from .plotting import new_figure as _figure
    from .plotting import save_figure as _save

    fn = _resolve(target)
    t = torch.linspace(-lim, lim, n)
    zz = torch.stack(torch.meshgrid(t, t, indexing="xy"), -1).reshape(-1, 2)
    panels = [("exp(-U)" if isinstance(target, str) else "target", fn(zz))]
    for name, flow in flows.items():
        was = flow.training
        flow.eval()
        try:
            lq = torch.cat(
                [
                    flow.log_prob(zz[i : i + 8192].to(flow.dtype))
                    for i in range(0, zz.shape[0], 8192)
                ]
            )
        finally:
            flow.train(was)
        panels.append((name, lq.float()))
    fig = _figure(3.0 * len(panels), 3.2)
    for k, (name, logd) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        img = torch.exp(logd - logd.max()).reshape(n, n).numpy()
        ax.imshow(img, origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    _save(fig, path)
