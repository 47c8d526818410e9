"""Peer benchmark: exactflow against zuko, nflows and normflows on the same models.

Every library builds the same three models — 5 transforms, conditioners MLP 128x128 (ReLU):

* ``maf``     masked affine autoregressive flow, feature order reversed between layers;
* ``nsf``     autoregressive rational-quadratic spline flow, 8 bins on [-5, 5], linear tails;
* ``realnvp`` affine coupling flow, alternating halves.

Speed mode (default) measures, per model and dimension D, the throughput in samples/s of

* ``train``    one Adam step on ``-log_prob(x).mean()`` at batch 1024,
* ``log_prob`` at batch 8192 without gradients,
* ``sample``   at batch 8192 without gradients (D sequential passes for the autoregressive models),

interleaving the contenders round by round (A B C D A B C D ...) so that load from other
processes hits all of them alike, and prints the median over rounds and the ratio to the fastest
*peer* (zuko, nflows, normflows eager, and zuko under ``torch.compile`` — with
``mode="reduce-overhead"`` on CUDA). Parameter counts are printed side by side first, as a check
that every library really builds the same architecture.

Quality mode (``--quality``) is the multi-seed suite of ``benchmarks/quality.py`` (every
library's three models through one plain loop on the 2-D toys, digits, breast_cancer and iris,
paired against the best peer); ``peers.py --quality ARGS`` runs ``quality.py ARGS``.
``--toy-quality`` is the earlier small check behind older figures in the READMEs (2-D toys,
a constant-lr Adam loop for ``--steps``, last weights, ``--seeds`` seeds). Digits mode (``--digits``) does the same on scikit-learn digits (64-D, uniform dequantisation and a
logit transform shared by everyone) and reports bits/dim in pixel space. ``--digits-default``
runs the NSF at ``exactflow train --data digits --model nsf``'s default configuration instead:
every library's model (the peers' with an identity-initialised LU-linear layer before each
spline layer, as exactflow's NSF has; ``--no-lu`` for their stock NSF) is fitted by exactflow's
``Trainer`` on the same split, batches and dequantisation noise, so only the model differs;
``--default-config DATA`` does the same at any data set's default (``moons``: the bare
``exactflow train``, test NLL in nats). There ``--exactflow-map-kwargs JSON`` adds exactflow
NSFs with other spline arguments, paired seed by seed against zuko and exactflow's default
(``--reference`` reuses an earlier ``--json`` run's contenders instead of retraining them),
and ``--peer-adam-lr LR ...`` trains the peers the way their own examples do instead -- a
plain constant-learning-rate Adam loop, same steps and batches, last weights -- once per LR.

    python benchmarks/peers.py --quick
    python benchmarks/peers.py --device cpu --dims 2 16 64 --models maf nsf realnvp --rounds 7
    python benchmarks/peers.py --quality --threads 1 --json /tmp/quality.json
    python benchmarks/peers.py --digits --models nsf
    python benchmarks/peers.py --digits-default --threads 1 --seeds 3
    python benchmarks/peers.py --default-config moons --threads 1 --seeds 3
    python benchmarks/peers.py --default-config moons --threads 1 --seeds 8 --libs zuko \
        --exactflow-map-kwargs '{"min_width": 0.01, "min_height": 0.01}'
    python benchmarks/peers.py --default-config moons --threads 1 --seeds 8 \
        --peer-adam-lr 1e-3 2e-3 5e-3

Peers are used only through their public APIs (``pip install -e .[bench]``); a library that is
missing or fails is reported and skipped.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

TRANSFORMS = 5
HIDDEN = (128, 128)
BINS = 8
BOUND = 5.0
MODELS = ("maf", "nsf", "realnvp")
PEERS = ("zuko", "nflows", "normflows", "zuko+compile")
# exactflow+compile: the user's one line, torch.compile(flow.log_prob) (as zuko+compile);
# exactflow-trainer: Trainer(compile=True)'s whole guarded step (training only)
EXACTFLOW = ("exactflow", "exactflow+compile", "exactflow-trainer")
LIBRARIES = (*PEERS, *EXACTFLOW)
# contenders that differ from another only in how it runs, not in what it computes
SPEED_ONLY = ("zuko+compile", "exactflow+compile", "exactflow-trainer")
TASKS = ("train", "log_prob", "sample")


@dataclass
class Contender:
    """One library's model behind a uniform interface.

    ``train_log_prob`` is used inside the training step (it differs from ``log_prob`` only for
    compiled contenders, which get one compiled callable per use so shapes never recompile).
    """

    name: str
    module: nn.Module
    log_prob: Callable[[Tensor], Tensor]
    sample: Callable[[int], Tensor]
    train_log_prob: Callable[[Tensor], Tensor] | None = None
    notes: list[str] = field(default_factory=list)
    cudagraphs: bool = False
    # a contender that owns its whole training step (the trainer) runs it instead of the
    # benchmark's plain Adam step, and takes part only in ``tasks``
    train_step: Callable[[Tensor], object] | None = None
    tasks: tuple[str, ...] = TASKS

    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# builders: one per library, all with the architecture fixed above


def _zuko(model: str, d: int, lu: bool = False) -> tuple[nn.Module, Callable, Callable]:
    import zuko

    # zuko's NSF takes the spline bound from MonotonicRQSTransform's default; check it is ours
    bound = inspect.signature(zuko.transforms.MonotonicRQSTransform).parameters["bound"].default
    if model == "nsf" and bound != BOUND:
        raise RuntimeError(f"zuko's spline bound is {bound}, the benchmark needs {BOUND}")
    kw = {"transforms": TRANSFORMS, "hidden_features": HIDDEN}
    if model == "maf":
        flow = zuko.flows.MAF(d, **kw)
    elif model == "nsf":
        flow = zuko.flows.NSF(d, bins=BINS, **kw)
        if lu:
            # an identity-initialised L U x before every spline layer (zuko's NSF has none)
            lus = [
                zuko.flows.UnconditionalTransform(zuko.transforms.LULinearTransform, torch.eye(d))
                for _ in range(TRANSFORMS)
            ]
            layers = [t for pair in zip(lus, flow.transform.transforms) for t in pair]
            flow = zuko.flows.Flow(layers, flow.base)
    else:
        flow = zuko.flows.RealNVP(d, **kw)
    return flow, (lambda x: flow().log_prob(x)), (lambda n: flow().sample((n,)))


class _IgnoreContext(nn.Module):
    """nflows couplings call ``net(x, context)``; its plain MLP takes only ``x``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.net(x)


