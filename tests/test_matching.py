"""Flow matching: closed-form paths, exact OT pairing, training, likelihood, reflow, CLI."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from exactflow.check import check_flow
from exactflow.cli import main
from exactflow.continuous import CNF
from exactflow.data.toy import TOY
from exactflow.distributions import StandardNormal
from exactflow.errors import ConfigError, ContextError, ShapeError
from exactflow.matching import (
    CondOTPath,
    IndependentPairing,
    LinearPath,
    MatchingFlow,
    OTPairing,
    VelocityMLP,
    fit,
    matching_loss,
    ot_permutation,
    reflow,
    sliced_wasserstein,
    straightness,
)
from exactflow.models import MODELS
from exactflow.models.matching import CFM, OTCFM, RectifiedFlow

# -- closed forms: Gaussian -> Gaussian -------------------------------------------------------


class GaussianVelocity(nn.Module):
    """The marginal velocity ``E[u_t | x_t = x]`` for data ``N(m, s² I)`` and noise ``N(0, I)``
    coupled independently: ``a' m + (a a' s² + b b') / (a² s² + b² + σ²) (x - a m)``."""

    def __init__(self, path, m: torch.Tensor, s: float):
        super().__init__()
        self.path, self.m, self.s = path, m, s
        self.features = m.numel()

    def forward(self, t, x, context=None):
        t = torch.as_tensor(t, dtype=x.dtype)
        a, b, da, db = self.path.coefficients(t)
        var = a**2 * self.s**2 + b**2 + self.path.sigma**2
        k = (a * da * self.s**2 + b * db) / var
        return da * self.m + k * (x - a * self.m)


@pytest.mark.parametrize("path", [LinearPath(0.0), LinearPath(0.3), CondOTPath(0.1)])
def test_path_points_and_targets_match_the_formulas(path):
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    t = torch.rand(5, generator=g)
    xt, ut = path.sample(x0, x1, t, torch.Generator().manual_seed(1))
    tc = t[:, None]
    if isinstance(path, CondOTPath):
        smin = path.sigma_min
        mean, target = (1 - tc) * x0 + (smin + (1 - smin) * tc) * x1, (1 - smin) * x1 - x0
    else:
        mean, target = (1 - tc) * x0 + tc * x1, x1 - x0
    xi = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(xt, mean + path.sigma * xi)
    torch.testing.assert_close(ut, target)
    # the ends: data at t = 0 (up to the path's width), noise at t = 1
    x_start, _ = path.sample(x0, x1, torch.zeros(5))
    x_end, _ = path.sample(x0, x1, torch.ones(5))
    if path.sigma == 0:
        b0 = path.sigma_min if isinstance(path, CondOTPath) else 0.0
        torch.testing.assert_close(x_start, x0 + b0 * x1)
        torch.testing.assert_close(x_end, x1)


def test_condot_conditional_path_is_the_gaussian_its_velocity_generates():
    """Given x0, p_t(x | x0) = N((1-t) x0, σ_t²) and u_t(x | x0) moves the sample along it."""
    path = CondOTPath(0.05)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.tensor([1.5, -2.0], dtype=torch.float64).expand(n, 2)
    x1 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    for tv in (0.0, 0.3, 0.9):
        t = torch.full((n,), tv, dtype=torch.float64)
        xt, ut = path.sample(x0, x1, t)
        mean, std = path.mean_std(t[:1], x0[:1])
        sigma_t = 0.05 + 0.95 * tv
        torch.testing.assert_close(mean[0], (1 - tv) * x0[0])
        assert abs(float(std) - sigma_t) < 1e-12
        assert torch.allclose(xt.mean(0), mean[0], atol=5 * sigma_t / math.sqrt(n))
        assert torch.allclose(xt.std(0), std[0].expand(2), rtol=1e-2)
        # the analytic conditional field at x_t equals the sampled target
        torch.testing.assert_close(path.conditional_velocity(t, xt, x0), ut)


