import math

import pytest
import torch

from exactflow.errors import ConfigError, ContextError, ShapeError
from exactflow.transforms import Inverse, Planar
from exactflow.vae import AmortisedPlanar, FlowVAE, binarised_images, evaluate_vae, train_vae
from helpers import perturb


def perturbed_planar(seed=0) -> AmortisedPlanar:
    torch.manual_seed(seed)  # the layer's random initial w
    return perturb(AmortisedPlanar(3, 4).double(), 0.5, seed)


def test_amortised_planar_round_trip_and_log_det():
    t = perturbed_planar()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 3, generator=g, dtype=torch.float64)
    c = torch.randn(5, 4, generator=g, dtype=torch.float64)
    x, ladj_inv = t.inverse(z, c)
    z_back, ladj_fwd = t.forward(x, c)
    torch.testing.assert_close(z_back, z, atol=1e-10, rtol=0)
    torch.testing.assert_close(ladj_fwd, -ladj_inv, atol=1e-10, rtol=0)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(lambda v, i=i: t.inverse(v, c[i])[0], z[i])
        assert float(torch.linalg.slogdet(jac)[1]) == pytest.approx(
            float(ladj_inv[i].detach()), abs=1e-10
        )
    # the context changes the map; zero-initialised layers start as the identity
    assert not torch.allclose(t.inverse(z, c)[0], t.inverse(z, c.flip(0))[0])
    fresh = AmortisedPlanar(3, 4).double()
    x0, ladj0 = fresh.inverse(z, c)
    torch.testing.assert_close(x0, z, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj0, torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)
    with pytest.raises(ContextError, match="\\(\\*batch, 4\\)"):
        t.inverse(z, c[:, :2])
    with pytest.raises(ContextError, match="needs a context"):
        t.inverse(z)


def test_amortised_planar_is_the_inverse_planar_layer():
    """No second planar implementation: the VAE layer is ``Inverse(Planar(d, c))`` started at
    ``u = 0``, so both give the same map and log-det for the same parameters."""
    t = perturbed_planar(seed=3)
    assert isinstance(t, Inverse) and isinstance(t.transform, Planar)
    twin = Inverse(Planar(3, 4)).double()
    twin.load_state_dict(t.state_dict())
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64)
    c = torch.randn(6, 4, generator=g, dtype=torch.float64)
    for a, b in zip(t.inverse(z, c), twin.inverse(z, c), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(AmortisedPlanar(3, 4).transform.u.detach().abs().max()) == 0.0


@pytest.mark.parametrize("posterior", ["gaussian", "iaf", "planar"])
def test_bounds_order_and_shapes(posterior):
    torch.manual_seed(0)
    model = FlowVAE(64, latent=4, hidden=32, posterior=posterior, transforms=2, context=8)
    x = torch.bernoulli(torch.full((6, 64), 0.3), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(2)
    lw = model.log_weights(x, k=50, generator=g)
    assert lw.shape == (50, 6) and torch.isfinite(lw).all()
    # on the same samples, log mean exp >= mean (Jensen), with equality for k = 1
    iw = torch.logsumexp(lw, 0) - math.log(50)
    assert torch.all(iw >= lw.mean(0) - 1e-9)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(model.iw_bound(x, 1, g1), model.elbo(x, 1, g2))
    # log p(x) of 64 Bernoulli pixels is <= 0, and so is any bound on it
    assert float(iw.max().detach()) < 0
    with pytest.raises(ShapeError, match="\\(B, 64\\)"):
        model.log_weights(torch.zeros(2, 63))


def test_flow_vae_tiny_run_improves_its_bound():
    data = binarised_images(seed=0, prefer="digits")
    assert data["name"] == "digits" and data["train"].shape[1] == 64
    train, test = data["train"][:512], data["test"][:200]
    torch.manual_seed(0)
    model = FlowVAE(64, latent=4, hidden=64, posterior="iaf", transforms=2, context=16)
    before = evaluate_vae(model, test, k=16)
    res = train_vae(model, train, test, steps=150, batch_size=64, lr=3e-3, k_eval=16)
    assert res.iw > before.iw + 10.0  # nats per 64-pixel image
    assert res.elbo <= res.iw + 1e-9 and len(res.losses) == 150
    assert math.isfinite(res.iw_se) and res.iw_se > 0


def test_flow_prior_and_bad_options():
    model = FlowVAE(16, latent=2, hidden=8, posterior="planar", prior="flow", context=4)
    x = torch.ones(3, 16)
    assert model.elbo(x).shape == (3,)
    assert any("prior" in n for n, _ in model.named_parameters())
    with pytest.raises(ConfigError, match="posterior must be one of"):
        FlowVAE(16, posterior="nsf")
    with pytest.raises(ConfigError, match="prior must be"):
        FlowVAE(16, prior="vamp")


@pytest.mark.parametrize("posterior", ["iaf", "planar"])
def test_posterior_density_is_the_exact_change_of_variables(posterior):
    torch.manual_seed(0)
    model = FlowVAE(64, latent=3, hidden=16, posterior=posterior, transforms=2, context=8)
    model = model.double()
    with torch.no_grad():
        for p in model.q.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.bernoulli(torch.full((4, 64), 0.3, dtype=torch.float64))
    h = model.encoder(x).detach()
    z, log_q = model.q.sample_and_log_prob(5, context=h)
    # the density of the sampled points, evaluated back through the data -> noise direction
    torch.testing.assert_close(log_q, model.q.log_prob(z, h.expand(5, 4, 8)), atol=1e-9, rtol=0)
    z0 = torch.randn(3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: model.q.transform.inverse(v, h[0])[0], z0)
    ladj = model.q.transform.inverse(z0, h[0])[1].detach()
    assert float(torch.linalg.slogdet(jac)[1]) == pytest.approx(float(ladj), abs=1e-9)
