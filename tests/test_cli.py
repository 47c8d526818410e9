import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from exactflow.cli import main
from exactflow.train import load_checkpoint

TINY = """
model = "realnvp"
[model_args]
transforms = 2
hidden = [16]
[data_args]
n_train = 512
n_val = 128
n_test = 512
[train]
steps = 40
batch_size = 64
eval_every = 10
checkpoint_every = 10
progress = false
"""


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


def run(*args) -> int:
    return main([str(a) for a in args])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_train_eval_sample_end_to_end(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    assert run("train", "--config", tiny, "--out", out, "--quiet") == 0
    printed = capsys.readouterr().out
    assert "test NLL" in printed
    for f in ("config.toml", "checkpoint.safetensors", "model.safetensors", "metrics.json"):
        assert (out / f).is_file(), f
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "density.png").stat().st_size > 1000
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 40 and m["n_test"] == 512 and "bits_per_dim" not in m
    assert np.isfinite(m["test_nll"]) and 0 < m["test_nll_se"] < 0.2
    assert m["test_nll"] < 4.0  # better than the untrained N(0, I) on moons (~4.8 nats)

    # eval reproduces the recorded test NLL exactly (same split, same weights)
    assert run("eval", out) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["nll"] == pytest.approx(m["test_nll"], rel=1e-6)

    assert run("sample", out, "-n", 50, "--out", tmp_path / "s.npy") == 0
    s = np.load(tmp_path / "s.npy")
    assert s.shape == (50, 2) and np.isfinite(s).all()
    assert run("sample", out, "-n", 200, "--out", tmp_path / "s.png") == 0
    assert (tmp_path / "s.png").stat().st_size > 1000
    # an existing output file is not overwritten without --force
    assert run("sample", out, "-n", 5, "--out", tmp_path / "s.npy") == 2
    assert "exists" in one_line_error(capsys)
    assert np.load(tmp_path / "s.npy").shape == (50, 2)


def test_images_report_bits_per_dim_and_sample_grid(tmp_path, capsys):
    cfg = tmp_path / "img.toml"
    cfg.write_text(
        'data = "digits_image"\nmodel = "realnvp"\n[model_args]\ntransforms = 2\n'
        "hidden = [32]\n[train]\nsteps = 20\nbatch_size = 64\nprogress = false\n"
    )
    out = tmp_path / "img"
    assert run("train", "--config", cfg, "--out", out, "--quiet") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["bits_per_dim"] == pytest.approx(m["test_nll"] / (64 * np.log(2)))
    assert 0 < m["bits_per_dim"] < 8.0  # 20 steps: finite and sane, not yet good
    assert (out / "samples.png").stat().st_size > 500
    assert run("sample", out, "-n", 10, "--out", tmp_path / "x.npy") == 0
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (10, 1, 8, 8) and (x == np.round(x)).all() and x.min() >= 0 and x.max() <= 16


def test_existing_run_is_not_overwritten_without_force(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("precious")
    assert run("train", "--config", tiny, "--out", out, "--quiet", "--no-plots") == 2
    msg = one_line_error(capsys)
    assert "holds metrics.json" in msg and "--force" in msg
    assert (out / "metrics.json").read_text() == "precious"
    assert run("train", "--config", tiny, "--out", out, "--quiet", "--no-plots", "--force") == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 40


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "moon"], "unknown dataset 'moon'; valid names: moons"),
        (["train", "--model", "glowww"], "unknown model 'glowww'; valid: nice, realnvp"),
        (["train", "--data", "{tmp}/missing.csv"], "missing.csv: no such file"),
        (["train", "--data", "{tmp}/nan.csv"], "non-finite value(s) (NaN or inf)"),
        (["train", "--data", "{tmp}/ragged.csv"], "ragged rows"),
        (["train", "--config", "{tmp}/bad.toml"], "unknown training option(s) stepz"),
        (["train", "--config", "{tmp}/missing.toml"], "no such configuration file"),
        (["train", "--steps", "0"], "steps must be >= 1"),
        (["train", "--out", "{tmp}/x", "--resume"], "nothing to resume"),
        (["eval", "{tmp}"], "no model.safetensors"),
        (["eval", "{tmp}/pickled"], "refused and never executed"),
        (["check", "nope"], "unknown model 'nope'"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "nan.csv").write_text("x,y\n1,2\n3,nan\n4,5\n")
    (tmp_path / "ragged.csv").write_text("1,2\n3,4,5\n")
    (tmp_path / "bad.toml").write_text("[train]\nstepz = 3\n")
    (tmp_path / "pickled").mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "pickled" / "model.safetensors")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main([*argv, "--quiet"] if argv[0] == "train" else argv) == 2
    assert message in one_line_error(capsys)


