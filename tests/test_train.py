import itertools
import math
import os
import pickle
import warnings

import pytest
import torch

from exactflow import Flow
from exactflow.app.config import RunConfig
from exactflow.distributions import StandardNormal
from exactflow.errors import ConfigError, DataError
from exactflow.train import (
    EMA,
    NonFiniteTraining,
    TrainConfig,
    Trainer,
    load_checkpoint,
    mmd2_rbf,
    save_checkpoint,
    warmup_cosine,
)
from exactflow.transforms import Affine, Compose, LULinear, Planar
from helpers import interrupt_at


def gaussian_flow(shift=0.0, d=2) -> Flow:
    """A learnable full-covariance Gaussian: LU-linear then a learnable affine."""
    return Flow(
        Compose([LULinear(d), Affine(shift + torch.zeros(d), torch.ones(d), learnable=True)]),
        StandardNormal((d,)),
    )


def small_flow(d=2) -> Flow:
    torch.manual_seed(0)
    return Flow(Compose([Planar(d), LULinear(d), Planar(d)]), StandardNormal((d,)))


def params(flow) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in flow.state_dict().items()}


def cfg(**kw) -> TrainConfig:
    base = dict(steps=60, batch_size=32, lr=1e-2, warmup=5, eval_every=10, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def data(n=512, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g) @ torch.tensor([[2.0, 0.0], [1.0, 0.5]]) + 1.0


# -- small parts -------------------------------------------------------------------------------
def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, 100, 1.0, warmup=10, final_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    mid = warmup_cosine(55, 100, 1.0, warmup=10, final_ratio=0.0)
    assert mid == pytest.approx(0.5)


def test_ema_closed_form():
    p = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        p.weight.fill_(0.0)
    ema = EMA(p, decay=0.5)
    with torch.no_grad():
        p.weight.fill_(1.0)
    ema.update()  # d = min(0.5, 2/11) = 2/11
    assert ema.shadow["weight"].item() == pytest.approx(1 - 2 / 11)
    with ema.applied():
        assert p.weight.item() == pytest.approx(1 - 2 / 11)
    assert p.weight.item() == 1.0


def test_mmd_zero_for_same_distribution_and_positive_for_shift():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 2, generator=g), torch.randn(400, 2, generator=g)
    same = mmd2_rbf(x, y)
    shifted = mmd2_rbf(x, y + 1.5)
    assert abs(float(same)) < 0.02 and float(shifted) > 0.3
    a = x.clone().requires_grad_(True)
    mmd2_rbf(a, y + 1.0, bandwidths=[1.0]).backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_train_config_rejects_unknown_and_bad_values():
    with pytest.raises(ConfigError, match=r"unknown training option.*lr_max.*valid: steps"):
        TrainConfig.from_dict({"lr_max": 1.0})
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="batch_size must be int"):
        TrainConfig(batch_size=1.5)
    with pytest.raises(ConfigError, match=r"unknown configuration key.*trian"):
        RunConfig.from_dict({"trian": {}})


# -- training quality and determinism ----------------------------------------------------------
def test_fits_gaussian_to_closed_form_entropy():
    x = data(4000)
    cov = torch.tensor([[2.0, 0.0], [1.0, 0.5]])
    cov = cov @ cov.T
    # NLL of the true density is its entropy: 0.5 log det(2 pi e Sigma)
    entropy = 0.5 * float(torch.logdet(2 * math.pi * math.e * cov))
    flow = gaussian_flow()
    t = Trainer(
        flow, x[:3000], x[3000:3500], cfg(steps=200, batch_size=256, lr=5e-2, eval_every=50)
    )
    t.fit()
    nll, se = t.nll(x[3500:])
    assert abs(nll - entropy) < 3 * se + 0.03


