"""Flow matching and rectified flow: the ODE trajectories they learn, and how straight they are.

Four velocity fields on 8 Gaussians, the same ``VelocityMLP`` and budget for each: CFM
(independent noise/data pairs), OT-CFM (minibatch optimal-transport pairs), rectified flow
(independent pairs, ``σ = 0``) and the same rectified flow after one reflow (refitted on its
own noise/sample pairs). For each the script measures

* straightness ``S = ∫ E|(z - x(0)) - v(t, x(t))|² dt`` and the path-length ratio (1 = straight),
  from :func:`exactflow.matching.straightness`;
* the sliced Wasserstein-2 distance to held-out data of samples from one Euler step and from
  the adaptive ``dopri5`` solve;
* the exact test NLL (instantaneous change of variables, exact trace, ``dopri5``),

and plots trajectories from noise (``t = 1``) to data (``t = 0``) and one-step samples.

    python examples/flow_matching_paths.py [--smoke] [--out docs/figures]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from exactflow.data.toy import toy_splits
from exactflow.matching import fit, reflow, sliced_wasserstein, straightness, trajectory
from exactflow.models import CFM, OTCFM, RectifiedFlow


def evaluate(flow, test: torch.Tensor, z: torch.Tensor, seed: int) -> dict[str, float]:
    """Straightness, one-step and dopri5 sample quality, and exact test NLL of ``flow``."""
    s, ratio = straightness(flow.velocity, z, steps=32)
    g = torch.Generator().manual_seed(seed)
    one_step = flow.sample(test.shape[0], generator=g, steps=1)
    flow.reset_nfe()
    g = torch.Generator().manual_seed(seed)
    adaptive = flow.sample(test.shape[0], generator=g)
    nfe = flow.nfe["forward"]
    with torch.no_grad():
        nll = -flow.log_prob(test).mean()
    sw = torch.Generator().manual_seed(seed + 1)
    return {
        "straightness": float(s),
        "length ratio": float(ratio),
        "1-step SW": float(sliced_wasserstein(one_step, test, generator=sw)),
        "dopri5 SW": float(sliced_wasserstein(adaptive, test, generator=sw)),
        "dopri5 NFE": float(nfe),
        "test NLL": float(nll),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run (CI)")
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = ap.parse_args(argv)
    steps, reflow_steps, pairs, n_test = (
        (30, 20, 256, 256) if args.smoke else (2000, 1000, 10_000, 2000)
    )
    hidden = (32, 32) if args.smoke else (64, 64, 64)
    splits = toy_splits("8gaussians", n_train=20_000, n_val=1, n_test=n_test, seed=0)
    train, test = splits.train, splits.test
    z = torch.randn(n_test, 2, generator=torch.Generator().manual_seed(1))

    models = {}
    for name, builder in (("CFM", CFM), ("OT-CFM", OTCFM), ("rectified flow", RectifiedFlow)):
        torch.manual_seed(0)
        flow = builder(2, hidden=hidden)
        fit(flow, train, steps=steps, lr=2e-3, generator=torch.Generator().manual_seed(0))
        models[name] = flow
    # reflow a copy, so the rectified flow before reflow is still there to compare
    rf = RectifiedFlow(2, hidden=hidden)
    rf.load_state_dict(models["rectified flow"].state_dict())
    reflow(rf, pairs, steps=reflow_steps, lr=1e-3, generator=torch.Generator().manual_seed(2))
    models["rectified flow + reflow"] = rf

    results = {}
    print(f"8gaussians, {steps} fit steps each, reflow: {pairs} pairs, {reflow_steps} steps")
    print(
        f"{'model':<24} {'S':>7} {'length':>7} {'1-step SW':>10} {'dopri5 SW':>10} "
        f"{'NFE':>5} {'test NLL':>9}"
    )
    for name, flow in models.items():
        r = evaluate(flow, test, z, seed=3)
        results[name] = r
        print(
            f"{name:<24} {r['straightness']:7.3f} {r['length ratio']:7.3f} "
            f"{r['1-step SW']:10.3f} {r['dopri5 SW']:10.3f} {r['dopri5 NFE']:5.0f} "
            f"{r['test NLL']:9.3f}"
        )

    fig, ax = plt.subplots(2, len(models), figsize=(4 * len(models), 8))
    shown = z[:150]
    for k, (name, flow) in enumerate(models.items()):
        points, _ = trajectory(flow.velocity, shown, steps=32)
        for i in range(shown.shape[0]):
            ax[0, k].plot(points[:, i, 0], points[:, i, 1], color="0.6", lw=0.5)
        ax[0, k].scatter(points[0, :, 0], points[0, :, 1], s=4, color="C0", label="noise, t = 1")
        ax[0, k].scatter(points[-1, :, 0], points[-1, :, 1], s=4, color="C3", label="data, t = 0")
        r = results[name]
        ax[0, k].set_title(f"{name}\nS = {r['straightness']:.3f}, length {r['length ratio']:.3f}")
        one = flow.sample(1000, generator=torch.Generator().manual_seed(4), steps=1)
        ax[1, k].scatter(test[:1000, 0], test[:1000, 1], s=2, color="0.8", label="test data")
        ax[1, k].scatter(one[:, 0], one[:, 1], s=2, color="C2", label="1 Euler step")
        ax[1, k].set_title(f"one Euler step: SW = {r['1-step SW']:.3f}")
        for a in ax[:, k]:
            a.set_xlim(-3.5, 3.5)
            a.set_ylim(-3.5, 3.5)
            a.set_aspect("equal")
    ax[0, 0].legend(fontsize=7, loc="lower left")
    ax[1, 0].legend(fontsize=7, loc="lower left", markerscale=4)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "flow_matching_paths.png", dpi=60)
    plt.close(fig)
    return results


if __name__ == "__main__":
    main()
