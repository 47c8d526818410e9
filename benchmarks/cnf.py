"""FFJORD with and without RNODE regularisation on 2-D toy densities.

For each data set, seed and setting: train for a fixed number of steps (Adam, linear lr
warm-up then cosine decay, dopri5 at ``--train-tol``), then report the test NLL (eval mode:
exact trace, dopri5 at ``--eval-tol``, the SAME tolerance for every model), the mean number of
dynamics evaluations per ``log_prob`` call (one call = one batch of ``--eval-batch`` points,
read from the CNF's own ``nfe_forward`` counter), the mean forward NFE per training step, and
the training time (wall and process CPU seconds; with one thread on a shared machine the CPU
time is the load-independent figure). RNODE adds ``regularization_loss(flow)`` (kinetic energy
+ Jacobian Frobenius norm) to the mean NLL, the way a training loop is meant to.

    nice -n 19 python benchmarks/cnf.py --out cnf.json

``benchmarks/matching.py --ffjord-from cnf.json`` reuses the plain rows as its maximum-
likelihood reference (OT-CFM then trains for a tenth of their CPU time).

Reference points: the true differential entropies (the best achievable test NLL) are about
1.70 nats for ``8gaussians`` (eight well-separated N(., 0.2²) on a radius-2 circle) and
log 8 = 2.08 nats for ``checkerboard`` (uniform on 8 unit squares). exactflow's NSF at its
own budget (500 steps, ``peers.py --quality``) reaches 1.810 / 2.447 / 2.288 nats on
8gaussians / moons / checkerboard. Results of the defaults: ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from exactflow.continuous import CNF, RNODE, regularization_loss, regularization_terms
from exactflow.models import FFJORD

try:
    from exactflow.data.toy import toy_splits
except ImportError:  # an older tree without the toy data module
    toy_splits = None

ENTROPY = {
    "8gaussians": math.log(8) + math.log(2 * math.pi * math.e * 0.2**2),
    "checkerboard": math.log(8),
    "moons": None,  # no closed form
}


def _local_splits(name: str, n_train: int, n_test: int, seed: int):
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        if name == "8gaussians":
            k = torch.randint(0, 8, (n,), generator=g).float() * (2 * math.pi / 8)
            return 2.0 * torch.stack([k.cos(), k.sin()], -1) + 0.2 * torch.randn(n, 2, generator=g)
        cell = torch.randint(0, 8, (n,), generator=g)
        row = cell // 2
        col = 2 * (cell % 2) + row % 2
        return torch.stack([col, row], -1).float() + torch.rand(n, 2, generator=g) - 2.0

    return draw(n_train), draw(n_test)


def data(name: str, n_train: int, n_test: int, seed: int):
    if toy_splits is not None:
        s = toy_splits(name, n_train=n_train, n_val=1, n_test=n_test, seed=seed)
        return s.train, s.test
    return _local_splits(name, n_train, n_test, seed)


def cnfs(flow):
    return [m for m in flow.modules() if isinstance(m, CNF)]


def nfe(flow) -> int:
    return sum(c.nfe_forward for c in cnfs(flow))


def reset(flow) -> None:
    for c in cnfs(flow):
        c.reset_nfe()


def lr_at(step: int, args) -> float:
    """Linear warm-up over ``--warmup`` steps, then cosine decay to 1 % of ``--lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * frac)))


@torch.no_grad()
def evaluate(
    flow, points: torch.Tensor, args, tol: float | None = None
) -> tuple[float, float, float]:
    """Mean NLL over ``points``, its standard error, and the mean NFE per ``log_prob`` call
    at the eval tolerance (or ``tol``)."""
    flow.eval()
    for c in cnfs(flow):
        c.atol = c.rtol = args.eval_tol if tol is None else tol
    reset(flow)
    chunks = points.split(args.eval_batch)
    nll = torch.cat([-flow.log_prob(chunk).double() for chunk in chunks])
    for c in cnfs(flow):
        c.atol = c.rtol = args.train_tol
    se = float(nll.std() / math.sqrt(nll.numel())) if nll.numel() > 1 else math.nan
    return float(nll.mean()), se, nfe(flow) / len(chunks)


