"""Calibration of neural posterior estimation: SBC ranks of a trained ``sbi.train_npe`` posterior.

The fast test trains a small posterior on gaussian_linear and checks that its SBC ranks pass a
uniformity test in every dimension while the same posterior made three times too narrow, or
shifted by one posterior standard deviation, fails. The slow test is the 10 000-simulation
check of the documented configuration (docs: guide/sbi.md), which currently fails (xfail).
"""

from __future__ import annotations

import pytest
import torch

from exactflow import sbi

pytest.importorskip("scipy")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def narrowed(sampler, factor: float):
    """``sampler`` with every draw pulled towards the draws' mean: over-confident by ``factor``."""

    def draw(x, n, generator=None):
        theta = sampler(x, n, generator)
        mean = theta.mean(0, keepdim=True)
        return mean + (theta - mean) / factor

    return draw


def shifted(sampler, offset: float):
    """``sampler`` with every draw moved by ``offset`` in every coordinate: biased."""
    return lambda x, n, generator=None: sampler(x, n, generator) + offset


def test_small_npe_on_gaussian_linear_is_calibrated_and_a_narrowed_one_is_not():
    task = sbi.get_task("gaussian_linear")
    post = sbi.train_npe(
        task,
        3000,
        model="maf",
        model_kwargs={"transforms": 2, "hidden": [32]},
        steps=600,
        batch_size=128,
        lr=3e-3,
        seed=0,
    )
    runs, draws = 300, 100
    ranks = sbi.sbc_ranks(post.sampler(), task, runs, draws, gen(5))
    assert ranks.shape == (runs, 10)
    p = sbi.sbc_uniformity(ranks, draws)
    assert (p > 0.01).all(), p

    # the same posterior three times too narrow piles ranks at both ends: fails everywhere
    bad = sbi.sbc_ranks(narrowed(post.sampler(), 3.0), task, runs, draws, gen(5))
    assert (sbi.sbc_uniformity(bad, draws) < 0.01).all()
    ends = ((bad <= 10) | (bad >= draws - 10)).double().mean()
    assert float(ends) > 0.5
    # moved by one posterior sd (0.22) in every coordinate: the ranks lean to one side
    biased = sbi.sbc_ranks(shifted(post.sampler(), 0.22), task, runs, draws, gen(5))
    assert (sbi.sbc_uniformity(biased, draws) < 0.01).all()
    assert float(biased.double().mean()) < 0.4 * draws


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="measured 2026-12-06 (benchmarks/sbi.py --sbc): the default 10k-simulation NSF fails "
    "SBC in theta_8 (KS p < 1e-4) and theta_5 (p = 0.0025); its validation NLL is lowest by "
    "step 750 of 5000 and rises after, so the kept weights are an early, biased fit. When the "
    "training loop is fixed this passes and strict=True flags the marker for removal",
)
def test_npe_at_10k_simulations_is_calibrated_on_gaussian_linear():
    # the documented configuration: the default NSF and budget of benchmarks/sbi.py --sbc
    task = sbi.get_task("gaussian_linear")
    post = sbi.train_npe(task, 10_000, steps=5000, seed=0)
    runs, draws = 1000, 100
    ranks = sbi.sbc_ranks(post.sampler(), task, runs, draws, gen(0))
    p = sbi.sbc_uniformity(ranks, draws)
    assert (p > 0.01).all(), p
