"""Export a flow to ONNX and check the graphs against PyTorch: ``log_prob`` on data and
``sample`` from fixed noise, run by onnxruntime, plus the time per batch in each runtime.

Two models: a RealNVP, and a flow-matching CNF (CFM) whose ODE solve is exported as a fixed
number of RK4 steps unrolled in the graph, with the exact trace of the velocity's Jacobian
computed analytically (PyTorch runs the same steps through torchdiffeq with autograd traces).

    python examples/export_onnx.py [--smoke] [--out docs/figures]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from exactflow.data import toy_splits
from exactflow.export import load_onnx, to_onnx
from exactflow.models import CFM, RealNVP


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run (CI)")
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = toy_splits("moons", n_train=5000, n_val=10, n_test=4096, seed=0)

    torch.manual_seed(0)
    flow = RealNVP(2, transforms=4, hidden=(64, 64))
    opt = torch.optim.Adam(flow.parameters(), lr=2e-3)
    for _ in range(5 if args.smoke else 500):  # a trained flow, so the graphs do real work
        batch = data.train[torch.randint(len(data.train), (256,))]
        loss = -flow.log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    flow.eval()

    with tempfile.TemporaryDirectory() as tmp:
        density = load_onnx(to_onnx(flow, Path(tmp) / "log_prob.onnx", what="log_prob"))
        sampler = load_onnx(to_onnx(flow, Path(tmp) / "sample.onnx", what="sample"))
    x = data.test
    noise = torch.randn(len(x), 2, generator=torch.Generator().manual_seed(1))
    one = np.asarray(1.0, dtype=np.float32)
    with torch.no_grad():
        lp_torch = flow.log_prob(x).numpy()
        xs_torch = flow.transform.inverse(noise)[0].numpy()
    lp_onnx = density.run(None, {"x": x.numpy()})[0]
    xs_onnx = sampler.run(None, {"noise": noise.numpy(), "temperature": one})[0]
    repeats = 3 if args.smoke else 51
    with torch.no_grad():
        t_torch = median_seconds(lambda: flow.log_prob(x), repeats)
    t_onnx = median_seconds(lambda: density.run(None, {"x": x.numpy()}), repeats)
    results = {
        "log_prob max abs diff": float(np.abs(lp_torch - lp_onnx).max()),
        "sample max abs diff": float(np.abs(xs_torch - xs_onnx).max()),
        "torch ms": t_torch * 1e3,
        "onnxruntime ms": t_onnx * 1e3,
    }

    # flow matching: 8 RK4 steps (2 Euler steps in the smoke run) in PyTorch and in the graph
    torch.manual_seed(0)
    if args.smoke:
        cfm = CFM(2, hidden=(16,), solver="euler", steps=2)
    else:
        cfm = CFM(2, hidden=(64, 64), solver="rk4", steps=8)
    opt = torch.optim.Adam(cfm.parameters(), lr=2e-3)
    for _ in range(5 if args.smoke else 1000):
        batch = data.train[torch.randint(len(data.train), (256,))]
        loss = cfm.training_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cfm.eval()
    with tempfile.TemporaryDirectory() as tmp:
        cnf_density = load_onnx(to_onnx(cfm, Path(tmp) / "cfm_log_prob.onnx"))
        cnf_sampler = load_onnx(to_onnx(cfm, Path(tmp) / "cfm_sample.onnx", what="sample"))
    with torch.no_grad():
        lp_cnf = cfm.log_prob(x).numpy()
        xs_cnf = cfm.transform.inverse(noise)[0].numpy()
        t_cnf_torch = median_seconds(lambda: cfm.log_prob(x), max(3, repeats // 5))
    t_cnf_onnx = median_seconds(lambda: cnf_density.run(None, {"x": x.numpy()}), repeats)
    xs_cnf_onnx = cnf_sampler.run(None, {"noise": noise.numpy(), "temperature": one})[0]
    lp_cnf_onnx = cnf_density.run(None, {"x": x.numpy()})[0]
    results.update(
        {
            "cnf log_prob max abs diff": float(np.abs(lp_cnf - lp_cnf_onnx).max()),
            "cnf sample max abs diff": float(np.abs(xs_cnf - xs_cnf_onnx).max()),
            "cnf torch ms": t_cnf_torch * 1e3,
            "cnf onnxruntime ms": t_cnf_onnx * 1e3,
            "cnf test nll": float(-lp_cnf.mean()),
        }
    )
    for k, v in results.items():
        print(f"{k:26s} {v:.3g}")

    fig, ax = plt.subplots(1, 3, figsize=(13, 4))
    ax[0].scatter(lp_torch, lp_onnx, s=2)
    ax[0].set_xlabel("flow.log_prob (PyTorch)")
    ax[0].set_ylabel("log_prob graph (onnxruntime)")
    ax[0].set_title(f"RealNVP log_prob\nmax |Δ| = {results['log_prob max abs diff']:.1e}")
    ax[1].scatter(xs_onnx[:, 0], xs_onnx[:, 1], s=1, color="C1")
    diff = results["sample max abs diff"]
    ax[1].set_title(f"RealNVP samples (onnxruntime)\nmax |Δ| vs PyTorch {diff:.1e}")
    ax[2].scatter(xs_cnf_onnx[:, 0], xs_cnf_onnx[:, 1], s=1, color="C2")
    diff = results["cnf sample max abs diff"]
    ax[2].set_title(f"CFM samples, fixed-step RK4 (onnxruntime)\nmax |Δ| vs PyTorch {diff:.1e}")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "export_onnx.png", dpi=70)
    plt.close(fig)
    return results


if __name__ == "__main__":
    main()
