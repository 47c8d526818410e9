"""Flow matching vs maximum likelihood on 2-D toys, and what reflow does to a rectified flow.

Part 1 -- OT-CFM vs FFJORD, same velocity network (``TimeMLP``/``VelocityMLP``, gate time
conditioning, tanh, the same hidden widths, so the same parameter count):

* FFJORD is trained by maximum likelihood (exact trace, back-propagation through dopri5).
  With ``--ffjord-from cnf.json`` its rows come from ``benchmarks/cnf.py`` (500 steps, warm-up
  + cosine lr, the same data split); otherwise it trains here for ``--ffjord-seconds``.
* OT-CFM is trained by regression for one tenth of FFJORD's measured training time (the
  issue's "10x less training time" claim) -- process CPU time by default (``--clock cpu``:
  one thread on a shared machine, so wall time mostly measures the other jobs) -- and,
  optionally, for ``--cfm-steps`` steps. Adam, batch ``--cfm-batch`` (128: the exact OT
  assignment costs O(n³), so 128 rows give ~3x the steps of 256 per second), lr ``--cfm-lr``
  with a cosine decay along the time budget.

Both are scored by the exact test NLL (dopri5, atol = rtol = ``--eval-tol`` = 1e-5, exact
trace) on the same held-out rows, plus the NFE of that solve.

Part 2 -- reflow: a rectified flow trained for ``--rf-steps``, then one reflow
(``--reflow-pairs`` noise/sample pairs, ``--reflow-steps`` steps). Reported before and after:
straightness ``S`` and path-length ratio, the sliced Wasserstein-2 distance to the test data
of one-step Euler samples and of dopri5 samples, and the exact test NLL.

Run it niced on a shared machine, e.g.::

    nice -n 19 python benchmarks/matching.py --json /tmp/matching.json

Wall times are real but measured on whatever else the machine is doing; both methods of a row
run back to back under the same load.

Measured 2026-11-29 (``--ffjord-from`` the 500-step FFJORD rows of ``benchmarks/cnf.py``,
``--skip-reflow --cfm-steps 0``, other defaults; seed 0; one thread at nice 19 on a shared
2-core machine at load 15-22; test NLL on 5,000 points):

============  =================  =====  =====  ======  ===============  ===  =========
data          model              steps  CPU s  wall s  test NLL         NFE  1-step SW
============  =================  =====  =====  ======  ===============  ===  =========
8gaussians    FFJORD (ML)        500    105    668     1.738            72   -
8gaussians    OT-CFM, 1/10 time  1986   10.5   45      1.748 ± 0.016    86   0.093
moons         FFJORD (ML)        500    86     772     2.465 ± 0.011    64   -
moons         OT-CFM, 1/10 time  1784   8.6    41      2.448 ± 0.010    62   0.076
checkerboard  FFJORD (ML)        500    75     382     2.427 ± 0.008    50   -
checkerboard  OT-CFM, 1/10 time  1598   7.5    36      2.444 ± 0.009    62   0.082
============  =================  =====  =====  ======  ===============  ===  =========

Reflow, measured 2026-11-28 with the previous version of this script (constant lr 2e-3,
batch 256, ``--rf-steps 1200 --reflow-steps 800``):
Rectified flow (1,200 steps), then one reflow on 5,000 pairs (800 steps): straightness S
1.34 -> 0.010 / 1.03 -> 0.004 / 0.98 -> 0.002 and one-step-Euler SW 1.224 -> 0.181 /
1.216 -> 0.153 / 1.060 -> 0.113 (8gaussians / moons / checkerboard); dopri5-sample SW and
test NLL moved by < 0.1 (1.975 -> 2.072, 2.712 -> 2.713, 2.787 -> 2.771).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from exactflow.data.toy import toy_splits
from exactflow.matching import MatchingFlow, reflow, sliced_wasserstein, straightness
from exactflow.models import FFJORD
from exactflow.models.matching import OTCFM, RectifiedFlow


def _clock(kind: str) -> float:
    # one thread on a shared machine: process CPU time is what the method costs, wall time
    # also counts every other job's share of the cores
    return time.process_time() if kind == "cpu" else time.perf_counter()


def train_for(
    flow,
    data: torch.Tensor,
    loss_fn,
    *,
    seconds=None,
    steps=None,
    lr=2e-3,
    seed=0,
    batch=256,
    clock="cpu",
    schedule="constant",
    warmup=0,
):
    """Adam on batches of ``batch`` until ``seconds`` (``clock`` time) or ``steps``.

    ``schedule="cosine"`` decays the lr to 1 % along the budget -- the elapsed fraction of
    ``seconds`` when the budget is a time, else of ``steps`` -- after ``warmup`` linear
    warm-up steps. Returns ``(steps done, wall s, CPU s)``.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in flow.parameters() if p.requires_grad], lr=lr)
    flow.train()
    done = 0
    start, wall0, cpu0 = _clock(clock), time.perf_counter(), time.process_time()
    while True:
        elapsed = _clock(clock) - start
        if (seconds is not None and elapsed >= seconds) or (steps is not None and done >= steps):
            break
        frac = elapsed / seconds if seconds is not None else done / steps
        scale = (
            1.0 if schedule == "constant" else 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * frac))
        )
        if done < warmup:
            scale *= (done + 1) / warmup
        for group in opt.param_groups:
            group["lr"] = lr * scale
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        loss = loss_fn(flow, data[idx], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 5.0)
        opt.step()
        done += 1
    flow.eval()
    return done, time.perf_counter() - wall0, time.process_time() - cpu0


