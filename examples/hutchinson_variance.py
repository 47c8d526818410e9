"""Hutchinson's trace estimator ``tr A ≈ εᵀ A ε``: variance of Rademacher vs Gaussian probes.

For ``f(z) = A z`` the estimate from :func:`exactflow.continuous.hutchinson_divergence` is
unbiased with variance ``2‖S‖²_F`` (Gaussian ε) or ``2(‖S‖²_F − Σ a_ii²)`` (Rademacher ε),
``S = (A + Aᵀ)/2``. The script draws many probes per D, compares the empirical variance
with these closed forms, and plots the relative error of a one-probe trace against D.

    python examples/hutchinson_variance.py [--smoke] [--out docs/figures]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from exactflow.continuous import exact_divergence, hutchinson_divergence, sample_probe


def estimates(a: torch.Tensor, probes: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """``probes`` one-probe trace estimates of ``a`` ``(D, D)``: shape ``(probes,)``."""
    z = torch.zeros(probes, a.shape[0], dtype=a.dtype, requires_grad=True)
    f = z @ a.T  # every row has Jacobian a
    eps = sample_probe(z, kind, generator=gen)
    trace, _ = hutchinson_divergence(f, z, eps)
    return trace.detach()


def closed_form_variance(a: torch.Tensor, kind: str) -> float:
    """Variance of ``εᵀ a ε`` for the probe distribution ``kind``."""
    s = 0.5 * (a + a.T)
    frob = float(s.square().sum())
    return 2.0 * frob if kind == "gaussian" else 2.0 * (frob - float(a.diagonal().square().sum()))


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run (CI)")
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = ap.parse_args(argv)
    dims = [2, 8] if args.smoke else [2, 4, 8, 16, 32, 64, 128]
    probes = 500 if args.smoke else 20_000
    gen = torch.Generator().manual_seed(0)

    rows: dict[int, dict[str, float]] = {}
    print(f"{probes} probes per D; A = I + N(0, 1/D) entries")
    print(
        f"{'D':>4} {'tr A':>8} {'exact div':>9} | {'kind':>10} {'mean':>8} {'var':>9} {'closed':>9}"
    )
    for d in dims:
        a = (
            torch.eye(d, dtype=torch.float64)
            + torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
        )
        z = torch.zeros(1, d, dtype=torch.float64, requires_grad=True)
        exact = float(exact_divergence(z @ a.T, z)[0])
        rows[d] = {"trace": float(a.trace())}
        for kind in ("rademacher", "gaussian"):
            est = estimates(a, probes, kind, gen)
            rows[d][f"{kind} var"] = float(est.var())
            rows[d][f"{kind} closed"] = closed_form_variance(a, kind)
            print(
                f"{d:>4} {float(a.trace()):>8.3f} {exact:>9.3f} | {kind:>10} {float(est.mean()):>8.3f} "
                f"{float(est.var()):>9.3f} {closed_form_variance(a, kind):>9.3f}"
            )

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, kind in enumerate(("rademacher", "gaussian")):
        rel = [rows[d][f"{kind} var"] ** 0.5 / abs(rows[d]["trace"]) for d in dims]
        ref = [rows[d][f"{kind} closed"] ** 0.5 / abs(rows[d]["trace"]) for d in dims]
        ax.loglog(dims, rel, "o", color=f"C{k}", label=f"{kind}: measured")
        ax.loglog(dims, ref, "-", color=f"C{k}", alpha=0.6, label=f"{kind}: closed form")
    ax.set_xlabel("D")
    ax.set_ylabel("std of one-probe estimate / |tr A|")
    ax.set_title("Hutchinson trace estimator, A = I + G/√D")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "hutchinson_variance.png", dpi=80)
    plt.close(fig)
    return rows


if __name__ == "__main__":
    main()
