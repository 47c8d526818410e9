"""FFJORD with and without RNODE regularisation on 2-D toy densities.

For each data set and setting: train for a fixed number of steps, then report the test NLL
(eval mode: exact trace, the training solver and tolerances), the mean number of dynamics
evaluations per ``log_prob`` call (one call = one batch of ``--eval-batch`` points), the mean
forward NFE per training step, and wall time. RNODE adds ``regularization_loss(flow)`` (kinetic
energy + Jacobian Frobenius norm) to the mean NLL, the way a training loop is meant to.

    python benchmarks/cnf.py --steps 300 --out cnf.json

Reference points: the true differential entropies (the best achievable test NLL) are about
1.70 nats for ``8gaussians`` (eight well-separated N(., 0.2²) on a radius-2 circle) and
log 8 = 2.08 nats for ``checkerboard`` (uniform on 8 unit squares).
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


def run(name: str, rnode: RNODE | None, args) -> dict:
    torch.manual_seed(args.seed)
    train, test = data(name, args.n_train, args.n_test, args.seed)
    flow = FFJORD(
        2,
        hidden=tuple(args.hidden),
        trace=args.trace,
        solver="dopri5",
        atol=args.tol,
        rtol=args.tol,
        adjoint=args.adjoint,
        regularization=rnode,
    )
    opt = torch.optim.Adam(flow.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    g = torch.Generator().manual_seed(args.seed + 1)
    flow.train()
    reset(flow)
    t0 = time.perf_counter()
    log = []
    for step in range(1, args.steps + 1):
        batch = train[torch.randint(0, train.shape[0], (args.batch,), generator=g)]
        nll = -flow.log_prob(batch).mean()
        loss = nll + regularization_loss(flow)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.steps:
            entry = {"step": step, "nll": float(nll.detach()), **regularization_terms(flow)}
            entry["nfe_per_step"] = nfe(flow) / step
            log.append(entry)
            print(f"  [{name} {'rnode' if rnode else 'plain'}] {entry}", flush=True)
    train_s = time.perf_counter() - t0
    train_nfe = nfe(flow) / args.steps

    flow.eval()
    reset(flow)
    calls = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        total = 0.0
        for chunk in test.split(args.eval_batch):
            total += float(flow.log_prob(chunk).sum())
            calls += 1
    eval_s = time.perf_counter() - t0
    test_nll = -total / test.shape[0]
    return {
        "data": name,
        "rnode": None if rnode is None else rnode.__dict__,
        "test_nll": test_nll,
        "gap_to_entropy": test_nll - ENTROPY[name],
        "nfe_per_log_prob": nfe(flow) / calls,
        "train_nfe_per_step": train_nfe,
        "train_s": train_s,
        "eval_s": eval_s,
        "steps": args.steps,
        "log": log,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["8gaussians", "checkerboard"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64])
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--trace", default="hutchinson")
    p.add_argument("--adjoint", action="store_true", help="adjoint gradients (default: direct)")
    p.add_argument("--kinetic", type=float, default=0.05)
    p.add_argument("--jacobian", type=float, default=0.05)
    p.add_argument("--n-train", type=int, default=20_000)
    p.add_argument("--n-test", type=int, default=5_000)
    p.add_argument("--eval-batch", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # small-tensor work: extra threads only contend

    results = []
    for name in args.datasets:
        for rnode in (None, RNODE(kinetic=args.kinetic, jacobian=args.jacobian)):
            results.append(run(name, rnode, args))
            if args.out:  # after every run, so a cut-short benchmark keeps what it measured
                with open(args.out, "w") as f:
                    json.dump({"args": vars(args), "results": results}, f, indent=2)
    print(
        f"\n{'data':<13} {'setting':<8} {'test NLL':>9} {'gap':>6} {'NFE/log_prob':>13} "
        f"{'NFE/step':>9} {'train s':>8}"
    )
    for r in results:
        setting = "rnode" if r["rnode"] else "plain"
        print(
            f"{r['data']:<13} {setting:<8} {r['test_nll']:9.3f} {r['gap_to_entropy']:6.3f} "
            f"{r['nfe_per_log_prob']:13.1f} {r['train_nfe_per_step']:9.1f} {r['train_s']:8.1f}"
        )


if __name__ == "__main__":
    main()
