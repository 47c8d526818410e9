"""Reliability (issue 24): inputs a hurried user types, each refused by name before it can crash
late, leave an unusable run, or pass silently.

Every CLI case runs ``exactflow.cli.main`` in a scratch directory and asserts exit code 2, one
line on stderr naming the problem (no traceback) and no run directory left behind; every API
case asserts the ``ExactflowError`` subclass and the words of its message. One case runs the
real ``python -m exactflow`` process. See docs/reliability.md ("Failure classes").
"""

from __future__ import annotations

import errno
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import exactflow.app.run as run_module
from exactflow.app.config import RunConfig
from exactflow.app.detect import detector_from_run
from exactflow.app.run import evaluate_run, load_run, sample_run, train_run
from exactflow.check import check_transform
from exactflow.cli import main
from exactflow.data import Dataset
from exactflow.errors import (
    ConfigError,
    DataError,
    DomainError,
    DTypeError,
    ExactflowError,
    ShapeError,
)
from exactflow.export import to_onnx
from exactflow.models import MAF, NSF, RealNVP
from exactflow.train.checkpoint import load_checkpoint, save_checkpoint
from exactflow.transforms import Affine, AffineMap, RationalQuadraticSpline, resolve_map
from exactflow.validation import (
    MAX_SEED,
    as_tensor,
    check_count,
    check_map_kwargs,
    check_positive_finite,
    check_sample_shape,
    check_seed,
)

TINY = """
data = "train.csv"
model = "realnvp"
[model_args]
transforms = 2
hidden = [8]
[train]
steps = 2
batch_size = 16
eval_every = 2
checkpoint_every = 0
progress = false
"""