def _nflows(model: str, d: int, lu: bool = False) -> tuple[nn.Module, Callable, Callable]:
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.nn.nets import MLP
    from nflows.transforms import (
        AffineCouplingTransform,
        CompositeTransform,
        LULinear,
        MaskedAffineAutoregressiveTransform,
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
        ReversePermutation,
    )

    # MADE with one feed-forward (non-residual) block = hidden layers (128, 128)
    made = {
        "hidden_features": HIDDEN[0],
        "num_blocks": len(HIDDEN) - 1,
        "use_residual_blocks": False,
    }
    layers: list[nn.Module] = []
    for i in range(TRANSFORMS):
        if model == "maf":
            layers.append(MaskedAffineAutoregressiveTransform(features=d, **made))
        elif model == "nsf":
            if lu:
                layers.append(LULinear(d, identity_init=True))
            layers.append(
                MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                    features=d, num_bins=BINS, tails="linear", tail_bound=BOUND, **made
                )
            )
        else:
            mask = torch.where(torch.arange(d) % 2 == i % 2, 1, -1)
            layers.append(
                AffineCouplingTransform(
                    mask, lambda n_in, n_out: _IgnoreContext(MLP((n_in,), (n_out,), list(HIDDEN)))
                )
            )
        if model != "realnvp" and i < TRANSFORMS - 1:
            layers.append(ReversePermutation(d))
    flow = Flow(CompositeTransform(layers), StandardNormal([d]))
    return flow, flow.log_prob, flow.sample


