"""ONNX export: onnxruntime agrees with PyTorch on log_prob, sampling and the transform."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import exactflow as ef
from exactflow.errors import ConfigError
from exactflow.transforms import AffineMap, Compose, ElementwiseTransform, Linear, LULinear, Radial

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from exactflow.export import export_form, load_onnx, to_onnx


def small_flow(context: int = 0) -> ef.Flow:
    torch.manual_seed(0)
    t = Compose([LULinear(3), Radial(3), ElementwiseTransform(AffineMap(), 3, 0.3), Linear(3)])
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.2 * torch.randn_like(p))
    base = (
        ef.distributions.ConditionalGaussian(3, context, (8,)) if context else ef.StandardNormal(3)
    )
    return ef.Flow(t, base)


def test_export_form_is_equivalent():
    flow = small_flow()
    frozen = export_form(flow)
    x = torch.randn(10, 3)
    torch.testing.assert_close(frozen.log_prob(x), flow.log_prob(x), atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, LULinear) for m in frozen.modules())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    flow = small_flow()
    d = tmp_path_factory.mktemp("onnx")
    paths = {w: to_onnx(flow, d / f"{w}.onnx", what=w) for w in ("log_prob", "sample")}
    return flow, paths


@pytest.mark.parametrize("batch", [1, 1000, 37], ids=["b1", "b1000", "b37-unseen"])
def test_log_prob_parity(exported, batch):
    flow, paths = exported
    x = torch.randn(batch, 3, generator=torch.Generator().manual_seed(batch)) * 2
    got = load_onnx(paths["log_prob"]).run(None, {"x": x.numpy()})[0]
    ref = flow.log_prob(x).detach().numpy()
    assert got.shape == (batch,)
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("batch", [1, 1000], ids=["b1", "b1000"])
def test_sample_parity_with_temperature(exported, batch):
    flow, paths = exported
    noise = torch.randn(batch, 3, generator=torch.Generator().manual_seed(7))
    feeds = {"noise": noise.numpy(), "temperature": np.array(0.7, dtype=np.float32)}
    got = load_onnx(paths["sample"]).run(None, feeds)[0]
    ref = flow.transform.inverse(0.7 * noise)[0].detach().numpy()
    assert np.abs(got - ref).max() < 1e-4


def test_conditional_log_prob_export(tmp_path):
    flow = small_flow(context=2)
    path = to_onnx(flow, tmp_path / "c.onnx")
    x, c = torch.randn(20, 3), torch.randn(20, 2)
    got = load_onnx(path).run(None, {"x": x.numpy(), "context": c.numpy()})[0]
    assert np.abs(got - flow.log_prob(x, c).detach().numpy()).max() < 1e-4


def test_loads_in_fresh_process_without_torch(exported):
    _, paths = exported
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "out = s.run(None, {'x': np.zeros((4, 3), np.float32)})[0]\n"
        "assert 'torch' not in sys.modules and 'exactflow' not in sys.modules\n"
        "print(out.shape)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(paths["log_prob"])], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "(4,)"


def test_unknown_target():
    with pytest.raises(ConfigError, match="valid: log_prob, sample, transform"):
        to_onnx(small_flow(), "x.onnx", what="density")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        load_onnx("/nonexistent/model.onnx")


# -- the model zoo: every discrete builder exports both directions ---------------------------------
ZOO_D = 4


def _zoo(name: str):
    from exactflow import models

    return {
        "realnvp": lambda: models.RealNVP(ZOO_D, transforms=3, hidden=(32,)),
        "nice": lambda: models.NICE(ZOO_D, transforms=3, hidden=(32,)),
        "maf": lambda: models.MAF(ZOO_D, transforms=3, hidden=(32,)),
        "iaf": lambda: models.IAF(ZOO_D, transforms=3, hidden=(32,)),
        "nsf": lambda: models.NSF(ZOO_D, transforms=2, hidden=(32,)),
        "nsf-coupling": lambda: models.NSF(ZOO_D, transforms=2, hidden=(32,), autoregressive=False),
        "glow": lambda: models.Glow((1, 4, 4), levels=2, depth=2, hidden_channels=8),
    }[name]()


# spline and Glow exports take 6-25 s each on 2 cores: kept out of the default run
_SLOW = {"nsf", "nsf-coupling", "glow"}
# measured: 1.1e-4 max |onnxruntime - torch| on 1,000 float32 log-probs (|log p| up to ~11),
# just over the 1e-4 target; kept strict so a fix shows up
_KNOWN = {
    ("nsf-coupling", "log_prob"): pytest.mark.xfail(
        strict=True, reason="float32 parity 1.1e-4 > 1e-4 at batch 1000 (measured)"
    )
}
ZOO = [
    pytest.param(
        n,
        w,
        id=f"{n}-{w}",
        marks=([pytest.mark.slow] if n in _SLOW else [])
        + ([_KNOWN[n, w]] if (n, w) in _KNOWN else []),
    )
    for n in ("realnvp", "nice", "maf", "iaf", "nsf", "nsf-coupling", "glow")
    for w in ("log_prob", "sample")
]


@pytest.mark.parametrize("name, what", ZOO)
def test_model_zoo_onnx_parity(name, what, tmp_path):
    torch.manual_seed(0)
    flow = _zoo(name).eval()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from the identity initialisation
    session = load_onnx(to_onnx(flow, tmp_path / "m.onnx", what=what))
    for batch in (1, 1000, 37):  # batch 37 was never seen at export
        x = torch.randn(batch, *flow.event_shape, generator=torch.Generator().manual_seed(batch))
        if what == "log_prob":
            ref = flow.log_prob(x).detach().numpy()
            got = session.run(None, {"x": x.numpy()})[0]
        else:
            ref = flow.transform.inverse(0.8 * x)[0].detach().numpy()
            feeds = {"noise": x.numpy(), "temperature": np.array(0.8, dtype=np.float32)}
            got = session.run(None, feeds)[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-4
