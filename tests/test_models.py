"""The discrete vector builders (coupling, autoregressive, planar/radial): each builds,
conditions on a context, round-trips and starts where it should; the RealNVP "boss battle"
(float32 round trip on 10k points, O(D) log-det, exact density decomposition); short seeded
training runs reaching test-NLL thresholds on 2-D toys.

The contract over *every* MODELS entry (ODE and image models included: log_prob, sampling,
check_flow, state_dict, context, keyword-only arguments, deprecated names) is
tests/test_models_contract.py."""

from __future__ import annotations

import math

import pytest
import torch

import exactflow as ef
from exactflow.data.toy import eight_gaussians, moons
from exactflow.errors import ConfigError, ContextError
from exactflow.models import IAF, MAF, MODELS, NICE, NSF, PlanarFlow, RadialFlow, RealNVP

SMALL = {"transforms": 2, "hidden": (16,)}
# the discrete vector families: every entry that is neither an ODE nor an image model
NAMES = sorted(n for n, s in MODELS.items() if not s.continuous and s.input == "vector")


def test_names_are_the_eight_discrete_vector_families():
    assert NAMES == ["iaf", "maf", "nice", "nsf", "nsf-coupling", "planar", "radial", "realnvp"]


def _build(name, features, context=0):
    if name in ("planar", "radial"):
        return MODELS[name](features, transforms=3, context=context)
    return MODELS[name](features, context=context, **SMALL)


@pytest.mark.parametrize("context", [0, 3])
@pytest.mark.parametrize("name", NAMES)
def test_every_model_builds_samples_and_round_trips(name, context):
    if name.startswith("nsf"):
        pytest.importorskip("exactflow.transforms.splines")
    torch.manual_seed(0)
    flow = _build(name, 4, context)
    assert isinstance(flow, ef.Flow)
    assert flow.context_features == context
    g = torch.Generator().manual_seed(0)
    c = torch.randn(6, context, generator=g) if context else None
    x = torch.randn(6, 4, generator=g)
    log_p = flow.log_prob(x, c)
    assert log_p.shape == (6,) and torch.isfinite(log_p).all()
    z, _ = flow.transform(x, c)
    x_rec, _ = flow.transform.inverse(z, c)
    torch.testing.assert_close(x_rec, x, atol=1e-5, rtol=0)
    samples = flow.sample(5, c[0] if context else None, generator=g)
    assert samples.shape == (5, 4)
    if context:
        with pytest.raises(ContextError):
            flow.log_prob(x)


@pytest.mark.parametrize("name", ["nice", "realnvp", "maf", "iaf", "nsf", "nsf-coupling"])
def test_models_start_as_the_standard_normal(name):
    """Zero-initialised conditioners, identity splines and volume-preserving reversals:
    before training every such model's density is exactly N(0, I)."""
    pytest.importorskip("exactflow.transforms.splines")
    flow = _build(name, 5)
    x = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    expected = -0.5 * x.square().sum(-1) - 2.5 * math.log(2 * math.pi)
    torch.testing.assert_close(flow.log_prob(x), expected, atol=1e-5, rtol=0)