@pytest.mark.parametrize("path", [LinearPath(0.0), LinearPath(0.2), CondOTPath(0.1)])
def test_regression_target_has_the_gaussian_marginal_velocity(path):
    """E[u_t | x_t] (least squares of u on x_t, exact for jointly Gaussian rows) equals the
    analytic marginal velocity of N(m, s²) -> N(0, 1)."""
    m, s, n = torch.tensor([2.0], dtype=torch.float64), 0.5, 400_000
    g = torch.Generator().manual_seed(1)
    x0 = m + s * torch.randn(n, 1, generator=g, dtype=torch.float64)
    x1 = torch.randn(n, 1, generator=g, dtype=torch.float64)
    field = GaussianVelocity(path, m, s)
    for tv in (0.1, 0.5, 0.8):
        t = torch.full((n,), tv, dtype=torch.float64)
        xt, ut = path.sample(x0, x1, t, g)
        design = torch.cat([torch.ones(n, 1, dtype=torch.float64), xt], 1)
        coef = torch.linalg.lstsq(design, ut).solution.squeeze(-1)
        probe = torch.tensor([[-1.0], [0.0], [1.0]], dtype=torch.float64)
        fitted = coef[0] + coef[1] * probe
        torch.testing.assert_close(fitted, field(tv, probe), atol=2e-2, rtol=0)


@pytest.mark.parametrize("path", [LinearPath(0.0), CondOTPath(0.1)])
def test_cnf_of_the_marginal_velocity_has_the_data_density(path):
    """Time convention: the CNF of the marginal velocity maps data (t=0) to noise (t=1), so
    MatchingFlow.log_prob is the t=0 marginal N(m, s² + b(0)²) exactly."""
    m, s = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.7
    cnf = CNF(GaussianVelocity(path, m, s), solver="dopri5", atol=1e-9, rtol=1e-9, features=2)
    flow = MatchingFlow(cnf, StandardNormal((2,)), path).double().eval()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    b0 = float(path.coefficients(torch.zeros(()))[1])
    want = torch.distributions.Normal(m, math.sqrt(s**2 + b0**2)).log_prob(x).sum(-1)
    torch.testing.assert_close(flow.log_prob(x), want, atol=1e-6, rtol=0)
    # sampling runs the same ODE backwards: samples have the data's moments
    xs = flow.sample(4000, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(xs.mean(0), m, atol=0.05)
    assert torch.allclose(
        xs.std(0), torch.full((2,), math.sqrt(s**2 + b0**2), dtype=torch.float64), atol=0.05
    )


# -- pairing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_ot_pairing_equals_brute_force_permutation_search(n):
    g = torch.Generator().manual_seed(n)
    for _ in range(3):
        x0 = torch.randn(n, 3, generator=g, dtype=torch.float64)
        x1 = torch.randn(n, 3, generator=g, dtype=torch.float64)
        cost = torch.cdist(x0, x1).square()
        perms = torch.tensor(list(itertools.permutations(range(n))))
        totals = cost[torch.arange(n), perms].sum(-1)
        best = perms[totals.argmin()]
        perm = ot_permutation(x0, x1)
        assert torch.equal(perm, best)
        # the pairing object returns the same partners
        p0, p1, _ = OTPairing()(x0, x1)
        torch.testing.assert_close(p1, x1[best])
        torch.testing.assert_close(p0, x0)


def test_ot_pairing_rectangular_context_groups_and_errors():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, 2, generator=g), torch.randn(9, 2, generator=g)
    perm = ot_permutation(x0, x1)
    assert perm.unique().numel() == 4 and int(perm.max()) < 9
    with pytest.raises(ShapeError, match="n1 >= n0"):
        ot_permutation(x1, x0)
    with pytest.raises(ShapeError, match="same D"):
        ot_permutation(x0, torch.randn(4, 3))
    # with a context, partners come only from rows of the same context
    x0, x1 = torch.randn(12, 2, generator=g), torch.randn(12, 2, generator=g)
    ctx = torch.tensor([[0.0], [1.0], [2.0]]).repeat(4, 1)
    _, p1, c = OTPairing()(x0, x1, ctx)
    for i in range(12):
        (j,) = torch.nonzero((x1 == p1[i]).all(-1)).squeeze(-1).tolist()
        assert c[i, 0] == ctx[j, 0]
    # independent pairing keeps the rows (fresh noise is already independent of the data)
    q0, q1, _ = IndependentPairing()(x0, x1)
    assert torch.equal(q0, x0) and torch.equal(q1, x1)


