"""``Trainer(compile=True)`` for real: the compiled step (compiled forward and backward, fused
Adam) trains to the eager step's test NLL, keeps the guard, and compiles once per run."""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from exactflow.data import toy_splits
from exactflow.models import RealNVP
from exactflow.train import TrainConfig, Trainer
from helpers import interrupt_at


def _config(**kw) -> TrainConfig:
    base = dict(
        steps=150,
        batch_size=128,
        lr=3e-3,
        warmup=10,
        eval_every=50,
        checkpoint_every=0,
        progress=False,
        ema=0.9,
    )
    base.update(kw)
    return TrainConfig(**base)


def _flow() -> torch.nn.Module:
    torch.manual_seed(0)
    return RealNVP(2, transforms=3, hidden=(32, 32))


@pytest.fixture(scope="module")
def moons():
    return toy_splits("moons", n_train=2000, n_val=500, n_test=2000, seed=3)


@pytest.fixture(scope="module")
def runs(moons):
    """The same run (init, batches, schedule, EMA) eagerly and compiled."""
    out = {}
    for compiled in (False, True):
        flow = _flow()
        t = Trainer(flow, moons.train, moons.val, _config(), compile=compiled)
        first, _ = t.nll(moons.test)
        result = t.fit()
        out[compiled] = (t, first, result, t.nll(moons.test))
    return out


def test_compiled_trainer_reaches_the_eager_test_nll(runs):
    (_, first, eager, (eager_nll, eager_se)), (t, _, comp, (comp_nll, _)) = runs[False], runs[True]
    assert t.compiled and t.optimizer.defaults["fused"]
    # both learned (the identity-initialised flow starts far above)
    assert eager_nll < first - 0.5 and comp_nll < first - 0.5
    # same init, batches and schedule: the compiled run follows the eager one up to float
    # rounding of fused kernels, far inside the seed-to-seed spread of this size (~0.02)
    assert abs(comp_nll - eager_nll) < 0.02, (comp_nll, eager_nll, eager_se)
    assert comp.skipped == eager.skipped == 0
    assert len(comp.losses) == len(eager.losses) == 150
    assert abs(comp.losses[-1] - eager.losses[-1]) < 0.05


def test_compiled_step_keeps_the_guard(runs, moons):
    t = runs[True][0]
    flow = t.flow
    before = {k: v.detach().clone() for k, v in flow.state_dict().items()}
    state = {k: v.clone() for k, v in t.optimizer.state_dict()["state"][0].items()}
    shadow = {k: v.clone() for k, v in t.ema.shadow.items()}
    bad = moons.train[:128].clone()
    bad[5, 0] = float("nan")  # the value checks are skipped in the compiled region
    with pytest.warns(RuntimeWarning, match="loss is nan; update skipped"):
        loss = t.train_step(bad)
    assert math.isnan(loss)
    for k, v in flow.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in t.optimizer.state_dict()["state"][0].items():
        assert torch.equal(v, state[k]), k
    for k, v in t.ema.shadow.items():
        assert torch.equal(v, shadow[k]), k
    assert math.isfinite(t.train_step(moons.train[:128]))


def test_the_compiled_step_compiles_once_per_run(moons, monkeypatch):
    counter = CompileCounterWithBackend("aot_eager")
    real = torch.compile

    def counted(fn, **kwargs):
        return real(fn, backend=counter, **kwargs)

    monkeypatch.setattr(torch, "compile", counted)
    t = Trainer(_flow(), moons.train, moons.val, _config(steps=30, eval_every=10), compile=True)
    t.fit()
    # every batch has batch_size rows and validation runs eagerly: one graph, no recompiles
    assert counter.frame_count == 1


def test_fused_optimizer_falls_back_where_there_is_no_fused_kernel(monkeypatch):
    from exactflow.train import engine

    calls = []
    real = torch.optim.AdamW

    class NoFused(real):
        def __init__(self, params, **kw):
            calls.append(kw.get("fused"))
            if kw.get("fused"):
                raise RuntimeError("`fused=True` requires all the params to be on a device")
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", NoFused)
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = engine._optimizer(params, _config(), fused=True)
    assert calls == [True, None] and isinstance(opt, NoFused)
    assert not opt.defaults.get("fused")


def test_a_killed_compiled_run_resumes_bit_identically(tmp_path, moons, monkeypatch):
    # torch.compile stands aside (the real compile is above): what is checked is that the
    # fused optimiser's state and the compiled run's counters round-trip through a checkpoint
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    c = _config(steps=40, eval_every=10, checkpoint_every=20)
    ref = _flow()
    Trainer(ref, moons.train, moons.val, c, compile=True).fit()

    broken = _flow()
    ck = tmp_path / "ck.safetensors"
    t = Trainer(broken, moons.train, moons.val, c, checkpoint=ck, compile=True)
    interrupt_at(t, 27)  # after the step-20 checkpoint
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    torch.manual_seed(123)  # another initialisation: everything must come from the file
    fresh = RealNVP(2, transforms=3, hidden=(32, 32))
    t2 = Trainer(fresh, moons.train, moons.val, c, checkpoint=ck, compile=True)
    assert t2.optimizer.defaults["fused"]
    result = t2.fit(resume=True)
    assert result.steps == 40 and t2.optimizer.param_groups[0]["fused"]
    for (k, v), w in zip(ref.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_the_resuming_run_picks_the_optimiser_kernels(tmp_path, moons, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    c = _config(steps=10, eval_every=10, checkpoint_every=10)
    eager = Trainer(_flow(), moons.train, moons.val, c, checkpoint=tmp_path / "e.safetensors")
    eager.fit()
    compiled = Trainer(
        _flow(), moons.train, moons.val, c, checkpoint=tmp_path / "e.safetensors", compile=True
    )
    compiled.load()
    assert compiled.optimizer.param_groups[0]["fused"] is True
    assert compiled.step == eager.step == 10
    plain = Trainer(_flow(), moons.train, moons.val, c, checkpoint=tmp_path / "e.safetensors")
    plain.load()
    assert not plain.optimizer.param_groups[0]["fused"]
