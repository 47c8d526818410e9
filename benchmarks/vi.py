"""Variational inference on the Rezende & Mohamed (2015) energies U1-U4.

For each target, fits a 32-layer planar flow (sampling direction closed form) and a neural
spline flow by reverse KL, and reports the ELBO and the importance-sampled log Z against
log Z by grid quadrature; writes ``docs/vi_<target>.png`` (exp(-U) next to both q's) and
a JSON line per fit.

    nice -n 19 python benchmarks/vi.py [--targets U1 U2 U3 U4] [--planar-steps 3000]
        [--nsf-steps 1500] [--out docs]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from exactflow.models import NSF, Planar
from exactflow.vi import fit_vi, log_z_grid, plot_vi


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", default=["U1", "U2", "U3", "U4"])
    p.add_argument("--flows", nargs="+", default=["planar", "nsf"], choices=["planar", "nsf"])
    p.add_argument("--planar-steps", type=int, default=3000)
    p.add_argument("--nsf-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--anneal", type=int, default=0, help="beta annealing steps (0 = off)")
    p.add_argument("--eval-samples", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs")
    p.add_argument("--results", default=None, help="append JSON lines here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.targets:
        log_z = log_z_grid(name)
        flows = {}
        specs = [
            ("planar-32", lambda: Planar(2, 32, for_sampling=True), args.planar_steps, 5e-3),
            ("nsf-4x32", lambda: NSF(2, transforms=4, hidden=(32, 32)), args.nsf_steps, 3e-3),
        ]
        for label, build, steps, lr in specs:
            if label.split("-")[0] not in args.flows:
                continue
            torch.manual_seed(args.seed)
            flow = build()
            flow.validate = False
            t0 = time.perf_counter()
            res = fit_vi(
                flow,
                name,
                steps=steps,
                batch_size=args.batch_size,
                lr=lr,
                anneal=args.anneal,
                seed=args.seed,
                eval_samples=args.eval_samples,
            )
            row = {
                "target": name,
                "flow": label,
                "log_z_grid": log_z,
                "gap": log_z - res.elbo,
                **res.as_dict(),
                "total_s": time.perf_counter() - t0,
            }
            print(json.dumps(row), flush=True)
            if args.results:
                with open(args.results, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
            flows[f"{label}\nELBO {res.elbo:.3f} (log Z {log_z:.3f})"] = flow
        plot_vi(flows, name, out / f"vi_{name}.png", n=150, title=name)


if __name__ == "__main__":
    main()
