import pytest
import torch

from exactflow.data import TOY, split, toy_splits
from exactflow.errors import ConfigError, ShapeError


@pytest.mark.parametrize("name", sorted(TOY))
def test_toy_seeded_shape_and_finite(name):
    a = TOY[name](500, torch.Generator().manual_seed(3))
    b = TOY[name](500, torch.Generator().manual_seed(3))
    c = TOY[name](500, torch.Generator().manual_seed(4))
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() < 6.0
    assert TOY[name](0).shape == (0, 2)


def test_checkerboard_only_black_cells():
    x = TOY["checkerboard"](4000, torch.Generator().manual_seed(0))
    cells = torch.floor(x + 2.0).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    assert len({tuple(c) for c in cells.tolist()}) == 8


def test_eight_gaussians_modes():
    x = TOY["eight_gaussians"](8000, torch.Generator().manual_seed(0))
    angle = torch.atan2(x[:, 1], x[:, 0])
    mode = torch.round(angle / (torch.pi / 4)).long() % 8
    counts = torch.bincount(mode, minlength=8).float()
    assert (counts / 8000 - 1 / 8).abs().max() < 0.02
    assert (x.norm(dim=1) - 2.0).abs().mean() < 0.3


def test_split_disjoint_and_sized():
    data = torch.arange(100.0)[:, None]
    s = split(data, val=0.2, test=0.1, generator=torch.Generator().manual_seed(0))
    assert (len(s.train), len(s.val), len(s.test)) == (70, 20, 10)
    joined = torch.cat([s.train, s.val, s.test]).squeeze(1).sort().values
    assert torch.equal(joined, data.squeeze(1))


def test_split_bad_input():
    with pytest.raises(ConfigError, match="val fraction"):
        split(torch.zeros(10, 2), val=1.5)
    with pytest.raises(ShapeError, match="no training rows"):
        split(torch.zeros(2, 2), val=0.4, test=0.4)


def test_toy_splits_unknown_name_lists_valid():
    with pytest.raises(ConfigError, match="moons"):
        toy_splits("moon")
    s = toy_splits("moons", 100, 20, 30, seed=1)
    assert [len(p) for p in s] == [100, 20, 30]
