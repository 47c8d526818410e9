"""MAF vs IAF: the same masked autoregressive layers used in opposite directions.

MAF evaluates ``log_prob`` of data in one MADE pass per layer and samples in D sequential
passes; IAF is the reverse (its ``sample_and_log_prob`` of its own samples is one pass). This
script times both operations for growing D and plots the trade-off.

    python examples/maf_vs_iaf.py [--smoke] [--out docs/figures]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from exactflow.models import IAF, MAF


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(d: int, batch: int, repeats: int) -> dict[str, float]:
    """Seconds for log_prob of a data batch and for sampling a batch, for MAF and IAF."""
    torch.manual_seed(0)
    x = torch.randn(batch, d)
    out = {}
    for name, builder in (("MAF", MAF), ("IAF", IAF)):
        flow = builder(d, transforms=3, hidden=(64, 64))
        with torch.no_grad():  # leave the identity so the passes do real work
            for p in flow.parameters():
                p.add_(0.01 * torch.randn_like(p))
            out[f"{name} log_prob"] = median_seconds(lambda f=flow: f.log_prob(x), repeats)
            out[f"{name} sample"] = median_seconds(lambda f=flow: f.sample(batch), repeats)
    return out


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run (CI)")
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (timings)")
    args = ap.parse_args(argv)
    # one thread: on a shared, loaded machine extra threads mostly measure contention
    torch.set_num_threads(args.threads)
    dims = [2, 4] if args.smoke else [2, 4, 8, 16, 32, 64]
    repeats = 2 if args.smoke else 11
    batch = 256

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch}; median ms")
    results = {d: measure(d, batch, repeats) for d in dims}
    names = list(results[dims[0]])
    print(f"{'D':>4} " + " ".join(f"{n:>13}" for n in names))
    for d in dims:
        print(f"{d:>4} " + " ".join(f"{results[d][n] * 1e3:>13.2f}" for n in names))

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for j, op in enumerate(("log_prob", "sample")):
        for k, model in enumerate(("MAF", "IAF")):
            ys = [results[d][f"{model} {op}"] * 1e3 for d in dims]
            ax[j].loglog(dims, ys, "o-", color=f"C{k}", label=model)
        ax[j].set_title(f"{op} of {batch} points")
        ax[j].set_xlabel("D")
        ax[j].grid(alpha=0.3, which="both")
        ax[j].legend()
    ax[0].set_ylabel("ms (median)")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "maf_vs_iaf.png", dpi=80)
    plt.close(fig)
    return results


if __name__ == "__main__":
    main()
