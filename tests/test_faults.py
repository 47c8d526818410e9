"""Fault injection: kill -9 during checkpoint writes, a full disk, a read-only output
directory, non-finite gradients mid-training, and crafted pickle payloads.

Related tests elsewhere (not repeated here): tests/test_train.py (a failing ``os.replace``
keeps the old checkpoint; one SIGKILL of a checkpoint writer; a NaN batch or gradient leaves
weights, optimiser and EMA untouched; abort after ``max_nonfinite`` skips in a row; resume
after an interrupt is bit-identical; a pickled checkpoint is refused) and tests/test_cli.py
(SIGKILL of ``exactflow train`` then ``--resume`` is bit-identical; ENOSPC on the CLI gives exit
code 2 and one line).
"""

from __future__ import annotations

import errno
import math
import multiprocessing
import os
import pickle
import random
import re
import signal
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import exactflow.train.checkpoint as ckpt
from exactflow import Flow
from exactflow.app.run import load_run
from exactflow.cli import main
from exactflow.data.files import read_table
from exactflow.distributions import StandardNormal
from exactflow.errors import ExactflowError
from exactflow.train import TrainConfig, Trainer, load_checkpoint
from exactflow.transforms import Compose, LULinear, Planar


def _flow(seed: int = 0) -> Flow:
    torch.manual_seed(seed)
    return Flow(Compose([Planar(2), LULinear(2), Planar(2)]), StandardNormal((2,)))


def _data(n: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g) @ torch.tensor([[2.0, 0.0], [1.0, 0.5]]) + 1.0


def _config(**kw) -> TrainConfig:
    base = dict(
        steps=60, batch_size=32, lr=1e-2, warmup=5, eval_every=10, checkpoint_every=20, ema=0.9
    )
    base.update(kw, progress=False)
    return TrainConfig(**base)


def _weights(flow: Flow) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in flow.state_dict().items()}


# -- kill -9 during checkpoint writes ----------------------------------------------------------
def _write_forever(path: Path) -> None:
    """Checkpoint writer, run in a forked child until it is killed."""
    try:
        i = load_checkpoint(path)[1]["i"] + 1  # continue after the last complete checkpoint
    except ExactflowError:
        i = 0
    start = i
    while True:
        # 8 MB per checkpoint, so that most kills land in the middle of a write
        ckpt.save_checkpoint(path, {"w": torch.full((2_000_000,), float(i))}, {"i": i})
        if i == start + 2:
            # renamed into place: the parent polls for the name and must never read it empty
            (path.parent / "ready.part").write_text(str(i))
            os.replace(path.parent / "ready.part", path.parent / "ready")
        i += 1


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs fork (POSIX)"
)
def test_repeated_sigkill_while_writing_always_leaves_the_last_complete_checkpoint(tmp_path):
    """A writer killed at random moments, five times over, and restarted from what is on
    disk: every kill leaves a complete checkpoint, never an older one than was last finished,
    and the restarted writer continues from it. (Forked writers: no interpreter start-up.)"""
    path = tmp_path / "c.safetensors"
    rng = random.Random(12)
    fork = multiprocessing.get_context("fork")
    last = -1
    for _ in range(5):
        (tmp_path / "ready").unlink(missing_ok=True)
        proc = fork.Process(target=_write_forever, args=(path,), daemon=True)
        proc.start()
        deadline = time.time() + 60
        while not (tmp_path / "ready").exists() and time.time() < deadline:
            assert proc.is_alive(), "the writer died on its own"
            time.sleep(0.002)
        finished = int((tmp_path / "ready").read_text())
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        tensors, meta = load_checkpoint(path)  # raises on a torn or half-written file
        assert meta["i"] >= finished > last  # nothing that had finished is lost
        assert torch.equal(tensors["w"], torch.full((2_000_000,), float(meta["i"])))
        last = meta["i"]
    # a kill mid-write strands a temporary file; it is never mistaken for the checkpoint
    names = {p.name for p in tmp_path.iterdir()} - {"ready", "ready.part"}
    assert path.name in names
    assert all(n.startswith(".c.safetensors.") and n.endswith(".tmp") for n in names - {path.name})


# -- full disk and read-only directory during training -----------------------------------------
class _HalfWrite:
    """A file whose ``write`` stores half of the bytes, then fails as a full disk does."""

    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def _inject(monkeypatch, fault: str, after: int) -> None:
    """Let ``after`` checkpoint writes succeed, then fail every write with ``fault``."""
    calls = [0]
    real_fdopen, real_mkstemp = os.fdopen, ckpt.tempfile.mkstemp

    def fdopen(fd, *args, **kwargs):
        fh = real_fdopen(fd, *args, **kwargs)
        calls[0] += 1
        return _HalfWrite(fh) if calls[0] > after else fh

    def mkstemp(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))
        return real_mkstemp(*args, **kwargs)

    if fault == "full-disk":
        monkeypatch.setattr(ckpt.os, "fdopen", fdopen)
    else:
        monkeypatch.setattr(ckpt.tempfile, "mkstemp", mkstemp)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    flow = _flow()
    Trainer(flow, _data(), _data(64, 1), _config()).fit()
    return _weights(flow)