def test_grouped_ot_pairing_is_the_optimum_within_each_context_group():
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(30, 2, generator=g), torch.randn(30, 2, generator=g)
    ctx = torch.randint(0, 3, (30, 2), generator=g).double()  # up to 9 groups, uneven sizes
    _, p1, c = OTPairing()(x0, x1, ctx)
    assert torch.equal(c, ctx)
    groups = torch.unique(ctx, dim=0)
    assert groups.shape[0] > 3
    total = 0.0
    for row in groups:
        idx = torch.nonzero((ctx == row).all(-1)).squeeze(-1)
        # the partners of a group are a permutation of the same group's noise rows ...
        got = sorted(map(tuple, p1[idx].tolist()))
        assert got == sorted(map(tuple, x1[idx].tolist()))
        # ... at the group's minimal squared cost (SciPy on the group alone)
        cost = torch.cdist(x0[idx].double(), x1[idx].double()).square().numpy()
        r, col = linear_sum_assignment(cost)
        best = float(cost[r, col].sum())
        mine = float((x0[idx] - p1[idx]).double().square().sum())
        assert mine == pytest.approx(best, rel=1e-6)
        total += best
    assert total < float((x0 - x1).double().square().sum())


def test_conditional_ot_cfm_training_step_traces_as_one_graph():
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    flow = OTCFM(2, hidden=(8,), context=1)
    x = torch.randn(16, 2)
    ctx = torch.tensor([[0.0], [1.0]]).repeat(8, 1)
    dynamo.reset()
    try:
        e = dynamo.explain(flow.training_loss)(x, ctx)
    finally:
        dynamo.reset()
    assert e.graph_break_count == 0 and e.graph_count == 1, [
        b.reason.splitlines()[0] for b in e.break_reasons
    ]


def test_ot_pairing_lowers_the_transport_cost():
    g = torch.Generator().manual_seed(0)
    x0, x1 = TOY["8gaussians"](256, g), torch.randn(256, 2, generator=g)
    _, p1, _ = OTPairing()(x0, x1)
    assert (x0 - p1).square().sum() < 0.5 * (x0 - x1).square().sum()


# -- the model object --------------------------------------------------------------------------


def test_builders_registered_and_identity_at_init():
    for name, builder in (("cfm", CFM), ("otcfm", OTCFM), ("rectified", RectifiedFlow)):
        assert MODELS[name].builder is builder and MODELS[name].continuous
        flow = builder(2, hidden=(16,))
        assert isinstance(flow, MatchingFlow)
        x = torch.randn(5, 2)
        want = StandardNormal((2,)).log_prob(x)
        torch.testing.assert_close(flow.log_prob(x), want)
    assert isinstance(OTCFM(2).pairing, OTPairing)
    assert CFM(2, sigma=0.2).path.sigma_min == 0.2


def test_solver_overrides_count_steps_and_restore():
    torch.manual_seed(0)
    flow = OTCFM(2, hidden=(16,))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for solver, per_step in (("euler", 1), ("midpoint", 2), ("rk4", 4)):
        flow.reset_nfe()
        x = flow.sample(10, steps=3, solver=solver)
        assert x.shape == (10, 2) and flow.nfe["forward"] == 3 * per_step
    flow.reset_nfe()
    flow.sample(10, steps=5)  # steps alone = Euler
    assert flow.nfe["forward"] == 5
    assert flow.cnf.solver == "dopri5" and flow.cnf.steps == 20  # restored
    # one Euler step from the noise is x = z - v(1, z)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(10, 2, generator=torch.Generator().manual_seed(4))
    want = z - flow.velocity(torch.tensor(1.0), z).detach()
    torch.testing.assert_close(flow.sample(10, generator=g, steps=1), want)
    with pytest.raises(ConfigError, match="fixed-step"):
        flow.sample(4, steps=3, solver="dopri5")
    with pytest.raises(ConfigError, match="unknown solver"):
        flow.log_prob(torch.zeros(1, 2), solver="leapfrog")
    with pytest.raises(ConfigError, match="trace"):
        flow.log_prob(torch.zeros(1, 2), trace="approx")
    # Hutchinson log_prob is an unbiased estimate of the exact one
    flow.eval()
    x = torch.randn(4, 2, generator=g)
    torch.manual_seed(1)
    with torch.no_grad():
        exact = flow.log_prob(x, solver="rk4", steps=4)
        est = torch.stack(
            [flow.log_prob(x, trace="hutchinson", solver="rk4", steps=4) for _ in range(100)]
        )
    assert not torch.allclose(est[0], exact, atol=1e-6)
    torch.testing.assert_close(est.mean(0), exact, atol=0.05, rtol=0)


