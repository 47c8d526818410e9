"""The rational-quadratic spline alone: exactflow's against zuko's, eager and compiled.

Both evaluate the same map (K bins on [-B, B], identity tails) on the same inputs and
parameters; exactflow's parameters are handed over the way its MADE produces them (a
``(N, D, P)`` view of parameter-major memory), zuko's as a contiguous ``(N, D, P)`` tensor, the
way its own conditioner produces them. Each task is timed in interleaved rounds and the median
per call is printed, with exactflow ÷ zuko (< 1: exactflow faster).

    python benchmarks/spline_speed.py --threads 2
    python benchmarks/spline_speed.py --threads 2 --compile --batch 1024

Tasks: ``forward`` (no grad, the log_prob path) and ``train`` (forward plus the backward of
``y.sum() + logdet.sum()`` to the parameters, the training path).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def _contenders(batch: int, d: int, bins: int, bound: float, grad: bool) -> dict[str, Callable]:
    from exactflow.transforms.splines import rational_quadratic_spline

    g = torch.Generator().manual_seed(0)
    p = 3 * bins - 1
    x = 0.5 * bound * torch.randn(batch, d, generator=g)
    raw = 0.5 * torch.randn(batch, p, d, generator=g)
    ours_params = raw.clone().requires_grad_(grad)  # parameter-major, as MADE returns it
    peer_params = raw.transpose(-1, -2).contiguous().requires_grad_(grad)
    out: dict[str, Callable] = {
        "exactflow": lambda: rational_quadratic_spline(
            x, ours_params.transpose(-1, -2), bound=bound
        )
    }
    try:
        from zuko.transforms import MonotonicRQSTransform
    except ImportError:  # the [bench] extra is missing: exactflow alone
        return out
    k = bins

    def zuko() -> tuple:
        q = peer_params
        t = MonotonicRQSTransform(q[..., :k], q[..., k : 2 * k], q[..., 2 * k :], bound=bound)
        return t.call_and_ladj(x)

    out["zuko"] = zuko
    return out


def _task(fn: Callable, train: bool) -> Callable[[], object]:
    def run() -> object:
        if train:
            y, ld = fn()
            (y.sum() + ld.sum()).backward()
            return None
        with torch.no_grad():
            return fn()  # returned, so that torch.compile cannot drop the work as dead code

    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--bins", type=int, default=8)
    ap.add_argument("--bound", type=float, default=5.0)
    ap.add_argument("--compile", action="store_true", help="torch.compile every task first")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=10, help="calls per timed measurement")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# batch {args.batch}, D {args.dim}, {args.bins} bins, bound {args.bound}, "
        f"{'compiled' if args.compile else 'eager'}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        flush=True,
    )
    for task in ("forward", "train"):
        train = task == "train"
        fns = _contenders(args.batch, args.dim, args.bins, args.bound, train)
        runs = {name: _task(fn, train) for name, fn in fns.items()}
        if args.compile:
            runs = {name: torch.compile(run, dynamic=False) for name, run in runs.items()}
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            print(f"#   {task} {name}: first call {time.perf_counter() - t0:.1f} s", flush=True)
            for _ in range(2):
                run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    run()
                times[name].append((time.perf_counter() - t0) / args.calls * 1e3)
        med = {name: statistics.median(v) for name, v in times.items()}
        cells = ", ".join(f"{name} {ms:.2f} ms" for name, ms in med.items())
        ratio = f"; exactflow / zuko {med['exactflow'] / med['zuko']:.2f}" if "zuko" in med else ""
        print(f"{task}: {cells}{ratio}", flush=True)


if __name__ == "__main__":
    main()
