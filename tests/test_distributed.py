"""Data-parallel training: 2 CPU processes with gloo against one process.

The multi-process tests launch real processes (torch.multiprocessing spawn, or torchrun on the
CLI); the machine is shared and loaded, so their timeouts are generous and the models tiny.
Running this file as a script (under torchrun) is the CLI worker of the file-writing test.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from exactflow import Flow
from exactflow.app.config import RunConfig
from exactflow.app.run import train_run
from exactflow.errors import ConfigError, DataError
from exactflow.models import RealNVP
from exactflow.train import TrainConfig, Trainer, load_checkpoint
from exactflow.train.distributed import (
    DistributedError,
    DistributedTrainer,
    _decode_error,
    _encode_error,
    session,
    shard_bounds,
)
from exactflow.transforms import ActNorm, Compose

WORLD = 2
LAUNCH_TIMEOUT = 600  # seconds; process start-up alone can take tens of seconds under load

CLI_RUN = """
model = "realnvp"
[model_args]
transforms = 2
hidden = [16]
[data_args]
n_train = 512
n_val = 128
n_test = 256
[train]
steps = 80
batch_size = 64
eval_every = 20
checkpoint_every = 10
ema = 0.9
progress = false
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


# -- the model and run of the equivalence test ------------------------------------------------
def actnorm_realnvp() -> Flow:
    """ActNorm -> RealNVP couplings -> ActNorm on 3 features, seeded, in float64.

    float64 because the first-step gradients of a freshly initialised ActNorm are exactly zero
    (its init batch is standardised), and Adam, dividing by sqrt(v) + 1e-8, turns float32
    rounding noise in a zero gradient into an update of about lr: two one-process runs that
    merely sum in another order differ by ~1e-3 then. In float64 the noise stays ~1e-9.
    """
    torch.manual_seed(0)
    inner = RealNVP(3, transforms=2, hidden=[8])
    return Flow(Compose([ActNorm(3), inner.transform, ActNorm(3)]), inner.base).double()


def rows(n: int, seed: int) -> torch.Tensor:
    # far from standardised, so the ActNorm initialisation matters
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.4, 0.0], [-1.0, 0.3, 3.0]])
    x = torch.randn(n, 3, generator=g) @ a + torch.tensor([4.0, -2.0, 1.0])
    return x.double()


def equivalence_config() -> TrainConfig:
    # B = 33 splits 16/17 over two ranks; 200 rows make epochs roll over within 15 steps
    return TrainConfig(
        steps=15,
        batch_size=33,
        lr=1e-2,
        warmup=3,
        clip_norm=1.0,
        weight_decay=1e-3,
        ema=0.9,
        eval_every=5,
        eval_batch_size=50,
        checkpoint_every=0,
        progress=False,
    )


def _state(flow: Flow) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in flow.state_dict().items()}


# -- process harness --------------------------------------------------------------------------
def _worker(rank: int, store: str, out: str, task) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=LAUNCH_TIMEOUT),
    )
    try:
        (TASKS[task] if isinstance(task, str) else task)(rank, Path(out))
        # as in exactflow's own session(): a rank that tears its group down while the other
        # is still finishing (rank 0 writes metrics) can make that rank abort (SIGABRT in CI)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(task, out: Path) -> None:
    """Run ``task`` on WORLD gloo ranks: a name in TASKS, or a module-level function
    ``(rank, out_dir) -> None`` of another test file (pickled by reference)."""
    name = task if isinstance(task, str) else task.__name__
    procs = mp.start_processes(
        _worker,
        args=(str(out / f"store-{name}"), str(out), task),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"distributed task {name!r} did not finish in {LAUNCH_TIMEOUT} s")


def _task_equivalence(rank: int, out: Path) -> None:
    flow = actnorm_realnvp()
    trainer = DistributedTrainer(flow, rows(200, 0), rows(64, 1), equivalence_config())
    result = trainer.fit()
    torch.save(
        {"state": _state(flow), "losses": result.losses, "val": result.val_history},
        out / f"rank{rank}.pt",
    )

    # NaN guard: a non-finite row on rank 1 only must make *both* ranks skip the update
    flow.train()
    flow.validate = False  # let the NaN reach the loss instead of the input check
    before = _state(flow)
    x = rows(16, 2 + rank)
    if rank == 1:
        x[3, 0] = math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipped = trainer.train_step(x)
    after = _state(flow)
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    nxt = trainer.train_step(rows(16, 4 + rank))  # the next step runs (no rank left waiting)
    report = {
        "skipped": skipped,
        "unchanged": unchanged,
        "next": nxt,
        "warnings": sum("update skipped" in str(w.message) for w in caught),
        "streak": trainer.nonfinite_streak,
    }
    (out / f"nan{rank}.json").write_text(json.dumps(report))


