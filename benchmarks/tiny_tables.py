"""Small tables under ``exactflow train``'s own recipe: every model against the
full-covariance Gaussian fitted to the same training split (issue 23, point 3).

For each data set (breast_cancer: 569 rows, 30-D; iris: 150 rows, 4-D), model and seed, trains
``default_config(data, model)`` exactly as ``exactflow train --data DATA --model MODEL --seed S``
does, and reports its test NLL next to the maximum-likelihood Gaussian's (training mean and
covariance) on the same test rows, in nats of the original data space. The Gaussian is the
flow's own starting point on whitened data, so a model that ends worse has lost ground.

    nice -n 19 python benchmarks/tiny_tables.py --seeds 0 1 2 3 4 --models nsf maf realnvp
    python benchmarks/tiny_tables.py --summarise tiny.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch

from exactflow.app.run import default_config, load_run_data, train_run


def gaussian_nll(train: torch.Tensor, test: torch.Tensor) -> float:
    """Mean test NLL of the ML full-covariance Gaussian of ``train``."""
    x = train.double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / x.shape[0]
    dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    return float(-dist.log_prob(test.double()).mean())


def run_cell(data: str, model: str, seed: int, overrides: dict | None = None) -> dict:
    cfg = default_config(data, model)
    for section, values in (overrides or {}).items():
        target = cfg.train if section == "train" else getattr(cfg, section)
        for k, v in values.items():
            if section == "train":
                setattr(target, k, v)
            else:
                target[k] = v
    cfg.seed = cfg.train.seed = seed
    cfg.train.progress = False
    with tempfile.TemporaryDirectory() as tmp:
        m = train_run(cfg, Path(tmp) / "run", plots=False, quiet=True)
    ds = load_run_data(cfg)
    return {
        "data": data,
        "model": model,
        "seed": seed,
        "test_nll": m["test_nll"],
        "gaussian_nll": gaussian_nll(ds.train, ds.test),
        "steps": m["steps"],
        "n_train": int(ds.train.shape[0]),
        "n_params": m["n_params"],
        "overrides": overrides or {},
    }


def summarise(rows: list[dict]) -> str:
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        model = r["model"] + (f" {json.dumps(r['overrides'])}" if r.get("overrides") else "")
        cells.setdefault((r["data"], model), []).append(r)
    lines = [
        "| data | model | seeds | flow test NLL | Gaussian | flow − Gaussian, paired | flow better in |",
        "|---|---|---|---|---|---|---|",
    ]
    for (data, model), rs in sorted(cells.items()):
        f = [r["test_nll"] for r in rs]
        g = [r["gaussian_nll"] for r in rs]
        d = [a - b for a, b in zip(f, g)]

        def ms(v):
            if len(v) < 2:
                return f"{v[0]:.2f}"
            return f"{statistics.fmean(v):.2f} ± {statistics.stdev(v) / math.sqrt(len(v)):.2f}"

        better = sum(x < 0 for x in d)
        lines.append(
            f"| {data} | {model} | {len(rs)} | {ms(f)} | {ms(g)} | {ms(d)} | {better} of {len(d)} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=["iris", "breast_cancer"])
    ap.add_argument("--models", nargs="+", default=["nsf", "maf", "realnvp"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=Path("tiny.jsonl"))
    ap.add_argument("--summarise", type=Path, default=None)
    ap.add_argument(
        "--overrides",
        type=json.loads,
        default=None,
        help='JSON {"model_args": {...}, "train": {...}} laid over the defaults (ablations)',
    )
    args = ap.parse_args()
    if args.summarise is not None:
        rows = [json.loads(line) for line in args.summarise.read_text().splitlines() if line]
        print(summarise(rows))
        return
    torch.set_num_threads(args.threads)
    rows = [
        _record(run_cell(data, model, seed, args.overrides), args.results)
        for data, model, seed in itertools.product(args.data, args.models, args.seeds)
    ]
    print(summarise(rows))


def _record(row: dict, results: Path) -> dict:
    """Print the row and append it to the results file at once (a killed sweep keeps it)."""
    line = json.dumps(row)
    print(line, flush=True)
    with open(results, "a") as fh:
        fh.write(line + "\n")
    return row


if __name__ == "__main__":
    main()