@pytest.mark.parametrize("fault", ["full-disk", "read-only"])
def test_write_failure_keeps_last_checkpoint_and_resume_loses_only_later_steps(
    tmp_path, monkeypatch, fault, reference
):
    path = tmp_path / "run.safetensors"
    t = Trainer(_flow(), _data(), _data(64, 1), _config(), checkpoint=path)
    _inject(monkeypatch, fault, after=1)  # the step-20 checkpoint is written, step 40 fails
    with pytest.raises(OSError) as info:
        t.fit()
    assert info.value.errno == (errno.ENOSPC if fault == "full-disk" else errno.EROFS)
    assert info.value.filename == str(path)  # the error names the checkpoint, not a temp file
    assert t.step == 40
    monkeypatch.undo()  # space freed / directory writable again
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no half-written temp file
    assert load_checkpoint(path)[1]["step"] == 20

    # resuming loses steps 21-40 only: redone, it ends where an uninterrupted run ends
    fresh = Trainer(_flow(seed=5), _data(), _data(64, 1), _config(), checkpoint=path)
    assert fresh.fit(resume=True).steps == 60
    for k, v in reference.items():
        assert torch.equal(v, fresh.flow.state_dict()[k]), k


TINY = """
model = "realnvp"
[model_args]
transforms = 1
hidden = [8]
[data_args]
n_train = 256
n_val = 64
n_test = 64
[train]
steps = 5
batch_size = 32
eval_every = 5
progress = false
"""


def test_cli_read_only_output_directory_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    _inject(monkeypatch, "read-only", after=0)
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err == f"exactflow train: error: {out / 'config.toml'}: Read-only file system"
    assert not any(out.glob("*"))


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory nobody may create files in: mode 0o555, or for root (who ignores modes)
    the immutable attribute where ``chattr`` works."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    try:
        made = subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
    except OSError:
        made = False
    if not made:
        pytest.skip("running as root without chattr: no directory is read-only for root")
    try:
        yield d
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_cli_real_read_only_directory(tmp_path, unwritable_dir, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = unwritable_dir / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"exactflow train: error: {out}: ")
    assert "Permission denied" in err or "Operation not permitted" in err
    assert not out.exists()


# -- non-finite gradients mid-training ---------------------------------------------------------
def test_nan_gradients_mid_training_are_contained_and_survive_resume(tmp_path):
    path = tmp_path / "run.safetensors"
    t = Trainer(_flow(), _data(), _data(64, 1), _config(steps=40), checkpoint=path)
    first = next(t.flow.parameters())
    # steps 25 and 26 get a NaN gradient: a bad batch, an overflow in a layer
    first.register_hook(lambda g: g * math.nan if t.step in (25, 26) else g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = t.fit()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2 and all("gradient norm is nan; update skipped" in m for m in messages)
    assert r.steps == 40 and r.skipped == 2
    bad = [i for i, v in enumerate(r.losses) if not math.isfinite(v)]
    assert bad == [25, 26]
    assert all(bool(torch.isfinite(p).all()) for p in t.flow.parameters())
    assert all(math.isfinite(v[1]) for v in r.val_history)
    assert r.best_val < r.val_history[0][1]  # training went on improving after the NaNs
    meta = load_checkpoint(path)[1]
    assert meta["step"] == 40 and meta["skipped"] == 2  # the count survives a resume


# -- safe loading ------------------------------------------------------------------------------
class _Payload:
    """Unpickling this writes a marker file: proof that code from the file ran."""

    marker: Path

    def __reduce__(self):
        return (Path.write_text, (_Payload.marker, "pwned"))


def test_crafted_pickle_payload_runs_through_no_loader(tmp_path, monkeypatch, capsys):
    _Payload.marker = tmp_path / "pwned"
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": _Payload()}, run / "model.safetensors")
    (run / "checkpoint.safetensors").write_bytes(pickle.dumps({"model": _Payload()}))
    np.save(tmp_path / "data.npy", np.array([_Payload(), None], dtype=object), allow_pickle=True)

    loaders = [
        lambda: load_checkpoint(run / "model.safetensors"),
        lambda: load_checkpoint(run / "checkpoint.safetensors"),
        lambda: load_run(run),
        lambda: Trainer(_flow(), _data(), checkpoint=run / "checkpoint.safetensors").load(),
        lambda: read_table(tmp_path / "data.npy"),
    ]
    for load in loaders:
        with pytest.raises(ExactflowError) as info:
            load()
        assert isinstance(info.value, ValueError)
        assert "refused" in str(info.value) or "pickled" in str(info.value)
    for argv in (
        ["eval", "run"],
        ["train", "--out", "run", "--resume"],
        ["train", "--data", "data.npy"],
    ):
        assert main([*argv, "--quiet"] if argv[0] == "train" else argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not _Payload.marker.exists()


def test_no_library_code_can_unpickle():
    """The loaders above are the only ones: nothing in the package calls an unpickler."""
    src = Path(__file__).resolve().parents[1] / "src" / "exactflow"
    calls = re.compile(r"\b(torch\.load|pickle\.loads?|Unpickler|dill\.|joblib\.load)\b")
    npload = re.compile(r"\bnp\.load\(([^)]*)\)")
    found = []
    for py in sorted(src.rglob("*.py")):
        text = py.read_text(encoding="utf-8")
        found += [f"{py.name}: {m.group(0)}" for m in calls.finditer(text)]
        found += [
            f"{py.name}: {m.group(0)}"
            for m in npload.finditer(text)
            if "allow_pickle=False" not in m.group(1)
        ]
    assert not found, found
