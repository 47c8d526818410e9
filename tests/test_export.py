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
from helpers import perturb

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


def test_loads_in_fresh_process_without_torch(exported, tmp_path):
    """Both exports run in a process that imported only numpy and onnxruntime, and give the
    numbers PyTorch gives."""
    flow, paths = exported
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(3))
    np.save(tmp_path / "x.npy", x.numpy())
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "x = np.load(sys.argv[3])\n"
        "lp = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "sa = ort.InferenceSession(sys.argv[2], providers=['CPUExecutionProvider'])\n"
        "np.save(sys.argv[4], lp.run(None, {'x': x})[0])\n"
        "t = np.array(0.5, np.float32)\n"
        "np.save(sys.argv[5], sa.run(None, {'noise': x, 'temperature': t})[0])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'exactflow')))\n"
    )
    files = [tmp_path / n for n in ("x.npy", "lp.npy", "s.npy")]
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(paths["log_prob"]),
            str(paths["sample"]),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"  # neither torch nor exactflow was imported
    with torch.no_grad():
        ref_lp = flow.log_prob(x).numpy()
        ref_s = flow.transform.inverse(0.5 * x)[0].numpy()
    assert np.abs(np.load(files[1]) - ref_lp).max() < 1e-4
    assert np.abs(np.load(files[2]) - ref_s).max() < 1e-4


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
        "glow": lambda: models.Glow((1, 4, 4), levels=2, transforms=2, hidden=8),
        # continuous flows export as the same fixed-step solve the PyTorch model runs
        "ffjord": lambda: models.FFJORD(ZOO_D, hidden=(16,), solver="rk4", steps=2),
        "cfm": lambda: models.CFM(ZOO_D, hidden=(16, 16), solver="rk4", steps=3),
    }[name]()


