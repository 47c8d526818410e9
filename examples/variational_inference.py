"""Variational inference with a flow: fit q to the unnormalised density exp(−U1) (Rezende &
Mohamed, 2015) by reverse KL, and compare the ELBO and the importance-sampled log Z with
log Z by quadrature on a grid.

    python examples/variational_inference.py [--smoke] [--out docs/figures]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from exactflow.models import PlanarFlow
from exactflow.vi import TARGETS, fit_vi, learnable_base, log_z_grid


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run (CI)")
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)  # small matmuls; do not fight other jobs for cores
    target = TARGETS["U1"]

    torch.manual_seed(0)
    # closed-form direction = noise -> sample; a base with learnable mean and scale
    flow = learnable_base(PlanarFlow(2, transforms=32, for_sampling=True))
    result = fit_vi(
        flow,
        target,
        steps=5 if args.smoke else 3000,
        lr=5e-3,
        warmup=0 if args.smoke else 100,
        eval_samples=2000 if args.smoke else 100_000,
        anneal=0 if args.smoke else 1000,
    )
    reference = log_z_grid(target)
    out = {
        "elbo": result.elbo,
        "elbo_se": result.elbo_se,
        "log_z_is": result.log_z,
        "log_z_is_se": result.log_z_se,
        "log_z_grid": reference,
        "seconds": result.wall_time,
    }
    print(
        f"planar-32 on U1, {result.steps} steps, {result.wall_time:.0f} s: "
        f"ELBO {result.elbo:.4f} ± {result.elbo_se:.4f}, "
        f"IS log Z {result.log_z:.4f} ± {result.log_z_se:.4f}, grid log Z {reference:.4f}"
    )

    ticks = torch.linspace(-4.0, 4.0, 200)
    mesh = torch.stack(torch.meshgrid(ticks, ticks, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        samples = flow.sample(20_000 if not args.smoke else 500)
    fig, ax = plt.subplots(1, 3, figsize=(11, 3.5))
    ax[0].imshow(
        target(mesh).exp().reshape(200, 200).numpy(), origin="lower", extent=(-4, 4, -4, 4)
    )
    ax[0].set_title("target exp(−U1(z))")
    ax[1].hist2d(samples[:, 0].numpy(), samples[:, 1].numpy(), bins=100, range=[[-4, 4], [-4, 4]])
    ax[1].set_title("samples of q (planar, 32 layers)")
    losses = torch.tensor(result.losses)
    ax[2].plot(losses.numpy(), color="0.6", lw=0.5)
    ax[2].axhline(-reference, color="C3", ls="--", label="−log Z (grid)")
    ax[2].set_ylim(-reference - 1.0, -reference + 4.0)
    ax[2].set_xlabel("step")
    ax[2].set_title("loss E_q[log q − β log p~]")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "variational_inference.png", dpi=70)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