def nll_loss(flow, x, g):
    return -flow.log_prob(x).mean()


def matching_loss(flow, x, g):
    return flow.training_loss(x, generator=g)


@torch.no_grad()
def exact_nll(flow, test: torch.Tensor, tol: float = 1e-5) -> tuple[float, float, int]:
    """Mean test NLL, its standard error, and the NFE of one solve over the whole test set."""
    cnf = flow.cnf if isinstance(flow, MatchingFlow) else flow.transform
    cnf.eval_trace, cnf.atol, cnf.rtol, cnf.solver = "exact", tol, tol, "dopri5"
    flow.eval()
    cnf.reset_nfe()
    v = -flow.log_prob(test).double()
    return float(v.mean()), float(v.std() / math.sqrt(v.numel())), cnf.nfe_forward


def one_step_quality(flow: MatchingFlow, test: torch.Tensor, seed: int) -> dict[str, float]:
    n = test.shape[0]
    out = {}
    for label, kw in (("sw_1step", {"steps": 1}), ("sw_dopri5", {})):
        x = flow.sample(n, generator=torch.Generator().manual_seed(seed), **kw)
        sg = torch.Generator().manual_seed(seed + 1)
        out[label] = float(sliced_wasserstein(x, test, projections=512, generator=sg))
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed + 2))
    s, ratio = straightness(flow.velocity, z, steps=32)
    out["straightness"], out["path_length_ratio"] = float(s), float(ratio)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["8gaussians", "moons", "checkerboard"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64])
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=5000)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="which time the 1/10 budget divides (cpu: process time, one thread)")  # fmt: skip
    p.add_argument("--ffjord-from", help="cnf.py JSON: reuse its plain FFJORD rows (same split)")
    p.add_argument("--ffjord-seconds", type=float, default=180.0)
    p.add_argument("--ffjord-tol", type=float, default=1e-4)
    p.add_argument("--eval-tol", type=float, default=1e-5, help="dopri5 atol = rtol of test NLL")
    p.add_argument("--cfm-steps", type=int, default=2000, help="the long OT-CFM run (0: skip)")
    p.add_argument("--cfm-batch", type=int, default=128)
    p.add_argument("--cfm-lr", type=float, default=2e-2)
    p.add_argument("--cfm-schedule", choices=["constant", "cosine"], default="cosine")
    p.add_argument("--rf-steps", type=int, default=1500)
    p.add_argument("--reflow-pairs", type=int, default=5000)
    p.add_argument("--reflow-steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-ffjord", action="store_true")
    p.add_argument("--skip-reflow", action="store_true")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    hidden = tuple(args.hidden)
    reference = {}
    if args.ffjord_from:
        with open(args.ffjord_from) as f:
            saved = json.load(f)
        # the same split as cnf.py drew, so both models see the same train and test rows
        args.n_train, args.n_test = saved["args"]["n_train"], saved["args"]["n_test"]
        hidden = tuple(saved["args"]["hidden"])
        for r in saved["results"]:
            if r["setting"] == "plain":
                reference[(r["data"], r["seed"])] = r
    rows: list[dict] = []
    for name in args.datasets:
        for seed in args.seeds:
            s = toy_splits(name, n_train=args.n_train, n_val=1, n_test=args.n_test, seed=seed)
            train, test = s.train, s.test
            row: dict = {"data": name, "seed": seed}
            budget = None
            if (name, seed) in reference:
                r = reference[(name, seed)]
                row["ffjord"] = {"steps": r["steps"], "train_s": r["train_s"],
                                 "train_cpu_s": r["train_cpu_s"], "nll": r["test_nll"],
                                 "se": r.get("test_se", float("nan")),
                                 "nfe": r["nfe_per_log_prob"], "from": args.ffjord_from}  # fmt: skip
            elif not args.skip_ffjord:
                torch.manual_seed(seed)
                ff = FFJORD(2, hidden=hidden, trace="exact", adjoint=False,
                            atol=args.ffjord_tol, rtol=args.ffjord_tol)  # fmt: skip
                steps, wall, cpu = train_for(ff, train, nll_loss, seconds=args.ffjord_seconds,
                                             lr=args.lr, seed=seed, clock=args.clock)  # fmt: skip
                nll, se, nfe = exact_nll(ff, test, args.eval_tol)
                row["ffjord"] = {"steps": steps, "train_s": wall, "train_cpu_s": cpu,
                                 "nll": nll, "se": se, "nfe": nfe}  # fmt: skip
            if "ffjord" in row:
                f = row["ffjord"]
                budget = (f["train_cpu_s"] if args.clock == "cpu" else f["train_s"]) / 10
                print(f"{name} s{seed}: FFJORD {f['steps']} steps {f['train_s']:.0f}s wall "
                      f"{f['train_cpu_s']:.0f}s CPU NLL {f['nll']:.3f}", flush=True)  # fmt: skip
            runs = [("otcfm_tenth", {"seconds": budget})] if budget is not None else []
            if args.cfm_steps:
                runs.append(("otcfm", {"steps": args.cfm_steps}))
            for label, kw in runs:
                torch.manual_seed(seed)
                fm = OTCFM(2, hidden=hidden)
                steps, wall, cpu = train_for(
                    fm, train, matching_loss, lr=args.cfm_lr, seed=seed, batch=args.cfm_batch,
                    clock=args.clock, schedule=args.cfm_schedule, **kw,
                )  # fmt: skip
                nll, se, nfe = exact_nll(fm, test, args.eval_tol)
                row[label] = {"steps": steps, "train_s": wall, "train_cpu_s": cpu,
                              "nll": nll, "se": se, "nfe": nfe}  # fmt: skip
                row[label].update(one_step_quality(fm, test, seed=1))
                print(f"{name} s{seed}: {label} {steps} steps {wall:.0f}s wall {cpu:.1f}s CPU "
                      f"NLL {nll:.3f}±{se:.3f}", flush=True)  # fmt: skip
            if not args.skip_reflow:
                torch.manual_seed(seed)
                rf = RectifiedFlow(2, hidden=hidden)
                steps, wall, _ = train_for(rf, train, matching_loss, steps=args.rf_steps,
                                           lr=args.lr, seed=seed)  # fmt: skip
                before = one_step_quality(rf, test, seed=1)
                before["nll"] = exact_nll(rf, test, args.eval_tol)[0]
                t0 = time.perf_counter()
                reflow(rf, args.reflow_pairs, steps=args.reflow_steps, lr=args.lr / 2,
                       generator=torch.Generator().manual_seed(3))  # fmt: skip
                after = one_step_quality(rf, test, seed=1)
                after["nll"] = exact_nll(rf, test, args.eval_tol)[0]
                row["reflow"] = {"rf_train_s": wall, "reflow_s": time.perf_counter() - t0,
                                 "before": before, "after": after}  # fmt: skip
                print(f"{name}: reflow 1-step SW {before['sw_1step']:.3f} -> "
                      f"{after['sw_1step']:.3f}", flush=True)  # fmt: skip
            rows.append(row)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    print_tables(rows)


