"""The certification tool: it passes correct transforms, catches wrong ones, certifies flows."""

from __future__ import annotations

import math

import pytest
import torch

import exactflow as ef
from exactflow.check import check_flow, check_transform, declared_tolerance
from exactflow.cli import _check_input, main
from exactflow.continuous import CNF, FixedStepCNF, TimeMLP
from exactflow.distributions import GaussianMixture, StandardNormal
from exactflow.errors import CheckFailed
from exactflow.models import MODELS
from exactflow.transforms import Compose, LULinear, Planar, Radial, Transform, sum_rightmost
from helpers import perturb


class CubeRoot(Transform):
    """A user-defined transform: z = x + x^3 / 3 (forward), inverse by Cardano's formula."""

    def forward(self, x, context=None):
        return x + x**3 / 3, sum_rightmost(torch.log1p(x**2), 1)

    def inverse(self, z, context=None):
        # x^3 + 3x - 3z = 0 has the single real root below (p = 3 > 0)
        s = torch.sqrt(9 * z**2 / 4 + 1)
        x = torch.sign(1.5 * z + s) * (1.5 * z + s).abs() ** (1 / 3) - (s - 1.5 * z) ** (1 / 3)
        return x, -sum_rightmost(torch.log1p(x**2), 1)


class WrongLogDet(CubeRoot):
    def forward(self, x, context=None):
        z, ladj = super().forward(x, context)
        return z, 0.5 * ladj  # wrong by a factor


class WrongInverse(CubeRoot):
    def inverse(self, z, context=None):
        x, ladj = super().inverse(z, context)
        return x * 1.001, ladj


def test_user_defined_transform_is_certified():
    x = torch.randn(16, 3, dtype=torch.float64)
    report = check_transform(CubeRoot(), x)
    assert report.passed
    assert report.ladj_error_forward < 1e-10 and report.roundtrip_forward < 1e-10
    assert "PASSED" in str(report)


def test_wrong_logdet_is_caught():
    x = torch.randn(16, 3, dtype=torch.float64)
    with pytest.raises(CheckFailed, match="log-det error"):
        check_transform(WrongLogDet(), x)
    report = check_transform(WrongLogDet(), x, raise_on_failure=False)
    assert not report.passed and report.ladj_error_forward > 1e-3


def test_wrong_inverse_is_caught():
    x = torch.randn(16, 3, dtype=torch.float64) + 2.0
    with pytest.raises(CheckFailed, match="round trip"):
        check_transform(WrongInverse(), x)


def test_nonfinite_gradient_is_caught():
    class BadGrad(Transform):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(0.0))

        def forward(self, x, context=None):
            return x + torch.sqrt(self.a), torch.zeros(x.shape[:-1], dtype=x.dtype)

        def inverse(self, z, context=None):
            return z - torch.sqrt(self.a), torch.zeros(z.shape[:-1], dtype=z.dtype)

    report = check_transform(BadGrad(), torch.randn(4, 2), raise_on_failure=False)
    assert report.nonfinite_grads == ["a"]
    assert not report.passed


def test_check_does_not_touch_the_original():
    t = LULinear(3)
    check_transform(t, torch.randn(5, 3))
    assert t.log_diag.dtype == torch.float32


@pytest.mark.parametrize("dim", [1, 2])
def test_check_flow_integrates_to_one(dim):
    torch.manual_seed(0)
    t = perturb(Compose([LULinear(dim), Radial(dim), Planar(dim)]), 0.4)
    flow = ef.Flow(t, GaussianMixture(dim, components=3))
    report = check_flow(flow, generator=torch.Generator().manual_seed(0))
    assert report.passed, str(report)
    assert abs(report.integral - 1.0) < 1e-2


def test_check_flow_catches_unnormalised_density():
    class Leaky(Transform):
        def forward(self, x, context=None):
            return x, torch.full(x.shape[:-1], 0.5, dtype=x.dtype)  # claims volume change

        def inverse(self, z, context=None):
            return z, torch.full(z.shape[:-1], -0.5, dtype=z.dtype)

    flow = ef.Flow(Leaky(), StandardNormal(2))
    report = check_flow(flow, raise_on_failure=False)
    assert not report.passed
    assert abs(report.integral - 1.6487) < 0.02  # e^0.5


# -- issue 20's defects: image shapes on the CLI, ODE tolerances, the grid's own error ----------


