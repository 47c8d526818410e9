"""Variational inference on the Rezende & Mohamed (2015) energies U1-U4.

For each target and seed, fits a 32-layer planar flow (sampling direction closed form) and a
neural spline flow by reverse KL, each on a base with learnable mean and scale, and reports
the ELBO (from 10^5 samples of q) and the importance-sampled log Z against log Z by grid
quadrature; writes ``docs/vi_<target>.png`` (exp(-U) next to both q's, first seed) and one
JSON line per fit, then a summary table (gap = log Z - ELBO, mean ± s.d. over seeds).

    nice -n 19 python benchmarks/vi.py [--targets U1 U2 U3 U4] [--seeds 0 1 2]
        [--flows planar nsf] [--planar-steps 15000] [--nsf-steps 2000] [--out docs]
        [--results vi.jsonl] [--save states/]
    nice -n 19 python benchmarks/vi.py --plot-only --save states/   # figures from saved q's
    python benchmarks/vi.py --summarise vi.jsonl                     # table over all fits
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from exactflow.models import NSF, PlanarFlow
from exactflow.vi import evaluate_vi, fit_vi, learnable_base, log_z_grid, plot_vi


def build(kind: str) -> torch.nn.Module:
    if kind == "planar":
        return learnable_base(PlanarFlow(2, transforms=32, for_sampling=True))
    # knot-derivative factors in (0.5, 2), as the slow test's NSF (docs/guide/vi.md)
    return learnable_base(
        NSF(2, transforms=4, hidden=(32, 32), map_kwargs={"derivative_range": (0.5, 2)})
    )


LABELS = {"planar": "planar-32", "nsf": "nsf-4x32"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", default=["U1", "U2", "U3", "U4"])
    p.add_argument("--flows", nargs="+", default=["planar", "nsf"], choices=["planar", "nsf"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--planar-steps", type=int, default=15000)
    p.add_argument("--nsf-steps", type=int, default=2000)
    p.add_argument("--planar-lr", type=float, default=5e-3)
    p.add_argument("--nsf-lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--warmup", type=int, default=100, help="learning-rate warm-up steps")
    p.add_argument("--planar-anneal", type=int, default=5000, help="beta annealing steps (0 = off)")
    p.add_argument("--nsf-anneal", type=int, default=1000, help="beta annealing steps (0 = off)")
    p.add_argument("--eval-samples", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs", help="folder for vi_<target>.png ('' = no plots)")
    p.add_argument("--results", default=None, help="append JSON lines here")
    p.add_argument(
        "--summarise",
        default=None,
        help="only print the table of a --results file (fits split over several processes)",
    )
    p.add_argument("--save", default=None, help="folder for each fitted q's state dict")
    p.add_argument(
        "--plot-only",
        action="store_true",
        help="no fitting: plot the first seed's q's from the --save folder",
    )
    args = p.parse_args()
    if args.plot_only:
        torch.set_num_threads(args.threads)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for name in args.targets:
            flows = {}
            log_z = log_z_grid(name)
            for kind in args.flows:
                flow = build(kind)
                path = Path(args.save) / f"{name}_{kind}_{args.seeds[0]}.pt"
                flow.load_state_dict(torch.load(path, weights_only=True))
                res = evaluate_vi(
                    flow, name, args.eval_samples, generator=torch.Generator().manual_seed(0)
                )
                flows[f"{LABELS[kind]}\nELBO {res.elbo:.3f} (log Z {log_z:.3f})"] = flow
            plot_vi(flows, name, Path(args.out) / f"vi_{name}.png", n=150, title=name)
        return
    if args.summarise:
        with open(args.summarise, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        summarise(rows)
        return
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.targets:
        log_z = log_z_grid(name)
        flows = {}
        for seed in args.seeds:
            for kind in args.flows:
                steps, lr, anneal = (
                    getattr(args, f"{kind}_{k}") for k in ("steps", "lr", "anneal")
                )
                torch.manual_seed(seed)
                flow = build(kind)
                flow.validate = False
                res = fit_vi(
                    flow,
                    name,
                    steps=steps,
                    batch_size=args.batch_size,
                    lr=lr,
                    warmup=args.warmup,
                    anneal=anneal,
                    seed=seed,
                    eval_samples=args.eval_samples,
                )
                row = {
                    "target": name,
                    "flow": LABELS[kind],
                    "seed": seed,
                    "log_z_grid": log_z,
                    "gap": log_z - res.elbo,
                    **res.as_dict(),
                }
                print(json.dumps(row), flush=True)
                if args.results:
                    with open(args.results, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(row) + "\n")
                rows.append(row)
                if args.save:
                    Path(args.save).mkdir(parents=True, exist_ok=True)
                    torch.save(flow.state_dict(), Path(args.save) / f"{name}_{kind}_{seed}.pt")
                if seed == args.seeds[0]:
                    flows[f"{LABELS[kind]}\nELBO {res.elbo:.3f} (log Z {log_z:.3f})"] = flow
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            plot_vi(flows, name, Path(args.out) / f"vi_{name}.png", n=150, title=name)
    summarise(rows)


def summarise(rows: list[dict]) -> None:
    """Markdown table: gap = log Z - ELBO, mean ± s.d. over seeds, per target and flow."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["target"], row["flow"]), []).append(row)
    print(
        "\n| target | flow | log Z (grid) | log Z - ELBO, mean ± s.d. | worst seed | seeds "
        "| steps | s per fit |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (name, flow), rs in sorted(groups.items()):
        g = [r["gap"] for r in rs]
        sd = statistics.stdev(g) if len(g) > 1 else float("nan")
        t = statistics.mean(r["wall_time"] for r in rs)
        print(
            f"| {name} | {flow} | {rs[0]['log_z_grid']:.4f} | {statistics.mean(g):.3f} ± {sd:.3f} "
            f"| {max(g):.3f} | {len(g)} | {rs[0]['steps']} | {t:.0f} |"
        )


if __name__ == "__main__":
    main()