def _normflows(model: str, d: int, lu: bool = False) -> tuple[nn.Module, Callable, Callable]:
    import normflows as nf
    from normflows.flows.neural_spline.autoregressive import (
        MaskedPiecewiseRationalQuadraticAutoregressive,
    )

    made = {
        "hidden_features": HIDDEN[0],
        "num_blocks": len(HIDDEN) - 1,
        "use_residual_blocks": False,
    }
    flows: list[nn.Module] = []
    for i in range(TRANSFORMS):
        # normflows' log_prob runs each flow's *inverse*; wrapping the autoregressive layers in
        # nf.flows.Reverse puts their fast (one-pass) direction on the density side, as in MAF.
        if model == "maf":
            flows.append(nf.flows.Reverse(nf.flows.MaskedAffineAutoregressive(d, **made)))
        elif model == "nsf":
            layer = MaskedPiecewiseRationalQuadraticAutoregressive(
                features=d, num_bins=BINS, tails="linear", tail_bound=BOUND, **made
            )
            flows.append(nf.flows.Reverse(layer))
            if lu:
                # normflows' list runs noise -> data: this LU comes before the spline on the
                # density side; its fixed random permutation replaces the swap below
                flows.append(nf.flows.LULinearPermute(d, identity_init=True))
                continue
        else:
            net = nf.nets.MLP([d // 2, *HIDDEN, 2 * (d - d // 2)], init_zeros=True)
            flows.append(nf.flows.AffineCouplingBlock(net))
        if i < TRANSFORMS - 1:
            flows.append(nf.flows.Permute(d, mode="swap"))
    flow = nf.NormalizingFlow(nf.distributions.DiagGaussian(d, trainable=False), flows)
    return flow, flow.log_prob, (lambda n: flow.sample(n)[0])


def _exactflow(model: str, d: int, lu: bool = True) -> tuple[nn.Module, Callable, Callable]:
    """exactflow's NSF always has its LU layers (``lu`` is accepted for a uniform signature);
    the peers' NSF builders add theirs only with ``lu=True``."""
    import exactflow.models as em

    kw = {"transforms": TRANSFORMS, "hidden": HIDDEN}
    if model == "maf":
        flow = em.MAF(d, **kw)
    elif model == "nsf":
        flow = em.NSF(d, bins=BINS, bound=BOUND, autoregressive=True, **kw)
    else:
        flow = em.RealNVP(d, **kw)
    return flow, flow.log_prob, flow.sample


BUILDERS = {"zuko": _zuko, "nflows": _nflows, "normflows": _normflows, "exactflow": _exactflow}


def build(
    lib: str,
    model: str,
    d: int,
    device: torch.device,
    seed: int = 0,
    compile_sample: bool = False,
    lu: bool = False,
) -> Contender:
    """Build ``model`` at dimension ``d`` in library ``lib`` (seeded), on ``device``.

    ``lu`` gives the peers' NSF an identity-initialised LU-linear layer before every spline
    layer, as exactflow's NSF has.

    ``zuko+compile`` samples eagerly unless ``compile_sample``: compiling the D sequential
    passes of autoregressive sampling unrolls them into one huge graph (minutes per model).
    """
    torch.manual_seed(seed)
    if lib == "exactflow-trainer":
        return _trainer_contender(model, d, device)
    if lib in ("zuko+compile", "exactflow+compile"):
        if lib == "zuko+compile":
            module, log_prob, sample = _zuko(model, d, lu)
        else:
            module, log_prob, sample = _exactflow(model, d)
            module.validate = False  # what a user compiling for speed writes (as for zuko)
        module.to(device)
        cuda = device.type == "cuda"
        opts = {"mode": "reduce-overhead"} if cuda else {}
        # one compiled callable per use: shapes and grad mode differ between the tasks
        return Contender(
            lib,
            module,
            torch.compile(log_prob, dynamic=False, **opts),
            torch.compile(sample, dynamic=False, **opts) if compile_sample else sample,
            train_log_prob=torch.compile(log_prob, dynamic=False, **opts),
            cudagraphs=cuda,
        )
    module, log_prob, sample = BUILDERS[lib](model, d, lu)
    module.to(device)
    return Contender(lib, module, log_prob, sample)


def _trainer_contender(model: str, d: int, device: torch.device) -> Contender:
    """exactflow's model trained by ``Trainer(compile=True)``: one call of its guarded step
    (compiled forward and backward, fused Adam, the finiteness guard, CUDA graphs on CUDA)
    per training unit, configured as the plain step of the others: Adam at lr 1e-3, no
    weight decay, warm-up, clipping or EMA."""
    from exactflow.train import TrainConfig, Trainer

    module, log_prob, sample = _exactflow(model, d)
    config = TrainConfig(
        optimizer="adam",
        lr=1e-3,
        warmup=0,
        final_lr_ratio=1.0,
        clip_norm=0.0,
        ema=0.0,
        progress=False,
        checkpoint_every=0,
        device=str(device),
        compile=True,
    )
    # the rows only anchor the trainer; the benchmark hands train_step its batches itself
    trainer = Trainer(module, torch.zeros(2, d), None, config)
    return Contender(
        "exactflow-trainer",
        module,
        log_prob,
        sample,
        train_step=trainer.train_step,
        tasks=("train",),
    )


def available(libs: list[str]) -> list[str]:
    """The libraries of ``libs`` that import; prints why the others are skipped."""
    modules = {
        "zuko+compile": "zuko",
        "exactflow": "exactflow.models",
        "exactflow+compile": "exactflow.models",
        "exactflow-trainer": "exactflow.train",
    }
    ok = []
    for lib in libs:
        try:
            __import__(modules.get(lib, lib))
            ok.append(lib)
        except Exception as exc:  # any import failure means "skip this contender"
            print(f"# skipping {lib}: cannot import ({type(exc).__name__}: {exc})")
    return ok


# ---------------------------------------------------------------------------------------------
# speed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _task_fn(c: Contender, task: str, d: int, batch: int, device: torch.device) -> Callable:
    """A zero-argument callable running one unit of ``task`` for contender ``c``."""
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, d, generator=g, device=device)
    if task == "train" and c.train_step is not None:
        own = c.train_step

        def trainer_step() -> None:
            own(x)

        return trainer_step
    if task == "train":
        opt = torch.optim.Adam(c.module.parameters(), lr=1e-3)
        log_prob = c.train_log_prob or c.log_prob

        def step() -> None:
            if c.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            opt.zero_grad(set_to_none=True)
            loss = -log_prob(x).mean()
            loss.backward()
            opt.step()

        return step
    if task == "log_prob":

        def density() -> None:
            if c.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                c.log_prob(x)

        return density

    def draw() -> None:
        if c.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            c.sample(batch)

    return draw


def _seconds(fn: Callable, iters: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def measure(
    contenders: list[Contender],
    task: str,
    d: int,
    batch: int,
    rounds: int,
    target_s: float,
    device: torch.device,
) -> dict[str, dict]:
    """Median samples/s per contender, rounds interleaved; failures are reported, not raised."""
    fns, iters, out = {}, {}, {}
    for c in contenders:
        if task not in c.tasks:
            continue
        try:
            fn = _task_fn(c, task, d, batch, device)
            t0 = time.perf_counter()
            fn()  # first call: compilation, lazy init, allocator warm-up
            _sync(device)
            first = time.perf_counter() - t0
            one = _seconds(fn, 1, device)
            fns[c.name] = fn
            iters[c.name] = max(1, min(50, math.ceil(target_s / max(one, 1e-6))))
            out[c.name] = {"first_call_s": first, "times": []}
        except Exception as exc:
            out[c.name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
            print(f"#   {c.name} {task} failed: {out[c.name]['error']}")
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name]["times"].append(_seconds(fn, iters[name], device))
    for name in fns:
        med = statistics.median(out[name]["times"])
        out[name]["median_s"] = med
        out[name]["samples_per_s"] = batch / med
        out[name]["iters_per_round"] = iters[name]
    return out


def _fmt_rate(r: float | None) -> str:
    if r is None:
        return "-"
    if r >= 1e6:
        return f"{r / 1e6:.2f}M"
    if r >= 1e3:
        return f"{r / 1e3:.1f}k"
    return f"{r:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table (readable as plain text too)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def speed(args: argparse.Namespace, device: torch.device) -> dict:
    libs = available(args.libs)
    batches = {"train": args.train_batch, "log_prob": args.eval_batch, "sample": args.eval_batch}
    results: dict = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "peer_lu": bool(args.lu),
        "rows": [],
    }
    param_rows = []
    for model in args.models:
        for d in args.dims:
            contenders = []
            for lib in libs:
                try:
                    contenders.append(
                        build(lib, model, d, device, 0, args.compile_sample, lu=bool(args.lu))
                    )
                except Exception as exc:
                    print(f"# {lib} {model} D={d}: build failed: {type(exc).__name__}: {exc}")
            counts = {c.name: c.params() for c in contenders}
            param_rows.append([model, str(d)] + [f"{counts.get(lib, '-')}" for lib in libs])
            print(f"# {model} D={d} parameters: {counts}", flush=True)
            for task in args.tasks:
                batch = batches[task]
                res = measure(contenders, task, d, batch, args.rounds, args.target, device)
                row = {"model": model, "D": d, "task": task, "batch": batch, "libs": res}
                peer_rates = [
                    r["samples_per_s"]
                    for n, r in res.items()
                    if n in PEERS and "samples_per_s" in r
                ]
                row["best_peer"] = max(peer_rates) if peer_rates else None
                results["rows"].append(row)
                rates = {n: _fmt_rate(r.get("samples_per_s")) for n, r in res.items()}
                print(f"#   {task:8s} {rates}", flush=True)
    header = ["model", "D", *libs]
    print("\nParameter counts (trainable):")
    print(_table(header, param_rows))
    same = all(len({r for r in row[2:] if r != "-"}) <= 1 for row in param_rows)
    print("all libraries have equal parameter counts" if same else "NOTE: counts differ (above)")
    results["param_counts"] = param_rows
    for task in args.tasks:
        print(
            f"\n{task}: median samples/s over {args.rounds} interleaved rounds "
            f"(batch {batches[task]}, {device}, {torch.get_num_threads()} threads); "
            "(x) = ratio to the fastest peer"
        )
        rows = []
        for row in results["rows"]:
            if row["task"] != task:
                continue
            best = row["best_peer"]
            cells = [row["model"], str(row["D"])]
            for lib in libs:
                r = row["libs"].get(lib, {})
                rate = r.get("samples_per_s")
                if rate is None:
                    cells.append("err" if "error" in r else "-")
                else:
                    ratio = f" ({rate / best:.2f})" if best else ""
                    cells.append(_fmt_rate(rate) + ratio)
            rows.append(cells)
        print(_table(header, rows))
    _first_call_table(results, libs)
    _acceptance_table(results)
    return results


def _first_call_table(results: dict, libs: list[str]) -> None:
    """Seconds of each contender's first call per row: compilation for the compiled ones."""
    print("\nfirst call, s (for compiled contenders: the compile time the user waits)")
    rows = []
    for row in results["rows"]:
        cells = [row["model"], str(row["D"]), row["task"]]
        for lib in libs:
            first = row["libs"].get(lib, {}).get("first_call_s")
            cells.append("-" if first is None else f"{first:.1f}")
        rows.append(cells)
    print(_table(["model", "D", "task", *libs], rows))


def _acceptance_table(results: dict) -> None:
    """exactflow eager against the best eager peer, and the compiled exactflow contenders
    against ``zuko+compile``, per row (samples/s ratios; above 1 means exactflow is faster)."""
    eager = ("zuko", "nflows", "normflows")
    rows = []
    for row in results["rows"]:
        rate = {n: r.get("samples_per_s") for n, r in row["libs"].items()}
        peers = [rate[n] for n in eager if rate.get(n)]
        ref = rate.get("zuko+compile")

        def ratio(num: float | None, den: float | None) -> str:
            return "-" if not num or not den else f"{num / den:.2f}"

        rows.append(
            [
                row["model"],
                str(row["D"]),
                row["task"],
                ratio(rate.get("exactflow"), max(peers) if peers else None),
                ratio(rate.get("exactflow+compile"), ref),
                ratio(rate.get("exactflow-trainer"), ref),
            ]
        )
    header = [
        "model",
        "D",
        "task",
        "exactflow / best eager peer",
        "exactflow+compile / zuko+compile",
        "exactflow-trainer / zuko+compile",
    ]
    print("\nratios (samples/s; > 1: exactflow faster)")
    print(_table(header, rows))


# ---------------------------------------------------------------------------------------------
# quality


def _train(
    c: Contender,
    train: Tensor,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    transform: Callable[[Tensor, torch.Generator], Tensor] | None = None,
) -> bool:
    """Adam on the mean NLL with seeded minibatches; False if the loss ever went non-finite."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(c.module.parameters(), lr=lr)
    finite = True
    for _ in range(steps):
        idx = torch.randint(0, train.shape[0], (batch,), generator=g)
        x = train[idx]
        if transform is not None:
            x = transform(x, g)
        loss = -c.log_prob(x).mean()
        if not torch.isfinite(loss):
            finite = False
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return finite


def _mean_se(values: list[float]) -> tuple[float, float]:
    if any(not math.isfinite(v) for v in values):
        return math.nan, math.nan
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return mean, se


def _quality_table(results: list[dict], libs: list[str], unit: str) -> None:
    header = ["model", "data", *[f"{lib} ({unit})" for lib in libs], "exactflow ok?"]
    rows = []
    for r in results:
        cells = [r["model"], r["data"]]
        for lib in libs:
            s = r["libs"].get(lib)
            cells.append("-" if s is None else f"{s['mean']:.3f} ± {s['se']:.3f}")
        ef, peers = r["libs"].get("exactflow"), [r["libs"][p] for p in PEERS if p in r["libs"]]
        peers = [p for p in peers if math.isfinite(p["mean"])]
        if ef is None or not peers:
            cells.append("-")
        else:
            best = min(peers, key=lambda p: p["mean"])
            # lower is better: exactflow may exceed the best peer by at most one standard error
            cells.append("yes" if ef["mean"] <= best["mean"] + best["se"] else "NO")
        rows.append(cells)
    print(_table(header, rows))


def toy_quality(args: argparse.Namespace) -> list[dict]:
    from exactflow.data.toy import toy_splits

    libs = [lib for lib in available(args.libs) if lib not in SPEED_ONLY]
    results = []
    for data in args.datasets:
        # one fixed data draw for everyone; seeds vary initialisation and minibatch order
        splits = toy_splits(data, n_train=10_000, n_val=0, n_test=10_000, seed=1234)
        for model in args.models:
            row = {"model": model, "data": data, "libs": {}}
            for lib in libs:
                nlls, t0 = [], time.perf_counter()
                for seed in range(args.seeds):
                    try:
                        c = build(lib, model, 2, torch.device("cpu"), seed=seed)
                        ok = _train(c, splits.train, args.steps, args.batch, args.lr, seed)
                        with torch.no_grad():
                            nll = -c.log_prob(splits.test).mean().item() if ok else math.nan
                    except Exception as exc:
                        print(f"# {lib} {model} {data} seed {seed}: {type(exc).__name__}: {exc}")
                        nll = math.nan
                    nlls.append(nll if math.isfinite(nll) else math.nan)
                mean, se = _mean_se(nlls)
                row["libs"][lib] = {"mean": mean, "se": se, "nlls": nlls}
                secs = time.perf_counter() - t0
                print(f"# {data} {model} {lib}: {mean:.4f} ± {se:.4f} ({secs:.0f} s)", flush=True)
            results.append(row)
    print(
        f"\nTest NLL (nats, 10k test points) after {args.steps} Adam steps, batch {args.batch}, "
        f"lr {args.lr}; mean ± s.e. over {args.seeds} seeds (lower is better)"
    )
    _quality_table(results, libs, "nats")
    return results


# digits: integer pixels v in {0..16}; u ~ U[0, 1); x = (v + u) / 17; y = logit(a + (1 - 2a) x)
_LEVELS, _ALPHA = 17.0, 0.05


def _to_logit(v: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Dequantise and logit-transform pixels; returns ``y`` and ``log|dy/d(v+u)|`` per row."""
    s = _ALPHA + (1 - 2 * _ALPHA) * (v + torch.rand(v.shape, generator=g)) / _LEVELS
    y = torch.log(s) - torch.log1p(-s)
    ladj = (math.log((1 - 2 * _ALPHA) / _LEVELS) - torch.log(s) - torch.log1p(-s)).sum(-1)
    return y, ladj


def digits(args: argparse.Namespace) -> list[dict]:
    from sklearn.datasets import load_digits

    libs = [lib for lib in available(args.libs) if lib not in SPEED_ONLY]
    pixels = torch.as_tensor(load_digits().data, dtype=torch.float32)
    perm = torch.randperm(pixels.shape[0], generator=torch.Generator().manual_seed(0))
    n_test = pixels.shape[0] // 5
    test, train = pixels[perm[:n_test]], pixels[perm[n_test:]]
    d = pixels.shape[1]
    results = []
    for model in args.models:
        row = {"model": model, "data": "digits", "libs": {}}
        for lib in libs:
            bpds, t0 = [], time.perf_counter()
            for seed in range(args.seeds):
                try:
                    c = build(lib, model, d, torch.device("cpu"), seed=seed)
                    ok = _train(
                        c,
                        train,
                        args.digits_steps,
                        args.digits_batch,
                        args.lr,
                        seed,
                        transform=lambda v, g: _to_logit(v, g)[0],
                    )
                    with torch.no_grad():
                        y, ladj = _to_logit(test, torch.Generator().manual_seed(99))
                        nll = -(c.log_prob(y) + ladj).mean().item() if ok else math.nan
                    bpd = nll / (d * math.log(2))
                except Exception as exc:
                    print(f"# {lib} {model} digits seed {seed}: {type(exc).__name__}: {exc}")
                    bpd = math.nan
                bpds.append(bpd if math.isfinite(bpd) else math.nan)
            mean, se = _mean_se(bpds)
            row["libs"][lib] = {"mean": mean, "se": se, "bpd": bpds}
            secs = time.perf_counter() - t0
            print(f"# digits {model} {lib}: {mean:.4f} ± {se:.4f} bits/dim ({secs:.0f} s)")
        results.append(row)
    print(
        f"\nDigits test bits/dim in pixel space (17 levels, uniform dequantisation, logit "
        f"alpha={_ALPHA}) after {args.digits_steps} Adam steps, batch {args.digits_batch}, "
        f"lr {args.lr}; mean ± s.e. over {args.seeds} seeds"
    )
    _quality_table(results, libs, "bits/dim")
    return results


def _as_exactflow(c: Contender, pre: nn.Module, d: int) -> nn.Module:
    """Peer ``c`` behind exactflow's pre-processing ``pre``, as an exactflow ``Flow`` that
    exactflow's ``Trainer`` can fit: ``log p(v + u) = log p_peer(y) + log|dy/d(v + u)|`` with
    ``(y, log|dy/d(v + u)|) = pre(v + u)``. Density only (sampling is not wired up)."""
    from exactflow.distributions import StandardNormal
    from exactflow.flow import Flow

    class PeerFlow(Flow):
        def __init__(self) -> None:
            # the base is never used for the density; it anchors dtype and device for Trainer
            super().__init__(pre, StandardNormal(d))
            self.peer = c.module

        def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
            y, ladj = self.transform(x)
            return c.log_prob(y) + ladj

    return PeerFlow()


# ``--peer-adam-lr``: what the peers' own examples do -- Adam at a constant learning rate, no
# warm-up, clipping, EMA or weight decay, and the weights of the last step (one validation,
# at the end)
PLAIN_ADAM = {
    "optimizer": "adam",
    "weight_decay": 0.0,
    "warmup": 0,
    "final_lr_ratio": 1.0,
    "clip_norm": 0.0,
    "ema": 0.0,
    "patience": 0,
}


def default_budget(args: argparse.Namespace, data: str) -> list[dict]:
    """NSF on ``data`` at ``exactflow train --data DATA --model nsf``'s default configuration.

    Every library's model is fitted by exactflow's ``Trainer`` with that configuration (steps,
    batch, optimiser, warm-up + cosine, clipping, EMA, best-on-validation weights) on the same
    split and the same batches (and, for discrete data, the same dequantisation noise);
    exactflow's own model is built exactly as the command builds it. Test NLL as the command
    reports it: nats for continuous data, bits/dim in pixel space for discrete data.
    """
    from exactflow.app.config import RunConfig
    from exactflow.app.run import build_flow, default_config
    from exactflow.data import bits_per_dim, dequantize, load_dataset
    from exactflow.models import NSF
    from exactflow.train import Trainer

    # the peers are built from this file's constants: they must be what the command trains
    base = default_config(data, "nsf")
    nsf_defaults = {k: v.default for k, v in inspect.signature(NSF).parameters.items()}
    ours = {"transforms": TRANSFORMS, "hidden": list(HIDDEN), "bins": BINS, "bound": BOUND}
    used = {k: base.model_args.get(k, nsf_defaults[k]) for k in ours}
    used["hidden"] = list(used["hidden"])
    if used != ours:
        raise RuntimeError(f"the {data} default NSF is {used}, this benchmark builds {ours}")
    lu = True if args.lu is None else args.lu
    t = base.train
    print(
        f"# default {data} budget: {t.steps} steps x batch {t.batch_size}, {t.optimizer} lr "
        f"{t.lr} weight decay {t.weight_decay}, warm-up {t.warmup} then cosine to "
        f"{t.final_lr_ratio} x lr, clip {t.clip_norm}, EMA {t.ema}, validate every "
        f"{t.eval_every} (patience {t.patience}), data {base.data_args}; peers' LU: {lu}",
        flush=True,
    )
    libs = [lib for lib in available(args.libs) if lib not in SPEED_ONLY]
    # (label, library, exactflow spline map_kwargs, training-option overrides): each
    # --exactflow-map-kwargs is one more exactflow contender and each --peer-adam-lr one more
    # per peer, trained on the same seeds so that they pair with every other contender
    variants = [(lib, lib, None, {}) for lib in libs]
    if args.peer_adam_lr:  # the peers as their users train them: a plain Adam loop instead
        variants = [v for v in variants if v[1] == "exactflow"]
        plain = {**PLAIN_ADAM, "eval_every": t.steps}
        peers = [lib for lib in libs if lib != "exactflow"]
        variants += [
            (f"{lib} adam {lr:g}", lib, None, {**plain, "lr": lr})
            for lib in peers
            for lr in args.peer_adam_lr
        ]
    for text in args.exactflow_map_kwargs or []:
        variants.append((f"exactflow {text}", "exactflow", _map_kwargs(text), {}))
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    row: dict = {"model": "nsf", "data": data, "seeds": seeds, "libs": {}}
    unit = "nats"
    for label, lib, map_kwargs, overrides in variants:
        runs = []
        for seed in seeds:
            train = {"progress": False, **overrides}
            cfg = RunConfig.from_dict({"seed": seed, "train": train}, base)
            dataset = load_dataset(cfg.data, cfg.seed, **cfg.data_args)
            d = dataset.features
            unit = "bits/dim" if dataset.discrete else "nats"
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    if lib == "exactflow":
                        model_args = dict(cfg.model_args)
                        if map_kwargs is not None:
                            model_args["map_kwargs"] = map_kwargs
                        flow, _ = build_flow(cfg.model, model_args, dataset.meta(), dataset)
                    else:
                        c = build(lib, "nsf", d, torch.device("cpu"), seed=seed, lu=lu)
                        flow = _as_exactflow(c, dataset.preprocess((d,)), d)
                params = sum(p.numel() for p in flow.parameters() if p.requires_grad)
                trainer = Trainer(
                    flow,
                    dataset.train,
                    dataset.val,
                    cfg.train,
                    batch_fn=dequantize if dataset.discrete else None,
                )
                result = trainer.fit()
                nll, _ = trainer.nll(dataset.test, seed=cfg.seed + 1)
                run = {
                    "nll": bits_per_dim(nll, d) if dataset.discrete else nll,
                    "train_s": result.wall_time,
                    "steps": result.steps,
                    "best_step": result.best_step,
                    "params": params,
                }
            except Exception as exc:
                print(f"# {label} nsf {data} seed {seed}: {type(exc).__name__}: {exc}")
                run = {"nll": math.nan, "train_s": math.nan, "steps": 0, "best_step": -1}
            print(f"#   {label} seed {seed}: {json.dumps(run)}", flush=True)
            runs.append(run)
        mean, se = _mean_se([r["nll"] for r in runs])
        row["libs"][label] = {"mean": mean, "se": se, "runs": runs}
        print(f"# {data} nsf {label}: {mean:.4f} ± {se:.4f} {unit}", flush=True)
    if args.reference:
        _merge_reference(row, args.reference)
    print(
        f"\n{data} test NLL ({unit}) at exactflow's default {data} budget "
        f"({t.steps} steps x {t.batch_size}), every library fitted by exactflow's Trainer; "
        f"mean ± s.e. over {args.seeds} seeds (seed = split, init, batches)"
    )
    rows = []
    for lib, r in row["libs"].items():
        runs = r["runs"]
        rows.append(
            [
                lib,
                str(runs[0].get("params", "-")),
                "/".join(str(x["steps"]) for x in runs),
                "/".join(str(x["best_step"]) for x in runs),
                f"{statistics.fmean(x['train_s'] for x in runs):.0f}",
                f"{r['mean']:.3f} ± {r['se']:.3f}",
                " ".join(f"{x['nll']:.3f}" for x in runs),
            ]
        )
    header = ["library", "params", "steps", "best step", "train s/run", unit, "per seed"]
    print(_table(header, rows))
    _paired_table(row, unit)
    _quality_table([row], [lib for lib in row["libs"] if lib in LIBRARIES], unit)
    return [row]


def _map_kwargs(text: str) -> dict:
    """A ``--exactflow-map-kwargs`` value: a JSON object of spline arguments."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--exactflow-map-kwargs: not JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise SystemExit(f"--exactflow-map-kwargs: expected a JSON object, got {text!r}")
    return value


def _merge_reference(row: dict, path: str) -> None:
    """Add the contenders of an earlier ``--default-config --json`` run on the same data and
    seeds that this run did not train (training is deterministic at a fixed thread count,
    so the earlier runs pair with these seed by seed)."""
    with open(path) as fh:
        ref = json.load(fh)["default_config"][0]
    if ref["data"] != row["data"] or ref.get("seeds") != row["seeds"]:
        raise SystemExit(
            f"--reference {path}: data {ref['data']!r} seeds {ref.get('seeds')}, "
            f"this run has {row['data']!r} seeds {row['seeds']}"
        )
    for label, value in ref["libs"].items():
        if label not in row["libs"]:
            row["libs"][label] = value
            print(f"# {label}: {value['mean']:.4f} ± {value['se']:.4f} (from {path})")


def _paired_table(row: dict, unit: str) -> None:
    """Seed-by-seed differences ``contender - reference`` (mean ± s.e. over seeds) against
    zuko and against exactflow's default, whichever of them ran: seeds share the split and
    the batches, so the paired difference has far less noise than the two means."""
    refs = [r for r in ("zuko", "exactflow") if r in row["libs"]]
    if not refs or len(row["libs"]) < 2:
        return
    rows = []
    for label, value in row["libs"].items():
        cells = [label, f"{value['mean']:.4f} ± {value['se']:.4f}"]
        for ref in refs:
            diffs = [
                a["nll"] - b["nll"]
                for a, b in zip(value["runs"], row["libs"][ref]["runs"], strict=True)
            ]
            mean, se = _mean_se(diffs)
            wins = sum(x < 0 for x in diffs)
            cells.append("-" if label == ref else f"{mean:+.4f} ± {se:.4f} ({wins}/{len(diffs)})")
        rows.append(cells)
    print(
        f"\nPaired differences ({unit}, lower is better; (n/N) = seeds where the contender is "
        "lower)"
    )
    print(_table(["contender", unit, *[f"- {ref}" for ref in refs]], rows))


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument(
        "--libs",
        nargs="*",
        choices=LIBRARIES,
        default=list(LIBRARIES),
        help="contenders (none: only the --exactflow-map-kwargs variants)",
    )
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median taken)")
    ap.add_argument("--target", type=float, default=0.3, help="seconds per timed measurement")
    ap.add_argument("--train-batch", type=int, default=1024)
    ap.add_argument("--eval-batch", type=int, default=8192)
    ap.add_argument(
        "--compile-sample",
        action="store_true",
        help="also compile zuko's sampling (slow to compile: D passes get unrolled)",
    )
    ap.add_argument("--quick", action="store_true", help="D in {2, 16}, 3 rounds, 0.1 s each")
    ap.add_argument(
        "--quality", action="store_true", help="the quality suite (benchmarks/quality.py) instead"
    )
    ap.add_argument(
        "--toy-quality",
        action="store_true",
        help="the earlier 3-seed toy check (plain Adam, last weights) behind older README figures",
    )
    ap.add_argument("--datasets", nargs="+", default=["moons", "8gaussians"])
    ap.add_argument("--steps", type=int, default=500, help="--toy-quality: Adam steps")
    ap.add_argument("--batch", type=int, default=256, help="--toy-quality: batch size")
    ap.add_argument("--digits", action="store_true", help="bits/dim on sklearn digits instead")
    ap.add_argument(
        "--default-config",
        metavar="DATA",
        default=None,
        help="NSF test NLL on DATA at `exactflow train --data DATA`'s default budget",
    )
    ap.add_argument(
        "--digits-default", action="store_true", help="the same as --default-config digits"
    )
    ap.add_argument(
        "--lu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="give the peers' NSF (zuko+compile's too) an identity-initialised LU-linear layer "
        "before every spline layer, as exactflow's NSF has, so that every library runs the "
        "same model; default on for --default-config, off (their stock NSF) for speed mode",
    )
    ap.add_argument(
        "--exactflow-map-kwargs",
        metavar="JSON",
        action="append",
        default=None,
        help="--default-config: one more exactflow NSF whose splines get these arguments, "
        "e.g. '{\"derivative_range\": [0.25, 8]}' (repeatable)",
    )
    ap.add_argument(
        "--peer-adam-lr",
        metavar="LR",
        type=float,
        nargs="+",
        default=None,
        help="--default-config: train the peers with a plain constant-lr Adam loop at each LR "
        "(same steps and batches) instead of exactflow's training configuration",
    )
    ap.add_argument(
        "--reference",
        metavar="FILE",
        default=None,
        help="--default-config: pair with the contenders of an earlier --json run (same seeds)",
    )
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--first-seed", type=int, default=0, help="--default-config: seeds from this one on"
    )
    ap.add_argument("--digits-steps", type=int, default=300)
    ap.add_argument("--digits-batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--quality" in argv:  # the suite has its own options: hand it every other argument
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import quality

        quality.main([a for a in argv if a != "--quality"])
        return
    args = ap.parse_args(argv)
    if args.quick:
        args.dims, args.rounds, args.target = [2, 16], 3, 0.1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    versions = {"torch": torch.__version__}
    for lib in ("zuko", "nflows", "normflows", "exactflow"):
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    print(f"# versions: {versions}; argv: {' '.join(sys.argv[1:])}", flush=True)
    try:
        if args.toy_quality:
            out = {"quality": toy_quality(args)}
        elif args.digits:
            out = {"digits": digits(args)}
        elif args.default_config or args.digits_default:
            data = args.default_config or "digits"
            out = {"default_config": default_budget(args, data)}
        else:
            out = speed(args, device)
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.exit(130)
    if args.json:
        out["versions"] = versions
        out["argv"] = sys.argv[1:]
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