# spline, Glow and flow-matching exports take 6-45 s each on 2 cores: out of the default run
_SLOW = {"nsf", "nsf-coupling", "glow", "cfm"}
# NSF-coupling log_prob was 1.1e-4 from PyTorch with min_width 1e-3 and free knot derivatives
# (knots ~1e-6 off in float32, amplified by narrow bins); with the bounded derivatives and 2%
# minimum bins of splines.py it is 1.6e-5 (measured), so no case is marked as a known failure
_KNOWN: dict = {}
ZOO = [
    pytest.param(
        n,
        w,
        id=f"{n}-{w}",
        marks=([pytest.mark.slow] if n in _SLOW else [])
        + ([_KNOWN[n, w]] if (n, w) in _KNOWN else []),
    )
    for n in ("realnvp", "nice", "maf", "iaf", "nsf", "nsf-coupling", "glow", "ffjord", "cfm")
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


# -- continuous flows: the unrolled solve and the analytic trace ----------------------------------


@pytest.mark.parametrize("time_mode", ["gate", "concat"])
@pytest.mark.parametrize("context", [0, 2])
def test_fixed_step_cnf_matches_torchdiffeq_in_float64(time_mode, context):
    """Every solver, activation and both dynamics classes: the export form's state and log-det
    (analytic trace) equal the torchdiffeq solve's (autograd trace) to float64 rounding."""
    from exactflow.continuous import CNF, TimeMLP
    from exactflow.export import FixedStepCNF
    from exactflow.matching import VelocityMLP

    torch.manual_seed(0)
    for solver in FixedStepCNF.SOLVERS:
        for act, cls in zip(("tanh", "softplus", "silu", "elu"), (TimeMLP, VelocityMLP) * 2):
            dyn = perturb(cls(3, (8, 8), context, time=time_mode, activation=act), 0.5)
            cnf = CNF(dyn, solver=solver, steps=3, t1=0.7).double().eval()
            frozen = export_form(cnf)
            assert isinstance(frozen, FixedStepCNF) and frozen.solver == solver
            x = torch.randn(5, 3, dtype=torch.float64)
            c = torch.randn(5, context, dtype=torch.float64) if context else None
            for direction in ("forward", "inverse"):
                y_ref, l_ref = getattr(cnf, direction)(x, c)
                y, ladj = getattr(frozen, direction)(x, c)
                torch.testing.assert_close(y, y_ref.detach(), atol=1e-10, rtol=1e-10)
                torch.testing.assert_close(ladj, l_ref.detach(), atol=1e-10, rtol=1e-10)


def test_analytic_trace_matches_autograd_jacobian():
    from exactflow.continuous import TimeMLP

    torch.manual_seed(1)
    dyn = perturb(TimeMLP(4, (16, 8, 16), 3, time="gate", activation="softplus"), 0.5).double()
    z, c = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    f, trace = dyn.forward_with_trace(0.3, z, c)
    jac = torch.autograd.functional.jacobian(lambda v: dyn(0.3, v, c).sum(0), z)  # (D, N, D)
    torch.testing.assert_close(f, dyn(0.3, z, c))
    torch.testing.assert_close(trace, torch.diagonal(jac, dim1=0, dim2=2).sum(-1))
    linear = perturb(TimeMLP(3, (), time="concat"), 0.5).double()  # no hidden layer
    z = torch.randn(4, 3, dtype=torch.float64)
    trace = linear.forward_with_trace(0.5, z, None)[1]
    expected = linear.layers[0].linear.weight[:, :3].diagonal().sum()
    torch.testing.assert_close(trace, expected.expand(4))


def test_cnf_export_options_and_errors():
    from exactflow.continuous import CNF, TimeMLP
    from exactflow.export import FixedStepCNF

    adaptive = ef.models.FFJORD(2, hidden=(8,))  # dopri5: exported as rk4 with its steps (20)
    frozen = export_form(adaptive).transform
    assert (frozen.solver, frozen.steps) == ("rk4", 20)
    frozen = export_form(adaptive, solver="midpoint", steps=5).transform
    assert (frozen.solver, frozen.steps) == ("midpoint", 5)
    with pytest.raises(ConfigError, match="fixed-step one of euler, midpoint, heun2, rk4"):
        export_form(adaptive, solver="dopri5")
    with pytest.raises(TypeError, match="steps must be a Python int"):
        export_form(adaptive, steps=torch.tensor(4))

    class Custom(torch.nn.Module):
        features = 2

        def forward(self, t, z):
            return -z

    with pytest.raises(ConfigError, match="forward_with_trace"):
        export_form(CNF(Custom()))
    assert isinstance(export_form(CNF(TimeMLP(2, (4,)))), FixedStepCNF)


def test_whiten_export_form_is_equivalent():
    from exactflow.transforms.preprocessing import Whiten

    a = torch.randn(3, 3, dtype=torch.float64)
    tril = torch.linalg.cholesky(a @ a.T + torch.eye(3, dtype=torch.float64))
    w = Whiten(torch.randn(3, dtype=torch.float64), tril)
    frozen = export_form(w)
    assert not isinstance(frozen, Whiten)
    x = torch.randn(7, 3, dtype=torch.float64)
    for direction in ("forward", "inverse"):
        torch.testing.assert_close(getattr(frozen, direction)(x), getattr(w, direction)(x))


# -- command line: export a trained run, score a file with onnxruntime ------------------------------
TINY_RUN = """
model = "maf"
[model_args]
transforms = 2
hidden = [16]
[train]
steps = 20
batch_size = 64
eval_every = 10
progress = false
"""


def test_cli_export_and_score_match_eval_in_data_space(tmp_path, capsys):
    """A MAF trained on a shifted, scaled, correlated table (whitened before the flow):
    scoring raw rows with the exported file gives the run's own log p per row, and their
    mean is ``exactflow eval``'s NLL."""
    import json

    from exactflow.app.run import load_run
    from exactflow.cli import main

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(400, 3)) @ np.array([[2, 0, 0], [1, 3, 0], [0, 0.5, 0.2]])
    rows += np.array([10.0, -5.0, 100.0])
    data = tmp_path / "d.csv"
    np.savetxt(data, rows, delimiter=",", header="a,b,c", comments="")
    (tmp_path / "run.toml").write_text(TINY_RUN)
    run, model = tmp_path / "run", tmp_path / "m.onnx"
    argv = ["train", "--data", data, "--config", tmp_path / "run.toml", "--out", run]
    assert main([str(a) for a in [*argv, "--quiet", "--no-plots"]]) == 0
    assert main(["export", str(run), "--out", str(model)]) == 0
    assert "log_prob (N,) in nats of the original data space" in capsys.readouterr().out
    scores = tmp_path / "s.npy"
    assert main(["score", str(model), str(data), "--out", str(scores)]) == 0
    got = np.load(scores)
    flow = load_run(run).flow
    with torch.no_grad():
        ref = flow.log_prob(torch.from_numpy(rows).float()).numpy()
    assert got.shape == (400,) and np.abs(got - ref).max() < 1e-4
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data)]) == 0
    nll = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nll"]
    assert -got.mean() == pytest.approx(nll, abs=1e-4)

    # the sampler maps base noise to data units (the whitening undone in the graph)
    sampler = tmp_path / "s.onnx"
    assert main(["export", str(run), "--what", "sample", "--out", str(sampler)]) == 0
    noise = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    feeds = {"noise": noise.numpy(), "temperature": np.array(1.0, np.float32)}
    x = load_onnx(sampler).run(None, feeds)[0]
    with torch.no_grad():
        assert np.abs(x - flow.transform.inverse(noise)[0].numpy()).max() < 1e-4

    # bad input: one line on stderr, exit code 2
    narrow = tmp_path / "narrow.npy"
    np.save(narrow, rows[:, :2])
    capsys.readouterr()
    for argv, message in [
        (["score", str(tmp_path / "none.onnx"), str(data)], "no such ONNX file"),
        (["score", str(model), str(tmp_path / "none.csv")], "no such file"),
        (["score", str(model), str(narrow)], "rows have 2 columns but the model expects 3"),
        (["score", str(sampler), str(data)], "needs a log_prob export (input x[, context]"),
        (["score", str(data), str(data)], "not a loadable ONNX model"),
        (["export", str(run), "--out", str(model)], "exists; pass --force"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert message in err
