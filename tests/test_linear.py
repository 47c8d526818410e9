"""Dense and LU-parameterised linear flows agree; permutations; validation."""

from __future__ import annotations

import pytest
import torch

from exactflow.transforms import Linear, LULinear, Permutation, RandomPermutation, Reverse


@pytest.mark.parametrize("d", [2, 7, 32])
def test_dense_logdet_agrees_with_lu_on_the_same_matrix(d):
    torch.manual_seed(d)
    lu = LULinear(d, permutation=torch.randperm(d)).double()
    with torch.no_grad():
        for p in lu.parameters():
            p.add_(0.2 * torch.randn_like(p))
    dense = Linear(d, weight=lu.weight().detach()).double()
    with torch.no_grad():
        dense.bias.copy_(lu.bias)
    x = torch.randn(9, d, dtype=torch.float64)
    z_lu, l_lu = lu(x)
    z_d, l_d = dense(x)
    torch.testing.assert_close(z_lu, z_d, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(l_lu, l_d, rtol=1e-10, atol=1e-10)
    x_lu, _ = lu.inverse(z_lu)
    x_d, _ = dense.inverse(z_d)
    torch.testing.assert_close(x_lu, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(x_d, x, atol=1e-9, rtol=0)


def test_lu_logdet_is_sum_of_log_diag():
    lu = LULinear(5)
    with torch.no_grad():
        lu.log_diag.copy_(torch.arange(5.0) / 10)
    _, ladj = lu(torch.randn(3, 5))
    torch.testing.assert_close(ladj, torch.full((3,), 1.0))


def test_permutations():
    x = torch.arange(4.0).expand(2, 4)
    z, ladj = Reverse(4)(x)
    assert z[0].tolist() == [3.0, 2.0, 1.0, 0.0] and ladj.tolist() == [0.0, 0.0]
    p = RandomPermutation(10, seed=3)
    assert torch.equal(p.perm, RandomPermutation(10, seed=3).perm)
    assert not torch.equal(p.perm, RandomPermutation(10, seed=4).perm)
    y = torch.randn(3, 10)
    assert torch.equal(p.inverse(p(y)[0])[0], y)


def test_bad_arguments():
    with pytest.raises(ValueError, match="not a permutation"):
        Permutation(torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="positive int"):
        LULinear(0)
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        Linear(3, weight=torch.eye(2))
