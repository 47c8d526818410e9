import itertools
import math

import pytest
import torch

from exactflow.distributions import DiagGaussian, StandardNormal
from exactflow.errors import ConfigError, ContextError, ShapeError
from exactflow.models import IAF, NSF, PlanarFlow, RadialFlow
from exactflow.transforms import Inverse
from exactflow.transforms import Planar as PlanarLayer
from exactflow.vi import (
    TARGETS,
    _lr_factor,
    energy_u1,
    energy_u2,
    energy_u3,
    energy_u4,
    evaluate_vi,
    fit_vi,
    learnable_base,
    log_z_grid,
    plot_vi,
)

MU = torch.tensor([1.0, -0.5])
PREC = torch.tensor([[2.0, 0.9], [0.9, 1.0]])  # precision matrix, positive definite
OFFSET = 3.0
# Z = e^3 * (2 pi)^(D/2) / sqrt(det P)
LOG_Z = OFFSET + math.log(2 * math.pi) - 0.5 * math.log(float(torch.det(PREC)))


def gaussian_target(z):
    d = z - MU.to(z)
    return OFFSET - 0.5 * ((d @ PREC.to(z)) * d).sum(-1)


def test_energies_match_hand_values():
    z = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, 0.0]])
    # U1 at (2, 0): on the ring, at the centre of the right lobe -> -log(1 + e^{-(4/0.6)^2/2})
    assert float(energy_u1(z[0])) == pytest.approx(-math.log1p(math.exp(-0.5 * (4 / 0.6) ** 2)))
    # U1 at (0, 2): on the ring, both lobes at distance 2 -> -log(2 e^{-(2/0.6)^2/2})
    assert float(energy_u1(z[1])) == pytest.approx(0.5 * (2 / 0.6) ** 2 - math.log(2.0))
    env = 0.5 * (1 / 4) ** 8
    # w1(1) = sin(pi / 2) = 1, so z2 = 1 sits on the U2 ridge
    assert float(energy_u2(z[2])) == pytest.approx(env)
    # at z1 = 1: w2 = 3, w3 = 3/2; z2 = 0 is d = -1 below the first ridge
    a, b = -0.5 * (1 / 0.35) ** 2, -0.5 * (2 / 0.35) ** 2
    assert float(energy_u3(z[3])) == pytest.approx(-math.log(math.exp(a) + math.exp(b)) + env)
    a, b = -0.5 * (1 / 0.4) ** 2, -0.5 * (0.5 / 0.35) ** 2
    assert float(energy_u4(z[3])) == pytest.approx(-math.log(math.exp(a) + math.exp(b)) + env)
    for name in TARGETS:
        assert TARGETS[name](z).shape == (4,)
    with pytest.raises(ShapeError, match="\\(\\*batch, 2\\)"):
        energy_u1(torch.zeros(3, 3))


def test_grid_quadrature_matches_closed_form_log_z():
    assert log_z_grid(gaussian_target, lim=8.0, n=401) == pytest.approx(LOG_Z, abs=1e-8)
    # every built-in target is normalisable: the box edge holds no mass
    for name in TARGETS:
        assert log_z_grid(name, lim=7.0, n=401) == pytest.approx(
            log_z_grid(name, lim=9.0, n=515), abs=1e-3
        )


def test_iaf_fits_a_gaussian_target_and_estimates_log_z():
    torch.manual_seed(0)
    flow = IAF(2, transforms=2, hidden=(16,))
    untrained = evaluate_vi(
        flow, gaussian_target, n=5000, generator=torch.Generator().manual_seed(1)
    )
    res = fit_vi(flow, gaussian_target, steps=400, lr=1e-2, eval_samples=20000, seed=0)
    # an affine autoregressive q contains the target: KL(q || p) = log Z - ELBO -> 0
    assert untrained.elbo < LOG_Z - 0.3
    assert LOG_Z - 0.03 < res.elbo <= LOG_Z + 3 * res.elbo_se
    assert abs(res.log_z - LOG_Z) < 3 * res.log_z_se + 2e-3
    assert res.ess > 0.9 and len(res.losses) == 400


