"""One loss path: ``Flow.training_loss`` is what every trainer minimises.

The plain NLL, the NLL plus declared penalties (RNODE on a CNF, or any module declaring
``training_penalty``), flow matching's override, the trainer's eager and compiled steps, the
distributed objective (RNODE on 2 gloo ranks equals one process), and ActNorm's explicit
all-reduce initialisation hook.
"""

from __future__ import annotations

import pytest
import torch

from exactflow import Flow
from exactflow.continuous import regularization_loss, regularization_terms
from exactflow.distributions import StandardNormal
from exactflow.errors import DTypeError
from exactflow.flow import DeclaresPenalty, declared_penalty
from exactflow.matching import matching_loss
from exactflow.models import CFM, FFJORD, RealNVP
from exactflow.train import TrainConfig, Trainer, mmd2_rbf
from exactflow.train.distributed import (
    DistributedTrainer,
    current_context,
    shard_bounds,
    synchronized_actnorm_init,
)
from exactflow.transforms import ActNorm, Affine, Compose
from test_distributed import _spawn

F64 = torch.float64


def rnode_ffjord(kinetic: float = 1.0, jacobian: float = 0.5) -> Flow:
    """A tiny FFJORD with RNODE, fixed-step rk4 and the exact trace (rows solve independently,
    so a split batch solves exactly as the whole), moved away from its f = 0 initialisation
    (where both penalties vanish), in float64."""
    torch.manual_seed(0)
    flow = FFJORD(
        2,
        hidden=(8,),
        solver="rk4",
        steps=3,
        trace="exact",
        adjoint=False,
        regularization={"kinetic": kinetic, "jacobian": jacobian},
    ).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.4 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow


def data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, generator=g, dtype=F64) * torch.tensor([1.5, 0.5])).double()


def rnode_config() -> TrainConfig:
    # B = 33 splits 16/17 over two ranks
    return TrainConfig(
        steps=4, batch_size=33, lr=1e-2, warmup=1, clip_norm=1.0, checkpoint_every=0, progress=False
    )


