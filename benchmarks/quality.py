"""Multi-seed density-quality suite: exactflow against zuko, nflows and normflows (issue 23).

Three sections, each written to the ``--json`` file after every run (a killed sweep keeps what
it measured) and printed run by run:

* ``plain`` (default): every library's MAF, NSF and RealNVP from ``peers.py``'s builders (5
  transforms, MLP 128x128, 8 bins, bound 5) trained by one plain loop -- Adam lr 1e-3, batch
  512, cosine decay of the lr to 0 over the steps, gradient-norm clipping at 5, validation
  every 50 steps and the best-validation weights restored -- 600 steps on the 2-D toys, 900 on
  the tables. Test NLL is the mean over the test split: nats in the original data space for
  the toys and the continuous tables (standardised with the training mean and std, the
  log-det added back), bits/dim in pixel space for digits (uniform dequantisation and
  ``peers._to_logit``'s logit, the same noise for everyone). Seed ``s`` fixes the
  initialisation, the minibatch order and the dequantisation noise; the toys share one data
  draw, the tables are split by ``s`` (so every library sees the same split per seed). Per
  cell: mean ± s.e. over seeds, and the seed-paired difference exactflow - best peer (the
  peer with the lowest mean), verdict ``better`` if it is below -1 s.e., ``ok`` if at most
  +1 s.e., else ``worse``.
* ``recipe`` (``--recipe``): exactflow under ``exactflow train``'s own recipe for the data set
  and model (``default_config`` + ``train_run``, via ``tiny_tables.run_cell``), same seeds,
  next to the full-covariance Gaussian of the same training split; flags non-finite and
  exploding test NLLs (worse than the Gaussian by more than 1 nat per dimension; for digits,
  above log2(17) bits/dim, the uniform distribution over the pixel levels).
* ``ablation`` (``--ablation VARIANT ...``): exactflow's model only, in the plain loop, with
  spline, log-scale, permutation and initialisation variants, paired against exactflow's
  default seed by seed.

    nice -n 10 python benchmarks/quality.py --threads 1 --json /tmp/quality_toys.json
    nice -n 10 python benchmarks/quality.py --threads 1 --datasets iris breast_cancer digits
    nice -n 10 python benchmarks/quality.py --threads 1 --recipe --datasets moons iris
    nice -n 10 python benchmarks/quality.py --threads 1 --datasets 8gaussians --models maf \\
        --ablation lsb5 lsb10 random-init
    python benchmarks/quality.py --quick
    python benchmarks/quality.py --summarise /tmp/quality_toys.json /tmp/quality_tables.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers

TOYS = ("8gaussians", "checkerboard", "moons", "circles", "swissroll", "pinwheel", "spirals")
TABLES = ("iris", "breast_cancer", "digits")
PEER_LIBS = ("zuko", "nflows", "normflows")
LIBS = (*PEER_LIBS, "exactflow")
LR, BATCH, CLIP, EVAL_EVERY = 1e-3, 512, 5.0, 50
TOY_SIZES = {"n_train": 10_000, "n_val": 2_000, "n_test": 10_000}
TOY_DATA_SEED = 1234
LOG2_LEVELS = math.log2(17)


# ---------------------------------------------------------------------------------------------
# data: every split in the space the model is trained in, plus what maps NLLs back


class Task:
    """One data set for one seed: train/val/test tensors and how a batch reaches the model.

    ``prepare(x, g)`` maps raw rows ``(B, D)`` to model inputs ``(B, D)`` and the per-row
    log-det ``(B,)`` of that map (dequantisation noise drawn from ``g``); ``to_unit`` turns a
    mean NLL in nats of the raw space into the reported unit.
    """

    def __init__(self, name: str, seed: int):
        from exactflow.data import load_dataset, toy_splits

        self.name, self.seed = name, seed
        self.discrete = name == "digits"
        if name in TOYS:
            parts = toy_splits(name, seed=TOY_DATA_SEED, **TOY_SIZES)
            self.train, self.val, self.test = parts.train, parts.val, parts.test
        else:
            ds = load_dataset(name, seed)
            self.train, self.val, self.test = (t.float() for t in (ds.train, ds.val, ds.test))
        self.d = self.train.shape[1]
        self.unit = "bits/dim" if self.discrete else "nats"
        if name in TABLES and not self.discrete:
            self.mean = self.train.mean(0)
            self.std = self.train.std(0).clamp_min(1e-12)
        else:
            self.mean = self.std = None

    def prepare(self, x: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        if self.discrete:
            return peers._to_logit(x, g)
        if self.std is not None:
            return (x - self.mean) / self.std, -self.std.log().sum().expand(x.shape[0])
        return x, x.new_zeros(x.shape[0])

    def to_unit(self, nll: float) -> float:
        return nll / (self.d * math.log(2)) if self.discrete else nll


# ---------------------------------------------------------------------------------------------
# the plain loop


@torch.no_grad()
def evaluate(log_prob: Callable, module: nn.Module, task: Task, x: Tensor, noise_seed: int):
    """Mean NLL (nats, raw space) of rows ``x``, in chunks; NaN if any row is non-finite."""
    module.eval()
    g = torch.Generator().manual_seed(noise_seed)
    total = 0.0
    for chunk in x.split(4096):
        y, ladj = task.prepare(chunk, g)
        lp = log_prob(y) + ladj
        if not torch.isfinite(lp).all():
            module.train()
            return math.nan
        total += float(lp.double().sum())
    module.train()
    return -total / x.shape[0]


def fit_plain(module: nn.Module, log_prob: Callable, task: Task, steps: int, seed: int) -> dict:
    """The issue's loop; returns the test NLL at the best-validation weights and run facts."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)
    g = torch.Generator().manual_seed(seed)
    n = task.train.shape[0]
    batch = min(BATCH, n)
    order, pos = torch.randperm(n, generator=g), 0
    best, best_step, best_state, diverged = math.inf, -1, None, None
    t0 = time.perf_counter()
    module.train()
    for step in range(1, steps + 1):
        if pos + batch > n:  # a new epoch: reshuffle
            order, pos = torch.randperm(n, generator=g), 0
        x = task.train[order[pos : pos + batch]]
        pos += batch
        y, _ = task.prepare(x, g)
        loss = -log_prob(y).mean()
        if not torch.isfinite(loss):
            diverged = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, CLIP)
        if not torch.isfinite(norm):
            diverged = step
            break
        opt.step()
        sched.step()
        if step % EVAL_EVERY == 0 or step == steps:
            val = evaluate(log_prob, module, task, task.val, noise_seed=seed + 10_000)
            if math.isfinite(val) and val < best:
                best, best_step = val, step
                best_state = copy.deepcopy(module.state_dict())
    train_s = time.perf_counter() - t0
    if best_state is None:
        test = math.nan
    else:
        module.load_state_dict(best_state)
        test = evaluate(log_prob, module, task, task.test, noise_seed=seed + 20_000)
    return {
        "nll": task.to_unit(test) if math.isfinite(test) else math.nan,
        "val": task.to_unit(best) if math.isfinite(best) else math.nan,
        "best_step": best_step,
        "diverged_at": diverged,
        "train_s": round(train_s, 2),
    }


