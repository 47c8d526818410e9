"""Flow: closed-form likelihoods, sampling shapes, context handling, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

import exactflow as ef
from exactflow.distributions import ConditionalGaussian, DiagGaussian, StandardNormal
from exactflow.errors import ContextError, DomainError, DTypeError, ExactflowError, ShapeError
from exactflow.transforms import Affine, AffineMap, Compose, ElementwiseTransform, LULinear


def lecture_flow() -> ef.Flow:
    """x = 2 + 3 z, z ~ N(0, 1)."""
    return ef.Flow(ef.transforms.Affine(2.0, 3.0), StandardNormal(())).double()


def test_lecture_example_affine_1d():
    flow = lecture_flow()
    x = torch.tensor(5.0, dtype=torch.float64)
    expected = Normal(torch.tensor(2.0, dtype=torch.float64), 3.0).log_prob(x)
    got = flow.log_prob(x)
    assert abs(float(got - expected)) < 1e-12
    # -0.5 - log 3 - 0.5 log 2 pi: the lecture's printed -2.3259 is not attainable
    assert abs(float(got) - (-0.5 - math.log(3.0) - 0.5 * math.log(2 * math.pi))) < 1e-12
    assert round(float(got), 4) == -2.5176


def test_lecture_example_accepts_python_numbers_and_batches():
    flow = lecture_flow()
    assert abs(float(flow.log_prob(5.0)) + 2.5176) < 1e-4
    xs = torch.linspace(-5, 9, 11, dtype=torch.float64)
    torch.testing.assert_close(flow.log_prob(xs), Normal(2.0, 3.0).log_prob(xs.float()).double())


def test_affine_learnable_gaussian_vector_closed_form():
    loc = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    scale = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    flow = ef.Flow(Affine(loc, scale, learnable=True), StandardNormal(3)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    expected = Normal(loc, scale).log_prob(x).sum(-1)
    torch.testing.assert_close(flow.log_prob(x), expected, rtol=0, atol=1e-12)


def test_linear_flow_is_a_gaussian_with_known_covariance():
    # z = W x + b with z ~ N(0, I)  =>  x ~ N(-W^{-1} b, (W^T W)^{-1})
    torch.manual_seed(0)
    t = LULinear(4).double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    flow = ef.Flow(t, StandardNormal(4)).double()
    w, b = t.weight(), t.bias
    mean = -torch.linalg.solve(w, b)
    cov = torch.linalg.inv(w.T @ w)
    mvn = torch.distributions.MultivariateNormal(mean.detach(), cov.detach())
    x = torch.randn(20, 4, dtype=torch.float64)
    torch.testing.assert_close(flow.log_prob(x), mvn.log_prob(x), rtol=0, atol=1e-10)


def test_sample_and_log_prob_agree_with_log_prob():
    torch.manual_seed(0)
    flow = ef.Flow(
        Compose([LULinear(3), ElementwiseTransform(AffineMap(), 3, init_scale=0.5)]),
        DiagGaussian(3, loc=0.3, scale=1.5),
    ).double()
    x, logp = flow.sample_and_log_prob(50)
    assert x.shape == (50, 3) and logp.shape == (50,)
    torch.testing.assert_close(logp, flow.log_prob(x), rtol=0, atol=1e-10)
    # reparameterised: gradients reach every parameter through samples and log-density
    (logp.mean() + x.square().mean()).backward()
    assert all(p.grad is not None for p in flow.parameters())


def test_sampling_is_seeded_by_generator():
    flow = lecture_flow()
    a = flow.sample(5, generator=torch.Generator().manual_seed(3))
    b = flow.sample(5, generator=torch.Generator().manual_seed(3))
    assert a.shape == (5,)
    torch.testing.assert_close(a, b)
    assert flow.sample((2, 3)).shape == (2, 3)


def test_sample_statistics_match_the_model():
    flow = lecture_flow()
    x = flow.sample(200_000, generator=torch.Generator().manual_seed(0))
    assert abs(float(x.mean()) - 2.0) < 0.03
    assert abs(float(x.std()) - 3.0) < 0.03


def test_distribution_view_interop():
    flow = lecture_flow()
    before = torch.distributions.Distribution._validate_args
    d = flow.distribution()
    assert isinstance(d, torch.distributions.Distribution)
    x = torch.tensor([1.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(d.log_prob(x), flow.log_prob(x))
    assert d.sample((4, 2)).shape == (4, 2)
    assert d.rsample((3,)).shape == (3,)
    assert torch.distributions.Distribution._validate_args == before  # no global change


def test_conditional_base_and_context_broadcast():
    torch.manual_seed(0)
    base = ConditionalGaussian(2, context=3, hidden=(8,))
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.5 * torch.randn_like(p))
    flow = ef.Flow(LULinear(2), base).double()
    assert flow.context_features == 3
    c = torch.randn(3, dtype=torch.float64)
    x = torch.randn(6, 2, dtype=torch.float64)
    one = flow.log_prob(x, c)  # one context for the whole batch
    rows = flow.log_prob(x, c.expand(6, 3))
    torch.testing.assert_close(one, rows)
    assert flow.sample(4, c).shape == (4, 2)
    assert flow.sample(4, torch.randn(5, 3, dtype=torch.float64)).shape == (4, 5, 2)
    xs, lp = flow.sample_and_log_prob(4, torch.randn(5, 3, dtype=torch.float64))
    assert xs.shape == (4, 5, 2) and lp.shape == (4, 5)


# ---- bad input -------------------------------------------------------------------------------


def vector_flow(context: int = 0) -> ef.Flow:
    base = ConditionalGaussian(2, context) if context else StandardNormal(2)
    return ef.Flow(LULinear(2), base)


@pytest.mark.parametrize(
    "x, error, words",
    [
        (torch.zeros(4, 3), ShapeError, ["(*batch, 2)", "(4, 3)"]),
        (torch.zeros(4), ShapeError, ["(*batch, 2)", "(4,)"]),
        (torch.zeros(4, 2, dtype=torch.int64), DTypeError, ["floating-point", "torch.int64"]),
        (torch.zeros(4, 2, dtype=torch.float64), DTypeError, ["torch.float64", "torch.float32"]),
        (torch.tensor([[0.0, float("nan")]]), DomainError, ["non-finite"]),
        (torch.tensor([[float("inf"), 0.0]]), DomainError, ["non-finite"]),
        ("not a tensor", DTypeError, ["torch.Tensor", "str"]),
    ],
    ids=["wrong-event-size", "wrong-rank", "integer", "wrong-float", "nan", "inf", "string"],
)
def test_bad_input_errors_name_the_problem(x, error, words):
    with pytest.raises(error) as info:
        vector_flow().log_prob(x)
    msg = str(info.value)
    for w in words:
        assert w in msg, msg
    assert isinstance(info.value, ExactflowError)
    assert isinstance(info.value, (ValueError, TypeError))


def test_context_given_to_unconditional_flow():
    with pytest.raises(ContextError, match="unconditional"):
        vector_flow().log_prob(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ContextError, match="unconditional"):
        vector_flow().sample(3, torch.zeros(4))


def test_context_missing_or_wrong_size_for_conditional_flow():
    flow = vector_flow(context=4)
    with pytest.raises(ContextError, match="conditional"):
        flow.log_prob(torch.zeros(3, 2))
    with pytest.raises(ContextError, match="conditional"):
        flow.sample(3)
    with pytest.raises(ShapeError, match=r"\(\*batch, 4\).*\(3, 5\)"):
        flow.log_prob(torch.zeros(3, 2), torch.zeros(3, 5))
    with pytest.raises(ShapeError, match="does not broadcast"):
        flow.log_prob(torch.zeros(3, 2), torch.zeros(2, 4))


def test_validation_can_be_switched_off_for_speed():
    flow = vector_flow()
    flow.validate = False
    out = flow.log_prob(torch.tensor([[0.0, float("nan")]]))
    assert torch.isnan(out).all()  # no check: NaN flows through instead of raising


def test_affine_rejects_zero_scale():
    with pytest.raises(ValueError, match="nonzero"):
        Affine(0.0, torch.tensor([1.0, 0.0]))


def test_numpy_input_is_accepted():
    flow = lecture_flow()
    torch.testing.assert_close(
        flow.log_prob(np.array([5.0])), flow.log_prob(torch.tensor([5.0]).double())
    )


def test_a_compose_of_mismatched_event_dims_is_a_named_shape_error():
    """``Affine(2.0, 3.0)`` is elementwise (event_dim 0): its per-element log-dets used to
    broadcast into a Compose's sum, a raw RuntimeError at batch 4 and a wrong-shaped sum at
    batch 3 (the batch equal to the event size)."""
    from exactflow.transforms import Reverse

    flow = ef.Flow(Compose([Affine(2.0, 3.0), Reverse(3)]), StandardNormal((3,)))
    for batch in (3, 4):
        with pytest.raises(ShapeError, match=r"Compose item 0 \(Affine, event_dim=0\)") as info:
            flow.log_prob(torch.randn(batch, 3))
        assert f"expected the batch shape ({batch},)" in str(info.value)
        with pytest.raises(ShapeError, match="event_dim=1"):
            flow.sample(batch)
    # the valid spelling, and the closed form it must equal
    ok = ef.Flow(Compose([Affine(2.0, 3.0, event_dim=1), Reverse(3)]), StandardNormal((3,)))
    x = torch.randn(4, 3)
    expected = Normal(2.0, 3.0).log_prob(x).sum(-1)
    torch.testing.assert_close(ok.log_prob(x), expected)
