"""Change of variables in 1-D and 2-D: exp(log_prob) against histograms of samples.

1-D: ``x = tanh(z)`` with ``z ~ N(0, 1)``; the flow's forward (data -> noise) is ``atanh``, so
``log p(x) = log N(atanh x) - log(1 - x²)``. 2-D: a fixed planar map bends a Gaussian; the
density from ``log_prob`` is compared with a 2-D histogram and its grid integral printed.

    python examples/change_of_variables.py [--smoke] [--out docs/figures]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import exactflow as ef
from exactflow.transforms import Inverse, Planar, Tanh


def one_d(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Samples, a grid, exp(log_prob) on it, and the max error against the closed form."""
    flow = ef.Flow(Inverse(Tanh(event_dim=0)), ef.StandardNormal(())).double()
    x = flow.sample(n, generator=gen)
    grid = torch.linspace(-0.995, 0.995, 400, dtype=torch.float64)
    logp = flow.log_prob(grid)
    closed = -0.5 * torch.atanh(grid) ** 2 - 0.5 * math.log(2 * math.pi) - torch.log1p(-(grid**2))
    return x, grid, logp.exp(), float((logp - closed).abs().max())


def two_d(n: int, gen: torch.Generator):
    """A planar flow with hand-set parameters: samples, grid density, and its grid integral."""
    planar = Planar(2)
    with torch.no_grad():
        planar.w.copy_(torch.tensor([3.0, 0.0]))
        planar.u.copy_(torch.tensor([1.5, 1.0]))
        planar.b.fill_(0.0)
    flow = ef.Flow(Inverse(planar), ef.StandardNormal((2,))).double()
    with torch.no_grad():
        x = flow.sample(n, generator=gen)
        ticks = torch.linspace(-4.0, 4.0, 200, dtype=torch.float64)
        mesh = torch.stack(torch.meshgrid(ticks, ticks, indexing="xy"), -1).reshape(-1, 2)
        dens = flow.log_prob(mesh).exp().reshape(200, 200)
    cell = float((ticks[1] - ticks[0]) ** 2)
    return x, ticks, dens, float(dens.sum()) * cell


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run (CI)")
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = ap.parse_args(argv)
    n = 2_000 if args.smoke else 200_000
    gen = torch.Generator().manual_seed(0)

    x1, grid, dens1, err1 = one_d(n, gen)
    x2, _, dens2, mass = two_d(n, gen)
    print(f"1-D: max |log_prob - closed form| = {err1:.2e}")
    print(f"2-D: grid integral of exp(log_prob) over [-4, 4]^2 = {mass:.4f}")

    fig, ax = plt.subplots(1, 3, figsize=(12, 3.6))
    ax[0].hist(x1.numpy(), bins=100, density=True, color="0.75", label="samples x = tanh(z)")
    ax[0].plot(grid, dens1, "C3", lw=1.5, label="exp(flow.log_prob(x))")
    ax[0].set_title("1-D: x = tanh(z)")
    ax[0].legend(fontsize=8)
    ax[1].hist2d(x2[:, 0].numpy(), x2[:, 1].numpy(), bins=100, range=[[-4, 4], [-4, 4]])
    ax[1].set_title("2-D: histogram of samples")
    ax[2].imshow(dens2.numpy(), origin="lower", extent=(-4, 4, -4, 4))
    ax[2].set_title(f"2-D: exp(log_prob), integral {mass:.3f}")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "change_of_variables.png", dpi=70)
    plt.close(fig)
    return {"err_1d": err1, "mass_2d": mass}


if __name__ == "__main__":
    main()