# ---------------------------------------------------------------------------------------------
# exactflow variants for the ablation


def _reinit_outputs(module: nn.Module) -> None:
    """Give every conditioner's zero output layer nn.Linear's default random initialisation,
    so the flow no longer starts at the identity."""
    from exactflow.nets import MADE, MLP

    for m in module.modules():
        if isinstance(m, MADE):
            w, b = m.weights[-1], m.biases[-1]
            bound = 1.0 / math.sqrt(w.shape[1])
            with torch.no_grad():
                w.uniform_(-bound, bound)
                b.uniform_(-bound, bound)
        elif isinstance(m, MLP):
            linears = [x for x in m.net if isinstance(x, nn.Linear)]
            linears[-1].reset_parameters()


def _stack(model: str, d: int, map_kwargs: dict, mixer: str) -> nn.Module:
    """exactflow's MAF or NSF with ``mixer`` between layers: ``"lu"`` (an LU-linear map
    starting at the reversal) or ``"perm"`` (the bare reversal / random permutation)."""
    from exactflow.flow import Flow
    from exactflow.models.coupling import standard_base
    from exactflow.transforms import Autoregressive, Compose, LULinear, Permutation

    name = "rq-spline" if model == "nsf" else "affine"
    reverse = torch.arange(d - 1, -1, -1)
    layers = []
    for _ in range(peers.TRANSFORMS):
        perm = reverse if d <= 2 else torch.randperm(d)
        layers.append(LULinear(d, permutation=perm) if mixer == "lu" else Permutation(perm))
        layers.append(Autoregressive(name, d, peers.HIDDEN, map_kwargs=map_kwargs))
    return Flow(Compose(layers), standard_base(d))


