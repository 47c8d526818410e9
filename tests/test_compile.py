"""torch.compile readiness: every MODELS entry traces as one graph, compiled equals eager.

``torch._dynamo.explain`` only traces (no code generation), so the per-model checks are
quick; one real ``torch.compile(fullgraph=True)`` of NSF (inductor) runs by default, the
heavier variants are ``slow``.

Compile forms. The continuous models (FFJORD, CFM, OT-CFM, rectified flow) are traced with
their fixed-step solver (``solver="rk4", steps=4``), which a compiled CNF runs as unrolled
tensor ops (:func:`exactflow.continuous.fixed_step.unrolled_solve`). Exempt, with the
reasons measured by ``torch._dynamo.explain`` on the tiny builds (torch 2.13):

* their default adaptive solver (``dopri5``): torchdiffeq's step-size control branches on
  tensor values (``torchdiffeq/_impl/misc.py``, ``rk_common.py``) and the exact trace calls
  ``torch.autograd.grad`` inside the right-hand side, which dynamo does not trace: 60 graph
  breaks in ``log_prob`` and ``sample``, 61 in FFJORD's training step;
* FFJORD's training step with its default Hutchinson trace: that estimator keeps the
  torchdiffeq path (30 breaks with ``rk4``), so the training step is traced with
  ``trace="exact"``, an unbiased form of the same objective.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from exactflow.models import MODELS
from exactflow.transforms import ActNorm

FIXED_STEP = {"solver": "rk4", "steps": 4}
# builder keywords of the compile-clean form of a MODELS entry (see the module docstring)
COMPILE_FORM = {
    "ffjord": {**FIXED_STEP, "trace": "exact"},
    "cfm": FIXED_STEP,
    "otcfm": FIXED_STEP,
    "rectified": FIXED_STEP,
}
NAMES = sorted(MODELS)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _build(name: str, batch: int = 8, seed: int = 0):
    spec = MODELS[name]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flow = spec.build_tiny(**COMPILE_FORM.get(name, {}))
    ex = spec.example
    shape = (ex,) if isinstance(ex, int) else tuple(ex)
    return flow, torch.randn(batch, *shape)


def _assert_one_graph(fn, *args) -> None:
    e = dynamo.explain(fn)(*args)
    reasons = sorted(
        {
            f"{b.reason.splitlines()[0]} @ "
            + (f"{b.user_stack[-1].filename}:{b.user_stack[-1].lineno}" if b.user_stack else "?")
            for b in e.break_reasons
        }
    )
    assert e.graph_break_count == 0 and e.graph_count == 1, (
        f"{e.graph_count} graphs, {e.graph_break_count} breaks:\n" + "\n".join(reasons)
    )


@pytest.mark.parametrize("name", NAMES)
def test_log_prob_traces_as_one_graph(name):
    flow, x = _build(name)
    flow.eval()
    assert flow.validate  # the value checks are skipped under compile, not switched off
    _assert_one_graph(flow.log_prob, x)


@pytest.mark.parametrize("name", NAMES)
def test_training_step_traces_as_one_graph(name):
    flow, x = _build(name)
    flow.train()
    # the first step of a fresh model runs ActNorm's data-dependent initialisation (a read of
    # its flag); every later step must be one graph
    flow.training_loss(x).backward()
    _assert_one_graph(flow.training_loss, x)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_sample_traces_as_one_graph(name):
    flow, _ = _build(name)
    flow.eval()
    _assert_one_graph(lambda: flow.sample(8))


def test_nsf_compiled_log_prob_equals_eager_without_recompiling():
    flow, x = _build("nsf", batch=64)
    flow.eval()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(flow.log_prob, backend=counter, fullgraph=True, dynamic=False)
    with torch.no_grad():
        eager = flow.log_prob(x)
        got = compiled(x)
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        # same shape, other values: the compiled graph is reused, not rebuilt
        x2 = 3.0 * torch.randn_like(x)
        torch.testing.assert_close(compiled(x2), flow.log_prob(x2), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    # and it really is a density of this model, not a constant: the batches differ
    assert not torch.allclose(eager, flow.log_prob(x2))


def test_compiled_fixed_step_cnf_equals_torchdiffeq_solve():
    # eager: torchdiffeq's rk4 with the autograd trace; compiled: the unrolled tableau with
    # the analytic trace. Same grid, same steps: the same numbers up to float32 rounding.
    flow, x = _build("cfm", batch=16)
    flow.eval()
    with torch.no_grad():  # a velocity far from the initial near-zero one
        for p in flow.parameters():
            p.normal_(0.0, 0.7)
    # dynamo's trace run as is (no code generation): what differs is the solve, not a backend
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(flow.log_prob, backend=counter, fullgraph=True, dynamic=False)
    eager = flow.log_prob(x)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    # a wrong step count would be a different integral: the check can tell
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coarse = MODELS["cfm"].build_tiny(solver="rk4", steps=1)
    coarse.load_state_dict(flow.state_dict())
    assert (coarse.eval().log_prob(x) - eager).abs().max() > 1e-5


def test_actnorm_remembers_its_flag_and_forgets_it_on_load():
    layer = ActNorm(3)
    x = torch.randn(64, 3) * 4.0 + 2.0
    layer.train()
    layer(x)
    assert bool(layer.initialized)
    fresh = ActNorm(3).state_dict()  # initialized = False, identity parameters
    layer.load_state_dict(fresh)
    z, _ = layer(x)  # the loaded flag is read again: initialises from this batch
    assert bool(layer.initialized)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    # an initialised layer is not re-initialised by later batches
    before = layer.shift.detach().clone()
    layer(x + 10.0)
    torch.testing.assert_close(layer.shift.detach(), before)


@pytest.mark.slow
def test_nsf_compiled_training_step_equals_eager():
    flow, x = _build("nsf", batch=64)
    flow.train()
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(flow.training_loss, backend=counter, fullgraph=True, dynamic=False)
    loss = flow.training_loss(x)
    grads = torch.autograd.grad(loss, list(flow.parameters()))
    got = step(x)
    got_grads = torch.autograd.grad(got, list(flow.parameters()))
    torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    step(torch.randn_like(x))
    assert counter.frame_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_compiled_log_prob_equals_eager(name):
    flow, x = _build(name, batch=16)
    flow.eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(flow.log_prob, backend=counter, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), flow.log_prob(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