def test_cli_check_takes_an_image_shape(capsys):
    """`exactflow check glow` / `realnvp-image` failed: image builders got `--features 2`."""
    assert main(["check", "realnvp-image"]) == 0  # the default shape, 1,4,4
    out = capsys.readouterr().out
    assert "realnvp-image (shape=1,4,4, context=0)" in out and "PASSED" in out
    assert _check_input("glow", MODELS["glow"], None, "2,8,8") == ((2, 8, 8), "shape=2,8,8")
    assert _check_input("nsf", MODELS["nsf"], None, None) == (2, "features=2")
    for argv, message in (
        (["check", "glow", "--shape", "1,4"], "--shape must be C,H,W"),
        (["check", "glow", "--shape", "1,a,4"], "--shape must be C,H,W"),
        (["check", "glow", "--shape", "0,4,4"], "--shape must be C,H,W"),
        (["check", "glow", "--features", "3"], "glow is an image model"),
        (["check", "nsf", "--shape", "1,4,4"], "nsf is a vector model"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def _perturbed_cnf(**solver) -> CNF:
    torch.manual_seed(0)
    return perturb(CNF(TimeMLP(2, (16,)), **solver), 0.1)


def test_ode_models_are_checked_against_their_own_solver_tolerance():
    """`exactflow check ffjord` FAILED "round trip 1.185e-04 > 1e-10": an adaptive solve at
    atol = rtol = 1e-5 is not exact, and the CNF now declares what it achieves."""
    cnf = _perturbed_cnf(atol=1e-5, rtol=1e-5)
    assert declared_tolerance(cnf) == pytest.approx(1e-2)  # 1000 max(atol, rtol)
    assert declared_tolerance(ef.Flow(cnf, StandardNormal(2)).transform) == pytest.approx(1e-2)
    assert declared_tolerance(LULinear(2)) == 0.0  # exact bijections keep float64 tolerances
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    report = check_transform(cnf, x, jacobian_samples=2)
    assert report.passed and report.atol_roundtrip == pytest.approx(1e-2)
    assert report.roundtrip_forward > 1e-10  # what failed before: the solver's own error
    assert "tolerances   round trip 1e-02" in str(report)
    # an explicit tolerance still wins
    strict = check_transform(
        cnf, x, jacobian_samples=2, atol_roundtrip=1e-10, atol_ladj=1e-8, raise_on_failure=False
    )
    assert not strict.passed

    class OffByATenth(CNF):  # a wrong log-det is caught at the solver's tolerance
        def forward(self, x, context=None):
            z, ladj = super().forward(x, context)
            return z, ladj + 0.1

    wrong = OffByATenth(TimeMLP(2, (16,)), atol=1e-5, rtol=1e-5)
    wrong.load_state_dict(cnf.state_dict())
    with pytest.raises(CheckFailed, match="log-det error"):
        check_transform(wrong, x, jacobian_samples=2)


def test_fixed_step_tolerance_follows_the_step_size():
    rk4 = CNF(TimeMLP(3, (8,)), solver="rk4", steps=20, t1=0.5)
    assert rk4.check_tolerance() == pytest.approx(1e3 * (0.5 / 20) ** 4)
    euler = CNF(TimeMLP(3, (8,)), solver="euler", steps=20, t1=0.5)
    assert euler.check_tolerance() == pytest.approx(1e3 * 0.5 / 20)
    unrolled = FixedStepCNF(TimeMLP(3, (8,)), t1=0.5, steps=20)
    assert unrolled.check_tolerance() == pytest.approx(rk4.check_tolerance())


def _spiky_flow(dim: int, width: float) -> ef.Flow:
    """70 % of the mass in N(0, I), 30 % in a spike of std ``width``."""
    base = GaussianMixture(dim, components=2)
    with torch.no_grad():
        base.logits.copy_(torch.tensor([0.0, math.log(0.3 / 0.7)]))
        base.loc.copy_(torch.tensor([[0.0] * dim, [0.31, 0.17][:dim]]))
        base.log_scale.copy_(torch.full((2, dim), math.log(width)))
        base.log_scale[0] = 0.0
    torch.manual_seed(0)
    return ef.Flow(perturb(LULinear(dim), 0.3), base)


@pytest.mark.parametrize("dim", [1, 2])
def test_check_flow_resolves_what_a_uniform_grid_misses(dim):
    """`exactflow check nsf-coupling` failed "density integrates to 0.9894" (2000^2 points give
    0.998): the fixed 400^2 grid was wrong, not the model. A 30 % spike of std 1e-3 falls between
    the points of such a grid (it integrated to 0.70); the adaptive grid refines where the
    samples are and finds all of it, with an error estimate of its own."""
    report = check_flow(_spiky_flow(dim, 1e-3), generator=torch.Generator().manual_seed(0))
    assert report.passed, str(report)
    assert abs(report.integral - 1.0) < 2e-3 and 0 < report.integral_error < 5e-3
    assert report.integral_points < 2**18
    assert "± " in str(report) and "adaptive" in str(report)


def test_an_unresolved_grid_widens_its_tolerance_visibly():
    # on a starved budget the estimate is poor, and the check says how poor instead of failing
    flow = _spiky_flow(2, 0.05)
    report = check_flow(
        flow,
        generator=torch.Generator().manual_seed(0),
        grid_points=8,
        max_points=400,
        raise_on_failure=False,
    )
    assert report.integral_points <= 400
    assert abs(report.integral - 1.0) <= 1e-2 + report.integral_error
    assert report.integral_error > 1e-2


@pytest.mark.slow
def test_cli_check_passes_the_issues_models():  # the issue's commands, ~30 s on 2 cores
    for model in ("nsf-coupling", "ffjord", "cfm", "otcfm", "rectified"):
        assert main(["check", model, "--features", "2"]) == 0, model
    assert main(["check", "glow"]) == 0