def _task_resume(rank: int, out: Path) -> None:
    train_run(RunConfig(), out / "killed", resume=True, plots=False, quiet=True)


TASKS = {"equivalence": _task_equivalence, "resume": _task_resume}


# -- small parts ------------------------------------------------------------------------------
def test_shard_bounds_partition_every_batch():
    for n in range(0, 40):
        for world in (1, 2, 3, 8):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[i][1] == bounds[i + 1][0] for i in range(world - 1))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ConfigError, match="rank"):
        shard_bounds(10, 2, 2)
    with pytest.raises(TypeError, match="world_size"):
        shard_bounds(10, 0, 2.0)


def test_errors_cross_ranks_with_their_class():
    err = _decode_error(_encode_error(DataError("bad.csv: ragged rows")))
    assert type(err) is DataError and str(err) == "bad.csv: ragged rows"
    err = _decode_error(_encode_error(FileNotFoundError(2, "No such file", "/x/y")))
    assert isinstance(err, OSError) and err.errno == 2 and err.filename == "/x/y"
    err = _decode_error(_encode_error(KeyError("k")))
    assert isinstance(err, DistributedError) and "KeyError" in str(err)


def test_single_process_needs_no_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    with session() as ctx:
        assert ctx is None
    with pytest.raises(ConfigError, match="process group"):
        DistributedTrainer(actnorm_realnvp(), rows(40, 0), config=equivalence_config())


# -- two processes ----------------------------------------------------------------------------
def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path):
    """RealNVP with ActNorm, B = 33 over 2 ranks (16 + 17 rows), EMA, clipping, weight decay,
    validation: weights after 15 steps equal the one-process run to 1e-5, ranks agree
    exactly, and a NaN on one rank makes both skip."""
    _spawn("equivalence", tmp_path)
    ref_flow = actnorm_realnvp()
    ref = Trainer(ref_flow, rows(200, 0), rows(64, 1), equivalence_config()).fit()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    want = _state(ref_flow)
    assert bool(want["transform.transforms.0.initialized"])
    for key, value in want.items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        torch.testing.assert_close(ranks[0]["state"][key], value, atol=1e-5, rtol=0), key
    # the training moved the weights well beyond the tolerance
    init = _state(actnorm_realnvp())
    moved = max((want[k].double() - init[k].double()).abs().max() for k in init)
    assert moved > 1e-2
    torch.testing.assert_close(ranks[0]["losses"], ref.losses, atol=1e-5, rtol=1e-6)
    assert [s for s, _ in ranks[0]["val"]] == [s for s, _ in ref.val_history]
    assert {5, 10, 15} <= {s for s, _ in ref.val_history}
    torch.testing.assert_close(ranks[0]["val"], ref.val_history, atol=1e-5, rtol=0)

    for r in range(WORLD):
        nan = json.loads((tmp_path / f"nan{r}.json").read_text())
        assert math.isnan(nan["skipped"]) and nan["unchanged"], nan
        assert math.isfinite(nan["next"]) and nan["streak"] == 0, nan
        assert nan["warnings"] == (1 if r == 0 else 0), nan  # one warning, from rank 0


def _torchrun(*args: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={WORLD}", *args]
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, env=_env(), stdout=fh, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, log: Path) -> None:
    try:
        proc.wait(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT} s:\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """``torchrun --nproc-per-node=2 <this file> EVENTS train ...``: the CLI on 2 ranks,
    each recording the file-system writes it makes under the run directory."""
    root = tmp_path_factory.mktemp("cli")
    (root / "run.toml").write_text(CLI_RUN)
    out, events = root / "ref", root / "events"
    events.mkdir()
    log = root / "torchrun.log"
    args = ["train", "--config", str(root / "run.toml"), "--out", str(out), "--quiet"]
    proc = _torchrun(__file__, str(events), *args, log=log)
    _wait(proc, log)
    return root, out, events, log


