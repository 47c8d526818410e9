"""Simulation-based inference: simulators, benchmark tasks, reference posteriors and metrics.

    from exactflow import sbi
    task = sbi.get_task("two_moons")                  # or gaussian_linear, slcp, gaussian_mixture
    theta, x = task.sample_joint(10_000, generator)   # simulations to train q(theta | x) on
    theta_o, x_o = sbi.observations(task, 10, seed=0) # fixed observations
    ref = task.reference_posterior(x_o[0], 10_000)    # true posterior samples at x_o
    sbi.c2st(ref, approx)                             # 0.5 = indistinguishable
    ranks = sbi.sbc_ranks(sampler, task, 200, 100)    # calibration; sbi.sbc_uniformity(ranks, 100)
    sbi.support_transform(task)                       # box <-> R^d bijection for an NPE flow
    posterior = sbi.train_npe(task, simulations=10_000, seed=0)  # q(theta | x), a Posterior
    posterior.sample(1000, x_o[0]); posterior.log_prob(theta, x_o[0])

Tasks and reference posteriors: :mod:`exactflow.sbi.tasks`; metrics:
:mod:`exactflow.sbi.metrics`; the support bijection: :mod:`exactflow.sbi.support`; neural
posterior estimation: :mod:`exactflow.sbi.npe`.
"""

from __future__ import annotations

from .metrics import c2st, plot_sbc, sbc_ranks, sbc_uniformity
from .npe import Posterior, train_npe
from .priors import BoxUniform, NormalPrior, Prior
from .support import support_transform
from .tasks import (
    SLCP,
    TASKS,
    GaussianLinear,
    GaussianMixture,
    Simulator,
    TwoMoons,
    get_task,
    observations,
)

__all__ = [
    "SLCP",
    "TASKS",
    "BoxUniform",
    "GaussianLinear",
    "GaussianMixture",
    "NormalPrior",
    "Posterior",
    "Prior",
    "Simulator",
    "TwoMoons",
    "c2st",
    "get_task",
    "observations",
    "plot_sbc",
    "sbc_ranks",
    "sbc_uniformity",
    "support_transform",
    "train_npe",
]
