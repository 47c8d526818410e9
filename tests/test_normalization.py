"""ActNorm (data-dependent init, saved flag, per-channel images) and BatchNormFlow (batch vs
running statistics, exact log-dets in both modes)."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch.autograd.functional import jacobian

from exactflow.errors import ShapeError
from exactflow.transforms import ActNorm, BatchNormFlow


def _data(n=256, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3.0 + torch.randn(n, d, generator=g) * torch.tensor([0.5, 2.0, 7.0])[:d]


def test_actnorm_first_training_batch_comes_out_standardised():
    layer = ActNorm(3)
    x = _data()
    z, ladj = layer(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(ladj, -x.std(0, unbiased=False).log().sum().expand(256))
    assert bool(layer.initialized)
    # later batches do not re-initialise
    shift = layer.shift.detach().clone()
    layer(_data(seed=1) * 10.0)
    assert torch.equal(layer.shift.detach(), shift)


def test_actnorm_flag_is_saved_and_eval_does_not_initialise():
    layer = ActNorm(3)
    layer.eval()
    x = _data()
    z, _ = layer(x)
    assert torch.equal(z, x) and not bool(layer.initialized)
    layer.train()
    layer(x)
    assert "initialized" in layer.state_dict()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = ActNorm(3)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    fresh(_data(seed=5) * 100.0)  # training mode, but already initialised: no re-init
    torch.testing.assert_close(fresh.log_scale, layer.log_scale)


def test_actnorm_image_statistics_are_per_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 4, 4, generator=g) * torch.tensor([1.0, 5.0]).view(2, 1, 1) + 2.0
    layer = ActNorm((2, 4, 4))
    z, ladj = layer(x)
    assert layer.shift.shape == (2, 1, 1)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3), unbiased=False), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(ladj, -16.0 * layer.log_scale.sum().expand(16))
    x_rec, ladj_inv = layer.inverse(z)
    torch.testing.assert_close(x_rec, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(ladj_inv, -ladj)


def test_batchnorm_train_mode_uses_batch_statistics():
    layer = BatchNormFlow(3, momentum=0.25)
    x = _data()
    z, ladj = layer(x)
    var = x.var(0, unbiased=False)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False), var / (var + 1e-5), atol=1e-5, rtol=0)
    torch.testing.assert_close(ladj, (-0.5 * torch.log(var + 1e-5).sum()).expand(256))
    torch.testing.assert_close(layer.running_mean, 0.25 * x.mean(0))
    torch.testing.assert_close(layer.running_var, 0.75 + 0.25 * var)


def test_batchnorm_eval_mode_is_a_fixed_per_sample_map_with_exact_logdet():
    layer = BatchNormFlow(3).double()
    for seed in range(30):
        layer(_data(seed=seed).double())
    with torch.no_grad():
        layer.log_gamma.fill_(0.3)
        layer.beta.fill_(-1.0)
    layer.eval()
    x = _data(8, seed=99).double()
    z, ladj = layer(x)
    z_single, _ = layer(x[:1])
    torch.testing.assert_close(z[:1], z_single)  # independent of the rest of the batch
    jac = jacobian(lambda v: layer(v.unsqueeze(0))[0].squeeze(0), x[0])
    torch.testing.assert_close(ladj[0], torch.linalg.slogdet(jac)[1])
    x_rec, ladj_inv = layer.inverse(z)
    torch.testing.assert_close(x_rec, x)
    torch.testing.assert_close(ladj_inv, -ladj)
    # running statistics converged to the data's
    torch.testing.assert_close(layer.running_mean, torch.full((3,), 3.0).double(), atol=0.3, rtol=0)


def test_errors():
    with pytest.raises(ShapeError, match="expected input of shape"):
        ActNorm(3)(torch.randn(4, 2))
    with pytest.raises(ValueError, match="momentum"):
        BatchNormFlow(3, momentum=0.0)
    with pytest.raises(ValueError, match="shape"):
        ActNorm(0)


def test_batchnorm_sampling_in_train_mode_warns_and_eval_mode_is_consistent():
    """In train mode log_prob normalises each batch with its own statistics while sampling
    inverts the running-statistics map, so ``sample_and_log_prob`` and ``log_prob`` disagree
    (by tenths of a nat for a fresh RealNVP): that used to happen silently."""
    import exactflow as ef
    from exactflow.distributions import StandardNormal
    from exactflow.transforms import Compose, Coupling, alternating_mask
    from exactflow.transforms.normalization import BatchNormTrainModeWarning

    torch.manual_seed(0)
    layers = [Coupling("affine", alternating_mask(2, i % 2 == 1), (16,)) for i in range(3)]
    flow = ef.Flow(Compose([layers[0], BatchNormFlow(2), *layers[1:]]), StandardNormal((2,)))
    g = torch.Generator().manual_seed(0)
    with pytest.warns(BatchNormTrainModeWarning, match="call flow.eval"):
        x, log_p = flow.sample_and_log_prob(256, generator=g)
    gap = (flow.log_prob(x) - log_p).detach().abs().mean()
    assert float(gap) > 0.01  # the disagreement warned of
    flow.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchNormTrainModeWarning)
        x, log_p = flow.sample_and_log_prob(256, generator=g)
        torch.testing.assert_close(flow.log_prob(x), log_p, atol=1e-4, rtol=0)
