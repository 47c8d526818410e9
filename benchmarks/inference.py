"""Inference speed: eager PyTorch vs ``torch.compile`` vs onnxruntime (CPU), in one run.

For each model (RealNVP, MAF, NSF on D-dimensional vectors; Glow on images) and each task
(``log_prob``; ``sample`` = the inverse pass from given base noise), at batch 1 and 1000:

* eager: the flow's own ``log_prob`` / ``transform.inverse`` under ``torch.inference_mode``;
* compile: the same function through ``torch.compile`` (inductor, static shapes, compiled and
  warmed up before timing; the compile time is reported separately);
* onnx: the file written by :func:`exactflow.export.to_onnx` (batch-dynamic, so one export
  per model and task), run by onnxruntime's CPU provider with the same number of intra-op
  threads as torch.

Each entry is the median over ``--runs`` (>= 5) timed runs of the per-call wall time, one run
being as many back-to-back calls as fit in ``--target`` seconds. The ratios are eager time
divided by the contender's (> 1: faster than eager). The contenders are interleaved per run
(eager, compile, onnx, eager, ...) so load drift on a shared machine hits all three alike.
Outputs of compile and onnx are checked against eager (max abs difference printed).

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/inference.py --threads 1
    python benchmarks/inference.py --models realnvp --batches 1000 --runs 5   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from exactflow import models
from exactflow.export import to_onnx

D = 16  # vector models: features
IMAGE = (3, 16, 16)  # Glow: channels, height, width


def build(name: str):
    """A model of the benchmark's size, moved off its identity initialisation."""
    torch.manual_seed(0)
    flow = {
        "realnvp": lambda: models.RealNVP(D, transforms=5, hidden=(128, 128)),
        "maf": lambda: models.MAF(D, transforms=5, hidden=(128, 128)),
        "nsf": lambda: models.NSF(D, transforms=5, hidden=(128, 128)),
        "glow": lambda: models.Glow(IMAGE, levels=2, transforms=4, hidden=64),
    }[name]().eval()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flow


def per_call(fn, target: float) -> float:
    """Seconds per call of ``fn``, from as many calls as fit in ``target`` seconds."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, math.ceil(target / once))
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def contenders(flow, task: str, x: torch.Tensor, path: Path, threads: int):
    """``{name: callable}`` for eager, compile and onnx, and the compile/export seconds."""
    if task == "log_prob":

        def eager_fn(v):
            return flow.log_prob(v)

        feeds = {"x": x.numpy()}
    else:

        def eager_fn(v):
            return flow.transform.inverse(v)[0]

        feeds = {"noise": x.numpy(), "temperature": np.array(1.0, dtype=np.float32)}
    compiled = torch.compile(eager_fn, dynamic=False)
    setup = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        compiled(x)
    setup["compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not path.exists():  # batch-dynamic: one file per model and task serves every batch
        to_onnx(flow, path, what="sample" if task == "sample" else "log_prob")
    setup["export_s"] = time.perf_counter() - t0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run_eager():
        with torch.inference_mode():
            return eager_fn(x)

    def run_compiled():
        with torch.inference_mode():
            return compiled(x)

    def run_onnx():
        return session.run(None, feeds)[0]

    return {"eager": run_eager, "compile": run_compiled, "onnx": run_onnx}, setup


def bench(
    names, tasks, batches, runs: int, target: float, threads: int, cache: Path | None
) -> list[dict]:
    rows = []
    tmp = cache or Path(tempfile.mkdtemp(prefix="exactflow-inference-"))
    tmp.mkdir(parents=True, exist_ok=True)
    for name in names:
        flow = build(name)
        for task in tasks:
            for batch in batches:
                g = torch.Generator().manual_seed(batch)
                x = torch.randn(batch, *flow.event_shape, generator=g)
                fns, setup = contenders(flow, task, x, tmp / f"{name}-{task}.onnx", threads)
                ref = fns["eager"]().numpy()
                diff = {
                    k: float(np.abs(np.asarray(fns[k]()) - ref).max()) for k in ("compile", "onnx")
                }
                times: dict[str, list[float]] = {k: [] for k in fns}
                for _ in range(runs):
                    for k, fn in fns.items():
                        times[k].append(per_call(fn, target))
                med = {k: statistics.median(v) for k, v in times.items()}
                row = {
                    "model": name,
                    "task": task,
                    "batch": batch,
                    **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                    "compile_speedup": med["eager"] / med["compile"],
                    "onnx_speedup": med["eager"] / med["onnx"],
                    "max_abs_diff_compile": diff["compile"],
                    "max_abs_diff_onnx": diff["onnx"],
                    **setup,
                }
                rows.append(row)
                print(
                    f"{name:8s} {task:8s} b={batch:<5d} eager {row['eager_ms']:9.3f} ms  "
                    f"compile {row['compile_ms']:9.3f} ms ({row['compile_speedup']:.2f}x)  "
                    f"onnx {row['onnx_ms']:9.3f} ms ({row['onnx_speedup']:.2f}x)  "
                    f"|diff| {diff['compile']:.1e}/{diff['onnx']:.1e}  "
                    f"compile {setup['compile_s']:.0f} s, export {setup['export_s']:.0f} s",
                    flush=True,
                )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | task | batch | eager (ms) | compile (ms) | onnxruntime (ms) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['task']} | {r['batch']} | {r['eager_ms']:.3f} | "
            f"{r['compile_ms']:.3f} ({r['compile_speedup']:.2f}×) | "
            f"{r['onnx_ms']:.3f} ({r['onnx_speedup']:.2f}×) |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["realnvp", "maf", "nsf", "glow"])
    p.add_argument("--tasks", nargs="+", default=["log_prob", "sample"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 1000])
    p.add_argument("--runs", type=int, default=7, help="timed runs per entry (>= 5)")
    p.add_argument("--target", type=float, default=0.2, help="seconds per timed run")
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument(
        "--cache", type=Path, help="keep the .onnx files here and reuse them (same seeds/sizes)"
    )
    args = p.parse_args()
    if args.runs < 5:
        p.error("--runs must be >= 5 (the table reports medians of at least 5)")
    torch.set_num_threads(args.threads)  # a benchmark script owns its process
    print(
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, "
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"vector D={D}, Glow image {IMAGE}, median of {args.runs} runs",
        flush=True,
    )
    rows = bench(
        args.models, args.tasks, args.batches, args.runs, args.target, args.threads, args.cache
    )
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
