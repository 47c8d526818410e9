"""Fast paths added for speed keep the numbers and the errors of the plain code.

Covers: the rational-quadratic spline's bins-first evaluation (elementwise, layout
independent), permutations by ``index_select``/``flip``, ``LULinear`` as one matmul, the
sum-first finiteness check of ``Flow``, and ``Trainer(compile=True)``.
"""

from __future__ import annotations

import pytest
import torch

from exactflow import Flow
from exactflow.distributions import StandardNormal
from exactflow.errors import DomainError
from exactflow.models import NSF
from exactflow.train import TrainConfig, Trainer
from exactflow.transforms import LULinear, Permutation, Reverse
from exactflow.transforms.splines import rational_quadratic_spline


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("derivatives", ["bounded", "free"])
def test_spline_is_elementwise_in_any_layout(inverse, derivatives):
    g = torch.Generator().manual_seed(0)
    x = 6.0 * torch.randn(5, 3, dtype=torch.float64, generator=g)
    params = 2.0 * torch.randn(5, 3, 23, dtype=torch.float64, generator=g)
    kw = {"inverse": inverse, "derivatives": derivatives}
    y, logd = rational_quadratic_spline(x, params, **kw)
    # transposed batch layout and one element at a time give the same values
    y_t, logd_t = rational_quadratic_spline(x.T, params.transpose(0, 1), **kw)
    torch.testing.assert_close(y_t.T, y, rtol=0, atol=1e-12)
    torch.testing.assert_close(logd_t.T, logd, rtol=0, atol=1e-12)
    for i, j in [(0, 0), (4, 2), (2, 1)]:
        yi, li = rational_quadratic_spline(x[i, j], params[i, j], **kw)
        assert yi.shape == () and li.shape == ()
        assert abs(float(yi - y[i, j])) < 1e-12 and abs(float(li - logd[i, j])) < 1e-12
    # perturbing one element's parameters moves only that element
    bumped = params.clone()
    bumped[1, 2] += 0.5
    y2, _ = rational_quadratic_spline(x, bumped, **kw)
    changed = (y2 != y).nonzero().tolist()
    assert changed in ([[1, 2]], [])  # [] only if x[1, 2] lies outside the box
    assert abs(float(x[1, 2])) > 5.0 or changed == [[1, 2]]


def test_permutations_select_exactly_their_indices():
    x = torch.randn(4, 7)
    rev = Reverse(7)
    z, ladj = rev(x)
    assert torch.equal(z, x[..., rev.perm]) and torch.equal(ladj, torch.zeros(4))
    assert torch.equal(rev.inverse(z)[0], x)
    perm = Permutation(torch.tensor([3, 0, 6, 1, 5, 2, 4]))
    z = perm(x)[0]
    assert torch.equal(z, x[..., perm.perm])
    assert torch.equal(perm.inverse(z)[0], x)


def test_lulinear_forward_is_its_dense_matrix():
    torch.manual_seed(0)
    t = LULinear(5, permutation=torch.tensor([4, 2, 0, 1, 3])).double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(6, 5, dtype=torch.float64)
    z, ladj = t(x)
    torch.testing.assert_close(z, x @ t.weight().T + t.bias, rtol=0, atol=1e-12)
    torch.testing.assert_close(ladj, torch.linalg.slogdet(t.weight())[1].expand(6))


def test_finite_check_survives_an_overflowing_sum_and_still_counts_bad_values():
    flow = Flow(Reverse(2), StandardNormal((2,)))
    big = torch.tensor([[3e38, 3e38]])  # finite, but the float32 sum overflows to inf
    assert torch.isinf(big.sum())
    assert flow.log_prob(big).shape == (1,)
    with pytest.raises(DomainError, match="2 non-finite value"):
        flow.log_prob(torch.tensor([[float("nan"), 0.0], [float("inf"), 1.0]]))


def test_trainer_compile_must_be_bool():
    flow = NSF(2, transforms=1, hidden=(8,))
    with pytest.raises(TypeError, match="compile must be a bool or None, got str"):
        Trainer(flow, torch.randn(16, 2), compile="yes")


@pytest.mark.slow
def test_compiled_training_matches_eager():
    data = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    losses = []
    for compile in (False, True):
        torch.manual_seed(0)
        flow = NSF(2, transforms=2, hidden=(16, 16))
        cfg = TrainConfig(steps=5, batch_size=64, progress=False, checkpoint_every=0)
        trainer = Trainer(flow, data, config=cfg, compile=compile)
        losses.append(trainer.fit().losses)
    assert len(losses[0]) == 5
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), atol=1e-4, rtol=0)