def test_torchrun_cli_only_rank0_writes_files(cli_run):
    _, out, events, log = cli_run
    written = {r: json.loads((events / f"rank{r}.json").read_text()) for r in range(WORLD)}
    assert written[1] == []  # rank 1 never opened a file for writing, renamed or removed one
    assert {Path(p).name for _, p in written[0]} >= {"metrics.json", "loss.png", "density.png"}
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        [
            "checkpoint.safetensors",
            "config.toml",
            "density.png",
            "loss.png",
            "metrics.json",
            "model.safetensors",
        ]
    )
    _, meta = load_checkpoint(out / "checkpoint.safetensors")
    assert meta["step"] == 80 and meta["world_size"] == WORLD
    assert log.read_text().count("test NLL") == 1  # printed by rank 0 only
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 80 and math.isfinite(metrics["test_nll"])


def test_killed_torchrun_run_resumes_to_the_same_result(cli_run, tmp_path):
    """SIGKILL both ranks of `torchrun -m exactflow train` mid-way; resuming on 2 ranks ends
    bit-identical to the uninterrupted run (weights, Adam moments, EMA, best weights, test
    NLL); resuming a copy on 1 process (rank count changed) matches to 1e-5."""
    root, ref, _, _ = cli_run
    shutil.copy(root / "run.toml", tmp_path / "run.toml")
    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    proc = _torchrun(
        "-m",
        "exactflow",
        "train",
        "--config",
        str(tmp_path / "run.toml"),
        "--out",
        str(killed),
        "--quiet",
        "--no-plots",
        log=log,
    )
    ckpt, step = killed / "checkpoint.safetensors", 0
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists():
            step = load_checkpoint(ckpt)[1]["step"]
            if step >= 10:
                break
        time.sleep(0.01)
    workers = _children(proc.pid) if proc.poll() is None else []
    for pid in workers:  # our own torchrun's workers, by pid
        os.kill(pid, signal.SIGKILL)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert len(workers) == WORLD, f"the run finished before it could be killed:\n{log.read_text()}"
    assert 10 <= step < 80
    assert not (killed / "metrics.json").exists()
    single = tmp_path / "single"
    shutil.copytree(killed, single)

    _spawn("resume", tmp_path)
    a, meta_a = load_checkpoint(ref / "checkpoint.safetensors")
    b, meta_b = load_checkpoint(killed / "checkpoint.safetensors")
    assert meta_a["step"] == meta_b["step"] == 80
    keys = [k for k in a if k.startswith(("model.", "optim.", "ema.", "best."))]
    assert len(keys) > 10
    for k in keys:
        assert torch.equal(a[k], b[k]), k
    assert meta_a["losses"] == meta_b["losses"]
    ma = json.loads((ref / "metrics.json").read_text())
    mb = json.loads((killed / "metrics.json").read_text())
    assert ma["test_nll"] == mb["test_nll"]

    # rank count 2 -> 1: the same global batches, equal up to float rounding
    m1 = train_run(RunConfig(), single, resume=True, plots=False, quiet=True)
    s, _ = load_checkpoint(single / "checkpoint.safetensors")
    for k in (k for k in keys if k.startswith("model.")):
        torch.testing.assert_close(s[k], a[k], atol=1e-5, rtol=0), k
    assert abs(m1["test_nll"] - ma["test_nll"]) < 1e-5


def _record_writes(root: Path, log: list) -> None:
    """Audit hook: every open-for-writing, rename, removal or mkdir under ``root``."""
    root_s = str(root.resolve())
    flags_w = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    moves = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "shutil.rmtree"}

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in str(mode or "") for c in "wax+") or bool((flags or 0) & flags_w)
        elif event in moves or event == "tempfile.mkstemp":
            path, writing = args[1] if event == "os.rename" else args[0], True
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            full = os.path.abspath(os.fsdecode(path))
            if full.startswith(root_s):
                log.append([event, full])

    sys.addaudithook(hook)


if __name__ == "__main__":  # CLI worker of test_torchrun_cli_only_rank0_writes_files
    from exactflow.cli import main

    events_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    out_dir = Path(argv[argv.index("--out") + 1])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    seen: list = []
    _record_writes(out_dir.parent / out_dir.name, seen)
    code = main(argv)
    rank = os.environ["RANK"]
    (events_dir / f"rank{rank}.json").write_text(json.dumps(seen))
    sys.exit(code)
