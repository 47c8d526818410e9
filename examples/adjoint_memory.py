"""The adjoint method: memory of a CNF's gradient with and without it, measured.

Back-propagating through the solver keeps every dynamics evaluation's graph alive until the
backward pass, so memory grows linearly with the number of solver steps. The adjoint method
(``CNF(..., adjoint=True)``) solves forward without a graph and recovers the gradient by a
second, backward-in-time solve of the adjoint ODE; only one evaluation's graph is alive at a
time. The script measures the peak bytes held by autograd's saved tensors (parameters
excluded, each storage counted once) during one ``log_prob(x).mean().backward()``:

* against the number of fixed RK4 steps (``steps``), at ``t1 = 1``;
* against the integration time ``t1`` with the adaptive ``dopri5`` (NFE grows with ``t1``).

It also times both and checks that the two gradients agree (they differ only by the
discretisation error of the backward solve).

    python examples/adjoint_memory.py [--smoke] [--out docs/figures]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

import exactflow as ef
from exactflow.continuous import CNF, TimeMLP


class SavedTensorMeter:
    """Live and peak bytes of the tensors autograd saves for backward.

    Use ``with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):``. A
    storage saved by several nodes counts once; ``ignore`` storages (the parameters, which
    exist whatever the gradient method) never count. A saved tensor stops counting when
    autograd frees it (its handle is garbage-collected).
    """

    def __init__(self, ignore: set[int]):
        self.ignore = ignore
        self.refs: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def pack(self, t: torch.Tensor) -> _Handle:
        key = t.untyped_storage().data_ptr()
        if key not in self.ignore:
            if self.refs.get(key, 0) == 0:
                self.live += t.untyped_storage().nbytes()
                self.peak = max(self.peak, self.live)
            self.refs[key] = self.refs.get(key, 0) + 1
        return _Handle(self, key, t)

    def unpack(self, handle: _Handle) -> torch.Tensor:
        return handle.tensor

    def release(self, key: int, nbytes: int) -> None:
        if key in self.ignore:
            return
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes


class _Handle:
    """What autograd stores instead of the tensor; tells the meter when it is freed."""

    def __init__(self, meter: SavedTensorMeter, key: int, tensor: torch.Tensor):
        # detached: a handle holding the tensor itself would, for a node's own output, close
        # a reference cycle (tensor -> grad_fn -> handle -> tensor) that only the cyclic GC
        # frees; autograd restores the history on unpack
        self.meter, self.key, self.tensor = meter, key, tensor.detach()
        self.nbytes = tensor.untyped_storage().nbytes()

    def __del__(self) -> None:
        self.meter.release(self.key, self.nbytes)


def dynamics(hidden: int, seed: int) -> nn.Module:
    """A ``TimeMLP`` with a small random output layer (not the identity), so that an
    adaptive solver has something to resolve."""
    torch.manual_seed(seed)
    f = TimeMLP(2, (hidden, hidden), activation="tanh")
    for p in f.layers[-1].parameters():
        nn.init.normal_(p, std=0.5)
    return f


def measure(flow: ef.Flow, x: torch.Tensor) -> dict[str, float]:
    """Peak saved-tensor bytes, wall time, NFE and the gradient of one backward pass."""
    cnf = flow.transform
    params = list(flow.parameters())
    meter = SavedTensorMeter({p.untyped_storage().data_ptr() for p in params})
    flow.zero_grad(set_to_none=True)
    cnf.reset_nfe()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        loss = -flow.log_prob(x).mean()
        loss.backward()
        del loss
    seconds = time.perf_counter() - start
    grad = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
    return {
        "peak_mb": meter.peak / 2**20,
        "seconds": seconds,
        "nfe_forward": cnf.nfe_forward,
        "nfe_backward": cnf.nfe_backward,
        "grad": grad,
    }


def build(adjoint: bool, seed: int, hidden: int, **solver) -> ef.Flow:
    cnf = CNF(dynamics(hidden, seed), trace="exact", adjoint=adjoint, **solver)
    return ef.Flow(cnf, ef.StandardNormal((2,))).double()


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run (CI)")
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = ap.parse_args(argv)
    steps_grid = [2, 8] if args.smoke else [2, 4, 8, 16, 32, 64]
    t1_grid = [0.5, 1.0] if args.smoke else [0.5, 1.0, 2.0, 4.0, 8.0]
    n, hidden = (64, 16) if args.smoke else (256, 64)
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    results: dict[str, dict] = {"steps": {}, "t1": {}}
    print(f"batch {n}, TimeMLP(2, ({hidden}, {hidden})), exact trace, float64")
    print(f"{'sweep':>10} {'method':>8} {'peak MB':>9} {'s':>7} {'NFE fwd':>8} {'NFE bwd':>8}")
    sweeps = [("steps", s, {"solver": "rk4", "steps": s}) for s in steps_grid] + [
        ("t1", t, {"solver": "dopri5", "t1": t, "atol": 1e-6, "rtol": 1e-6}) for t in t1_grid
    ]
    for sweep, value, solver in sweeps:
        row = {}
        for adjoint in (False, True):
            m = measure(build(adjoint, 0, hidden, **solver), x)
            name = "adjoint" if adjoint else "direct"
            row[name] = {k: v for k, v in m.items() if k != "grad"}
            row[name + " grad"] = m["grad"]
            print(
                f"{sweep}={value:<4} {name:>8} {m['peak_mb']:9.3f} {m['seconds']:7.3f} "
                f"{m['nfe_forward']:8d} {m['nfe_backward']:8d}"
            )
        g_direct, g_adjoint = row.pop("direct grad"), row.pop("adjoint grad")
        row["grad rel diff"] = float((g_adjoint - g_direct).norm() / g_direct.norm())
        print(f"{'':>10} |grad_adjoint - grad_direct| / |grad_direct| = {row['grad rel diff']:.1e}")
        results[sweep][value] = row

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, (sweep, xlabel) in enumerate(
        (("steps", "RK4 steps (t1 = 1)"), ("t1", "integration time t1 (dopri5, tol 1e-6)"))
    ):
        xs = list(results[sweep])
        for name, style in (("direct", "o-"), ("adjoint", "s-")):
            ys = [results[sweep][v][name]["peak_mb"] for v in xs]
            ax[k].plot(xs, ys, style, label="backprop through solver" if name == "direct" else name)
        if sweep == "t1":
            for v in xs:
                r = results[sweep][v]["direct"]
                ax[k].annotate(
                    f"NFE {r['nfe_forward']}",
                    (v, r["peak_mb"]),
                    textcoords="offset points",
                    xytext=(-10, 6),
                    fontsize=7,
                )
        ax[k].set_xscale("log", base=2)
        ax[k].set_yscale("log")
        ax[k].set_xlabel(xlabel)
        ax[k].set_ylabel("peak saved-tensor memory (MB)")
        ax[k].legend(fontsize=8)
    ax[0].set_title(f"memory of one backward pass, batch {n}")
    ax[1].set_title("adaptive solver: memory follows NFE")
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "adjoint_memory.png", dpi=70)
    plt.close(fig)
    return results


if __name__ == "__main__":
    main()
