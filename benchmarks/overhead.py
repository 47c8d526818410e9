"""Flow overhead: a flow's training step divided by a bare MLP stack's with the same matmuls.

The floor for a flow whose conditioners are 5 MLPs of shape ``n_in -> 128 -> 128 -> n_out`` is
5 such plain ``nn.Sequential`` MLPs (Linear/ReLU) trained with the same Adam step on a trivial
loss at the same batch: everything a flow adds (masks, permutations, the elementwise maps and
their log-dets, the base density, Python dispatch) shows up as the ratio above 1.

Matmul shapes per transform (D features, K bins):

* MAF      ``D -> 128 -> 128 -> 2D``
* NSF      ``D -> 128 -> 128 -> (3K - 1) D``   (autoregressive, linear tails)
* RealNVP  ``D/2 -> 128 -> 128 -> D``

Timings are interleaved (flow, floor, flow, floor, ...) and the median ratio is reported,
next to a load-independent count: the number of ATen operator calls one training step dispatches
(forward + backward + Adam), for the flow and for its floor. On a shared CPU the op count is
the steadier signal of per-step Python/dispatch overhead.

Compiled contenders (``--libs exactflow+compile exactflow-trainer zuko+compile``) are measured
against the *compiled* floor: the same MLP stack's loss through ``torch.compile`` (CUDA graphs
on CUDA) with torch's fused Adam. ``exactflow-trainer`` is ``Trainer(compile=True)``'s whole
guarded step (see peers.py); the table also gives each contender's first-call (compile) time.

    python benchmarks/overhead.py --libs exactflow exactflow-trainer zuko+compile --dims 16
    python benchmarks/overhead.py [--device cpu|cuda] [--dims 16 64] [--models maf nsf realnvp]
                                  [--libs exactflow zuko nflows normflows] [--rounds 7]
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # the builders live next to this script


def floor_shapes(model: str, d: int) -> list[int]:
    """Layer widths of one conditioner MLP of ``model`` at dimension ``d``."""
    if model == "maf":
        return [d, *peers.HIDDEN, 2 * d]
    if model == "nsf":
        return [d, *peers.HIDDEN, (3 * peers.BINS - 1) * d]
    return [d // 2, *peers.HIDDEN, 2 * (d - d // 2)]


def mlp_stack(model: str, d: int) -> nn.ModuleList:
    """``peers.TRANSFORMS`` plain MLPs with the conditioner shapes of ``model``."""
    widths = floor_shapes(model, d)
    stack = []
    for _ in range(peers.TRANSFORMS):
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        stack.append(nn.Sequential(*layers))
    return nn.ModuleList(stack)


def _step_fn(
    module: nn.Module, loss_fn, device: torch.device, fused: bool = False, cudagraphs=False
):
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, fused=fused or None)

    def step() -> None:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


COMPILED = ("zuko+compile", "exactflow+compile", "exactflow-trainer")


class _OpCounter(TorchDispatchMode):
    """Counts ATen operator calls (autograd's backward ops included)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> int:
    """ATen operator calls made by one ``fn()``."""
    with _OpCounter() as counter:
        fn()
    return counter.calls


def _seconds(fn, iters: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / iters


def measure(lib: str, model: str, d: int, args, device: torch.device) -> dict:
    """Median flow-step / floor-step time ratio over interleaved rounds."""
    flow = peers.build(lib, model, d, device)
    torch.manual_seed(0)
    stack = mlp_stack(model, d).to(device)
    x = torch.randn(args.batch, d, device=device)
    x_in = x[:, : floor_shapes(model, d)[0]].contiguous()

    def floor_loss() -> torch.Tensor:
        return sum(net(x_in).square().mean() for net in stack)

    compiled = lib in COMPILED
    cudagraphs = compiled and device.type == "cuda"
    if compiled:
        # the compiled floor: the same MLPs' loss through torch.compile (CUDA graphs on CUDA)
        # and torch's fused Adam, the cheapest step these matmuls allow
        opts = {"mode": "reduce-overhead"} if cudagraphs else {}
        floor_loss = torch.compile(floor_loss, dynamic=False, **opts)
    if flow.train_step is not None:
        own = flow.train_step

        def flow_step() -> None:
            own(x)

    else:
        log_prob = flow.train_log_prob or flow.log_prob
        flow_step = _step_fn(
            flow.module, lambda: -log_prob(x).mean(), device, cudagraphs=cudagraphs
        )
    floor_step = _step_fn(stack, floor_loss, device, fused=compiled, cudagraphs=cudagraphs)
    t0 = time.perf_counter()
    flow_step()
    first = time.perf_counter() - t0
    for fn in (flow_step, floor_step, floor_step):  # warm-up (and the floor's compile)
        fn()
    # ATen calls are a load-independent overhead count for eager steps; compiled kernels
    # are not ATen calls, so compiled rows show only the time ratio
    ops = ("-", "-") if compiled else (count_ops(flow_step), count_ops(floor_step))
    one = _seconds(flow_step, 1, device)
    iters = max(1, min(50, math.ceil(args.target / max(one, 1e-6))))
    flow_t, floor_t = [], []
    for _ in range(args.rounds):
        flow_t.append(_seconds(flow_step, iters, device))
        floor_t.append(_seconds(floor_step, iters, device))
    ratios = [a / b for a, b in zip(flow_t, floor_t)]
    return {
        "flow_ms": 1e3 * statistics.median(flow_t),
        "floor_ms": 1e3 * statistics.median(floor_t),
        "ratio": statistics.median(ratios),
        "first_call_s": first,
        "ops": ops,
        "flow_params": flow.params(),
        "floor_params": sum(p.numel() for p in stack.parameters()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--models", nargs="+", choices=peers.MODELS, default=list(peers.MODELS))
    ap.add_argument(
        "--libs",
        nargs="+",
        choices=[*peers.BUILDERS, *COMPILED],
        default=["exactflow"],
        help="exactflow-trainer: Trainer(compile=True)'s step; compiled contenders are "
        "measured against the compiled floor",
    )
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--target", type=float, default=0.3, help="seconds per timed measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    libs = peers.available(args.libs)
    print(
        f"flow training step / bare-MLP floor step (Adam, batch {args.batch}, {device}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds)"
    )
    print(
        peers._table(
            [
                "lib",
                "model",
                "D",
                "flow ms",
                "floor ms",
                "ratio",
                "fraction of floor",
                "first call s",
                "ops/step flow/floor",
                "params flow/floor",
            ],
            [],
        )
    )
    for lib in libs:
        for model in args.models:
            for d in args.dims:
                try:
                    r = measure(lib, model, d, args, device)
                except Exception as exc:
                    print(f"| {lib} | {model} | {d} | error: {type(exc).__name__}: {exc} |")
                    continue
                print(
                    f"| {lib} | {model} | {d} | {r['flow_ms']:.2f} | {r['floor_ms']:.2f} | "
                    f"{r['ratio']:.2f} | {1 / r['ratio']:.2f} | {r['first_call_s']:.1f} | {r['ops'][0]}/{r['ops'][1]} | "
                    f"{r['flow_params']}/{r['floor_params']} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
