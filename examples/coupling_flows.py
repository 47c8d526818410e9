"""NICE (additive, volume-preserving couplings + one diagonal scale) vs RealNVP (affine
couplings) trained on two moons by maximum likelihood; test NLL and density plots.

    python examples/coupling_flows.py [--smoke] [--out docs/figures]
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
from exactflow.models import NICE, RealNVP


def fit(flow, train: torch.Tensor, steps: int, seed: int = 0) -> float:
    """Adam on the mean negative log-likelihood, batches of 256; returns seconds taken."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(flow.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = train[torch.randint(len(train), (256,), generator=gen)]
        loss = -flow.log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def density_grid(flow, lim: float = 3.5, n: int = 120) -> torch.Tensor:
    """``exp(log_prob)`` on an ``n x n`` grid over ``[-lim, lim]²``."""
    ticks = torch.linspace(-lim, lim, n)
    mesh = torch.stack(torch.meshgrid(ticks, ticks, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        return flow.log_prob(mesh).exp().reshape(n, n)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run (CI)")
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads")
    args = ap.parse_args(argv)
    # small matmuls: one thread is as fast, and does not fight other jobs for the cores
    torch.set_num_threads(args.threads)
    steps = 5 if args.smoke else 1000
    data = toy_splits("moons", n_train=5000, n_val=10, n_test=5000, seed=0)

    torch.manual_seed(0)
    flows = {
        "NICE": NICE(2, transforms=6, hidden=(64, 64)),
        "RealNVP": RealNVP(2, transforms=6, hidden=(64, 64)),
    }
    nll = {}
    fig, ax = plt.subplots(1, 3, figsize=(10.5, 3.4))
    ax[0].scatter(data.test[:2000, 0], data.test[:2000, 1], s=1, color="0.3")
    ax[0].set_title("data (two moons)")
    for i, (name, flow) in enumerate(flows.items(), start=1):
        seconds = fit(flow, data.train, steps)
        with torch.no_grad():
            nll[name] = float(-flow.log_prob(data.test).mean())
        params = sum(p.numel() for p in flow.parameters())
        print(
            f"{name:8s} {params:6d} params  {steps} steps  {seconds:5.1f} s  test NLL {nll[name]:.3f}"
        )
        ax[i].imshow(density_grid(flow).numpy(), origin="lower", extent=(-3.5, 3.5, -3.5, 3.5))
        ax[i].set_title(f"{name}: test NLL {nll[name]:.3f}")
    for a in ax:
        a.set_xlim(-3.5, 3.5)
        a.set_ylim(-3.5, 3.5)
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "coupling_flows.png", dpi=70)
    plt.close(fig)
    return nll


if __name__ == "__main__":
    main()
