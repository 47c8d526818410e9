"""Neural posterior estimation on the four SBI benchmark tasks: C2ST against reference posteriors.

For each task, simulation budget, seed and library, trains q(theta | x) with
:func:`exactflow.sbi.train_npe` and reports the C2ST accuracy (0.5 = indistinguishable) of
its samples against the task's reference posterior, averaged over the first ``--observations``
of :func:`exactflow.sbi.observations` (seed 0). The libraries:

* ``exactflow``: ``exactflow.models.NSF(D, context=D_x)``: 5 autoregressive rational-quadratic
  spline layers, (128, 128) hidden units, 8 bins;
* ``zuko``: ``zuko.flows.NSF(D, D_x, transforms=5, hidden_features=(128, 128), bins=8)``, the
  same architecture, wrapped as an exactflow Transform.

Both are trained by the same loop (exactflow's Trainer through ``train_npe``: the same
simulations, split, support bijection, theta and x standardisation, optimiser, schedule,
steps, batch size and validation-based weight selection) and judged on the same observations
and reference samples.

    nice -n 19 python benchmarks/sbi.py                       # everything (hours on a CPU)
    python benchmarks/sbi.py --tasks two_moons --simulations 10000 --libraries exactflow
    python benchmarks/sbi.py --smoke                          # a tiny run of every code path
    python benchmarks/sbi.py --summarise sbi.jsonl            # the table of saved results
    python benchmarks/sbi.py --sbc docs/images/sbi_sbc_gaussian_linear.png
    python benchmarks/sbi.py --figure docs/images/sbi_two_moons.png

One JSON line per (task, simulations, seed, library) goes to ``--results``; the summary table
(mean ± standard error over seeds, with the number of seeds) is printed at the end.

``--sbc PNG`` is simulation-based calibration of exactflow's posterior on ``--tasks`` (default
gaussian_linear) at ``--simulations`` (default 10 000): 1000 runs of L = 100 posterior draws,
a Kolmogorov-Smirnov p-value per dimension and the rank histograms written to ``PNG``.
``--figure PNG`` draws exactflow's two_moons posterior (10 000 simulations) next to the
reference posterior at the first three benchmark observations, with each one's C2ST.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path

import torch

from exactflow import Flow, StandardNormal, sbi
from exactflow.transforms import Transform

# steps per simulation budget when --steps is not given (batch 256: ~20 epochs at 100k)
AUTO_STEPS = {1_000: 3000, 10_000: 5000, 100_000: 10_000}
# --lr's default is train_npe's own, so the benchmark follows the library's recipe
LR = inspect.signature(sbi.train_npe).parameters["lr"].default
LIBRARIES = ("exactflow", "zuko")


class ZukoTransform(Transform):
    """A zuko conditional transform as an exactflow Transform (``forward`` = data -> noise)."""

    event_dim = 1

    def __init__(self, lazy, context: int):
        super().__init__()
        self.lazy = lazy
        self.context_features = context

    def forward(self, x, context=None):
        return self.lazy(context).call_and_ladj(x)

    def inverse(self, z, context=None):
        return self.lazy(context).inv.call_and_ladj(z)


def zuko_nsf(features: int, context: int) -> Flow:
    """zuko's NSF with the exactflow NSF's architecture, on exactflow's standard normal base."""
    import zuko

    nsf = zuko.flows.NSF(features, context, transforms=5, hidden_features=(128, 128), bins=8)
    return Flow(ZukoTransform(nsf.transform, context), StandardNormal((features,)))


def run_cell(task_name, simulations, seed, library, steps, observations, samples, batch_size, lr):
    task = sbi.get_task(task_name)
    model = "nsf" if library == "exactflow" else zuko_nsf
    start = time.perf_counter()
    posterior = sbi.train_npe(
        task, simulations, model=model, steps=steps, batch_size=batch_size, lr=lr, seed=seed
    )
    train_time = time.perf_counter() - start
    _, x_o = sbi.observations(task, observations, seed=0)
    scores = []
    for i in range(observations):
        g = torch.Generator().manual_seed(1000 * seed + i)
        ref = task.reference_posterior(x_o[i], samples, g)
        approx = posterior.sample(samples, x_o[i], g)
        scores.append(float(sbi.c2st(ref, approx, seed=i)))
    return {
        "task": task_name,
        "simulations": simulations,
        "seed": seed,
        "library": library,
        "steps": steps,
        "lr": lr,
        "c2st": statistics.fmean(scores),
        "c2st_per_observation": scores,
        "best_val_nll": posterior.result.best_val,
        "train_seconds": round(train_time, 1),
    }


def _default(values: list, default: list) -> list:
    return default if values is None else values


def sbc(task_name, simulations, seed, steps, batch_size, lr, path, runs=1000, draws=100):
    """SBC ranks of exactflow's posterior, their KS p-values, and the rank-histogram picture."""
    task = sbi.get_task(task_name)
    start = time.perf_counter()
    posterior = sbi.train_npe(
        task, simulations, steps=steps, batch_size=batch_size, lr=lr, seed=seed
    )
    train_time = time.perf_counter() - start
    g = torch.Generator().manual_seed(seed)
    ranks = sbi.sbc_ranks(posterior.sampler(), task, runs, draws, g)
    pvalues = sbi.sbc_uniformity(ranks, draws)
    sbi.plot_sbc(ranks, path, draws)
    return {
        "sbc": task_name,
        "simulations": simulations,
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "runs": runs,
        "draws": draws,
        "ks_pvalues": [round(float(p), 4) for p in pvalues],
        "min_pvalue": round(float(pvalues.min()), 4),
        "train_seconds": round(train_time, 1),
        "plot": str(path),
    }