def test_planar_vi_on_u1_covers_both_lobes_and_stays_a_lower_bound():
    # U1's lobes are mirror images: a q on one lobe has gap log 2 = 0.69 at best. With the
    # paper's unshifted m, this run ends on one lobe for seeds 0, 1, 2 (measured: 0%, 100%,
    # 0% of samples right of the axis; gaps 0.84, 0.92, 0.76)
    log_z = log_z_grid("U1", lim=6.0, n=601)
    torch.manual_seed(0)
    flow = learnable_base(PlanarFlow(2, transforms=16, for_sampling=True))
    g = torch.Generator().manual_seed(3)
    before = evaluate_vi(flow, "U1", n=20000, generator=g)
    res = fit_vi(
        flow, "U1", steps=300, anneal=150, warmup=20, batch_size=128, lr=1e-2, eval_samples=20000
    )
    with torch.no_grad():
        z = flow.sample(4000, generator=g)
    assert 0.3 < float((z[:, 0] > 0).float().mean()) < 0.7
    assert res.elbo > before.elbo + 1.0
    assert log_z - 0.65 < res.elbo <= log_z + 3 * res.elbo_se
    assert res.log_z <= log_z + 5 * res.log_z_se + 0.05  # IS is unbiased for Z, not log Z


@pytest.mark.parametrize(
    "build",
    [
        lambda: PlanarFlow(2, transforms=4, for_sampling=True),
        lambda: RadialFlow(2, transforms=4, for_sampling=True),
        lambda: IAF(2, transforms=2, hidden=(8,)),
        lambda: NSF(2, transforms=1, hidden=(8,)),
    ],
    ids=["planar", "radial", "iaf", "nsf"],
)
def test_each_flow_family_trains_as_q(build, tmp_path):
    torch.manual_seed(0)
    flow = build()
    g = torch.Generator().manual_seed(0)
    before = evaluate_vi(flow, gaussian_target, n=4000, generator=g)
    res = fit_vi(flow, gaussian_target, steps=40, lr=2e-2, eval_samples=4000)
    assert math.isfinite(res.elbo) and res.elbo > before.elbo
    assert res.elbo <= LOG_Z + 3 * res.elbo_se
    grads = [p.grad for p in flow.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)


def test_bad_arguments_and_plot(tmp_path):
    flow = PlanarFlow(2, transforms=2, for_sampling=True)
    with pytest.raises(ConfigError, match="unknown target 'U5'"):
        fit_vi(flow, "U5")
    with pytest.raises(ConfigError, match="steps must be an int >= 1, got 0"):
        fit_vi(flow, "U1", steps=0)
    with pytest.raises(ConfigError, match="warmup must be shorter than steps"):
        fit_vi(flow, "U1", steps=10, warmup=10)
    with pytest.raises(TypeError, match="callable"):
        fit_vi(flow, 3.0)
    plot_vi({"planar": flow}, "U2", tmp_path / "vi.png", n=40)
    assert (tmp_path / "vi.png").stat().st_size > 1000


def test_lr_schedule_warms_up_then_decays_by_cosine():
    f = [_lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in itertools.pairwise(f[9:]))
    assert _lr_factor(0, 50, 0) == pytest.approx(1.0)


def test_fresh_planar_stack_starts_near_the_identity():
    # the paper's m(a) = -1 + softplus(a) gives w.u_hat = -0.31 at init: 32 layers would
    # start q at log-det ~ 32 log(0.69) = -12 (and collapse VI onto one mode of U1)
    torch.manual_seed(0)
    flow = PlanarFlow(2, transforms=32, for_sampling=True)
    z, log_q = flow.sample_and_log_prob(2000, generator=torch.Generator().manual_seed(0))
    log_base = StandardNormal((2,)).log_prob(z)
    assert (log_q - log_base).abs().mean() < 0.5