SPLINE = {"bins": peers.BINS, "bound": peers.BOUND}
# name -> (models it applies to, builder options); see build_variant
VARIANTS: dict[str, tuple[tuple[str, ...], dict]] = {
    "free": (("nsf",), {"map_kwargs": {"derivatives": "free"}}),
    "free-min2%": (
        ("nsf",),
        {"map_kwargs": {"derivatives": "free", "min_width": 0.02, "min_height": 0.02}},
    ),
    "range(0.25,8)": (("nsf",), {"map_kwargs": {"derivative_range": [0.25, 8.0]}}),
    "range(0.1,10)": (("nsf",), {"map_kwargs": {"derivative_range": [0.1, 10.0]}}),
    "min1%": (("nsf",), {"map_kwargs": {"min_width": 0.01, "min_height": 0.01}}),
    "min0.1%": (("nsf",), {"map_kwargs": {"min_width": 1e-3, "min_height": 1e-3}}),
    "perm": (("nsf",), {"mixer": "perm"}),
    "lu": (("maf",), {"mixer": "lu"}),
    "lsb0.5": (("maf", "realnvp"), {"log_scale_bound": 0.5}),
    "lsb1.5": (("maf", "realnvp"), {"log_scale_bound": 1.5}),
    "lsb5": (("maf", "realnvp"), {"log_scale_bound": 5.0}),
    "lsb10": (("maf", "realnvp"), {"log_scale_bound": 10.0}),
    "random-init": (("maf", "nsf", "realnvp"), {"random_init": True}),
}


def build_variant(variant: str, model: str, d: int, seed: int) -> tuple[nn.Module, Callable]:
    """exactflow's ``model`` at dimension ``d`` (seeded) with ``variant``'s change."""
    import exactflow.models as em

    torch.manual_seed(seed)
    opts = dict(VARIANTS[variant][1])
    random_init = opts.pop("random_init", False)
    kw = {"transforms": peers.TRANSFORMS, "hidden": peers.HIDDEN}
    if "mixer" in opts:
        base = {"log_scale_bound": 3.0} if model == "maf" else SPLINE
        flow = _stack(model, d, {**base, **opts.get("map_kwargs", {})}, opts["mixer"])
    elif model == "nsf":
        flow = em.NSF(
            d, bins=peers.BINS, bound=peers.BOUND, map_kwargs=opts.get("map_kwargs"), **kw
        )
    elif model == "maf":
        flow = em.MAF(d, log_scale_bound=opts.get("log_scale_bound", 3.0), **kw)
    else:
        flow = em.RealNVP(d, log_scale_bound=opts.get("log_scale_bound", 3.0), **kw)
    if random_init:
        _reinit_outputs(flow)
    return flow, flow.log_prob


# ---------------------------------------------------------------------------------------------
# sections


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