def figure(path, simulations, seed, steps, batch_size, lr, n=10_000, observations=3):
    """exactflow's two_moons posterior beside the reference one at the benchmark observations."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    task = sbi.get_task("two_moons")
    posterior = sbi.train_npe(
        task, simulations, steps=steps, batch_size=batch_size, lr=lr, seed=seed
    )
    _, x_o = sbi.observations(task, observations, seed=0)
    fig = Figure(figsize=(3.0 * observations, 6.0), dpi=100)
    FigureCanvasAgg(fig)
    scores = []
    for i in range(observations):
        g = torch.Generator().manual_seed(1000 * seed + i)
        ref = task.reference_posterior(x_o[i], n, g)
        approx = posterior.sample(n, x_o[i], g)
        scores.append(float(sbi.c2st(ref, approx, seed=i)))
        lo = torch.minimum(ref.min(0).values, approx.min(0).values).double() - 0.05
        hi = torch.maximum(ref.max(0).values, approx.max(0).values).double() + 0.05
        for row, (samples, label) in enumerate([(ref, "reference"), (approx, "exactflow NPE")]):
            ax = fig.add_subplot(2, observations, row * observations + i + 1)
            s = samples.double().numpy()
            ax.scatter(s[:, 0], s[:, 1], s=0.5, alpha=0.3, color="C0" if row == 0 else "C1")
            ax.set_xlim(float(lo[0]), float(hi[0]))
            ax.set_ylim(float(lo[1]), float(hi[1]))
            ax.set_aspect("equal")
            ax.tick_params(labelsize=7)
            x0, x1 = (float(v) for v in x_o[i])
            title = f"x_o = ({x0:.2f}, {x1:.2f})" if row == 0 else f"C2ST {scores[-1]:.3f}"
            ax.set_title(f"{label}\n{title}", fontsize=9)
            ax.set_xlabel("theta_1", fontsize=8)
            ax.set_ylabel("theta_2", fontsize=8)
    fig.suptitle(f"two_moons posterior, {simulations} simulations, {n} samples each", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return {
        "figure": str(path),
        "simulations": simulations,
        "seed": seed,
        "c2st": scores,
    }


def summarise(rows: list[dict]) -> str:
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        cells.setdefault((r["task"], r["simulations"], r["library"]), []).append(r["c2st"])
    libraries = [lib for lib in LIBRARIES if any(k[2] == lib for k in cells)]
    lines = [
        "| task | simulations | " + " | ".join(libraries) + " |",
        "|---|---|" + "---|" * len(libraries),
    ]
    for task, sims in sorted({(k[0], k[1]) for k in cells}):
        row = []
        for lib in libraries:
            v = cells.get((task, sims, lib))
            if not v:
                row.append("–")
            elif len(v) == 1:
                row.append(f"{v[0]:.3f} (1 seed)")
            else:
                se = statistics.stdev(v) / len(v) ** 0.5
                row.append(f"{statistics.fmean(v):.3f} ± {se:.3f} ({len(v)} seeds)")
        lines.append(f"| {task} | {sims} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=None, choices=sorted(sbi.TASKS))
    ap.add_argument("--simulations", nargs="+", type=int, default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: by budget)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=LR, help="Adam learning rate of train_npe")
    ap.add_argument("--observations", type=int, default=3, help="observations per cell (>= 3)")
    ap.add_argument("--samples", type=int, default=10_000, help="posterior and reference samples")
    ap.add_argument("--results", type=Path, default=Path("sbi.jsonl"))
    ap.add_argument("--smoke", action="store_true", help="tiny budgets: checks every code path")
    ap.add_argument(
        "--summarise", type=Path, default=None, help="print the table of a results file"
    )
    ap.add_argument("--sbc", type=Path, default=None, help="run SBC; write its PNG here")
    ap.add_argument("--figure", type=Path, default=None, help="draw the two_moons figure here")
    args = ap.parse_args()
    if args.sbc is not None or args.figure is not None:
        sims = _default(args.simulations, [10_000])[0]
        steps = args.steps or AUTO_STEPS.get(sims, 5000)
        if args.sbc is not None:
            task = _default(args.tasks, ["gaussian_linear"])[0]
            row = sbc(task, sims, args.seeds[0], steps, args.batch_size, args.lr, args.sbc)
        else:
            row = figure(
                args.figure, sims, args.seeds[0], steps, args.batch_size, args.lr, args.samples
            )
        print(json.dumps(row), flush=True)
        with open(args.results, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        return
    args.tasks = _default(args.tasks, sorted(sbi.TASKS))
    args.simulations = _default(args.simulations, [1_000, 10_000, 100_000])
    if args.summarise is not None:
        rows = [json.loads(line) for line in args.summarise.read_text().splitlines() if line]
        rows = [r for r in rows if "library" in r]
        print(summarise(rows))
        return
    if args.smoke:
        args.simulations, args.steps, args.samples = [300], 20, 300
    rows = []
    for task in args.tasks:
        for sims in args.simulations:
            steps = args.steps or AUTO_STEPS.get(sims, 5000)
            for seed in args.seeds:
                for lib in args.libraries:
                    row = run_cell(
                        task,
                        sims,
                        seed,
                        lib,
                        steps,
                        args.observations,
                        args.samples,
                        args.batch_size,
                        args.lr,
                    )
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    with open(args.results, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    print(summarise(rows))


if __name__ == "__main__":
    main()
