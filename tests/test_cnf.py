"""Continuous normalizing flows: closed forms, log-dets vs brute-force Jacobians, trace
estimators, adjoint gradients, NFE counters, RNODE terms, the FFJORD builder."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian
from torchdiffeq import odeint

from exactflow import Flow
from exactflow.continuous import (
    CNF,
    RNODE,
    TimeMLP,
    exact_divergence,
    hutchinson_divergence,
    regularization_loss,
    regularization_terms,
    sample_probe,
)
from exactflow.distributions import StandardNormal
from exactflow.errors import ConfigError, ContextError, ShapeError
from exactflow.models.continuous import FFJORD

F64 = torch.float64


class Contract(nn.Module):
    """f(t, z) = -z: z(t) = x e^{-t}, tr ∂f/∂z = -D."""

    def forward(self, t, z):
        return -z


class TimeScaled(nn.Module):
    """f(t, z) = -t z: z(t) = x e^{-t²/2}, ∂f/∂t = -z."""

    def forward(self, t, z):
        return -t * z


def random_mlp(d: int, context: int = 0, seed: int = 0, hidden=(16, 16), scale: float = 0.4):
    torch.manual_seed(seed)
    net = TimeMLP(d, hidden, context).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


# -- closed forms ------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 3])
def test_contraction_log_density_change_and_log_prob(d):
    T = 1.3
    cnf = CNF(Contract(), trace="exact", solver="dopri5", atol=1e-11, rtol=1e-11, t1=T).double()
    x = torch.randn(6, d, dtype=F64, generator=torch.Generator().manual_seed(0))
    z, ladj = cnf(x)
    torch.testing.assert_close(z, x * math.exp(-T), rtol=1e-8, atol=1e-9)
    # d log p(z(t))/dt = -tr ∂f/∂z = D, so log p changes by D·T and ladj = -D·T
    torch.testing.assert_close(-ladj, torch.full((6,), d * T, dtype=F64), rtol=0, atol=1e-6)

    flow = Flow(cnf, StandardNormal((d,))).double().eval()
    # z = x e^{-T} ~ N(0, I)  <=>  x ~ N(0, e^{2T} I)
    expected = torch.distributions.Normal(0.0, math.exp(T)).log_prob(x).sum(-1)
    torch.testing.assert_close(flow.log_prob(x), expected, rtol=0, atol=1e-6)

    x_back, ladj_inv = cnf.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-8)
    torch.testing.assert_close(ladj_inv, -ladj, rtol=0, atol=1e-8)


def test_rademacher_probe_is_exact_for_diagonal_jacobians():
    # εᵀ(-I)ε = -|ε|² = -D for ±1 entries; a Gaussian probe would scatter
    d, T = 4, 0.7
    cnf = CNF(Contract(), trace="hutchinson", probe="rademacher", t1=T, atol=1e-9, rtol=1e-9)
    x = torch.randn(50, d, dtype=F64)
    _, ladj = cnf.double()(x)
    torch.testing.assert_close(ladj, torch.full((50,), -d * T, dtype=F64), rtol=0, atol=1e-7)
    cnf.probe = "gaussian"
    _, ladj_g = cnf(x)
    assert ladj_g.std() > 0.1


# -- log-det against the brute-force Jacobian of the solved flow map ----------------------------


@pytest.mark.parametrize("d", [2, 5])
def test_logdet_matches_bruteforce_jacobian_of_solved_map(d):
    net = random_mlp(d, seed=d)
    cnf = CNF(net, trace="exact", solver="dopri5", atol=1e-10, rtol=1e-10).double().eval()
    x = torch.randn(3, d, dtype=F64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, ladj = cnf(x)
    grid = torch.linspace(0.0, 1.0, 101, dtype=F64)

    def flow_map(p):  # the plain ODE, no trace, differentiated by autograd through rk4
        return odeint(net, p.unsqueeze(0), grid, method="rk4")[-1].squeeze(0)

    for i in range(x.shape[0]):
        jac = jacobian(flow_map, x[i])
        logdet = torch.linalg.slogdet(jac)[1]
        assert abs(float(logdet - ladj[i])) < 1e-5, (float(logdet), float(ladj[i]))
    assert ladj.abs().max() > 0.05  # the map is far from volume preserving


# -- trace estimators ----------------------------------------------------------------------------


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_for_a_random_network(probe):
    d, n = 4, 10_000
    net = random_mlp(d, seed=3)
    t = torch.tensor(0.4, dtype=F64)
    z0 = torch.randn(1, d, dtype=F64, generator=torch.Generator().manual_seed(4))
    z = z0.expand(n, d).clone().requires_grad_(True)
    f = net(t, z)
    z1 = z0.clone().requires_grad_(True)
    tr_exact, frob_exact = exact_divergence(net(t, z1), z1)
    eps = sample_probe(z, probe, generator=torch.Generator().manual_seed(5))
    tr_est, frob_est = hutchinson_divergence(f, z, eps)
    for est, exact in ((tr_est, tr_exact[0]), (frob_est, frob_exact[0])):
        se = est.std() / math.sqrt(n)
        assert abs(float(est.mean() - exact)) < 3 * float(se), (float(est.mean()), float(exact))
        assert float(se) > 0  # a real estimate, not a constant


def test_rademacher_variance_not_above_gaussian():
    # Var_gauss = 2‖A_s‖²_F, Var_rademacher = 2(‖A_s‖²_F - Σ a_ii²), A_s = (A + Aᵀ)/2
    d, n = 5, 10_000
    g = torch.Generator().manual_seed(6)
    a = torch.randn(d, d, dtype=F64, generator=g) + 2.0 * torch.eye(d, dtype=F64)
    z = torch.zeros(n, d, dtype=F64, requires_grad=True)
    f = z @ a.T
    sym = 0.5 * (a + a.T)
    var = {}
    for kind in ("rademacher", "gaussian"):
        est, _ = hutchinson_divergence(f, z, sample_probe(z, kind, generator=g))
        assert abs(float(est.mean() - a.trace())) < 3 * float(est.std()) / math.sqrt(n)
        var[kind] = float(est.var())
    theory_g = 2 * float(sym.square().sum())
    theory_r = theory_g - 2 * float(a.diagonal().square().sum())
    assert var["gaussian"] == pytest.approx(theory_g, rel=0.1)
    assert var["rademacher"] == pytest.approx(theory_r, rel=0.1)
    assert var["rademacher"] < var["gaussian"]


def test_eval_mode_uses_exact_trace():
    net = random_mlp(3, seed=7)
    cnf = CNF(net, trace="hutchinson", solver="rk4", steps=6).double()
    exact = CNF(copy.deepcopy(net), trace="exact", solver="rk4", steps=6).double()
    x = torch.randn(5, 3, dtype=F64)
    with torch.no_grad():
        _, l1 = cnf(x)
        _, l2 = cnf(x)
        assert not torch.allclose(l1, l2)  # training mode: a fresh probe per solve
        cnf.eval()
        _, l3 = cnf(x)
        torch.testing.assert_close(l3, exact(x)[1], rtol=0, atol=1e-12)
        cnf.eval_trace = None  # opt out: eval uses the training estimator
        _, l4 = cnf(x)
        assert not torch.allclose(l3, l4)


def test_inference_mode_gives_the_same_log_prob():
    flow = Flow(
        CNF(random_mlp(2, seed=19, hidden=(8,)), solver="rk4", steps=4), StandardNormal((2,))
    )
    flow = flow.double().eval()
    x = torch.randn(5, 2, dtype=F64)
    with torch.no_grad():
        expected = flow.log_prob(x)
    with torch.inference_mode():
        got = flow.log_prob(x)
        samples = flow.sample(3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert samples.shape == (3, 2) and torch.isfinite(samples).all()


def test_auto_trace_switches_at_eight_dimensions():
    cnf = CNF(TimeMLP(9, (4,)))
    assert cnf.trace_mode(8) == "exact" and cnf.trace_mode(9) == "hutchinson"
    cnf.eval()
    assert cnf.trace_mode(9) == "exact"


# -- gradients and NFE -------------------------------------------------------------------------


def _grads(adjoint: bool, rnode: RNODE | None, trace: str):
    net = random_mlp(2, context=1, seed=8, hidden=(8,))
    cnf = CNF(
        net,
        trace=trace,
        solver="dopri5",
        atol=1e-10,
        rtol=1e-10,
        adjoint=adjoint,
        regularization=rnode,
    ).double()
    x = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(9))
    x.requires_grad_(True)
    c = torch.randn(6, 1, dtype=F64, generator=torch.Generator().manual_seed(10))
    c.requires_grad_(True)
    torch.manual_seed(11)  # the same Hutchinson probe in both runs
    z, ladj = cnf(x, c)
    loss = (0.5 * z.square().sum(-1) - ladj).mean() + regularization_loss(cnf)
    loss.backward()
    return [x.grad, c.grad] + [p.grad for p in net.parameters()], cnf


@pytest.mark.parametrize(
    "rnode, trace",
    [(None, "exact"), (RNODE(kinetic=0.1, jacobian=0.1, smoothness=0.1), "hutchinson")],
    ids=["plain-exact", "rnode-hutchinson"],
)
def test_adjoint_gradients_equal_direct_backprop(rnode, trace):
    direct, cnf_d = _grads(False, rnode, trace)
    adjoint, cnf_a = _grads(True, rnode, trace)
    for gd, ga in zip(direct, adjoint):
        assert gd is not None and ga is not None
        rel = float((gd - ga).norm() / gd.norm().clamp_min(1e-12))
        assert rel < 1e-4, rel
    assert cnf_d.nfe_backward == 0 and cnf_a.nfe_backward > 0


@pytest.mark.parametrize("adjoint", [False, True])
def test_nfe_counters(adjoint):
    steps = 5
    cnf = CNF(random_mlp(2, seed=12, hidden=(4,)), solver="rk4", steps=steps, adjoint=adjoint)
    x = torch.randn(4, 2, dtype=F64)
    z, ladj = cnf(x)
    assert cnf.nfe_forward == 4 * steps  # rk4: four evaluations per step
    (z.sum() + ladj.sum()).backward()
    assert cnf.nfe_backward == (4 * steps if adjoint else 0)
    with torch.no_grad():
        cnf.inverse(z)
    assert cnf.nfe == {"forward": 8 * steps, "backward": 4 * steps if adjoint else 0}
    cnf.reset_nfe()
    assert cnf.nfe_forward == 0 and cnf.nfe_backward == 0

    adaptive = CNF(random_mlp(2, seed=12, hidden=(4,)), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        adaptive(x)
    loose = adaptive.nfe_forward
    adaptive.reset_nfe()
    adaptive.atol = adaptive.rtol = 1e-9
    with torch.no_grad():
        adaptive(x)
    assert adaptive.nfe_forward > loose > 0  # tighter tolerance, more evaluations


# -- RNODE ---------------------------------------------------------------------------------------


def test_rnode_terms_closed_form_for_contraction():
    d, T = 3, 0.8
    w = RNODE(kinetic=0.5, jacobian=0.25, smoothness=2.0)
    cnf = CNF(Contract(), trace="exact", t1=T, atol=1e-10, rtol=1e-10, regularization=w).double()
    x = torch.randn(8, d, dtype=F64, generator=torch.Generator().manual_seed(13))
    cnf(x)
    sq = x.square().sum(-1).mean()
    kinetic = sq * (1 - math.exp(-2 * T)) / 2  # ∫ |x e^{-t}|² dt
    terms = cnf.regularization
    torch.testing.assert_close(terms["kinetic"], kinetic, rtol=1e-7, atol=0)
    torch.testing.assert_close(terms["jacobian"], torch.tensor(d * T, dtype=F64), rtol=1e-7, atol=0)
    torch.testing.assert_close(
        terms["smoothness"], torch.tensor(0.0, dtype=F64), rtol=0, atol=1e-12
    )
    expected = 0.5 * kinetic + 0.25 * d * T
    torch.testing.assert_close(regularization_loss(cnf), expected, rtol=1e-7, atol=0)
    assert set(regularization_terms(Flow(cnf, StandardNormal((d,))))) == {
        "kinetic",
        "jacobian",
        "smoothness",
    }
    # the acceleration of the path: (∂f/∂z) f = z, so its integral equals the kinetic energy
    cnf.rnode = RNODE(smoothness=1.0, derivative="total")
    cnf(x)
    torch.testing.assert_close(cnf.regularization["smoothness"], kinetic, rtol=1e-7, atol=0)
    # evaluation computes nothing
    cnf.eval()
    cnf(x)
    assert cnf.regularization == {} and float(regularization_loss(cnf)) == 0.0


def test_rnode_time_derivative_closed_form():
    # f = -t z: ∂f/∂t = -z, ‖z(t)‖² = ‖x‖² e^{-t²}, ∫_0^T = ‖x‖² (√π/2) erf(T)
    T = 1.1
    rnode = RNODE(smoothness=1.0)
    cnf = CNF(TimeScaled(), t1=T, atol=1e-10, rtol=1e-10, regularization=rnode).double()
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(14))
    cnf(x)
    expected = x.square().sum(-1).mean() * math.sqrt(math.pi) / 2 * math.erf(T)
    torch.testing.assert_close(cnf.regularization["smoothness"], expected, rtol=1e-7, atol=0)
    # the inverse solve reports the same (positive) integral
    z, _ = cnf(x)
    cnf.inverse(z.detach())
    torch.testing.assert_close(cnf.regularization["smoothness"], expected, rtol=1e-6, atol=0)


def test_rnode_switches_no_error_control_on():
    # regulariser columns are integrated but do not drive the adaptive step size
    x = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(15))
    counts = []
    for rnode in (None, RNODE(kinetic=1.0, jacobian=1.0)):
        cnf = CNF(random_mlp(2, seed=16, hidden=(8,)), trace="exact", regularization=rnode)
        cnf(x)
        counts.append(cnf.nfe_forward)
    assert counts[0] == counts[1]


def test_regularized_module_copies_without_graph():
    cnf = CNF(
        random_mlp(2, seed=17, hidden=(4,)),
        solver="euler",
        steps=3,
        regularization=RNODE(kinetic=1.0),
    )
    cnf(torch.randn(3, 2, dtype=F64))
    assert cnf.regularization_loss.requires_grad
    clone = copy.deepcopy(cnf)  # would fail if the stored graph-holding tensors were copied
    assert clone.regularization_loss is None


# -- builder and training -------------------------------------------------------------------------


def test_ffjord_builder_identity_at_init_and_context():
    flow = FFJORD(2, hidden=(8, 8), context=3)
    x = torch.randn(10, 2)
    c = torch.randn(10, 3)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    torch.testing.assert_close(flow.log_prob(x, c), expected)
    with pytest.raises(ContextError):
        flow.transform(x)
    samples = flow.sample(4, torch.randn(3))
    assert samples.shape == (4, 2)


def test_ffjord_short_training_learns_a_stretched_gaussian():
    torch.manual_seed(0)
    scale = torch.tensor([2.0, 0.5])
    g = torch.Generator().manual_seed(1)
    data = torch.randn(2000, 2, generator=g) * scale
    test = torch.randn(2000, 2, generator=g) * scale
    flow = FFJORD(2, hidden=(16, 16), trace="exact", solver="rk4", steps=6, adjoint=False)
    opt = torch.optim.Adam(flow.parameters(), lr=2e-2)
    for _ in range(40):
        batch = data[torch.randint(0, 2000, (256,), generator=g)]
        loss = -flow.log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    flow.eval()
    with torch.no_grad():
        nll = float(-flow.log_prob(test).mean())
    entropy = math.log(2 * math.pi * math.e) + float(scale.log().sum())  # 2.838
    identity_nll = float(-torch.distributions.Normal(0.0, 1.0).log_prob(test).sum(-1).mean())
    assert identity_nll > 3.9
    assert nll < entropy + 0.1, (nll, entropy)


# -- bad input -----------------------------------------------------------------------------------


def test_bad_configuration_is_rejected():
    net = TimeMLP(2, (4,))
    with pytest.raises(ConfigError, match="trace"):
        CNF(net, trace="approximate")
    with pytest.raises(ConfigError, match="probe"):
        CNF(net, probe="uniform")
    with pytest.raises(ConfigError, match="unknown solver"):
        CNF(net, solver="rk45")
    with pytest.raises(ConfigError, match="fixed-step"):
        CNF(net, solver="dopri5", steps=10)
    with pytest.raises(ConfigError, match="t1"):
        CNF(net, t1=0.0)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        CNF(lambda t, z: -z)
    with pytest.raises(ConfigError, match=r"RNODE\.kinetic"):
        RNODE(kinetic=-1.0)
    with pytest.raises(ConfigError, match="unknown RNODE keys"):
        CNF(net, regularization={"kinetik": 1.0})
    with pytest.raises(ConfigError, match="time"):
        TimeMLP(2, time="film")


def test_bad_inputs_are_rejected():
    cnf = CNF(TimeMLP(2, (4,), context=1))
    with pytest.raises(ShapeError, match=r"\(\*batch, 2\)"):
        cnf(torch.randn(3, 4))
    with pytest.raises(ContextError, match="no context"):
        cnf(torch.randn(3, 2))
    with pytest.raises(ShapeError, match="context must have shape"):
        cnf(torch.randn(3, 2), torch.randn(3, 2))
    with pytest.raises(ShapeError, match="does not broadcast"):
        cnf(torch.randn(3, 2), torch.randn(4, 1))

    class Wrong(nn.Module):
        def forward(self, t, z):
            return z[:, :1]

    with pytest.raises(ShapeError, match="dynamics must return"):
        CNF(Wrong())(torch.randn(3, 2))


def test_unconditional_cnf_ignores_context_and_keeps_batch_shape():
    cnf = CNF(random_mlp(2, seed=18, hidden=(4,)), solver="rk4", steps=4).eval()
    x = torch.randn(2, 3, 2, dtype=F64)
    z, ladj = cnf(x, torch.randn(2, 3, 5, dtype=F64))
    assert z.shape == x.shape and ladj.shape == (2, 3)
    z2, _ = cnf(x)
    torch.testing.assert_close(z, z2)
    empty, l0 = cnf(torch.zeros(0, 2, dtype=F64))
    assert empty.shape == (0, 2) and l0.shape == (0,)