def print_tables(rows: list[dict]) -> None:
    print(
        "\n| data | seed | model | steps | train s (wall) | train s (CPU) | test NLL (exact) "
        "| NFE | 1-step SW | S |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for key, label in (("ffjord", "FFJORD (ML)"), ("otcfm_tenth", "OT-CFM, 1/10 time"),
                           ("otcfm", "OT-CFM")):  # fmt: skip
            if key not in r:
                continue
            m = r[key]
            sw = f"{m['sw_1step']:.3f}" if "sw_1step" in m else "-"
            s = f"{m['straightness']:.4f}" if "straightness" in m else "-"
            print(f"| {r['data']} | {r['seed']} | {label} | {m['steps']} | {m['train_s']:.0f} | "
                  f"{m['train_cpu_s']:.1f} | {m['nll']:.3f} ± {m['se']:.3f} | {m['nfe']} | "
                  f"{sw} | {s} |")  # fmt: skip
    print("\n| data | rectified flow | S | path ratio | 1-step SW | dopri5 SW | test NLL |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "reflow" not in r:
            continue
        for when in ("before", "after"):
            m = r["reflow"][when]
            print(f"| {r['data']} | {when} reflow | {m['straightness']:.4f} | "
                  f"{m['path_length_ratio']:.3f} | {m['sw_1step']:.3f} | {m['sw_dopri5']:.3f} | "
                  f"{m['nll']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
