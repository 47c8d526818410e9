"""Conditional density estimation from the command line: p(x | c) trained, evaluated, sampled,
scored, detected and exported with the context from file columns, a second file, class
labels or SBI simulations (issue 22)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exactflow.app.run import load_run, load_run_data, sbi_dataset
from exactflow.data import load_dataset
from test_cli import one_line_error, run

SMALL = """
model = "maf"
[model_args]
transforms = 2
hidden = [16]
[train]
steps = 30
batch_size = 64
eval_every = 10
checkpoint_every = 10
progress = false
"""


@pytest.fixture
def table(tmp_path):
    """400 rows of x (3 columns a, b, d) that depend on a context (c1, c2), as one CSV with
    a header and as an .npy pair."""
    rng = np.random.default_rng(0)
    n = 400
    c = rng.normal(size=(n, 2))
    x = np.stack(
        [
            c[:, 0] + 0.3 * rng.normal(size=n),
            c[:, 0] * c[:, 1] + 0.3 * rng.normal(size=n),
            rng.normal(size=n),
        ],
        axis=1,
    )
    csv = tmp_path / "table.csv"
    rows = ["a,c1,b,c2,d"] + [
        f"{x[i, 0]},{c[i, 0]},{x[i, 1]},{c[i, 1]},{x[i, 2]}" for i in range(n)
    ]
    csv.write_text("\n".join(rows) + "\n")
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    np.save(tmp_path / "c.npy", c.astype(np.float32))
    (tmp_path / "small.toml").write_text(SMALL)
    return tmp_path


def test_context_columns_and_npy_pairs_are_the_same_problem(table, capsys):
    cfg = table / "small.toml"
    assert run("train", "--config", cfg, "--data", table / "table.csv",
               "--context-columns", "c1,c2", "--out", table / "cols", "--quiet") == 0  # fmt: skip
    assert run("train", "--config", cfg, "--data", table / "x.npy", "--context",
               table / "c.npy", "--out", table / "pair", "--quiet") == 0  # fmt: skip
    # indices name the same columns as the header names
    assert run("train", "--config", cfg, "--data", table / "table.csv",
               "--context-columns", "1,3", "--out", table / "idx", "--quiet") == 0  # fmt: skip
    metrics = [
        json.loads((table / r / "metrics.json").read_text()) for r in ("cols", "pair", "idx")
    ]
    assert metrics[0]["context"] == 2 and metrics[0]["features"] == 3
    # same rows, same split, same model, same seed: the same numbers to float rounding
    assert metrics[0]["test_nll"] == pytest.approx(metrics[1]["test_nll"], abs=1e-5)
    assert metrics[0]["test_nll"] == pytest.approx(metrics[2]["test_nll"], abs=1e-5)
    loaded = load_run(table / "cols")
    assert loaded.flow.context_features == 2
    assert loaded.data_meta["context_names"] == ["c1", "c2"]
    # the context standardisation was fitted on the training context and saved
    enc = loaded.flow.context_encoder
    assert not torch.allclose(enc.scale, torch.ones(2))
    # eval on the file reads the context from the same columns; on the pair, from --context
    capsys.readouterr()
    assert run("eval", table / "cols", "--data", table / "table.csv") == 0
    by_cols = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert run("eval", table / "pair", "--data", table / "x.npy", "--context", table / "c.npy") == 0
    by_pair = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert by_cols["nll"] == pytest.approx(by_pair["nll"], abs=1e-5)
    x = torch.as_tensor(np.load(table / "x.npy"))
    c = torch.as_tensor(np.load(table / "c.npy"))
    with torch.no_grad():
        want = -loaded.flow.log_prob(x, c).double().mean().item()
    assert by_cols["nll"] == pytest.approx(want, rel=1e-5)


def test_conditional_beats_unconditional_on_the_same_rows(table):
    cfg = table / "small.toml"
    common = ["--config", cfg, "--data", table / "table.csv", "--steps", 150, "--quiet"]
    assert run("train", *common, "--context-columns", "c1,c2", "--out", table / "c") == 0
    # the unconditional model of the same x columns (x.npy), same split of the 400 rows
    assert run("train", *common[:2], "--data", table / "x.npy", "--steps", 150,
               "--quiet", "--out", table / "u") == 0  # fmt: skip
    cond = json.loads((table / "c" / "metrics.json").read_text())["test_nll"]
    plain = json.loads((table / "u" / "metrics.json").read_text())["test_nll"]
    # x0 = c1 + 0.3 noise: knowing c is worth far more than the training noise
    assert cond < plain - 0.5, (cond, plain)


def test_sample_with_a_context_row_or_file(table, capsys):
    out = table / "cols"
    assert run("train", "--config", table / "small.toml", "--data", table / "table.csv",
               "--context-columns", "c1,c2", "--steps", 300, "--out", out, "--quiet") == 0  # fmt: skip
    assert run("sample", out, "-n", 7, "--context", "0.5,-1", "--out", table / "s.csv") == 0
    lines = (table / "s.csv").read_text().splitlines()
    assert lines[0] == "c1,c2,x0,x1,x2" and len(lines) == 8
    rows = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    np.testing.assert_allclose(rows[:, :2], [[0.5, -1.0]] * 7)
    # a context file of M rows: n samples per row, in row order, reproducible by seed
    np.savetxt(table / "ctx.csv", [[0.0, 0.0], [1.5, 1.0]], delimiter=",", header="c1,c2",
               comments="")  # fmt: skip
    assert run("sample", out, "-n", 400, "--context-file", table / "ctx.csv", "--out",
               table / "m.npy") == 0  # fmt: skip
    m = np.load(table / "m.npy")
    assert m.shape == (800, 3)
    # x0 ~ c1 + noise: the two context rows give samples centred near 0 and 1.5
    assert abs(m[:400, 0].mean()) < 0.4 and abs(m[400:, 0].mean() - 1.5) < 0.4
    flow = load_run(out).flow
    g = torch.Generator().manual_seed(0)
    ctx = torch.tensor([[0.0, 0.0], [1.5, 1.0]]).repeat_interleave(400, 0)
    with torch.no_grad():
        np.testing.assert_allclose(m, flow.sample(1, ctx, generator=g)[0].numpy(), atol=1e-6)
    capsys.readouterr()
    assert run("sample", out, "-n", 5, "--out", table / "x.csv") == 2
    assert "conditional on 2 context column(s) (c1, c2)" in one_line_error(capsys)
    assert run("sample", out, "-n", 5, "--context", "1,2,3", "--out", table / "x.csv") == 2
    assert "3 value(s)" in one_line_error(capsys)
    assert run("sample", out, "-n", 5, "--context", "1,nan", "--out", table / "x.csv") == 2
    assert "not finite" in one_line_error(capsys)
    np.save(table / "bad.npy", np.zeros((2, 3)))
    assert run("sample", out, "-n", 5, "--context-file", table / "bad.npy", "--out",
               table / "x.csv") == 2  # fmt: skip
    assert "3 context column(s)" in one_line_error(capsys)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--context-columns", "c9"], "unknown context column 'c9'; its header has a, c1, b"),
        (["--context-columns", "7"], "index 7 is out of range"),
        (["--context-columns", "a,c1,b,c2,d"], "every column is a context column"),
        (["--context", "{tmp}/short.npy"], "5 context rows for the 400 data rows"),
        (["--context", "{tmp}/nan.npy"], "non-finite"),
        (["--context-columns", "c1", "--condition", "label"], "one way to condition"),
        (["--condition", "label"], "--condition label needs a data set with class labels"),
        (["--simulations", "100"], "--simulations goes with --data sbi:TASK"),
    ],
)
def test_bad_context_options_are_one_line_and_leave_no_run(table, capsys, extra, message):
    np.save(table / "short.npy", np.zeros((5, 2), np.float32))
    nan = np.zeros((400, 2), np.float32)
    nan[3, 1] = np.nan
    np.save(table / "nan.npy", nan)
    extra = [e.replace("{tmp}", str(table)) for e in extra]
    out = table / "never"
    assert run("train", "--config", table / "small.toml", "--data", table / "table.csv",
               *extra, "--out", out, "--quiet") == 2  # fmt: skip
    assert message in one_line_error(capsys)
    assert not out.exists()


def test_model_args_context_must_match_the_data(table, capsys):
    bad = SMALL.replace("[model_args]\n", "[model_args]\ncontext = 3\n")
    (table / "ctx.toml").write_text(bad)
    assert run("train", "--config", table / "ctx.toml", "--data", table / "table.csv",
               "--context-columns", "c1,c2", "--out", table / "r", "--quiet") == 2  # fmt: skip
    assert "the data has 2 context column(s)" in one_line_error(capsys)
    assert run("train", "--config", table / "ctx.toml", "--data", table / "x.npy",
               "--out", table / "r", "--quiet") == 2  # fmt: skip
    assert "the data has no context" in one_line_error(capsys)


def test_unconditional_runs_refuse_a_context(table, capsys):
    out = table / "u"
    assert run("train", "--config", table / "small.toml", "--data", table / "x.npy",
               "--out", out, "--quiet") == 0  # fmt: skip
    assert run("sample", out, "-n", 3, "--context", "1,2", "--out", table / "s.csv") == 2
    assert "unconditional" in one_line_error(capsys)


def test_detect_and_onnx_use_the_context(table, capsys):
    pytest.importorskip("onnxruntime")
    out = table / "cols"
    assert run("train", "--config", table / "small.toml", "--data", table / "table.csv",
               "--context-columns", "c1,c2", "--out", out, "--quiet") == 0  # fmt: skip
    assert run("detect", out, "--data", table / "table.csv") == 0
    scores = np.genfromtxt(out / "detect" / "scores.csv", delimiter=",", names=True)["score"]
    flow = load_run(out).flow
    x = torch.as_tensor(np.load(table / "x.npy"))
    c = torch.as_tensor(np.load(table / "c.npy"))
    with torch.no_grad():
        want = -flow.log_prob(x, c).numpy()
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    assert run("export", out, "--out", table / "m.onnx") == 0
    assert "context (N, 2) in raw units" in capsys.readouterr().out
    assert run("score", table / "m.onnx", table / "x.npy", "--context", table / "c.npy",
               "--out", table / "s.npy") == 0  # fmt: skip
    np.testing.assert_allclose(np.load(table / "s.npy"), -want, rtol=1e-4, atol=1e-4)
    assert run("score", table / "m.onnx", table / "x.npy") == 2
    assert "is conditional" in one_line_error(capsys)


def test_sbi_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "npe"
    assert run("train", "--data", "sbi:two_moons", "--simulations", 600, "--steps", 40,
               "--out", out, "--quiet", "--no-plots") == 0  # fmt: skip
    meta = load_run(out).data_meta
    assert meta["context"] == 2 and meta["context_kind"] == "simulation"
    assert meta["support"] == [[-1.0, -1.0], [1.0, 1.0]]
    assert run("sample", out, "-n", 2000, "--context", "0.1,-0.2", "--out", tmp_path / "p.csv") == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "x0,x1,theta0,theta1"
    theta = np.array([[float(v) for v in line.split(",")[2:]] for line in lines[1:]])
    # the support bijection keeps every sample inside the prior box
    assert theta.shape == (2000, 2) and np.all(np.abs(theta) <= 1.0)
    capsys.readouterr()
    assert run("eval", out) == 0
    assert "sbi:two_moons test split" in capsys.readouterr().out
    # the run's data is the same simulations as sbi_dataset's for the seed
    again = sbi_dataset("two_moons", 0, simulations=600)
    assert torch.equal(load_run_data(load_run(out).config).train, again.train)


def test_sbi_bad_task_is_one_line(tmp_path, capsys):
    assert run("train", "--data", "sbi:nope", "--out", tmp_path / "r", "--quiet") == 2
    assert "nope" in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_class_conditional_toy_and_digits_keep_the_plain_rows(tmp_path, capsys):
    for name, classes in (("moons", 2), ("8gaussians", 8), ("digits", 10)):
        plain = load_dataset(name, 3) if name == "digits" else load_dataset(name, 3, n_train=500)
        opts = {} if name == "digits" else {"n_train": 500}
        cond = load_dataset(name, 3, condition="label", **opts)
        assert torch.equal(plain.train, cond.train) and torch.equal(plain.test, cond.test)
        assert cond.context == classes
        assert torch.equal(cond.train_context.sum(1), torch.ones(cond.train.shape[0]))
    # moons given the moon: each label's samples lie on its own half circle
    out = tmp_path / "m"
    assert run("train", "--data", "moons", "--condition", "label", "--steps", 300,
               "--out", out, "--quiet", "--no-plots") == 0  # fmt: skip
    for label in (0, 1):
        assert (
            run("sample", out, "-n", 500, "--context", label, "--out", tmp_path / f"{label}.npy")
            == 0
        )
    upper, lower = np.load(tmp_path / "0.npy"), np.load(tmp_path / "1.npy")
    # the upper moon (label 0) sits above the lower one on average
    assert upper[:, 1].mean() > lower[:, 1].mean() + 0.8
    assert run("sample", out, "-n", 5, "--context", "label=2", "--out", tmp_path / "x.npy") == 2
    assert "a class in 0..1" in one_line_error(capsys)
