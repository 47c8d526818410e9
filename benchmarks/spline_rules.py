"""Knot-derivative rules of the rational-quadratic spline: conditioning and fit quality.

Compares ``derivatives="bounded"`` (exactflow's default) with ``"free"`` (the paper's
``min_derivative + softplus``, smallest bins 1e-3):

* conditioning: over random extreme parameters (scale up to 50) and hard inputs (the
  robustness test's generators), the smallest and largest slope in the box and the largest
  float32 round-trip errors ``|f^-1(f(x)) - x|`` and ``|f(f^-1(z)) - z|``;
* quality: test NLL of an NSF (2-D, 5 layers, 64x64, Adam 1e-3 with cosine decay, batch 256)
  on 8gaussians and moons after ``--steps`` steps, per seed.

``--map-kwargs JSON`` (repeatable) adds a variant of the spline, e.g. a wider derivative
factor range or smaller minimum bins, to both comparisons.

    python benchmarks/spline_rules.py --steps 1500 --seeds 0 1
    python benchmarks/spline_rules.py --no-fit --map-kwargs '{"min_width": 0.01, "min_height": 0.01}'
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from exactflow.data import toy
from exactflow.models import NSF
from exactflow.transforms.splines import RationalQuadraticSpline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_splines import extreme_params, hard_inputs

RULES = {"bounded": {}, "free": {"derivatives": "free"}}
DATA = {"8gaussians": toy.eight_gaussians, "moons": toy.moons}


def conditioning(kwargs: dict, bound: float, n: int, seeds: int) -> dict:
    """Slope range and worst float32 round trips of one 8-bin spline (built with
    ``kwargs``) over ``seeds * n`` rows."""
    m = RationalQuadraticSpline(bins=8, bound=bound, **kwargs)
    lo, hi, err_x, err_z = math.inf, 0.0, 0.0, 0.0
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        params = extreme_params(n, m.num_params, g)
        x = hard_inputs(m, params, False, g)
        x = torch.where(x.abs() <= bound, x, x / 1e6)
        y, ld = m.forward(x, params)
        x2, _ = m.inverse(y, params)
        z = (2.0 * torch.rand(n, generator=g) - 1.0) * bound
        z2, _ = m.forward(m.inverse(z, params)[0], params)
        slope = ld.double().exp()
        lo, hi = min(lo, slope.min().item()), max(hi, slope.max().item())
        err_x = max(err_x, (x2 - x).abs().max().item())
        err_z = max(err_z, (z2 - z).abs().max().item())
    return {
        "bound": bound,
        "slope_min": lo,
        "slope_max": hi,
        "err_x": err_x,
        "err_z": err_z,
    }


def fit(kwargs: dict, data: str, seed: int, steps: int) -> tuple[float, float]:
    """Test NLL (mean, standard error) on 20k points after ``steps`` Adam steps, the
    splines built with ``kwargs``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    flow = NSF(2, transforms=5, hidden=(64, 64), map_kwargs=kwargs)
    opt = torch.optim.Adam(flow.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = -flow.log_prob(DATA[data](256, g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    test = DATA[data](20_000, torch.Generator().manual_seed(999))
    with torch.no_grad():
        lp = flow.log_prob(test)
    return -lp.mean().item(), lp.std().item() / math.sqrt(len(lp))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--data", nargs="+", choices=list(DATA), default=list(DATA))
    ap.add_argument("--rows", type=int, default=50_000, help="conditioning rows per seed")
    ap.add_argument("--no-fit", action="store_true", help="conditioning only")
    ap.add_argument(
        "--map-kwargs",
        metavar="JSON",
        action="append",
        default=[],
        help="one more spline variant: RationalQuadraticSpline arguments (repeatable)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rules = dict(RULES)
    for text in args.map_kwargs:
        rules[text] = json.loads(text)
    print("| rule | B | slope min | slope max | max err x->z->x | max err z->x->z |")
    print("|---|---|---|---|---|---|")
    for rule, kwargs in rules.items():
        for bound in (3.0, 5.0):
            r = conditioning(kwargs, bound, args.rows, 3)
            print(
                f"| {rule} | {bound:g} | {r['slope_min']:.2e} | {r['slope_max']:.3g} | "
                f"{r['err_x']:.1e} | {r['err_z']:.1e} |",
                flush=True,
            )
    if args.no_fit:
        return
    print(f"\n| data | seed | {' | '.join(rules)} | ({args.steps} steps) |")
    print("|---|---|" + "---|" * (len(rules) + 1))
    for data in args.data:
        for seed in args.seeds:
            start = time.perf_counter()
            cells = [fit(kwargs, data, seed, args.steps) for kwargs in rules.values()]
            took = time.perf_counter() - start
            row = " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in cells)
            print(f"| {data} | {seed} | {row} | {took:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