def test_seeded_runs_are_identical():
    a, b = small_flow(), small_flow()
    Trainer(a, data(), data(128, 1), cfg(ema=0.9)).fit()
    Trainer(b, data(), data(128, 1), cfg(ema=0.9)).fit()
    for k, v in params(a).items():
        assert torch.equal(v, params(b)[k]), k


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    c = cfg(steps=60, checkpoint_every=20, ema=0.9, weight_decay=1e-3)
    ref = small_flow()
    Trainer(ref, data(), data(128, 1), c).fit()

    broken = small_flow()
    t = Trainer(broken, data(), data(128, 1), c, checkpoint=tmp_path / "ck.safetensors")
    interrupt_at(t, 47)  # after the step-40 checkpoint
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    _, meta = load_checkpoint(tmp_path / "ck.safetensors")
    assert meta["step"] == 40

    torch.manual_seed(123)  # a differently initialised model: everything must come from disk
    fresh = Flow(Compose([Planar(2), LULinear(2), Planar(2)]), StandardNormal((2,)))
    t2 = Trainer(fresh, data(), data(128, 1), c, checkpoint=tmp_path / "ck.safetensors")
    r = t2.fit(resume=True)
    assert r.steps == 60 and len(r.losses) == 60
    for k, v in params(ref).items():
        assert torch.equal(v, params(fresh)[k]), k


def test_best_weights_and_early_stopping():
    # train data at 0, validation at +10: training drags the shift away from the best value
    # it starts at
    train = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    val = train + 10.0
    flow = Flow(Affine(10.0 + torch.zeros(2), torch.ones(2), learnable=True), StandardNormal((2,)))
    snapshots = []
    t = Trainer(flow, train, val, cfg(steps=50, eval_every=1, patience=2, lr=0.5, warmup=0))
    real_validate = t._validate

    def spy():
        snapshots.append(params(flow))
        real_validate()

    t._validate = spy
    r = t.fit()
    # the initial model (validated at step 0) is the best: two worse validations stop the run
    assert r.stopped_early and r.best_step == 0 and r.steps == 2
    assert [v[0] for v in r.val_history] == [0, 1, 2]
    for k, v in snapshots[0].items():
        assert torch.equal(params(flow)[k], v)


# -- the non-finite guard ----------------------------------------------------------------------
def test_nan_batch_leaves_weights_unchanged_and_warns():
    flow = small_flow()
    t = Trainer(flow, data(), None, cfg(ema=0.9))
    t.train_step(data(32))  # an ordinary step builds optimiser state
    before = params(flow)
    opt_before = {k: v.clone() for k, v in t.optimizer.state_dict()["state"][0].items()}
    ema_before = {k: v.clone() for k, v in t.ema.shadow.items()}
    bad = data(32)
    bad[3, 1] = float("nan")
    flow.validate = False  # let the NaN reach the loss instead of the input check
    with pytest.warns(RuntimeWarning, match="loss is nan; update skipped"):
        loss = t.train_step(bad)
    assert math.isnan(loss) and t.skipped == 1
    for k, v in params(flow).items():
        assert torch.equal(v, before[k]), k
    for k, v in t.optimizer.state_dict()["state"][0].items():
        assert torch.equal(v, opt_before[k]), k
    for k, v in t.ema.shadow.items():
        assert torch.equal(v, ema_before[k]), k
    t.train_step(data(32))
    assert t.nonfinite_streak == 0


def test_nonfinite_gradient_is_skipped():
    flow = small_flow()
    t = Trainer(flow, data(), None, cfg())
    before = params(flow)
    first = next(flow.parameters())
    handle = first.register_hook(lambda g: g * float("inf"))
    with pytest.warns(RuntimeWarning, match="gradient norm is"):
        t.train_step(data(32))
    handle.remove()
    for k, v in params(flow).items():
        assert torch.equal(v, before[k]), k


def test_aborts_after_max_nonfinite_in_a_row():
    flow = small_flow()
    flow.validate = False
    bad = data()
    bad[:, 0] = float("nan")
    t = Trainer(flow, bad, None, cfg(max_nonfinite=3))
    before = params(flow)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(NonFiniteTraining, match="3 consecutive steps had a non-finite loss"):
            t.fit()
    assert t.step == 2 and t.skipped == 3
    for k, v in params(flow).items():
        assert torch.equal(v, before[k]), k