def test_train_failing_on_its_input_leaves_no_directory(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert run("train", "--data", tmp_path / "missing.csv", "--out", out, "--quiet") == 2
    assert "missing.csv: no such file" in one_line_error(capsys)
    assert not (tmp_path / "new").exists()


def test_eval_on_file_checks_columns(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    assert run("train", "--config", tiny, "--out", out, "--quiet", "--no-plots") == 0
    capsys.readouterr()
    good, bad = tmp_path / "good.npy", tmp_path / "bad.csv"
    np.save(good, np.random.default_rng(0).normal(size=(20, 2)))
    bad.write_text("1,2,3\n4,5,6\n")
    assert run("eval", out, "--data", good) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 20
    assert run("eval", out, "--data", bad) == 2
    assert "has 3 columns but the model expects 2" in one_line_error(capsys)


def test_check_command(capsys):
    assert run("check", "realnvp", "--features", 3) == 0
    assert "PASSED" in capsys.readouterr().out


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, capsys):
    """A run killed with SIGKILL mid-way and resumed ends bit-identical to an uninterrupted
    run: weights, Adam moments, EMA and test NLL (CPU, same seed)."""
    cfg = tmp_path / "long.toml"
    cfg.write_text(
        TINY.replace("steps = 40", "steps = 300").replace(
            "checkpoint_every = 10", "checkpoint_every = 20"
        )
    )
    opts = ["--config", str(cfg), "--quiet", "--no-plots"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert run("train", *opts, "--out", ref) == 0

    cmd = [sys.executable, "-m", "exactflow", "train", *opts, "--out", str(killed)]
    proc = subprocess.Popen(cmd, env=_env())
    ckpt = killed / "checkpoint.safetensors"
    deadline = time.time() + 200
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            step = load_checkpoint(ckpt)[1]["step"]
            if step >= 60:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 60 <= step < 300
    assert not (killed / "metrics.json").exists()
    # what a kill during the checkpoint's write leaves (tests/test_faults.py): resume clears it
    (killed / ".checkpoint.safetensors.abc123.tmp").write_bytes(b"half a checkpoint")

    assert run("train", "--out", killed, "--resume", "--quiet", "--no-plots") == 0
    assert not list(killed.glob(".*.tmp"))
    a, meta_a = load_checkpoint(ref / "checkpoint.safetensors")
    b, meta_b = load_checkpoint(killed / "checkpoint.safetensors")
    assert meta_a["step"] == meta_b["step"] == 300
    keys = [k for k in a if k.startswith(("model.", "optim.", "ema.", "best."))]
    assert len(keys) > 10
    for k in keys:
        assert torch.equal(a[k], b[k]), k
    ma = json.loads((ref / "metrics.json").read_text())
    mb = json.loads((killed / "metrics.json").read_text())
    assert ma["test_nll"] == mb["test_nll"]


def test_model_file_of_another_model_is_refused(tmp_path, tiny, capsys):
    from exactflow.train import save_checkpoint

    out = tmp_path / "run"
    assert run("train", "--config", tiny, "--out", out, "--quiet", "--no-plots") == 0
    tensors, meta = load_checkpoint(out / "model.safetensors")
    meta["run"]["model_args"]["transforms"] = 3  # the weights are those of 2 transforms
    save_checkpoint(out / "model.safetensors", tensors, meta)
    capsys.readouterr()
    assert run("eval", out) == 2
    assert "weights do not match model 'realnvp'" in one_line_error(capsys)


def test_full_disk_fails_cleanly(tmp_path, tiny, capsys, monkeypatch):
    import exactflow.train.checkpoint as ck

    def no_space(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(ck, "atomic_write_bytes", no_space)
    out = tmp_path / "run"
    assert run("train", "--config", tiny, "--out", out, "--quiet", "--no-plots") == 2
    assert "No space left on device" in one_line_error(capsys)
    assert not (out / "checkpoint.safetensors").exists()


def test_threads_option_is_validated(tmp_path, capsys):
    from exactflow.cli import main

    assert main(["train", "--threads", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_os_error_without_a_file_name_is_one_clean_line(monkeypatch, capsys, tmp_path):
    """An OSError that names no file (e.g. ENOSPC from a library) reads
    'error: No space left on device', exit code 2, no traceback."""
    import errno

    import exactflow.cli as cli

    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "_cmd_eval", full_disk)
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "exactflow eval: error: No space left on device"
