"""exactflow.sbi: benchmark tasks, reference posteriors, the support bijection, C2ST and SBC.

Every reference sampler is checked against something computed another way: the conjugate
formula (gaussian_linear), importance sampling, a fine-grid posterior (the 2-D tasks), and the
generic likelihood MCMC against the analytic posterior.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from exactflow import Flow, StandardNormal, sbi
from exactflow.check import check_transform
from exactflow.errors import ConfigError, DomainError, DTypeError, ShapeError
from exactflow.transforms import Affine, Compose

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

NAMES = ["gaussian_linear", "gaussian_mixture", "slcp", "two_moons"]
DIMS = {
    "gaussian_linear": (10, 10),
    "gaussian_mixture": (2, 2),
    "slcp": (5, 8),
    "two_moons": (2, 2),
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- tasks, priors, simulators ----------------------------------------------------------------
def test_registry_names_and_dimensions():
    assert sorted(sbi.TASKS) == NAMES
    for name in NAMES:
        task = sbi.get_task(name)
        assert task.name == name
        assert (task.theta_dim, task.x_dim) == DIMS[name]


@pytest.mark.parametrize("name", NAMES)
def test_prior_samples_lie_in_the_support(name):
    task = sbi.get_task(name)
    theta = task.prior.sample(4000, gen(1))
    assert theta.shape == (4000, task.theta_dim) and theta.dtype == torch.get_default_dtype()
    lp = task.prior.log_prob(theta)
    assert lp.shape == (4000,) and torch.isfinite(lp).all()
    if task.bounds is None:
        assert name == "gaussian_linear"
        # N(0, 0.1 I): the sample variance is 0.1
        assert abs(float(theta.double().var(0).mean()) - 0.1) < 0.005
        return
    low, high = task.bounds
    assert (theta >= low.float()).all() and (theta <= high.float()).all()
    # uniform: constant density -sum log(high - low) inside, -inf just outside
    assert torch.allclose(lp, torch.full_like(lp, -float(torch.log(high - low).sum())))
    outside = high.to(theta.dtype) + 0.01
    assert task.prior.log_prob(outside) == -math.inf
    # the draws fill the box: each coordinate's mean and variance are the uniform's
    t = theta.double()
    assert torch.allclose(t.mean(0), (low + high) / 2, atol=0.05 * float((high - low).max()))
    assert torch.allclose(t.var(0), (high - low) ** 2 / 12, rtol=0.08)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simulator_shapes_dtypes_and_seeding(name, dtype):
    task = sbi.get_task(name)
    theta = task.prior.sample(7, gen(2), dtype)
    x = task.simulate(theta, gen(3))
    assert x.shape == (7, task.x_dim) and x.dtype == dtype and torch.isfinite(x).all()
    assert torch.equal(x, task.simulate(theta, gen(3)))  # the generator fixes the noise
    assert not torch.equal(x, task.simulate(theta, gen(4)))
    one = task.simulate(theta[0], gen(3))
    assert one.shape == (task.x_dim,)
    ll = task.log_likelihood(theta, x)
    assert ll.shape == (7,) and torch.isfinite(ll).all()
    assert task.log_likelihood(theta[0], x[0]).shape == ()
    th, xs = task.sample_joint(5, gen(5), dtype)
    assert th.shape == (5, task.theta_dim) and xs.shape == (5, task.x_dim)


def test_observations_are_reproducible():
    a = sbi.observations("two_moons", 4, seed=3)
    b = sbi.observations(sbi.get_task("two_moons"), 4, seed=3)
    c = sbi.observations("two_moons", 4, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (4, 2) and a[1].shape == (4, 2)
    theta64, x64 = sbi.observations("slcp", 2, seed=0, dtype=torch.float64)
    assert theta64.dtype == torch.float64 and x64.shape == (2, 8)


# -- the likelihoods agree with the simulators ------------------------------------------------
def test_slcp_and_gaussian_linear_likelihoods_match_torch_distributions():
    task = sbi.get_task("slcp")
    theta = task.prior.sample(6, gen(6), torch.float64)
    x = task.simulate(theta, gen(7))
    m = theta[:, :2]
    s1, s2, rho = theta[:, 2] ** 2, theta[:, 3] ** 2, torch.tanh(theta[:, 4])
    cov = torch.stack(
        [torch.stack([s1**2, rho * s1 * s2], -1), torch.stack([rho * s1 * s2, s2**2], -1)], -2
    )
    mvn = torch.distributions.MultivariateNormal(m[:, None, :], cov[:, None])
    expected = mvn.log_prob(x.reshape(6, 4, 2)).sum(-1)
    torch.testing.assert_close(task.log_likelihood(theta, x), expected)

    lin = sbi.get_task("gaussian_linear")
    theta = lin.prior.sample(5, gen(8), torch.float64)
    x = lin.simulate(theta, gen(9))
    normal = torch.distributions.Normal(theta, math.sqrt(0.1))
    torch.testing.assert_close(lin.log_likelihood(theta, x), normal.log_prob(x).sum(-1))


@pytest.mark.parametrize("name", ["two_moons", "gaussian_mixture"])
def test_2d_likelihood_is_the_simulators_density(name):
    # for one theta: exp(log_likelihood) integrates to 1 over a fine x-grid and its mean and
    # covariance are those of simulated x
    task = sbi.get_task(name)
    theta = torch.tensor([0.3, -0.5], dtype=torch.float64)
    x = task.simulate(theta.expand(200_000, -1), gen(10))
    half = 6.0 if name == "gaussian_mixture" else 0.15
    centre = x.mean(0)
    axis = [
        torch.linspace(float(c) - half, float(c) + half, 1201, dtype=torch.float64) for c in centre
    ]
    g1, g2 = torch.meshgrid(*axis, indexing="ij")
    pts = torch.stack([g1.reshape(-1), g2.reshape(-1)], -1)
    dens = task.log_likelihood(theta.expand(pts.shape[0], -1), pts).exp()
    cell = float((axis[0][1] - axis[0][0]) * (axis[1][1] - axis[1][0]))
    mass = float(dens.sum()) * cell
    assert abs(mass - 1.0) < 0.01
    w = dens / dens.sum()
    mean = (w[:, None] * pts).sum(0)
    cov = (w[:, None, None] * (pts - mean)[:, :, None] * (pts - mean)[:, None, :]).sum(0)
    torch.testing.assert_close(mean, x.mean(0), atol=0.01 * half, rtol=0)
    torch.testing.assert_close(cov, torch.cov(x.T), atol=0.02 * float(cov.diagonal().max()), rtol=0)


# -- reference posteriors -------------------------------------------------------------------
def test_gaussian_linear_posterior_is_the_conjugate_one():
    task = sbi.get_task("gaussian_linear")
    _, x = sbi.observations(task, 2, seed=1, dtype=torch.float64)
    x_o = x[1]
    # conjugate update with full matrices: S = (S0^-1 + S^-1)^-1, m = S (S^-1 x + S0^-1 m0)
    prior_cov = 0.1 * torch.eye(10, dtype=torch.float64)
    noise_cov = 0.1 * torch.eye(10, dtype=torch.float64)
    post_cov = torch.linalg.inv(torch.linalg.inv(prior_cov) + torch.linalg.inv(noise_cov))
    post_mean = post_cov @ (torch.linalg.inv(noise_cov) @ x_o)
    mean, cov = task.posterior_mean_cov(x_o)
    torch.testing.assert_close(mean, post_mean)
    torch.testing.assert_close(cov, post_cov)

    ref = task.reference_posterior(x_o, 20_000, gen(11))
    assert ref.shape == (20_000, 10) and ref.dtype == torch.float64
    se = math.sqrt(0.05 / 20_000)
    assert (ref.mean(0) - post_mean).abs().max() < 5 * se
    torch.testing.assert_close(torch.cov(ref.T), post_cov, atol=0.004, rtol=0)

    # self-normalised importance sampling from the prior agrees with the formula
    theta = task.prior.sample(400_000, gen(12), torch.float64)
    w = torch.softmax(task.log_likelihood(theta, x_o), 0)
    is_mean = (w[:, None] * theta).sum(0)
    ess = float(1 / (w**2).sum())
    assert ess > 1000
    assert (is_mean - post_mean).abs().max() < 5 * math.sqrt(0.05 / ess)


def _grid_posterior(task, x_o, box, points):
    low, high = box
    axis = [
        torch.linspace(float(lo), float(hi), points, dtype=torch.float64)
        for lo, hi in zip(low, high)
    ]
    g1, g2 = torch.meshgrid(*axis, indexing="ij")
    pts = torch.stack([g1.reshape(-1), g2.reshape(-1)], -1)
    logp = task.log_posterior_unnormalised(pts, x_o)
    w = torch.softmax(logp, 0)
    mean = (w[:, None] * pts).sum(0)
    second = (w[:, None, None] * pts[:, :, None] * pts[:, None, :]).sum(0)
    return pts, w, mean, second - mean[:, None] * mean[None, :]


@pytest.mark.parametrize(
    ("name", "x_o"),
    [
        ("two_moons", [0.05, -0.12]),
        ("two_moons", [-0.3, 0.2]),
        # near the corner the truncation by the box matters
        ("gaussian_mixture", [9.6, -9.7]),
        ("gaussian_mixture", [1.0, 2.0]),
    ],
)
def test_2d_reference_posterior_matches_a_fine_grid(name, x_o):
    task = sbi.get_task(name)
    x_o = torch.tensor(x_o, dtype=torch.float64)
    n = 5000
    ref = task.reference_posterior(x_o, n, gen(13))
    low, high = task.bounds
    assert ref.shape == (n, 2) and (ref >= low).all() and (ref <= high).all()
    if name == "gaussian_mixture":  # the posterior lives within ~6 of x_o
        box = (torch.maximum(low, x_o - 6), torch.minimum(high, x_o + 6))
    else:
        box = (low, high)
    pts, w, mean, cov = _grid_posterior(task, x_o, box, 1201)
    se = (cov.diagonal() / n).sqrt()
    assert ((ref.mean(0) - mean).abs() < 5 * se).all(), (ref.mean(0), mean, se)
    torch.testing.assert_close(
        torch.cov(ref.T), cov, atol=0.1 * float(cov.diagonal().max()), rtol=0
    )
    # mass in coarse cells of the grid posterior vs the samples (multinomial 5-sigma bands)
    edges = [
        torch.linspace(float(box[0][i]), float(box[1][i]), 5, dtype=torch.float64) for i in (0, 1)
    ]

    def cell(p):
        return torch.bucketize(p[:, 0].contiguous(), edges[0][1:-1]) * 4 + torch.bucketize(
            p[:, 1].contiguous(), edges[1][1:-1]
        )

    grid_mass = torch.zeros(16, dtype=torch.float64).index_add_(0, cell(pts), w)
    sample_mass = torch.bincount(cell(ref), minlength=16).double() / n
    band = 5 * (grid_mass * (1 - grid_mass) / n).sqrt() + 0.003
    assert ((sample_mass - grid_mass).abs() <= band).all()
    # highest-density regions: the grid's region of mass q holds a share q of the samples
    # (sensitive to how mass splits between sharp and broad parts, which moments are not)
    logp = task.log_posterior_unnormalised(pts, x_o)
    order = torch.argsort(logp, descending=True)
    cum = torch.cumsum(w[order], 0)
    logp_ref = task.log_posterior_unnormalised(ref, x_o)
    for q in (0.2, 0.4, 0.6, 0.8):
        level = logp[order][torch.searchsorted(cum, torch.tensor(q, dtype=torch.float64))]
        share = float((logp_ref >= level).double().mean())
        assert abs(share - q) < 5 * math.sqrt(q * (1 - q) / n) + 0.01, (q, share)


def test_likelihood_mcmc_recovers_the_analytic_posterior():
    task = sbi.get_task("gaussian_linear")
    _, x = sbi.observations(task, 1, seed=2, dtype=torch.float64)
    mean, cov = task.posterior_mean_cov(x[0])
    samples = task.likelihood_mcmc(
        x[0], 2000, gen(14), chains=200, burn_in=600, thin=5, pool=20_000
    )
    assert samples.shape == (2000, 10)
    assert (samples.mean(0) - mean).abs().max() < 0.04  # se of a mean ~0.005-0.01 here
    torch.testing.assert_close(samples.var(0), cov.diagonal(), atol=0.012, rtol=0)


def test_slcp_reference_is_in_the_box_symmetric_and_likely():
    task = sbi.get_task("slcp")
    theta_o, x = sbi.observations(task, 1, seed=0, dtype=torch.float64)
    ref = task.likelihood_mcmc(x[0], 400, gen(15), chains=100, burn_in=300, thin=5, pool=20_000)
    assert ref.shape == (400, 5)
    assert (ref.abs() <= 3).all()
    # the exact sign symmetry in theta_3 and theta_4: each sign about half the time
    for j in (2, 3):
        assert 0.38 < float((ref[:, j] > 0).double().mean()) < 0.62
    # posterior draws explain x_o far better than prior draws do
    ll_ref = task.log_likelihood(ref, x[0])
    ll_prior = task.log_likelihood(task.prior.sample(400, gen(16), torch.float64), x[0])
    assert torch.isfinite(ll_ref).all()
    assert float(ll_ref.median()) > float(ll_prior.median()) + 20
    assert float(ll_ref.median()) > float(task.log_likelihood(theta_o[0], x[0])) - 10


# -- support bijection ----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_support_transform_certifies_and_maps_into_the_box(name):
    task = sbi.get_task(name)
    t = sbi.support_transform(task)
    theta = task.prior.sample(32, gen(17), torch.float64)
    check_transform(t, theta)
    z = 3.0 * torch.randn(2000, task.theta_dim, generator=gen(18))
    back, _ = t.inverse(z)
    if task.bounds is None:
        torch.testing.assert_close(back, z)
        return
    low, high = (b.float() for b in task.bounds)
    assert ((back > low) & (back < high)).all()
    # even far out in float32 nothing leaves the closed box
    far, _ = t.inverse(torch.full((3, task.theta_dim), 1e4) * torch.tensor([[1.0], [-1.0], [0.0]]))
    assert torch.isfinite(far).all() and (far >= low).all() and (far <= high).all()


def test_a_flow_through_the_support_is_a_density_on_the_box():
    task = sbi.get_task("two_moons")
    flow = Flow(
        Compose(
            [
                sbi.support_transform(task),
                Affine(torch.tensor([0.3, -0.2]), torch.tensor([0.7, 0.5])),
            ]
        ),
        StandardNormal((2,)),
    )
    flow = flow.double()
    samples = flow.sample(5000)
    assert (samples.abs() <= 1).all()
    # midpoint rule over the box: the density integrates to 1
    k = 400
    mid = -1 + (torch.arange(k, dtype=torch.float64) + 0.5) * (2 / k)
    g1, g2 = torch.meshgrid(mid, mid, indexing="ij")
    pts = torch.stack([g1.reshape(-1), g2.reshape(-1)], -1)
    mass = float(flow.log_prob(pts).exp().sum()) * (2 / k) ** 2
    assert abs(mass - 1.0) < 5e-3


# -- metrics --------------------------------------------------------------------------------
def test_c2st_is_chance_for_one_distribution_and_one_for_separated_ones():
    task = sbi.get_task("two_moons")
    x_o = torch.tensor([0.05, -0.12], dtype=torch.float64)
    a = task.reference_posterior(x_o, 400, gen(19))
    b = task.reference_posterior(x_o, 400, gen(20))
    assert sbi.c2st(a, b, seed=0) < 0.6
    shifted = b + torch.tensor([0.5, 0.0], dtype=torch.float64)
    assert sbi.c2st(a.numpy(), shifted.numpy(), seed=0) > 0.9  # numpy arrays work too


def test_sbc_of_the_analytic_posterior_is_uniform_and_of_an_overconfident_one_is_not():
    task = sbi.get_task("gaussian_linear")
    ranks = sbi.sbc_ranks(task.reference_posterior, task, 200, 100, gen(21))
    assert ranks.shape == (200, 10) and ranks.dtype == torch.int64
    assert int(ranks.min()) >= 0 and int(ranks.max()) <= 100
    p = sbi.sbc_uniformity(ranks, 100)
    assert p.shape == (10,) and (p > 0.01).all(), p

    def overconfident(x, n, generator):
        mean, cov = task.posterior_mean_cov(x)
        eps = torch.randn((n, 10), generator=generator, dtype=torch.float64)
        return mean + eps * cov.diagonal().sqrt() / 3

    bad = sbi.sbc_ranks(overconfident, task, 200, 100, gen(21))
    assert (sbi.sbc_uniformity(bad, 100) < 0.01).all()
    # over-confidence piles the ranks at both ends
    ends = ((bad <= 10) | (bad >= 90)).double().mean()
    assert float(ends) > 0.5


def test_plot_sbc_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    ranks = torch.randint(0, 21, (60, 3), generator=gen(22))
    path = tmp_path / "sbc.png"
    sbi.plot_sbc(ranks, path, 20, names=["a", "b", "c"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ShapeError, match="3 entries"):
        sbi.plot_sbc(ranks, path, 20, names=["a"])


# -- bad input ------------------------------------------------------------------------------
def test_bad_input_raises_named_errors():
    with pytest.raises(ConfigError, match="gaussian_linear, gaussian_mixture, slcp, two_moons"):
        sbi.get_task("three_moons")
    task = sbi.get_task("two_moons")
    with pytest.raises(ShapeError, match=r"\(n, 2\) or \(2,\), got \(4, 3\)"):
        task.simulate(torch.zeros(4, 3))
    with pytest.raises(DomainError, match="NaN"):
        task.simulate(torch.tensor([[0.1, float("nan")]]))
    with pytest.raises(DTypeError, match="floating-point"):
        task.simulate(torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(DTypeError, match=r"torch\.Tensor"):
        task.simulate([[0.1, 0.2]])
    with pytest.raises(ShapeError):
        task.prior.log_prob(torch.zeros(3))
    with pytest.raises(DomainError):
        task.prior.log_prob(torch.tensor([float("inf"), 0.0]))
    with pytest.raises(ShapeError, match="one observation"):
        task.reference_posterior(torch.zeros(3, 2), 10)
    with pytest.raises(DomainError, match="positive integer"):
        task.prior.sample(0)
    with pytest.raises(ShapeError, match="rows"):
        task.log_likelihood(torch.zeros(4, 2), torch.zeros(3, 2))
    # an observation no theta in the box can produce
    with pytest.raises(DomainError, match="impossible"):
        sbi.get_task("gaussian_mixture").reference_posterior(torch.tensor([1e4, 1e4]), 10)
    a, b = torch.randn(50, 2), torch.randn(60, 2)
    with pytest.raises(ShapeError, match="same number"):
        sbi.c2st(a, b)
    with pytest.raises(ShapeError, match="same dimension"):
        sbi.c2st(a, torch.randn(50, 3))
    with pytest.raises(DomainError, match="non-finite"):
        sbi.c2st(a, torch.full((50, 2), float("nan")))
    with pytest.raises(ShapeError, match=r"\(5, 2\)"):
        sbi.sbc_ranks(lambda x, n, g: torch.zeros(n, 3), task, 2, 5)
    with pytest.raises(DomainError, match=r"0\.\.5"):
        sbi.sbc_uniformity(torch.tensor([[7, 1]]), 5)
    with pytest.raises(DTypeError):
        sbi.support_transform(object())
    assert np.isfinite(sbi.sbc_uniformity(torch.tensor([[0, 5], [3, 2]]), 5).numpy()).all()