# -- checkpoints -------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_atomicity(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor(3.0)}
    save_checkpoint(path, tensors, {"step": 7, "x": [1.5, float("nan")]})
    got, meta = load_checkpoint(path)
    assert torch.equal(got["a"], tensors["a"]) and torch.equal(got["b"], tensors["b"])
    assert meta["step"] == 7 and math.isnan(meta["x"][1])
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp files left

    # a failure between writing and renaming leaves the previous checkpoint intact
    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"a": torch.zeros(1)}, {"step": 8})
    monkeypatch.undo()
    assert load_checkpoint(path)[1]["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


class _Payload:
    def __reduce__(self):
        return (open, (str(_Payload.marker), "w"))


def test_pickle_payload_is_refused(tmp_path):
    _Payload.marker = tmp_path / "pwned"
    evil = tmp_path / "checkpoint.safetensors"
    evil.write_bytes(pickle.dumps({"model": _Payload()}))
    with pytest.raises(DataError, match="refused and never executed"):
        load_checkpoint(evil)
    torch.save({"model": _Payload()}, tmp_path / "torch.safetensors")
    with pytest.raises(DataError, match="not an exactflow checkpoint"):
        load_checkpoint(tmp_path / "torch.safetensors")
    assert not _Payload.marker.exists()


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"a": torch.randn(100)}, {"step": 1})
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError):
        load_checkpoint(path)
    with pytest.raises(DataError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_resume_refuses_checkpoint_of_another_model(tmp_path):
    t = Trainer(small_flow(), data(), None, cfg(steps=5), checkpoint=tmp_path / "c.safetensors")
    t.fit()
    other = Trainer(
        gaussian_flow(), data(), None, cfg(steps=5), checkpoint=tmp_path / "c.safetensors"
    )
    with pytest.raises(ConfigError, match="does not match this model"):
        other.fit(resume=True)


def test_mmd_penalty_trains():
    flow = small_flow()
    t = Trainer(flow, data(), None, cfg(steps=20, mmd_weight=1.0, mmd_samples=64))
    r = t.fit()
    assert r.skipped == 0 and all(math.isfinite(v) for v in r.losses)


_WRITER = """
import sys, torch
from pathlib import Path
from exactflow.train.checkpoint import save_checkpoint
path = Path(sys.argv[1])
i = 0
while True:
    # 4 MB per write so that kills often land mid-write
    save_checkpoint(path, {"w": torch.full((1_000_000,), float(i))}, {"i": i})
    i += 1
    if i == 3:
        (path.parent / "ready").write_text("")
"""


def test_sigkill_during_checkpoint_writes_never_leaves_a_torn_file(tmp_path):
    import subprocess
    import sys
    import time

    path = tmp_path / "c.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=env)
    deadline = time.time() + 120
    while not (tmp_path / "ready").exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05 + 0.1 * torch.rand(()).item())
    proc.kill()
    proc.wait()
    tensors, meta = load_checkpoint(path)  # always a complete checkpoint
    assert meta["i"] >= 2
    assert torch.equal(tensors["w"], torch.full((1_000_000,), float(meta["i"])))


def test_rnode_penalty_enters_the_training_loss():
    """A CNF's RNODE terms are added to the maximum-likelihood loss by the engine."""
    import exactflow.continuous.regularization as reg
    from exactflow.models import FFJORD
    from exactflow.train import Trainer

    torch.manual_seed(0)
    x = torch.randn(64, 2)
    plain = FFJORD(2, hidden=(8,), solver="rk4", steps=4, trace="exact", adjoint=False)
    weighted = FFJORD(
        2,
        hidden=(8,),
        solver="rk4",
        steps=4,
        trace="exact",
        adjoint=False,
        regularization={"kinetic": 10.0},
    )
    weighted.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for p in plain.parameters():  # move away from f = 0, where the kinetic energy vanishes
            p.add_(0.3 * torch.randn_like(p))
    weighted.load_state_dict(plain.state_dict())
    nll = float(Trainer(plain, x)._loss(x).detach())
    trainer = Trainer(weighted, x)
    total = float(trainer._loss(x).detach())
    penalty = float(reg.regularization_loss(weighted).detach())
    assert penalty > 0.0
    assert abs(total - (nll + penalty)) < 1e-4 * max(1.0, abs(total))
