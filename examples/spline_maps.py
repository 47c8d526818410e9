"""Monotone spline maps: the rational-quadratic (NSF) and monotone cubic elementwise maps
with random parameters, their derivatives (the Jacobian diagonal), and the inverse round
trip; then an NSF with coupling layers trained on the checkerboard density.

    python examples/spline_maps.py [--smoke] [--out docs/figures]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from exactflow.data import toy_splits
from exactflow.models import NSF
from exactflow.transforms import CubicSpline, RationalQuadraticSpline


def train_nsf(steps: int) -> tuple[torch.nn.Module, float, float]:
    """An NSF (coupling, 4 layers, 8 bins on [-4, 4]) fitted to the checkerboard; returns the
    flow, its test NLL and the seconds spent training."""
    data = toy_splits("checkerboard", n_train=10_000, n_val=10, n_test=5000, seed=0)
    torch.manual_seed(0)
    flow = NSF(2, transforms=4, hidden=(64, 64), bins=8, bound=4.0, autoregressive=False)
    opt = torch.optim.Adam(flow.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = data.train[torch.randint(len(data.train), (256,), generator=gen)]
        loss = -flow.log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        nll = float(-flow.log_prob(data.test).mean())
    return flow, nll, seconds


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run (CI)")
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads")
    args = ap.parse_args(argv)
    # small matmuls: one thread is as fast, and does not fight other jobs for the cores
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    x = torch.linspace(-4.0, 4.0, 801, dtype=torch.float64)

    fig, ax = plt.subplots(1, 3, figsize=(12, 3.6))
    results = {}
    for k, (name, spline) in enumerate(
        (
            ("rational-quadratic", RationalQuadraticSpline(bins=6, bound=3.0)),
            ("monotone cubic", CubicSpline(bins=6, bound=3.0)),
        )
    ):
        raw = 0.7 * torch.randn(spline.num_params, generator=gen, dtype=torch.float64)
        params = raw.expand(*x.shape, -1)
        y, logd = spline.forward(x, params)
        back, _ = spline.inverse(y, params)
        results[f"{name} round trip"] = float((back - x).abs().max())
        print(f"{name:18s} max |inverse(forward(x)) - x| = {results[f'{name} round trip']:.1e}")
        ax[0].plot(x, y, color=f"C{k}", label=name)
        ax[1].semilogy(x, logd.exp(), color=f"C{k}", label=name)
    ax[0].plot(x, x, ":", color="0.5", lw=0.8)
    ax[0].set_title("y = spline(x), box [-3, 3], identity outside")
    ax[1].set_title("dy/dx (Jacobian diagonal)")
    for a in ax[:2]:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)

    flow, nll, seconds = train_nsf(3 if args.smoke else 1000)
    results["nsf test nll"] = nll
    print(f"NSF coupling on checkerboard: test NLL {nll:.3f} after {seconds:.0f} s of training")
    ticks = torch.linspace(-4.0, 4.0, 120)
    mesh = torch.stack(torch.meshgrid(ticks, ticks, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        dens = flow.log_prob(mesh).exp().reshape(120, 120)
    ax[2].imshow(dens.numpy(), origin="lower", extent=(-4, 4, -4, 4))
    ax[2].set_title(f"NSF on checkerboard: test NLL {nll:.2f}")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "spline_maps.png", dpi=70)
    plt.close(fig)
    return results


if __name__ == "__main__":
    main()
