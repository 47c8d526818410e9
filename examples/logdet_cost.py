"""Why triangular Jacobians matter: log|det| of a dense D x D matrix (slogdet, LU
factorisation, O(D³)) against a triangular one (sum of log-diagonal, O(D)), timed per call.

Also times the whole Jacobian of a RealNVP coupling layer by autograd followed by slogdet
(what a flow without structure would pay per sample; D <= 256 only) against the layer's own log-det.

    python examples/logdet_cost.py [--smoke] [--out docs/figures]
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

from exactflow.transforms import Coupling, Linear, LULinear, alternating_mask


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(d: int, repeats: int) -> dict[str, float]:
    """Seconds per log-det at dimension ``d`` for the dense, LU and coupling cases."""
    torch.manual_seed(0)
    dense, lu = Linear(d), LULinear(d)
    coupling = Coupling("affine", alternating_mask(d), (64,))
    with torch.no_grad():  # a non-identity coupling, so its Jacobian is a real triangle
        for p in coupling.parameters():
            p.normal_(0.0, 0.1)
    x = torch.randn(1, d)
    with torch.no_grad():
        out = {
            "dense slogdet": median_seconds(lambda: torch.linalg.slogdet(dense.weight), repeats),
            "LU: sum log|diag|": median_seconds(lambda: lu.log_diag.sum(), repeats),
            "coupling forward (ladj included)": median_seconds(lambda: coupling(x), repeats),
        }

    def brute():
        jac = torch.autograd.functional.jacobian(lambda v: coupling(v)[0], x[0])
        return torch.linalg.slogdet(jac)

    # D backward passes per Jacobian: past 256 this alone takes minutes on a busy CPU
    slow = d <= 256
    out["coupling: autograd Jacobian + slogdet"] = (
        median_seconds(brute, max(3, repeats // 4)) if slow else float("nan")
    )
    return out


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run (CI)")
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (timings)")
    args = ap.parse_args(argv)
    # one thread: on a shared, loaded machine extra threads mostly measure contention
    torch.set_num_threads(args.threads)
    dims = [4, 8] if args.smoke else [16, 32, 64, 128, 256, 512, 1024]
    repeats = 3 if args.smoke else 21

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms per call")
    results = {d: measure(d, repeats) for d in dims}
    names = list(results[dims[0]])
    print(f"{'D':>5} " + " | ".join(f"{n:>22.22}" for n in names))
    for d in dims:
        print(f"{d:>5} " + " | ".join(f"{results[d][n] * 1e3:>22.4f}" for n in names))

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate(names):
        ax.loglog(dims, [results[d][name] * 1e3 for d in dims], "o-", color=f"C{i}", label=name)
    ax.set_xlabel("D")
    ax.set_ylabel("ms per call (median)")
    ax.set_title("log|det J|: dense vs triangular")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "logdet_cost.png", dpi=80)
    plt.close(fig)
    return results


if __name__ == "__main__":
    main()