def image_rows(n: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    scale = torch.tensor([3.0, 0.2, 1.0]).reshape(1, 3, 1, 1)
    shift = torch.tensor([5.0, -1.0, 0.0]).reshape(1, 3, 1, 1)
    return torch.randn(n, 3, 2, 2, generator=g) * scale + shift


class Penalised(Affine):
    """An affine layer that declares ``c · Σ shift²`` as its training penalty."""

    def __init__(self, d: int, c: float):
        super().__init__(torch.linspace(-1.0, 1.0, d), torch.ones(d), learnable=True)
        self.c = c

    def training_penalty(self) -> torch.Tensor:
        return self.c * self.shift.square().sum()


# -- the objective --------------------------------------------------------------------------
def test_plain_flow_training_loss_is_the_mean_nll():
    torch.manual_seed(0)
    flow = RealNVP(3, transforms=2, hidden=[8])
    x = torch.randn(16, 3)
    assert declared_penalty(flow) is None
    torch.testing.assert_close(flow.training_loss(x), -flow.log_prob(x).mean(), rtol=0, atol=0)

    torch.manual_seed(0)
    cond = RealNVP(3, context=2, transforms=2, hidden=[8])
    with torch.no_grad():
        for p in cond.parameters():
            p.add_(0.1 * torch.randn_like(p))
    c = torch.randn(16, 2)
    want = -cond.log_prob(x, c).mean()
    torch.testing.assert_close(cond.training_loss(x, c), want, rtol=0, atol=0)
    assert not torch.allclose(cond.training_loss(x, c + 1.0), want)


def test_declared_penalties_are_added_to_the_nll():
    layer = Penalised(3, c=0.25)
    assert isinstance(layer, DeclaresPenalty)
    flow = Flow(
        Compose([layer, Affine(torch.full((3,), 0.5), torch.full((3,), 2.0))]), StandardNormal((3,))
    )
    x = torch.randn(8, 3)
    penalty = 0.25 * torch.linspace(-1.0, 1.0, 3).square().sum()
    torch.testing.assert_close(flow.training_loss(x), -flow.log_prob(x).mean() + penalty)
    # the penalty's gradient reaches the parameters: d/dshift of c Σ shift² is 2 c shift
    flow.training_loss(x).backward()
    nll_grad = torch.autograd.grad(-flow.log_prob(x).mean(), layer.shift)[0]
    torch.testing.assert_close(layer.shift.grad, nll_grad + 0.5 * layer.shift.detach())


def test_an_attribute_named_like_the_hook_is_not_a_declaration():
    layer = Affine(torch.zeros(2), torch.ones(2))
    layer.training_penalty = 5.0  # plain data, not a method of its class
    flow = Flow(layer, StandardNormal((2,)))
    x = torch.randn(4, 2)
    assert declared_penalty(flow) is None
    torch.testing.assert_close(flow.training_loss(x), -flow.log_prob(x).mean())


def test_ffjord_training_loss_is_nll_plus_the_rnode_penalty():
    flow = rnode_ffjord(kinetic=2.0, jacobian=0.5)
    flow.train()
    x = data(20, 0)
    loss = flow.training_loss(x)
    terms = regularization_terms(flow)
    penalty = regularization_loss(flow)
    assert set(terms) == {"kinetic", "jacobian"} and min(terms.values()) > 1e-3
    assert float(penalty.detach()) == pytest.approx(
        2.0 * terms["kinetic"] + 0.5 * terms["jacobian"]
    )
    nll = -flow.log_prob(x).mean()
    torch.testing.assert_close(loss, nll + penalty, rtol=1e-12, atol=1e-12)
    assert float(penalty.detach()) > 1e-2  # large enough that dropping it would be seen
    # eval mode computes no terms: the objective is the plain NLL there
    flow.eval()
    torch.testing.assert_close(flow.training_loss(x), -flow.log_prob(x).mean())
    assert declared_penalty(flow) is None


def test_matching_flow_training_loss_is_its_matching_loss():
    torch.manual_seed(0)
    flow = CFM(2, hidden=(8,), solver="rk4", steps=2)
    x = data(32, 1).float()
    g = torch.Generator().manual_seed(5)
    loss = flow.training_loss(x, generator=g)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(x.shape, generator=g)
    want = matching_loss(flow.velocity, x, noise, flow.path, generator=g)
    torch.testing.assert_close(loss, want)
    # it is not the NLL (and does not solve the ODE)
    flow.reset_nfe()
    flow.training_loss(x, generator=torch.Generator().manual_seed(5))
    assert flow.nfe["forward"] == 0


# -- the trainers ---------------------------------------------------------------------------
def test_trainer_loss_is_training_loss_plus_mmd():
    flow = rnode_ffjord()
    x = data(24, 2)
    trainer = Trainer(flow, x, config=TrainConfig(progress=False))
    flow.train()
    torch.testing.assert_close(trainer._loss(x), flow.training_loss(x), rtol=1e-12, atol=0)

    torch.manual_seed(0)
    plain = RealNVP(2, transforms=1, hidden=[8])
    cfg = TrainConfig(progress=False, mmd_weight=0.5, mmd_samples=16, seed=3)
    trainer = Trainer(plain, x.float(), config=cfg)
    g = torch.Generator()
    g.set_state(trainer.sample_generator.get_state())
    got = trainer._loss(x.float())
    samples = plain.rsample(16, generator=g)
    want = plain.training_loss(x.float()) + 0.5 * mmd2_rbf(samples, x.float())
    torch.testing.assert_close(got, want)


def test_compiled_step_compiles_training_loss(monkeypatch):
    """``compile=True`` wraps the function that calls ``flow.training_loss`` (not a separate
    NLL), so penalties and overrides are part of what is compiled."""
    compiled = []

    def fake_compile(fn, **kwargs):
        compiled.append(kwargs)

        def run(*args):
            compiled.append("called")
            return fn(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    flow = rnode_ffjord()
    x = data(24, 2)
    trainer = Trainer(flow, x, config=TrainConfig(progress=False), compile=True)
    assert compiled == [{"dynamic": False}]
    flow.train()
    torch.testing.assert_close(trainer._loss(x), flow.training_loss(x), rtol=1e-12, atol=0)
    assert compiled[-1] == "called"


def test_engine_knows_nothing_model_specific():
    """The trainers import no model family (they call ``flow.training_loss``)."""
    import ast

    import exactflow.train.distributed as distributed
    import exactflow.train.engine as engine

    for module in (engine, distributed):
        tree = ast.parse(open(module.__file__).read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported |= {node.module or ""} | {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        family = {n for n in imported if any(w in n for w in ("continuous", "matching", "CNF"))}
        assert not family, (module.__name__, family)
        assert "regularization_loss" not in imported


# -- ActNorm's explicit hook ---------------------------------------------------------------
def test_actnorm_initialize_with_identity_reduce_is_the_plain_init():
    x = image_rows()
    plain, reduced = ActNorm((3, 2, 2)), ActNorm((3, 2, 2))
    plain.initialize(x)
    reduced.initialize(x, reduce=lambda t: t)
    assert bool(reduced.initialized)
    for name in ("shift", "log_scale"):
        torch.testing.assert_close(getattr(reduced, name), getattr(plain, name))
    z, _ = Flow(reduced, StandardNormal((3, 2, 2))).transform(x)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    with pytest.raises(DTypeError, match=r"reduce must be a callable.*got int"):
        ActNorm(3).initialize(torch.randn(4, 3), reduce=1)


def test_actnorm_sync_without_a_group_hooks_nothing():
    layer = ActNorm(3)
    with synchronized_actnorm_init(layer, None) as hooked:
        assert hooked == []
        layer(torch.randn(5, 3) + 2.0)
    assert bool(layer.initialized) and not layer._forward_pre_hooks


# -- two processes --------------------------------------------------------------------------
def _task_rnode_and_actnorm(rank: int, out) -> None:
    flow = rnode_ffjord()
    trainer = DistributedTrainer(flow, data(120, 0), None, rnode_config())
    result = trainer.fit()
    ctx = current_context()
    x = image_rows()
    lo, hi = shard_bounds(x.shape[0], rank, ctx.world_size)
    direct = ActNorm((3, 2, 2))
    direct.initialize(x[lo:hi], reduce=ctx.all_reduce)
    shape = (3, 2, 2)
    pre = Affine(torch.full(shape, 1.0), torch.full(shape, 2.0))
    hooked = Flow(Compose([pre, ActNorm(shape)]), StandardNormal(shape))
    with synchronized_actnorm_init(hooked, ctx) as layers:
        hooked.train()
        hooked.log_prob(x[lo:hi])
    leftover = sum(len(m._forward_pre_hooks) for m in hooked.modules())
    torch.save(
        {
            "state": {k: v.detach().clone() for k, v in flow.state_dict().items()},
            "losses": result.losses,
            "direct": direct.state_dict(),
            "hooked": hooked.transform[1].state_dict(),
            "n_hooked": len(layers),
            "leftover": leftover,
        },
        out / f"loss-path{rank}.pt",
    )


def test_rnode_on_two_gloo_ranks_equals_one_process(tmp_path):
    """FFJORD with RNODE (kinetic + Jacobian), B = 33 split 16/17: the losses and the weights
    after 4 steps equal the one-process run; the penalty is large enough that an objective
    dropping it on the ranks would fail. ActNorm initialised through ``initialize(x,
    reduce=all_reduce)`` (directly and by the trainer's pre-hook) equals the one-process
    initialisation on the whole batch."""
    _spawn(_task_rnode_and_actnorm, tmp_path)
    ref_flow = rnode_ffjord()
    x = data(120, 0)
    ref_flow.train()
    penalty = float((ref_flow.training_loss(x) + ref_flow.log_prob(x).mean()).detach())
    assert penalty > 1e-2
    ref = Trainer(ref_flow, x, None, rnode_config()).fit()
    ranks = [torch.load(tmp_path / f"loss-path{r}.pt") for r in range(2)]
    want = ref_flow.state_dict()
    init = rnode_ffjord().state_dict()
    assert max(float((want[k] - init[k]).abs().max()) for k in want) > 1e-3  # training moved
    for key, value in want.items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        torch.testing.assert_close(ranks[0]["state"][key], value, atol=1e-9, rtol=0), key
    torch.testing.assert_close(ranks[0]["losses"], ref.losses, atol=1e-9, rtol=1e-9)

    single = ActNorm((3, 2, 2))
    single.initialize(image_rows())
    for r in range(2):
        assert ranks[r]["n_hooked"] == 1 and ranks[r]["leftover"] == 0
        for name in ("shift", "log_scale", "initialized"):
            torch.testing.assert_close(ranks[r]["direct"][name], getattr(single, name))
        torch.testing.assert_close(ranks[r]["hooked"]["initialized"], torch.tensor(True))
    # the hooked layer saw x after Affine(1, 2): z = (x - 1) / 2
    after = ActNorm((3, 2, 2))
    after.initialize((image_rows() - 1.0) / 2.0)
    for name in ("shift", "log_scale"):
        torch.testing.assert_close(ranks[0]["hooked"][name], getattr(after, name))
