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

One JSON line per (task, simulations, seed, library) goes to ``--results``; the summary table
(mean ± s.d. over seeds) is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from exactflow import Flow, StandardNormal, sbi
from exactflow.transforms import Transform

# steps per simulation budget when --steps is not given (batch 256: ~20 epochs at 100k)
AUTO_STEPS = {1_000: 3000, 10_000: 5000, 100_000: 10_000}
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


def run_cell(task_name, simulations, seed, library, steps, observations, samples, batch_size):
    task = sbi.get_task(task_name)
    model = "nsf" if library == "exactflow" else zuko_nsf
    start = time.perf_counter()
    posterior = sbi.train_npe(
        task, simulations, model=model, steps=steps, batch_size=batch_size, seed=seed
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
        "c2st": statistics.fmean(scores),
        "c2st_per_observation": scores,
        "best_val_nll": posterior.result.best_val,
        "train_seconds": round(train_time, 1),
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
                row.append(f"{v[0]:.3f}")
            else:
                row.append(f"{statistics.fmean(v):.3f} ± {statistics.stdev(v):.3f}")
        lines.append(f"| {task} | {sims} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=sorted(sbi.TASKS), choices=sorted(sbi.TASKS))
    ap.add_argument("--simulations", nargs="+", type=int, default=[1_000, 10_000, 100_000])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: by budget)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--observations", type=int, default=3, help="observations per cell (>= 3)")
    ap.add_argument("--samples", type=int, default=10_000, help="posterior and reference samples")
    ap.add_argument("--results", type=Path, default=Path("sbi.jsonl"))
    ap.add_argument("--smoke", action="store_true", help="tiny budgets: checks every code path")
    ap.add_argument(
        "--summarise", type=Path, default=None, help="print the table of a results file"
    )
    args = ap.parse_args()
    if args.summarise is not None:
        rows = [json.loads(line) for line in args.summarise.read_text().splitlines() if line]
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
                    )
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    with open(args.results, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    print(summarise(rows))


if __name__ == "__main__":
    main()
