"""The contract test: every registered transform, and its inverse, in float64.

Adding a transform to ``exactflow.testing.registry`` runs all of these for it.
"""

from __future__ import annotations

import io

import pytest
import torch

from exactflow.check import check_transform, sample_domain
from exactflow.testing import CASES, Case
from exactflow.transforms import Inverse
from helpers import perturb

BATCH = 7
CONTEXT = 3

# the shape tests run the inverse in train mode on purpose; BatchNormFlow warns there (its
# inverse is the eval-mode map), which tests/test_normalization.py checks
pytestmark = pytest.mark.filterwarnings(
    "ignore::exactflow.transforms.normalization.BatchNormTrainModeWarning"
)


def _params(case: Case):
    out = []
    for case_ in CASES if case is None else [case]:
        for shape in case_.shapes:
            sid = "x".join(map(str, shape))
            if case_.unconditional:
                out.append(pytest.param(case_, shape, 0, id=f"{case_.name}-{sid}"))
            if case_.context:
                out.append(pytest.param(case_, shape, CONTEXT, id=f"{case_.name}-{sid}-ctx"))
    return out


PARAMS = [p for c in CASES for p in _params(c)]


def build(case: Case, shape, ctx: int, seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    return perturb(case.build(shape, ctx).to(dtype), case.perturb, seed + 1)


def inputs(case: Case, shape, ctx: int, dtype=torch.float64, batch=BATCH, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = sample_domain(case.domain, (batch, *shape), g).to(dtype)
    c = torch.randn(batch, ctx, generator=g, dtype=dtype) if ctx else None
    return x, c


@pytest.mark.parametrize("case, shape, ctx", PARAMS)
def test_certified(case, shape, ctx):
    t = build(case, shape, ctx)
    x, c = inputs(case, shape, ctx)
    report = check_transform(t, x, c, atol_ladj=case.ladj_tol, atol_roundtrip=case.roundtrip_tol)
    assert report.passed, str(report)


@pytest.mark.parametrize("case, shape, ctx", PARAMS)
def test_inverse_certified(case, shape, ctx):
    t = build(case, shape, ctx)
    x, c = inputs(case, shape, ctx)
    with torch.no_grad():
        t(x, c)  # data-dependent init on data, not noise
        z, _ = t(x, c)
    report = check_transform(
        Inverse(t), z, c, atol_ladj=case.ladj_tol, atol_roundtrip=case.roundtrip_tol
    )
    assert report.passed, str(report)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case, shape, ctx", PARAMS)
def test_shapes_dtype_and_batch(case, shape, ctx, dtype):
    t = build(case, shape, ctx, dtype=dtype)
    for batch_shape in [(BATCH,), (2, 3), (1,)]:
        n = 1
        for b in batch_shape:
            n *= b
        x, c = inputs(case, shape, ctx, dtype=dtype, batch=n)
        x = x.reshape(*batch_shape, *shape)
        c = None if c is None else c.reshape(*batch_shape, ctx)
        z, ladj = t(x, c)
        assert z.shape == x.shape and z.dtype == dtype
        assert ladj.shape == batch_shape and ladj.dtype == dtype
        x2, ladj2 = t.inverse(z, c)
        assert x2.shape == x.shape and ladj2.shape == batch_shape
        assert torch.isfinite(z).all() and torch.isfinite(ladj).all()


@pytest.mark.parametrize("case, shape, ctx", PARAMS)
def test_gradients_reach_parameters(case, shape, ctx):
    t = build(case, shape, ctx)
    x, c = inputs(case, shape, ctx)
    x.requires_grad_(True)
    z, ladj = t(x, c)
    (z.square().sum() + ladj.sum()).backward()
    assert torch.isfinite(x.grad).all()
    for name, p in t.named_parameters():
        assert p.grad is not None, f"parameter {name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("case, shape, ctx", [p for p in PARAMS if p.values[2]])
def test_context_changes_output(case, shape, ctx):
    t = build(case, shape, ctx)
    x, c = inputs(case, shape, ctx)
    z1, _ = t(x, c)
    z2, _ = t(x, c + 1.0)
    assert not torch.allclose(z1, z2), "output ignores the context"


@pytest.mark.parametrize("case, shape, ctx", PARAMS)
def test_state_dict_round_trip(case, shape, ctx):
    t = build(case, shape, ctx, seed=0)
    x, c = inputs(case, shape, ctx)
    with torch.no_grad():
        t(x, c)  # data-dependent init, if any, is part of the state
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    buf.seek(0)
    fresh = build(case, shape, ctx, seed=123)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    t.eval()
    fresh.eval()
    with torch.no_grad():
        za, la = t(x, c)
        zb, lb = fresh(x, c)
    torch.testing.assert_close(za, zb, rtol=0, atol=0)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