def test_planar_for_sampling_has_a_consistent_density():
    torch.manual_seed(0)
    for builder in (PlanarFlow, RadialFlow):
        flow = builder(3, transforms=4, for_sampling=True)
        x, log_p = flow.sample_and_log_prob(64, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(flow.log_prob(x.detach()), log_p.detach(), atol=1e-4, rtol=0)


def test_realnvp_with_batch_norm_trains_and_inverts_in_eval_mode():
    torch.manual_seed(0)
    flow = RealNVP(3, transforms=3, hidden=(16,), norm="batchnorm")
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    x = torch.randn(128, 3) * 2.0 + 1.0
    for _ in range(5):
        loss = -flow.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    flow.eval()
    with torch.no_grad():
        z, ladj = flow.transform(x)
        x_rec, ladj_inv = flow.transform.inverse(z)
    torch.testing.assert_close(x_rec, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(ladj, -ladj_inv, atol=1e-5, rtol=0)
    assert not torch.allclose(z, x)


def test_builder_errors():
    with pytest.raises(ConfigError, match="features must be >= 1"):
        RealNVP(0)
    with pytest.raises(TypeError, match="transforms must be an int"):
        MAF(3, transforms="4")
    with pytest.raises(ConfigError, match="features >= 2"):
        NICE(1)
    with pytest.raises(ConfigError, match="context must be >= 0"):
        IAF(3, context=-1)
    assert RealNVP(1, context=2, **SMALL).context_features == 2  # 1-D needs a context


# --------------------------------------------------------------------------------------------
# short seeded training runs
# --------------------------------------------------------------------------------------------
N_TRAIN, N_TEST, BATCH = 20_000, 10_000, 256


def _train(builder, sampler, steps, lr, **kwargs):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    train, test = sampler(N_TRAIN, generator=g), sampler(N_TEST, generator=g)
    flow = builder(2, **kwargs)
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    batches = torch.Generator().manual_seed(2)
    for _ in range(steps):
        idx = torch.randint(0, N_TRAIN, (BATCH,), generator=batches)
        loss = -flow.log_prob(train[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        nll = float(-flow.log_prob(test).mean())
    return flow, test, nll


@pytest.fixture(scope="module")
def realnvp_moons():
    return _train(RealNVP, moons, 300, 5e-3, transforms=6, hidden=(64, 64))


def test_boss_battle_realnvp_on_two_moons(realnvp_moons, monkeypatch):
    flow, test, _ = realnvp_moons
    assert test.dtype == torch.float32 and test.shape == (10_000, 2)
    with torch.no_grad():
        z, ladj = flow.transform(test)
        x_rec, ladj_inv = flow.transform.inverse(z)
        log_p = flow.log_prob(test)
    assert (x_rec - test).abs().max() < 1e-5
    assert (ladj + ladj_inv).abs().max() < 1e-5
    assert (log_p - (flow.base.log_prob(z) + ladj)).abs().max() < 1e-6
    # O(D) log-det: the density must not build or factorise any Jacobian
    import torch.autograd.functional as taf

    def forbidden(*args, **kwargs):
        raise AssertionError("a Jacobian/determinant was computed inside log_prob")

    for mod, name in [
        (taf, "jacobian"),
        (torch.autograd, "grad"),
        (torch.linalg, "slogdet"),
        (torch.linalg, "det"),
        (torch, "logdet"),
        (torch, "slogdet"),
    ]:
        monkeypatch.setattr(mod, name, forbidden)
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(test[:100]), log_p[:100], atol=0, rtol=0)


# Thresholds: measured test NLL (nats, 10k test points, seeded; torch 2.13 CPU) + ~0.1 margin.
# Measured: RealNVP 2.518 (moons) / 2.122 (8 gaussians); MAF 2.558 / 2.468; NSF 2.478 / 1.850
# (2.451 / 1.845 with the paper's free spline derivatives, before the bounded default).
# For scale: a fitted Gaussian scores 3.30 (moons) and 3.55 (8 gaussians); the 8-gaussian
# mixture's own entropy is ~1.70. CPU time per run ~3-5 s (more wall time on a busy machine).
TRAINING = [
    ("realnvp", "moons", RealNVP, moons, 300, 5e-3, {"transforms": 6, "hidden": (64, 64)}, 2.62),
    ("realnvp", "8gaussians", RealNVP, eight_gaussians, 300, 5e-3,
     {"transforms": 6, "hidden": (64, 64)}, 2.25),
    ("maf", "moons", MAF, moons, 300, 5e-3, {"transforms": 6, "hidden": (64, 64)}, 2.66),
    ("maf", "8gaussians", MAF, eight_gaussians, 300, 5e-3,
     {"transforms": 6, "hidden": (64, 64)}, 2.56),
    ("nsf", "moons", NSF, moons, 200, 5e-3, {"transforms": 3, "hidden": (32, 32)}, 2.55),
    ("nsf", "8gaussians", NSF, eight_gaussians, 200, 5e-3,
     {"transforms": 3, "hidden": (32, 32)}, 1.97),
]  # fmt: skip


@pytest.mark.parametrize(
    "model, data, builder, sampler, steps, lr, kwargs, threshold",
    TRAINING,
    ids=[f"{m}-{d}" for m, d, *_ in TRAINING],
)
def test_short_training_reaches_nll_threshold(
    model, data, builder, sampler, steps, lr, kwargs, threshold, request
):
    if model == "nsf":
        pytest.importorskip("exactflow.transforms.splines")
    if (model, data) == ("realnvp", "moons"):
        nll = request.getfixturevalue("realnvp_moons")[2]  # the boss-battle model, trained once
    else:
        nll = _train(builder, sampler, steps, lr, **kwargs)[2]
    print(f"{model} on {data}: test NLL {nll:.4f} (threshold {threshold})")
    assert nll < threshold