def test_velocity_mlp_takes_per_row_times_and_context():
    torch.manual_seed(0)
    v = VelocityMLP(2, (8,), context=3)
    with torch.no_grad():
        for p in v.parameters():
            p.add_(0.3 * torch.randn_like(p))
    z, c = torch.randn(4, 2), torch.randn(4, 3)
    t = torch.tensor([0.1, 0.5, 0.5, 0.9])
    rows = torch.stack([v(t[i], z[i : i + 1], context=c[i : i + 1])[0] for i in range(4)])
    torch.testing.assert_close(v(t, z, context=c), rows)
    assert not torch.allclose(v(t, z, context=c), v(t, z, context=c + 1))
    with pytest.raises(ShapeError, match="batch shape"):
        v(torch.rand(3), z, context=c)
    with pytest.raises(ContextError):
        v(t, z)


def test_conditional_model_trains_and_uses_its_context():
    """Two contexts select two Gaussians; the fitted conditional flow tells them apart."""
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 2, (2000, 1), generator=g).float()
    x = torch.randn(2000, 2, generator=g) * 0.3 + (4 * c - 2)
    torch.manual_seed(0)
    flow = CFM(2, hidden=(32, 32), context=1)
    fit(flow, x, context=c, steps=200, lr=5e-3, generator=g)
    probe = torch.tensor([[-2.0, -2.0], [2.0, 2.0]])
    lp0 = flow.log_prob(probe, torch.zeros(1))
    lp1 = flow.log_prob(probe, torch.ones(1))
    assert lp0[0] > lp0[1] + 3 and lp1[1] > lp1[0] + 3
    s = flow.sample(200, torch.ones(1), generator=g, steps=8, solver="rk4")
    assert s.shape == (200, 2) and s.mean(0).min() > 1.0
    with pytest.raises(ContextError):
        flow.log_prob(probe)


# -- training, likelihood, reflow --------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """OT-CFM fitted briefly on 8 Gaussians (seeded)."""
    g = torch.Generator().manual_seed(0)
    data, test = TOY["8gaussians"](4000, g), TOY["8gaussians"](1000, g)
    torch.manual_seed(0)
    flow = OTCFM(2, hidden=(64, 64))
    result = fit(flow, data, steps=400, batch_size=128, lr=5e-3, generator=g)
    return flow, data, test, result


def test_short_training_gives_a_sensible_exact_nll(trained):
    flow, data, test, result = trained
    assert sum(result.losses[-50:]) < 0.7 * sum(result.losses[:50])
    with torch.no_grad():
        nll = float(-flow.log_prob(test).mean())
    # the best single Gaussian for this mixture (moment-matched) is far worse
    gauss = torch.distributions.MultivariateNormal(data.mean(0), torch.cov(data.T))
    gauss_nll = float(-gauss.log_prob(test).mean())
    assert math.isfinite(nll) and nll < gauss_nll - 0.6, (nll, gauss_nll)