def run(name: str, rnode: RNODE | None, seed: int, args) -> dict:
    torch.manual_seed(seed)
    train, test = data(name, args.n_train, args.n_test, seed)
    probe = test[: args.eval_batch]
    flow = FFJORD(
        2,
        hidden=tuple(args.hidden),
        trace=args.trace,
        solver="dopri5",
        atol=args.train_tol,
        rtol=args.train_tol,
        adjoint=args.adjoint,
        activation=args.activation,
        regularization=rnode,
    )
    opt = torch.optim.Adam(flow.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(seed + 1)
    reset(flow)
    wall = cpu = 0.0
    train_nfe = 0
    log = []
    for step in range(args.steps):
        flow.train()
        t0, c0 = time.perf_counter(), time.process_time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        batch = train[torch.randint(0, train.shape[0], (args.batch,), generator=g)]
        nll = -flow.log_prob(batch).mean()
        loss = nll + regularization_loss(flow)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(flow.parameters(), args.clip)
        opt.step()
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        train_nfe += nfe(flow)
        reset(flow)
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            entry = {"step": done, "nll": float(nll.detach()), **regularization_terms(flow)}
            entry["nfe_per_step"] = train_nfe / done
            # the eval-mode NFE of one log_prob on eval-batch test points, as it evolves
            entry["val_nll"], _, entry["eval_nfe"] = evaluate(flow, probe, args)
            entry["cpu_s"] = cpu
            log.append(entry)
            setting = "rnode" if rnode else "plain"
            print(f"  [{name} {setting} s{seed}] {json.dumps(entry)}", flush=True)

    t0 = time.perf_counter()
    test_nll, test_se, eval_nfe = evaluate(flow, test, args)
    entropy = ENTROPY.get(name)
    # NFE against tolerance on the probe points: for a p-th order adaptive solver the step
    # count scales as (C / tol)^(1/p), so a regulariser's NFE ratio shows up at every tol
    sweep = {}
    for tol in args.sweep_tols:
        sweep[f"{tol:g}"] = dict(zip(("nll", "se", "nfe"), evaluate(flow, probe, args, tol)))
    return {
        "data": name,
        "seed": seed,
        "setting": "rnode" if rnode else "plain",
        "rnode": None if rnode is None else rnode.__dict__,
        "test_nll": test_nll,
        "test_se": test_se,
        "gap_to_entropy": None if entropy is None else test_nll - entropy,
        "nfe_per_log_prob": eval_nfe,
        "train_nfe_per_step": train_nfe / args.steps,
        "train_s": wall,
        "train_cpu_s": cpu,
        "eval_s": time.perf_counter() - t0,
        "steps": args.steps,
        "tolerance_sweep": sweep,
        "log": log,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["8gaussians", "checkerboard"])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64])
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--warmup", type=int, default=20, help="linear lr warm-up steps")
    p.add_argument("--clip", type=float, default=0.0, help="gradient-norm clip (0: none)")
    p.add_argument("--train-tol", type=float, default=1e-4, help="dopri5 atol = rtol in training")
    p.add_argument(
        "--eval-tol", type=float, default=1e-5, help="dopri5 atol = rtol for test NLL/NFE"
    )
    p.add_argument("--trace", default="exact", help="training trace (eval is always exact)")
    p.add_argument("--activation", default="tanh")
    p.add_argument("--settings", nargs="+", default=["plain", "rnode"], choices=["plain", "rnode"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--adjoint", action="store_true", help="adjoint gradients (default: direct)")
    p.add_argument("--kinetic", type=float, default=0.05)
    p.add_argument("--jacobian", type=float, default=0.05)
    p.add_argument("--smoothness", type=float, default=0.0, help="weight of ∫‖df/dt‖² dt")
    p.add_argument(
        "--derivative",
        default="partial",
        choices=["partial", "total"],
        help="df/dt for --smoothness: ∂f/∂t, or the acceleration along the path",
    )
    p.add_argument("--n-train", type=int, default=20_000)
    p.add_argument("--n-test", type=int, default=5_000)
    p.add_argument("--eval-batch", type=int, default=1000)
    p.add_argument(
        "--sweep-tols",
        type=float,
        nargs="*",
        default=[],
        help="after training, NLL and NFE on the eval-batch probe at each of these tolerances",
    )
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # small-tensor work: extra threads only contend

    results = []
    for name in args.datasets:
        for seed in args.seeds:
            for setting in args.settings:
                rnode = RNODE(
                    kinetic=args.kinetic,
                    jacobian=args.jacobian,
                    smoothness=args.smoothness,
                    derivative=args.derivative,
                )
                results.append(run(name, rnode if setting == "rnode" else None, seed, args))
                if args.out:  # after every run, so a cut-short benchmark keeps what it measured
                    with open(args.out, "w") as f:
                        json.dump({"args": vars(args), "results": results}, f, indent=2)
    print_table(results)


def print_table(results: list[dict]) -> None:
    print(
        "\n| data | setting | seed | test NLL | gap to entropy | NFE / log_prob | NFE / step "
        "| train s (wall) | train s (CPU) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        gap = "-" if r["gap_to_entropy"] is None else f"{r['gap_to_entropy']:.3f}"
        print(
            f"| {r['data']} | {r['setting']} | {r['seed']} | {r['test_nll']:.3f} | {gap} | "
            f"{r['nfe_per_log_prob']:.1f} | {r['train_nfe_per_step']:.1f} | {r['train_s']:.0f} | "
            f"{r['train_cpu_s']:.0f} |"
        )
    sweeps = [r for r in results if r["tolerance_sweep"]]
    if sweeps:
        tols = list(sweeps[0]["tolerance_sweep"])
        print("\nNFE per log_prob (probe points) at each dopri5 tolerance atol = rtol:")
        print("| data | setting | seed | " + " | ".join(tols) + " |")
        print("|---|---|---:|" + "---:|" * len(tols))
        for r in sweeps:
            cells = " | ".join(f"{r['tolerance_sweep'][t]['nfe']:.0f}" for t in tols)
            print(f"| {r['data']} | {r['setting']} | {r['seed']} | {cells} |")


if __name__ == "__main__":
    main()
