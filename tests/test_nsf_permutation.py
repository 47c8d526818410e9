"""NSF's LU maps start as per-layer random permutations (D > 2) or reversals (D <= 2)."""

import pytest
import torch

from exactflow.errors import ConfigError
from exactflow.models import NSF
from exactflow.transforms import LULinear


def _perms(flow) -> list[list[int]]:
    return [m.perm.tolist() for m in flow.modules() if isinstance(m, LULinear)]


def test_auto_is_seeded_random_above_two_features():
    torch.manual_seed(3)
    a = _perms(NSF(6, transforms=3, hidden=(8,)))
    torch.manual_seed(3)
    b = _perms(NSF(6, transforms=3, hidden=(8,)))
    assert a == b  # reproducible from the global seed
    assert len(a) == 3 and all(sorted(p) == list(range(6)) for p in a)
    assert len({tuple(p) for p in a}) > 1  # not one fixed permutation repeated


def test_two_features_and_reverse_keep_the_reversal():
    assert _perms(NSF(2, transforms=3, hidden=(8,))) == [[1, 0]] * 3
    assert _perms(NSF(5, transforms=2, hidden=(8,), permutation="reverse")) == [[4, 3, 2, 1, 0]] * 2


def test_random_permutation_round_trip_and_log_det():
    torch.manual_seed(0)
    flow = NSF(5, transforms=2, hidden=(16,), permutation="random").double()
    with torch.no_grad():  # move off the identity so the check means something
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(7, 5, dtype=torch.float64)
    z, ladj = flow.transform(x)
    back, ladj_inv = flow.transform.inverse(z)
    assert torch.allclose(back, x, atol=1e-8)
    assert torch.allclose(ladj, -ladj_inv, atol=1e-8)
    jac = torch.autograd.functional.jacobian(lambda v: flow.transform(v.unsqueeze(0))[0][0], x[0])
    assert torch.allclose(torch.linalg.slogdet(jac)[1], ladj[0], atol=1e-6)


def test_bad_permutation_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="'auto', 'random' or 'reverse', got 'shuffle'"):
        NSF(4, permutation="shuffle")