def test_trained_density_integrates_to_one(trained):
    flow, *_ = trained
    report = check_flow(
        flow,
        grid_points=100,
        atol_integral=0.02,
        generator=torch.Generator().manual_seed(0),
        raise_on_failure=False,
        # an adaptive solve at atol = rtol = 1e-5 round-trips to ~1e-4, not to float64 precision
        atol_ladj=2e-3,
        atol_roundtrip=2e-3,
    )
    assert report.integral is not None and abs(report.integral - 1.0) < 0.02, report.integral
    assert report.passed, str(report)


def test_training_loss_is_the_matching_loss_and_validates(trained):
    flow, data, *_ = trained
    x = data[:64]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(5))
    _, zp, _ = flow.pairing(x, z)
    # same generator stream: noise first, then times and path noise
    g2.manual_seed(5)
    torch.randn(64, 2, generator=g2)
    want = matching_loss(flow.velocity, x, zp, flow.path, generator=g2)
    torch.testing.assert_close(flow.training_loss(x, generator=g1), want)
    with pytest.raises(ShapeError, match="noise"):
        flow.training_loss(x, noise=torch.zeros(3, 2))
    with pytest.raises(ShapeError):
        flow.training_loss(torch.zeros(4, 3))


def test_reflow_straightens_and_improves_one_step_samples():
    g = torch.Generator().manual_seed(0)
    data = TOY["8gaussians"](3000, g)
    torch.manual_seed(0)
    flow = RectifiedFlow(2, hidden=(64, 64))
    fit(flow, data, steps=400, lr=3e-3, generator=g)

    def one_step_sw() -> float:
        x = flow.sample(2000, generator=torch.Generator().manual_seed(7), steps=1)
        return float(sliced_wasserstein(x, data, generator=torch.Generator().manual_seed(8)))

    def straight() -> float:
        z = torch.randn(500, 2, generator=torch.Generator().manual_seed(9))
        return float(straightness(flow.velocity, z, steps=16)[0])

    before, s_before = one_step_sw(), straight()
    reflow(flow, 3000, steps=300, lr=2e-3, generator=g)
    after, s_after = one_step_sw(), straight()
    assert after < 0.8 * before, (before, after)
    assert s_after < 0.5 * s_before, (s_before, s_after)


def test_straightness_and_sliced_wasserstein_closed_forms():
    # a constant field has straight paths: S = 0, length ratio 1
    def const(t, x):
        return torch.ones_like(x) * torch.tensor([1.0, -2.0])

    z = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    s, ratio = straightness(const, z, steps=4)
    assert float(s) < 1e-10 and abs(float(ratio) - 1) < 1e-6
    # a rotation field has circular, curved paths
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    s, ratio = straightness(lambda t, x: x @ rot.T, z, steps=64)
    assert float(s) > 0.1 and float(ratio) > 1.02
    # SW between a sample and its shift by c along every direction averages |θ·c|²
    x = torch.randn(1000, 2, generator=torch.Generator().manual_seed(1))
    c = torch.tensor([3.0, 0.0])
    sw = float(sliced_wasserstein(x, x + c, projections=1000))
    assert abs(sw - 3.0 / math.sqrt(2.0)) < 0.08
    assert float(sliced_wasserstein(x, x)) == 0.0


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_trains_a_flow_matching_model(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        'data = "8gaussians"\nmodel = "otcfm"\n'
        "[data_args]\nn_train = 1000\nn_val = 200\nn_test = 300\n"
        "[model_args]\nhidden = [32, 32]\n"
        "[train]\nsteps = 60\neval_every = 60\ncheckpoint_every = 0\n"
    )
    out = tmp_path / "run"
    code = main(["train", "--config", str(cfg), "--out", str(out), "--quiet", "--no-plots"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("test_nll", "nfe_log_prob", "nfe_sample", "straightness", "path_length_ratio"):
        assert math.isfinite(m[key]), key
    assert m["model"] == "otcfm" and m["nfe_log_prob"] >= 2 and m["path_length_ratio"] >= 1
    # the saved run reloads as a MatchingFlow with the same likelihood
    from exactflow.app.run import load_run

    run = load_run(out)
    assert isinstance(run.flow, MatchingFlow)
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert f"NLL {m['test_nll']:.4f}" in capsys.readouterr().out
