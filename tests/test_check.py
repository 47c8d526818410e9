"""The certification tool: it passes correct transforms, catches wrong ones, certifies flows."""

from __future__ import annotations

import pytest
import torch

import exactflow as ef
from exactflow.check import check_flow, check_transform
from exactflow.distributions import GaussianMixture, StandardNormal
from exactflow.errors import CheckFailed
from exactflow.transforms import Compose, LULinear, Planar, Radial, Transform, sum_rightmost


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
    t = Compose([LULinear(dim), Radial(dim), Planar(dim)])
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.4 * torch.randn_like(p))
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