def test_learnable_base_keeps_the_transform_and_starts_at_the_same_q():
    torch.manual_seed(0)
    flow = PlanarFlow(2, transforms=4, for_sampling=True)
    q = learnable_base(flow)
    assert isinstance(q.base, DiagGaussian) and q.transform is flow.transform
    z = torch.randn(50, 2)
    with torch.no_grad():
        torch.testing.assert_close(q.log_prob(z), flow.log_prob(z))
    names = {n for n, _ in q.named_parameters()}
    assert {"base.loc", "base.log_scale"} <= names
    with pytest.raises(TypeError, match="exactflow Flow"):
        learnable_base(flow.transform)
    with pytest.raises(ConfigError, match="unconditional"):
        learnable_base(PlanarFlow(2, transforms=2, context=3))


def test_amortised_planar_starts_context_free_then_depends_on_context():
    torch.manual_seed(0)
    layer = Inverse(PlanarLayer(2, context=3))
    plain = Inverse(PlanarLayer(2))
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if "amortise" not in k})
    z, c = torch.randn(6, 2), torch.randn(6, 3)
    x0, l0 = plain(z)
    x1, l1 = layer(z, c)
    torch.testing.assert_close(x1, x0)  # A = 0: every context gets the shared layer
    torch.testing.assert_close(l1, l0)
    with torch.no_grad():
        layer.transform.amortise.weight.normal_()
    x2, _ = layer(z, c)
    assert not torch.allclose(x2, x0)
    with pytest.raises(ContextError, match="needs a context of shape \\(\\*batch, 3\\)"):
        layer(z)
    with pytest.raises(ContextError, match="got \\(6, 2\\)"):
        layer(z, c[:, :2])
    with pytest.raises(ValueError, match="context must be >= 0"):
        PlanarLayer(2, context=-1)


# issue 8's acceptance point at the configuration of benchmarks/vi.py (seed 0); measured gaps
# over seeds are in docs/guide/vi.md
ACCEPTANCE = {
    # 15 000 steps with beta annealed over 5 000: at 3 000 / 1 000 the planar flow stopped
    # 0.10-0.26 nats short on U3/U4 for seeds 0-2 (docs/guide/vi.md)
    "planar": (
        lambda: PlanarFlow(2, transforms=32, for_sampling=True),
        {"steps": 15000, "lr": 5e-3, "anneal": 5000},
    ),
    # knot-derivative factors in (0.5, 2) instead of the density-estimation default (0.5, 4):
    # reverse KL lands in a kinked-ridge basin for 6 of 10 seeds on U2 with (0.5, 4), for 1 of
    # 20 fits over U1-U4 x seeds 0-4 with (0.5, 2) (docs/guide/vi.md)
    "nsf": (
        lambda: NSF(2, transforms=4, hidden=(32, 32), map_kwargs={"derivative_range": (0.5, 2)}),
        {"steps": 2000, "lr": 3e-3, "anneal": 1000},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("flow_name", list(ACCEPTANCE))
@pytest.mark.parametrize("target", list(TARGETS))
def test_elbo_within_a_tenth_of_a_nat_of_log_z(target, flow_name):
    log_z = log_z_grid(target)  # quadrature on a 1201^2 grid over [-8, 8]^2
    build, kwargs = ACCEPTANCE[flow_name]
    torch.manual_seed(0)
    flow = learnable_base(build())
    flow.validate = False
    res = fit_vi(flow, target, batch_size=256, warmup=100, seed=0, **kwargs)
    assert res.elbo_se < 0.005  # 10^5 samples: the 0.1 criterion is not a matter of noise
    assert res.elbo <= log_z + 3 * res.elbo_se
    assert log_z - res.elbo < 0.1