def _flow(context: int = 0):
    torch.manual_seed(0)
    return RealNVP(2, transforms=2, hidden=(8,), context=context)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A scratch directory with train.csv, tiny.toml, a trained run ``run`` and broken
    copies of it: ``nan`` (NaN weights), ``norun`` (metadata without "run"), ``listmeta``
    (metadata a JSON array), ``badshape`` (data shape a string)."""
    root = tmp_path_factory.mktemp("reliability")
    g = np.random.default_rng(0)
    np.savetxt(root / "train.csv", g.normal(size=(200, 2)), delimiter=",")
    (root / "tiny.toml").write_text(TINY)
    cfg = RunConfig.read(root / "tiny.toml")
    cfg.data = str(root / "train.csv")
    train_run(cfg, root / "run", plots=False, quiet=True)
    tensors, meta = load_checkpoint(root / "run" / "model.safetensors")
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)

    def variant(name: str, tensors=tensors, meta=meta) -> None:
        shutil.copytree(root / "run", root / name)
        save_checkpoint(root / name / "model.safetensors", tensors, meta)

    variant("nan", tensors={**tensors, key: torch.full_like(tensors[key], math.nan)})
    variant("norun", meta={k: v for k, v in meta.items() if k != "run"})
    variant("badshape", meta={**meta, "data": {**meta["data"], "shape": "2"}})
    shutil.copytree(root / "run", root / "listmeta")
    from safetensors.torch import save

    payload = save(
        {k: v.contiguous() for k, v in tensors.items()},
        metadata={"exactflow": json.dumps([meta["format"], meta["run"]])},
    )
    (root / "listmeta" / "model.safetensors").write_bytes(payload)
    return root


@pytest.fixture(autouse=True)
def _fresh(work):
    """A case that wrongly starts a run must not make the next one fail for "new exists"."""
    yield
    shutil.rmtree(work / "new", ignore_errors=True)


def _cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_line(code: int, err: str, *words: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _nothing_left(root: Path, name: str = "new") -> None:
    assert not (root / name).exists(), f"a failed start left {name}/"
    assert not list(root.glob(f".{name}.*.tmp")), "a failed start left a temporary directory"


# -- the CLI refuses a bad run before any directory exists ------------------------------------
BAD_TOML = [
    # (what the run file says, words the one line must contain)
    ("[model_args]\nhidden = [0]\n", ("[model_args] hidden = [0]", "model 'realnvp'")),
    ('model = "nsf"\n[model_args]\nhidden = []\n', ("model 'nsf'", "hidden = []")),
    ("[model_args]\ntransforms = 2\nhidden = [0]\n", ("hidden = [0]",)),
    ('[model_args]\nhidden = "64"\n', ("hidden",)),
    ("[model_args]\ntransforms = 0\n", ("transforms = 0",)),
    ("[model_args]\ntransforms = 2.5\n", ("transforms = 2.5",)),
    ('model = "nsf"\n[model_args]\nmap = "bogus"\n', ('[model_args] map = "bogus"',)),
    (
        'model = "nsf"\n[model_args]\nmap_kwargs = { bogus = 1 }\n',
        ("[model_args] map_kwargs = { bogus = 1 }", "unknown map_kwargs key(s) bogus", "bins"),
    ),
    ("[model_args]\nlog_scale_bound = 0.0\n", ("log_scale_bound",)),
    ("[model_args]\nhiden = [8]\n", ("hiden",)),
    ("[data_args]\ntest = 0.0\n", ("[data_args] test = 0", "every split needs at least one row")),
    ("[data_args]\nval = 0.0\n", ("[data_args] val = 0",)),
    ("[data_args]\nval = 1.5\n", ("[data_args] val = 1.5",)),
    ('[data_args]\nval = "0.1"\n', ("[data_args] val", "str")),
    ("seed = -1\n", ("seed must be an int in [0, 2**63 - 1], got -1",)),
    ("seed = 18446744073709551615\n", ("seed",)),
    ("seed = 1.5\n", ("seed must be an int", "float")),
    ("seed = true\n", ("seed must be an int", "bool")),
    ("[train]\nseed = -3\n", ("[train] seed",)),
]


@pytest.mark.parametrize("toml, words", BAD_TOML, ids=[t.split("\n")[-2] for t, _ in BAD_TOML])
def test_cli_bad_run_file_is_one_line_and_leaves_no_directory(
    work, capsys, monkeypatch, toml, words
):
    monkeypatch.chdir(work)
    head = "" if "model =" in toml else 'model = "realnvp"\n'
    tail = "" if "[train]" in toml else "[train]\n"
    (work / "case.toml").write_text(head + toml + tail + "steps = 2\n")
    code, err = _cli(capsys, "train", "--data", "train.csv", "--config", "case.toml",
                     "--out", "new", "--quiet", "--no-plots")  # fmt: skip
    _one_line(code, err, *words)
    _nothing_left(work)


@pytest.mark.parametrize(
    "argv, words",
    [
        (("--seed", "-1"), ("--seed must be an int in [0, 2**63 - 1], got -1",)),
        (("--seed", str(2**64 - 1)), ("--seed", str(2**64 - 1))),
        (("--seed", "1.5"), ("--seed", "invalid int value", "--help")),
        (("--steps", "ten"), ("--steps", "invalid int value: 'ten'")),
        (("--lr", "nan"), ("lr must be a positive number",)),
        (("--batch-size", "0"), ("batch_size must be >= 1",)),
        (("--device", "gpu"), ("device", "'gpu'")),
        (("--device", "cuda:x"), ("device", "'cuda:x'")),
        (("--device", f"cuda:{torch.cuda.device_count()}"), ("cuda",)),
        (("--model", "nfs"), ("unknown model 'nfs'", "valid: ")),
        (("--threads", "0"), ("--threads must be >= 1",)),
    ],
)
def test_cli_bad_option_is_one_line_and_leaves_no_directory(work, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(work)
    code, err = _cli(capsys, "train", "--data", "train.csv", "--steps", "2", "--out", "new",
                     "--quiet", "--no-plots", *argv)  # fmt: skip
    _one_line(code, err, *words)
    _nothing_left(work)


def test_cli_split_counts_on_toy_data(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    for key in ("n_train", "n_val", "n_test"):
        (work / "toy.toml").write_text(f"[data_args]\n{key} = 0\n[train]\nsteps = 2\n")
        code, err = _cli(capsys, "train", "--config", "toy.toml", "--out", "new", "--quiet")
        _one_line(code, err, f"[data_args] {key} = 0", "split empty")
        _nothing_left(work)


def test_seed_range_before_and_after_training(work, monkeypatch):
    """The largest accepted seed trains and evaluates (seed + 1 seeds the test noise); one
    more is refused up front instead of crashing after training."""
    monkeypatch.chdir(work)
    cfg = RunConfig.read("tiny.toml")
    cfg.seed = cfg.train.seed = MAX_SEED
    metrics = train_run(cfg, "maxseed", plots=False, quiet=True)
    assert math.isfinite(metrics["test_nll"])
    assert math.isfinite(evaluate_run("maxseed")["nll"])
    cfg.seed = cfg.train.seed = MAX_SEED + 1
    with pytest.raises(ConfigError, match=r"seed must be an int in \[0, 2\*\*63 - 1\]"):
        train_run(cfg, "new", plots=False, quiet=True)
    _nothing_left(work)


def test_api_train_run_validates_before_the_directory(work, monkeypatch):
    monkeypatch.chdir(work)
    cfg = RunConfig.read("tiny.toml")
    cfg.model_args = {"hidden": [0]}
    with pytest.raises(ConfigError, match=r"\[model_args\] hidden = \[0\]"):
        train_run(cfg, "new", plots=False, quiet=True)
    cfg = RunConfig.read("tiny.toml")
    cfg.data_args = {"test": 0.0}
    with pytest.raises(ConfigError, match=r"\[data_args\] test = 0"):
        train_run(cfg, "new", plots=False, quiet=True)
    with pytest.raises(ConfigError, match="RunConfig"):
        train_run({"data": "train.csv"}, "new")  # type: ignore[arg-type]
    _nothing_left(work)


def test_an_empty_split_from_any_loader_is_refused_before_training(work, monkeypatch):
    """The split check after loading (a safety net behind the option checks) names the split."""
    monkeypatch.chdir(work)
    rows = torch.randn(50, 2)

    def loader(name, seed, **options):
        return Dataset("stub", rows[:40], rows[40:], rows[:0], shape=(2,))

    monkeypatch.setattr(run_module, "load_dataset", loader)
    with pytest.raises(ConfigError, match=r"the test split of 'train\.csv' is empty"):
        train_run(RunConfig.read("tiny.toml"), "new", plots=False, quiet=True)
    _nothing_left(work)


def test_force_keeps_the_previous_run_when_the_new_one_fails_to_start(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    shutil.copytree("run", "kept")
    (work / "case.toml").write_text(TINY.replace("hidden = [8]", "hidden = [0]"))
    code, err = _cli(capsys, "train", "--config", "case.toml", "--out", "kept", "--force",
                     "--quiet", "--no-plots")  # fmt: skip
    _one_line(code, err, "hidden = [0]")
    assert (work / "kept" / "metrics.json").is_file() and (
        work / "kept" / "model.safetensors"
    ).is_file()
    load_run("kept")  # still a usable run


def test_run_directory_appears_atomically(work, capsys, monkeypatch):
    """A write failing while the new directory is filled leaves neither it nor its hidden
    temporary sibling, and the error names the file the user asked for."""
    monkeypatch.chdir(work)

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(run_module, "atomic_write_text", full)
    code, err = _cli(capsys, "train", "--config", "tiny.toml", "--out", "deep/new", "--quiet",
                     "--no-plots")  # fmt: skip
    _one_line(code, err, str(Path("deep/new/config.toml")), "No space left on device")
    _nothing_left(work / "deep")


def test_new_run_directory_keeps_the_umask_mode(work, monkeypatch):
    monkeypatch.chdir(work)
    train_run(RunConfig.read("tiny.toml"), "modes", plots=False, quiet=True)
    (work / "plain").mkdir()
    assert (work / "modes").stat().st_mode == (work / "plain").stat().st_mode
    # the files written atomically get a plain open()'s mode too, not mkstemp's 0600
    (work / "plain.txt").write_text("x")
    want = (work / "plain.txt").stat().st_mode
    for name in ("config.toml", "metrics.json", "model.safetensors", "checkpoint.safetensors"):
        assert (work / "modes" / name).stat().st_mode == want, name


def test_real_process_prints_one_line(work):
    proc = subprocess.run(
        [sys.executable, "-m", "exactflow", "train", "--seed", "-1", "--out", "new"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    _one_line(proc.returncode, proc.stderr, "--seed")
    _nothing_left(work)


def test_unexpected_errors_are_one_line_exit_1(work, capsys, monkeypatch):
    """A bug (not bad input) is one line and exit 1; EXACTFLOW_TRACEBACK=1 re-raises it."""
    monkeypatch.chdir(work)

    def boom(*args, **kwargs):
        raise RuntimeError("kaputt\nsecond line")

    monkeypatch.setattr(run_module, "Trainer", boom)
    code, err = _cli(capsys, "train", "--config", "tiny.toml", "--out", "new", "--quiet")
    assert code == 1 and err.strip().splitlines() == [
        "exactflow train: internal error: RuntimeError: kaputt (a bug: please report it; "
        "EXACTFLOW_TRACEBACK=1 shows the traceback)"
    ]
    _nothing_left(work)
    monkeypatch.setenv("EXACTFLOW_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="kaputt"):
        main(["train", "--config", "tiny.toml", "--out", "new", "--quiet"])


# -- loading a model checks its metadata and refuses non-finite weights --------------------------
@pytest.mark.parametrize(
    "run, error, words",
    [
        ("nan", DataError, ("1 tensor(s) hold NaN or inf", "values)", "allow_nonfinite=True")),
        ("norun", DataError, ("model metadata has no 'run' entry",)),
        ("listmeta", DataError, ("must be a JSON object, got a JSON array",)),
        ("badshape", DataError, ("'data.shape' must be a JSON array, got a JSON string",)),
        ("missing", DataError, ("no model.safetensors",)),
    ],
)
def test_load_run_names_what_is_wrong(work, monkeypatch, run, error, words):
    monkeypatch.chdir(work)
    with pytest.raises(error) as info:
        load_run(run)
    assert "\n" not in str(info.value)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize(
    "argv",
    [
        ("eval", "nan"),
        ("sample", "nan", "--out", "s.npy"),
        ("detect", "nan", "--data", "train.csv", "--out", "det"),
        ("export", "nan", "--out", "m.onnx"),
        ("check", "nan"),
        ("train", "--out", "nan_resume", "--resume"),
    ],
    ids=lambda a: a[0],
)
def test_cli_refuses_nan_weights(work, capsys, monkeypatch, argv):
    monkeypatch.chdir(work)
    if "nan_resume" in argv:  # a training checkpoint with NaN weights
        shutil.copytree("run", "nan_resume", dirs_exist_ok=True)
        ck, ck_meta = load_checkpoint("run/checkpoint.safetensors")
        key = next(k for k, v in ck.items() if v.is_floating_point())
        nan = {**ck, key: ck[key] * math.nan}
        save_checkpoint("nan_resume/checkpoint.safetensors", nan, ck_meta)
    code, err = _cli(capsys, *argv)
    _one_line(code, err, "NaN or inf", "--allow-nonfinite")
    assert not Path("s.npy").exists() and not Path("m.onnx").exists() and not Path("det").exists()


def test_allow_nonfinite_is_the_explicit_escape_hatch(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    assert main(["eval", "nan", "--allow-nonfinite"]) == 0
    assert "NLL nan" in capsys.readouterr().out
    assert main(["sample", "nan", "-n", "5", "--out", "s_nan.npy", "--allow-nonfinite"]) == 0
    assert np.isnan(np.load("s_nan.npy")).all()
    flow = load_run("nan", allow_nonfinite=True).flow
    assert torch.isnan(flow.log_prob(torch.zeros(3, 2))).all()
    with pytest.raises(DataError, match="NaN or inf"):
        load_checkpoint("nan/model.safetensors")
    tensors, _ = load_checkpoint("nan/model.safetensors", allow_nonfinite=True)
    assert any(torch.isnan(v).any() for v in tensors.values() if v.is_floating_point())
    with pytest.raises(DataError, match="NaN or inf"):
        detector_from_run("nan")


@pytest.mark.parametrize("run", ["norun", "listmeta", "badshape"])
def test_cli_refuses_malformed_metadata(work, capsys, monkeypatch, run):
    monkeypatch.chdir(work)
    _one_line(*_cli(capsys, "eval", run), f"{run}/model.safetensors")


def test_eval_and_sample_check_their_arguments(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    _one_line(*_cli(capsys, "eval", "run", "--seed", "-1"), "--seed")
    _one_line(*_cli(capsys, "sample", "run", "-n", "2.5", "--out", "s.npy"), "-n", "'2.5'")
    _one_line(*_cli(capsys, "sample", "run", "--out", "nowhere/s.npy"), "nowhere")
    _one_line(*_cli(capsys, "sample", "run", "--out", "s.txt"), ".npy, .csv or .png")
    _one_line(*_cli(capsys, "eval", "no_such_run"), "no_such_run")
    _one_line(*_cli(capsys, "eval"), "the following arguments are required: run")
    _one_line(*_cli(capsys, "trian"), "invalid choice: 'trian'")
    with pytest.raises(DTypeError, match="number of samples must be an int, got bool"):
        sample_run("run", True, "s.npy")
    with pytest.raises(ConfigError, match="seed must be an int in"):
        sample_run("run", 3, "s.npy", seed=-1)
    with pytest.raises(ConfigError, match="batch_size must be a positive int"):
        evaluate_run("run", batch_size=0)


# -- arguments of the Python API ----------------------------------------------------------------
@pytest.mark.parametrize(
    "n, error, words",
    [
        (2.5, DTypeError, ("number of samples must be an int", "float 2.5")),
        (None, DTypeError, ("NoneType",)),
        (True, DTypeError, ("bool True",)),
        ("12", DTypeError, ("str '12'",)),
        (torch.tensor(3.0), DTypeError, ("0-dim integer tensor", "torch.float32")),
        (torch.tensor(True), DTypeError, ("bool",)),
        ((2, True), DTypeError, ("bool True",)),
        ((2, 1.5), DTypeError, ("float 1.5",)),
        (0, ShapeError, ("number of samples must be >= 1", "(0,)")),
        ((3, -1), ShapeError, ("(3, -1)",)),
    ],
    ids=repr,
)
def test_sample_counts(n, error, words):
    flow = _flow()
    for call in (flow.sample, flow.rsample, flow.sample_and_log_prob):
        with pytest.raises(error) as info:
            call(n)
        for w in words:
            assert w in str(info.value)


def test_sample_accepts_ints_numpy_ints_and_0_dim_int_tensors():
    flow = _flow()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ref = flow.sample(3, generator=g())
    for n in (np.int64(3), torch.tensor(3), torch.tensor(3, dtype=torch.int32), [3], (3,)):
        assert torch.equal(flow.sample(n, generator=g()), ref)
    assert flow.sample(torch.Size([2, 3])).shape == (2, 3, 2)
    assert flow.distribution().sample((2,)).shape == (2, 2)
    with pytest.raises(DTypeError, match="sample_shape"):
        flow.distribution().sample("12")


@pytest.mark.parametrize(
    "x, error, words",
    [
        ([[0.1, 0.2], [0.3]], ShapeError, ("x is ragged", "x[1] has 1 entry but x[0] has 2")),
        ([[0.1, [0.2]]], ShapeError, ("ragged",)),
        ([["a", "b"]], DTypeError, ("x[0][0] must be a number", "str 'a'")),
        ([[0.1, None]], DTypeError, ("x[0][1]", "NoneType")),
        ([[True, False]], DTypeError, ("bool",)),
        (np.array([["a", "b"]]), DTypeError, ("strings",)),
        (np.array([[1, None]], dtype=object), DTypeError, ("NoneType",)),
        (np.array([[1 + 2j, 0]]), DTypeError, ("complex",)),
        ("0.1, 0.2", DTypeError, ("torch.Tensor", "str")),
        ({"x": 1}, DTypeError, ("dict",)),
        (None, DTypeError, ("NoneType",)),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_log_prob_inputs(x, error, words):
    with pytest.raises(error) as info:
        _flow().log_prob(x)
    assert "\n" not in str(info.value)
    for w in words:
        assert w in str(info.value)


def test_lists_and_arrays_are_accepted_as_data_and_context():
    flow = _flow()
    x = torch.tensor([[0.1, 0.2], [-1.0, 2.0]])
    ref = flow.log_prob(x)
    for same in (x.tolist(), x.numpy(), x.double().numpy(), tuple(map(tuple, x.tolist()))):
        torch.testing.assert_close(flow.log_prob(same), ref)
    assert torch.equal(flow.log_prob(np.array([[1, 2]])), flow.log_prob(torch.tensor([[1.0, 2.0]])))
    cond = _flow(context=3)
    c = [[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]]
    torch.testing.assert_close(cond.log_prob(x, c), cond.log_prob(x, torch.tensor(c)))
    assert cond.sample(4, np.array([0.0, 1.0, -1.0])).shape == (4, 2)


@pytest.mark.parametrize(
    "context, error, words",
    [
        ("abc", DTypeError, ("context must be a torch.Tensor", "str")),
        ([[0.0, 1.0, 2.0], [1.0]], ShapeError, ("context is ragged",)),
        ([["a", "b", "c"]], DTypeError, ("context[0][0]",)),
    ],
)
def test_bad_contexts(context, error, words):
    cond = _flow(context=3)
    for call in (
        lambda: cond.log_prob(torch.zeros(2, 2), context),
        lambda: cond.sample(2, context),
        lambda: cond.distribution(context),
    ):
        with pytest.raises(error) as info:
            call()
        for w in words:
            assert w in str(info.value)


@pytest.mark.parametrize(
    "build, error, words",
    [
        (lambda: MAF(2, log_scale_bound=0), ConfigError, ("log_scale_bound must be > 0",)),
        (lambda: MAF(2, log_scale_bound=-1.0), ConfigError, ("log_scale_bound",)),
        (lambda: RealNVP(2, log_scale_bound=math.inf), ConfigError, ("log_scale_bound", "inf")),
        (lambda: RealNVP(2, log_scale_bound=math.nan), ConfigError, ("log_scale_bound", "nan")),
        (lambda: RealNVP(2, log_scale_bound="3"), DTypeError, ("log_scale_bound", "str")),
        (lambda: NSF(2, bound="5"), DTypeError, ("bound must be a number", "str '5'")),
        (lambda: NSF(2, bound=math.inf), ConfigError, ("bound",)),
        (lambda: NSF(2, bins=True), DTypeError, ("bins", "bool")),
        (lambda: NSF(2, bins=2.0), DTypeError, ("bins", "float")),
        (lambda: NSF(2, map_kwargs={"bogus": 1}), ConfigError, ("bogus", "valid: bins, bound")),
        (lambda: Affine(0.0, math.nan), DomainError, ("scale must be finite",)),
        (lambda: Affine(math.inf, 1.0), DomainError, ("shift must be finite",)),
        (lambda: Affine(0.0, 0.0), DomainError, ("nonzero",)),
        (lambda: Affine("a", 1.0), DTypeError, ("Affine shift",)),
        (lambda: Affine([1.0, 2.0], [[1.0], [1.0, 2.0]]), ShapeError, ("ragged",)),
        (lambda: AffineMap(0.0), ConfigError, ("log_scale_bound",)),
        (lambda: RationalQuadraticSpline(bound=0), ConfigError, ("bound must be > 0",)),
        (lambda: RationalQuadraticSpline(min_width="0.01"), DTypeError, ("min_width",)),
        (lambda: resolve_map("affine", bogus=1), ConfigError, ("unknown map_kwargs key(s) bogus",)),
        (lambda: resolve_map("affyne"), ConfigError, ("unknown elementwise map 'affyne'",)),
        (lambda: resolve_map(AffineMap(), log_scale_bound=2.0), ConfigError, ("by name",)),
        (lambda: resolve_map(3), DTypeError, ("int",)),
    ],
)
def test_refused_at_build_time(build, error, words):
    with pytest.raises(error) as info:
        build()
    assert isinstance(info.value, ExactflowError)
    for w in words:
        assert w in str(info.value)


def test_valid_bounds_still_build_and_give_finite_densities():
    x = torch.randn(8, 2)
    for flow in (MAF(2, log_scale_bound=0.5), RealNVP(2, log_scale_bound=10), NSF(2, bound=3)):
        assert torch.isfinite(flow.log_prob(x)).all()
    flow = NSF(2, bound=np.float64(4.0), bins=4)
    assert torch.isfinite(flow.log_prob(x)).all()


def test_check_transform_takes_lists_and_names_a_wrong_width():
    report = check_transform(Affine(2.0, 3.0), [1.0, 2.0])
    assert report.passed
    torch.manual_seed(0)
    with pytest.raises(ShapeError, match=r"cannot take x of shape \(5, 3\)"):
        check_transform(NSF(2).transform, torch.randn(5, 3))
    with pytest.raises(ShapeError, match="ragged"):
        check_transform(Affine(2.0, 3.0), [[1.0], [1.0, 2.0]])


def test_to_onnx_into_a_missing_directory_names_it(tmp_path):
    with pytest.raises(ConfigError) as info:
        to_onnx(_flow(), tmp_path / "missing" / "model.onnx")
    msg = str(info.value)
    assert f"directory {tmp_path / 'missing'} does not exist" in msg
    assert "ONNX lacks" not in msg and "export_form" not in msg
    with pytest.raises(ConfigError, match="is a directory"):
        to_onnx(_flow(), tmp_path)


def test_anomaly_arguments(work, monkeypatch):
    from exactflow.anomaly import Detector, score

    flow = _flow()
    with pytest.raises(DTypeError, match="quantile must be a number"):
        Detector(flow, quantile="0.9")
    with pytest.raises(ConfigError, match="batch_size must be a positive int"):
        score(flow, torch.zeros(3, 2), batch_size=0)
    with pytest.raises(ShapeError, match="ragged"):
        score(flow, [[0.0, 1.0], [2.0]])
    with pytest.raises(DTypeError, match="needs the Flow"):
        Detector.load(work / "run" / "model.safetensors", "run")  # type: ignore[arg-type]
    np.testing.assert_allclose(score(flow, [[0.0, 1.0]]), score(flow, torch.tensor([[0.0, 1.0]])))


# -- the validation layer itself ----------------------------------------------------------------
def test_validation_helpers():
    assert check_count(np.int64(3), "n") == 3 and check_count(torch.tensor(2), "n") == 2
    assert check_count(0, "n") == 0
    with pytest.raises(ConfigError, match="n must be a non-negative int, got -1"):
        check_count(-1, "n")
    with pytest.raises(ShapeError, match="n must be an int >= 2, got 1"):
        check_count(1, "n", minimum=2, error=ShapeError)
    for bad in (True, 1.0, "1", None, torch.tensor([1])):
        with pytest.raises(DTypeError):
            check_count(bad, "n")
    assert check_sample_shape(torch.tensor([2, 3])) == (2, 3)
    assert check_positive_finite(np.float32(0.5), "b") == 0.5
    for bad in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ConfigError):
            check_positive_finite(bad, "b")
    assert check_seed(MAX_SEED) == 2**63 - 1
    with pytest.raises(ConfigError):
        check_seed(2**63)
    assert as_tensor(np.zeros(2, np.float64)).dtype == torch.float64
    assert as_tensor([1, 2]).dtype == torch.get_default_dtype()
    assert (
        as_tensor(3.0).shape == ()
        and as_tensor([[1, 2]], dtype=torch.float64).dtype == torch.float64
    )
    t = torch.zeros(2, dtype=torch.int64)
    assert as_tensor(t) is t  # tensors pass through: the caller checks their dtype
    assert check_map_kwargs(AffineMap, {"log_scale_bound": 2.0}) == {"log_scale_bound": 2.0}
    with pytest.raises(DTypeError, match="dict"):
        check_map_kwargs(AffineMap, [("log_scale_bound", 2.0)])