class Results:
    """Rows of one sweep, rewritten to ``path`` after every run."""

    def __init__(self, path: str | None, meta: dict):
        self.path, self.data = path, {"meta": meta, "plain": [], "recipe": [], "ablation": []}

    def cell(self, section: str, data: str, model: str, unit: str, seeds: list[int]) -> dict:
        row = {"data": data, "model": model, "unit": unit, "seeds": seeds, "libs": {}}
        self.data[section].append(row)
        return row

    def save(self) -> None:
        if self.path:
            tmp = Path(self.path + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            tmp.replace(self.path)


def _steps(args: argparse.Namespace, data: str) -> int:
    return args.steps_toy if data in TOYS else args.steps_table


def _one(label: str, data: str, model: str, seed: int, build: Callable, task: Task, steps):
    try:
        module, log_prob = build()
        run = fit_plain(module, log_prob, task, steps, seed)
        run["params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    except Exception as exc:  # a library failing on a cell is reported and skipped
        run = {"nll": math.nan, "error": _error(exc)}
    run["seed"] = seed
    print(f"  {data} {model} {label} seed {seed}: {json.dumps(run)}", flush=True)
    return run


def run_plain(args: argparse.Namespace, res: Results, variants: list[str] | None) -> None:
    """The plain loop over data x model x library (or, with ``variants``, exactflow's default
    and its ablation variants)."""
    libs = [lib for lib in peers.available(args.libs) if lib in LIBS]
    section = "ablation" if variants is not None else "plain"
    for data in args.datasets:
        for model in args.models:
            if variants is not None:
                todo = ["exactflow"] + [v for v in variants if model in VARIANTS[v][0]]
                if len(todo) == 1:
                    continue
            else:
                todo = libs
            steps = _steps(args, data)
            unit = "bits/dim" if data == "digits" else "nats"
            row = res.cell(section, data, model, unit, args.seeds)
            row["steps"] = steps
            for label in todo:
                row["libs"][label] = {"runs": []}
            # seeds outermost so an interrupted cell still has paired runs for every library
            for seed in args.seeds:
                try:
                    task = Task(data, seed)
                except Exception as exc:
                    print(f"# {data} seed {seed}: cannot load ({_error(exc)})", flush=True)
                    continue
                for label in todo:
                    if label in LIBS:

                        def build(lib=label, m=model, d=task.d, s=seed):
                            c = peers.build(lib, m, d, torch.device("cpu"), seed=s)
                            return c.module, c.log_prob

                    else:

                        def build(v=label, m=model, d=task.d, s=seed):
                            return build_variant(v, m, d, s)

                    run = _one(label, data, model, seed, build, task, steps)
                    row["libs"][label]["runs"].append(run)
                    res.save()
            _summarise_row(row)
            res.save()
            print(_row_line(row, section), flush=True)


def run_recipe(args: argparse.Namespace, res: Results) -> None:
    """exactflow under ``exactflow train``'s own configuration per data set and model."""
    import tiny_tables

    for data in args.datasets:
        for model in args.models:
            unit = "bits/dim" if data == "digits" else "nats"
            row = res.cell("recipe", data, model, unit, args.seeds)
            runs = row["libs"].setdefault("exactflow train", {"runs": []})["runs"]
            for seed in args.seeds:
                t0 = time.perf_counter()
                try:
                    r = tiny_tables.run_cell(data, model, seed)
                    run = {
                        "nll": r["test_nll"],
                        "gaussian": r["gaussian_nll"] if data != "digits" else math.nan,
                        "steps": r["steps"],
                        "n_params": r["n_params"],
                        "n_train": r["n_train"],
                    }
                except Exception as exc:
                    run = {"nll": math.nan, "error": _error(exc)}
                run["seed"] = seed
                run["train_s"] = round(time.perf_counter() - t0, 1)
                if not isinstance(run["nll"], float) or not math.isfinite(run["nll"]):
                    run["nll"] = math.nan
                runs.append(run)
                print(f"  recipe {data} {model} seed {seed}: {json.dumps(run)}", flush=True)
                res.save()
            _summarise_row(row)
            res.save()


# ---------------------------------------------------------------------------------------------
# summaries


def _mean_se(values: list[float]) -> tuple[float, float]:
    return peers._mean_se(values) if values else (math.nan, math.nan)


def _summarise_row(row: dict) -> None:
    for value in row["libs"].values():
        value["mean"], value["se"] = _mean_se([r["nll"] for r in value["runs"]])


def _paired(a: dict, b: dict) -> tuple[float, float, int, int]:
    """Mean and s.e. of ``a - b`` over the seeds both ran, seeds where ``a`` is lower, count."""
    rb = {r["seed"]: r["nll"] for r in b["runs"]}
    diffs = [r["nll"] - rb[r["seed"]] for r in a["runs"] if r["seed"] in rb]
    mean, se = _mean_se(diffs)
    return mean, se, sum(x < 0 for x in diffs), len(diffs)


def verdict(row: dict) -> tuple[str, str | None, tuple]:
    """``better`` / ``ok`` / ``worse`` for exactflow against the best peer of ``row``."""
    ef = row["libs"].get("exactflow")
    peer_stats = [
        (lib, v) for lib, v in row["libs"].items() if lib in PEER_LIBS and math.isfinite(v["mean"])
    ]
    if ef is None or not peer_stats:
        return "-", None, (math.nan, math.nan, 0, 0)
    best_lib, best = min(peer_stats, key=lambda kv: kv[1]["mean"])
    mean, se, wins, n = _paired(ef, best)
    if not math.isfinite(mean):
        return "worse (non-finite)", best_lib, (mean, se, wins, n)
    se = se if math.isfinite(se) else 0.0
    word = "better" if mean < -se else "ok" if mean <= se else "worse"
    return word, best_lib, (mean, se, wins, n)


def _fmt(v: dict | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    bad = sum(not math.isfinite(r["nll"]) for r in v["runs"])
    if not math.isfinite(v.get("mean", math.nan)):
        finite = [r["nll"] for r in v["runs"] if math.isfinite(r["nll"])]
        m, s = _mean_se(finite) if len(finite) > 1 else (math.nan, math.nan)
        return f"NaN×{bad} ({m:.{digits}f} ± {s:.{digits}f} finite)" if finite else "NaN"
    return f"{v['mean']:.{digits}f} ± {v['se']:.{digits}f}"


def _row_line(row: dict, section: str) -> str:
    parts = [f"{lib} {_fmt(v, 4)}" for lib, v in row["libs"].items()]
    line = f"# {section} {row['data']} {row['model']} ({row['unit']}): " + "; ".join(parts)
    if section == "plain":
        word, best, (m, s, w, n) = verdict(row)
        line += f" -> {word} vs {best}: {m:+.4f} ± {s:.4f} ({w}/{n})"
    return line


def plain_table(rows: list[dict]) -> str:
    """Markdown table of the plain-loop cells, with the ok / better / worse count."""
    libs = [lib for lib in LIBS if any(lib in r["libs"] for r in rows)]
    gauss = any(r["data"] in ("iris", "breast_cancer") for r in rows)
    head = ["data", "model", *libs, *(["Gaussian"] if gauss else [])]
    head += ["exactflow − best peer (paired)", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    counts = {"better": 0, "ok": 0, "worse": 0}
    for r in rows:
        word, best, (m, s, w, n) = verdict(r)
        counts["worse" if word.startswith("worse") else word] = (
            counts.get("worse" if word.startswith("worse") else word, 0) + 1
        )
        cells = [f"{r['data']} ({r['unit']})", r["model"]]
        cells += [_fmt(r["libs"].get(lib)) for lib in libs]
        if gauss:
            cells.append(_gaussian(r["data"], r["seeds"]))
        cells.append("-" if best is None else f"{m:+.3f} ± {s:.3f} vs {best} ({w}/{n} lower)")
        cells.append(word)
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(counts[k] for k in ("better", "ok", "worse"))
    ok = counts["better"] + counts["ok"]
    lines.append("")
    lines.append(
        f"exactflow within best peer + 1 s.e.: {ok} of {total} cells (better by > 1 s.e.: "
        f"{counts['better']}, level: {counts['ok']}); worse: {counts['worse']}"
    )
    return "\n".join(lines)


def _gaussian(data: str, seeds: list[int]) -> str:
    """Mean ± s.e. over ``seeds`` of the full-covariance Gaussian's test NLL (continuous
    tables only: the reference every flow starts from on whitened data)."""
    if data not in ("iris", "breast_cancer"):
        return "-"
    import tiny_tables

    nlls = []
    for seed in seeds:
        task = Task(data, seed)
        nlls.append(tiny_tables.gaussian_nll(task.train, task.test))
    mean, se = _mean_se(nlls)
    return f"{mean:.3f} ± {se:.3f}"


def ablation_table(rows: list[dict]) -> str:
    """Markdown table: every variant against exactflow's default, paired by seed."""
    head = ["data", "model", "variant", "test NLL", "variant − default (paired)", "lower in"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ref = r["libs"].get("exactflow")
        for label, v in r["libs"].items():
            if label == "exactflow" or ref is None:
                cells = [r["data"], r["model"], "default", _fmt(v), "-", "-"]
            else:
                m, s, w, n = _paired(v, ref)
                cells = [r["data"], r["model"], label, _fmt(v), f"{m:+.4f} ± {s:.4f}", f"{w}/{n}"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recipe_table(rows: list[dict]) -> str:
    """Markdown table of the ``exactflow train`` recipe cells against the Gaussian."""
    head = ["data", "model", "seeds", "test NLL", "Gaussian", "flow − Gaussian", "flags"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        v = r["libs"]["exactflow train"]
        runs = v["runs"]
        flags = []
        bad = [x["seed"] for x in runs if not math.isfinite(x["nll"])]
        if bad:
            flags.append(f"non-finite: seeds {bad}")
        if r["data"] == "digits":
            gauss, diff = "-", "-"
            boom = [x["seed"] for x in runs if x["nll"] > LOG2_LEVELS]
        else:
            gm, gs = _mean_se([x.get("gaussian", math.nan) for x in runs])
            diffs = [x["nll"] - x.get("gaussian", math.nan) for x in runs]
            dm, ds = _mean_se(diffs)
            gauss, diff = f"{gm:.3f} ± {gs:.3f}", f"{dm:+.3f} ± {ds:.3f}"
            d = _dims(r["data"])
            boom = [x["seed"] for x in runs if x["nll"] - x.get("gaussian", 0.0) > d]
            diff += f" ({sum(x < 0 for x in diffs)}/{len(diffs)} below)"
        if boom:
            flags.append(f"exploding: seeds {boom}")
        cells = [r["data"], r["model"], str(len(runs)), _fmt(v), gauss, diff]
        cells.append("; ".join(flags) or "none")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _dims(data: str) -> int:
    return {"iris": 4, "breast_cancer": 30, "digits": 64}.get(data, 2)


def summarise(data: dict) -> str:
    out = []
    if data.get("plain"):
        out += ["## plain loop", plain_table(data["plain"])]
    if data.get("recipe"):
        out += ["## exactflow train recipe", recipe_table(data["recipe"])]
    if data.get("ablation"):
        out += ["## ablation (exactflow only)", ablation_table(data["ablation"])]
    return "\n\n".join(out)


def _merge(paths: list[str]) -> dict:
    """Rows of several ``--json`` files, later files replacing earlier rows of the same
    section, data, model (so a rerun overrides) unless they add libraries."""
    merged: dict = {"plain": [], "recipe": [], "ablation": []}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for section in merged:
            for row in data.get(section, []):
                if not any(v["runs"] for v in row["libs"].values()):
                    continue
                _summarise_row(row)
                same = [
                    r
                    for r in merged[section]
                    if (r["data"], r["model"]) == (row["data"], row["model"])
                ]
                if same:
                    same[0]["libs"].update(row["libs"])
                else:
                    merged[section].append(row)
    return merged


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run the suite (see the module docstring); ``argv`` as on the command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(TOYS), help="toys and/or tables")
    ap.add_argument("--models", nargs="+", choices=peers.MODELS, default=list(peers.MODELS))
    ap.add_argument("--libs", nargs="+", choices=LIBS, default=list(LIBS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--steps-toy", type=int, default=600)
    ap.add_argument("--steps-table", type=int, default=900)
    ap.add_argument("--json", default=None, help="write the results here (after every run)")
    ap.add_argument("--recipe", action="store_true", help="exactflow train's recipe instead")
    ap.add_argument(
        "--ablation",
        nargs="+",
        choices=sorted(VARIANTS),
        default=None,
        help="exactflow variants in the plain loop, paired with exactflow's default",
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: moons, 2 seeds, 60 steps (tables 90)"
    )
    ap.add_argument("--summarise", nargs="+", metavar="JSON", help="print tables of --json files")
    args = ap.parse_args(argv)
    if args.summarise:
        print(summarise(_merge(args.summarise)))
        return
    known = set(TOYS) | set(TABLES)
    for data in args.datasets:
        if data not in known:
            ap.error(f"unknown data set {data!r}; valid: {', '.join(sorted(known))}")
    if args.quick:
        args.seeds, args.steps_toy, args.steps_table = args.seeds[:2], 60, 90
        if args.datasets == list(TOYS):
            args.datasets = ["moons"]
    torch.set_num_threads(args.threads)
    versions = {"torch": torch.__version__}
    for lib in LIBS:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    meta = {"versions": versions, "argv": sys.argv[1:] if argv is None else argv}
    print(f"# quality: {json.dumps(meta)}", flush=True)
    res = Results(args.json, meta)
    try:
        if args.recipe:
            run_recipe(args, res)
        else:
            run_plain(args, res, args.ablation)
    except KeyboardInterrupt:
        traceback.print_exc()
    res.save()
    print()
    print(summarise(res.data))


if __name__ == "__main__":
    main()
