"""Log-determinant cost: dense ``Linear`` (slogdet, O(D^3)) vs ``LULinear`` (O(D)).

Times, side by side in one run, (a) the log-det alone and (b) a whole forward pass at a fixed
batch, for D = 16 ... 1024, and prints medians and the dense/LU ratio.

    python benchmarks/logdet_scaling.py [--dims 16 64 256 1024] [--repeats 21] [--batch 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from exactflow.transforms import Linear, LULinear


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(d: int, batch: int, repeats: int) -> tuple[float, float, float, float]:
    """Median seconds: dense log-det, LU log-det, dense forward, LU forward."""
    torch.manual_seed(0)
    dense, lu = Linear(d), LULinear(d)
    x = torch.randn(batch, d)
    with torch.no_grad():
        return (
            _time(lambda: torch.linalg.slogdet(dense.weight)[1], repeats),
            _time(lambda: lu.log_diag.sum(), repeats),
            _time(lambda: dense(x), repeats),
            _time(lambda: lu(x), repeats),
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}")
    print(
        f"{'D':>6} {'slogdet ms':>11} {'LU ms':>9} {'ratio':>8} | {'dense fwd ms':>12} {'LU fwd ms':>10} {'ratio':>7}"
    )
    for d in args.dims:
        ld, ll, fd, fl = _measure(d, args.batch, args.repeats)
        print(
            f"{d:>6} {ld * 1e3:>11.4f} {ll * 1e3:>9.4f} {ld / ll:>8.1f} | "
            f"{fd * 1e3:>12.4f} {fl * 1e3:>10.4f} {fd / fl:>7.2f}"
        )


if __name__ == "__main__":
    main()
