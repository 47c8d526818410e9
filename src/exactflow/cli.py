"""The ``exactflow`` command line: ``train``, ``eval``, ``sample``, ``check``, ``detect``,
``export`` and ``score``.

    exactflow train                          # NSF on two moons, prints the test NLL
    exactflow train --data breast_cancer --model maf --steps 3000 --out runs/bc
    exactflow train --config run.toml --out runs/x
    exactflow train --out runs/x --resume    # continue a killed run
    exactflow eval runs/x [--data held_out.csv]
    exactflow sample runs/x -n 64 --out samples.png
    exactflow check nsf --features 4
    exactflow check glow --shape 1,8,8       # image models take C,H,W (default 1,4,4)
    exactflow detect runs/bc --data new.csv [--labels y.csv] [--quantile 0.99]
    exactflow export runs/bc --what log_prob --out bc.onnx   # standardisation baked in
    exactflow score bc.onnx new.csv [--out scores.npy]       # log p per row via onnxruntime

Errors from bad input (unknown names, bad files or arguments, a checkpoint of another model,
weights holding NaN, an existing output directory) print one line on stderr and exit with
code 2, no traceback; a failed check or an aborted run exits with 1. An unexpected error (a
bug) also prints one line and exits with 1; ``EXACTFLOW_TRACEBACK=1`` shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

from .errors import ExactflowError
from .validation import check_count, check_seed

__all__ = ["main"]

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
# `exactflow check`'s image shape: the smallest that Glow and RealNVPImage's default two
# levels divide, so 8 brute-force 16x16 Jacobians per direction take seconds
CHECK_IMAGE_SHAPE = (1, 4, 4)


class _ParseError(Exception):
    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog, self.message = prog, message


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block would bury the line that matters."""

    def error(self, message: str):  # type: ignore[override]
        raise _ParseError(self.prog, message)


_NONFINITE_HELP = "load weights holding NaN or inf (refused by default)"


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="exactflow", description="Normalizing flows with exact likelihoods.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a flow (default: NSF on two moons)")
    t.add_argument(
        "--data",
        help="dataset name, .npy/.csv file, or sbi:TASK for neural posterior estimation "
        "(default: moons)",
    )
    t.add_argument(
        "--context-columns",
        help="train p(x | c): these columns of the --data file (header names or 0-based "
        "indices, comma-separated) are the context c, the others x",
    )
    t.add_argument(
        "--context", help="train p(x | c) with c from this .npy/.csv file (one row per data row)"
    )
    t.add_argument(
        "--condition",
        choices=("label",),
        help="class-conditional: digits/iris/moons/8gaussians given their one-hot label",
    )
    t.add_argument(
        "--simulations", type=int, help="with --data sbi:TASK: simulations (default 10000)"
    )
    t.add_argument("--model", help="model name from exactflow.models.MODELS (default: nsf)")
    t.add_argument("--steps", type=int, help="optimisation steps")
    t.add_argument("--batch-size", type=int, help="rows per step")
    t.add_argument("--lr", type=float, help="peak learning rate")
    t.add_argument("--config", help="TOML run file (data, model, [model_args], [train] ...)")
    t.add_argument("--out", help="run directory (default: a new runs/<data>-<model>[-k])")
    t.add_argument("--seed", type=int, help="seed of split, initialisation and training")
    t.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--force", action="store_true", help="overwrite an existing run in --out")
    t.add_argument("--no-plots", action="store_true", help="skip loss/density/sample plots")
    t.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    t.add_argument(
        "--compile",
        action="store_true",
        help="compile the training objective with torch.compile ([train] compile = true)",
    )
    t.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads for this process (default: 1 for 2-D toy data, whose tiny "
        "ops only lose time to thread hand-offs; torch's default otherwise)",
    )

    e = sub.add_parser("eval", help="test NLL of a trained run with its standard error")
    e.add_argument("run", help="run directory")
    e.add_argument("--data", help="evaluate on this .npy/.csv file instead of the test split")
    e.add_argument("--seed", type=int, help="seed of the dequantisation noise")
    e.add_argument(
        "--context", help="context rows of --data, for a run trained with a context file"
    )
    e.add_argument("--allow-nonfinite", action="store_true", help=_NONFINITE_HELP)

    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run", help="run directory")
    s.add_argument("-n", type=int, default=1000, help="number of samples (default 1000)")
    s.add_argument("--out", required=True, help="samples.npy, samples.csv or samples.png")
    s.add_argument(
        "--context",
        help="a conditional run's context: 'v1,v2,...' in raw units (or a class, '3')",
    )
    s.add_argument(
        "--context-file", help=".npy/.csv of context rows: -n samples for each row, in order"
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="overwrite --out")
    s.add_argument("--allow-nonfinite", action="store_true", help=_NONFINITE_HELP)

    c = sub.add_parser("check", help="certify a model: round trips, log-dets, gradients")
    c.add_argument("model", help="model name, or a run directory to certify its trained flow")
    c.add_argument("--features", type=int, help="data dimension of a vector model (default 2)")
    c.add_argument(
        "--shape",
        help=f"C,H,W image shape of an image model such as glow (default "
        f"{','.join(map(str, CHECK_IMAGE_SHAPE))}: small, so the brute-force Jacobians are quick)",
    )
    c.add_argument("--context", type=int, default=0, help="context features (default 0)")
    c.add_argument("--seed", type=int, default=0)

    d = sub.add_parser("detect", help="flag anomalies: -log p(x) above a calibrated quantile")
    d.add_argument("run", help="run directory")
    d.add_argument("--data", required=True, help=".npy/.csv rows to score")
    d.add_argument("--labels", help="one-column .npy/.csv of 0/1 (1 = anomaly) for metrics")
    d.add_argument("--quantile", type=float, default=0.99, help="of validation scores (0.99)")
    d.add_argument("--out", help="output directory (default RUN/detect)")
    d.add_argument(
        "--context", help="context rows of --data, for a run trained with a context file"
    )
    d.add_argument("--allow-nonfinite", action="store_true", help=_NONFINITE_HELP)

    x = sub.add_parser("export", help="export a trained run to ONNX (log_prob or sample)")
    x.add_argument("run", help="run directory")
    x.add_argument(
        "--what", default="log_prob", choices=("log_prob", "sample", "transform"),
        help="log_prob: x -> log p(x) in data units (default); sample: noise, temperature -> x",
    )  # fmt: skip
    x.add_argument("--out", required=True, help="the .onnx file to write")
    x.add_argument("--solver", help="fixed-step solver of continuous models (default rk4)")
    x.add_argument("--steps", type=int, help="solver steps of continuous models")
    x.add_argument("--force", action="store_true", help="overwrite --out")
    x.add_argument("--allow-nonfinite", action="store_true", help=_NONFINITE_HELP)

    r = sub.add_parser("score", help="log p(x) of each row of a file with an exported model")
    r.add_argument("model", help="a log_prob .onnx file from `exactflow export`")
    r.add_argument("data", help=".npy/.csv rows to score")
    r.add_argument("--out", help="write scores to .npy or .csv (default: print one per line)")
    r.add_argument("--batch-size", type=int, default=4096, help="rows per run (default 4096)")
    r.add_argument("--context", help="a conditional export's context rows (.npy/.csv)")
    return p


def _default_out(data: str, model: str) -> Path:
    stem = Path(data).stem if Path(data).suffix else data
    base = Path("runs") / f"{stem}-{model}".replace("/", "_")
    if not base.exists():
        return base
    k = 1
    while Path(f"{base}-{k}").exists():
        k += 1
    return Path(f"{base}-{k}")


def _set_threads(threads: int | None, data: str) -> None:
    """The CLI owns its process, so it may size torch's thread pool (the library never does).

    Measured with ``exactflow train`` on moons: 28.1 s with 1 thread vs 30.4 s with 2 on an idle
    2-core machine, and 13.5 s vs 141 s for 100 steps when the cores are shared.
    """
    import torch

    from .data import TOY

    if threads is not None:
        if threads < 1:
            raise _Usage(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif data in TOY:
        torch.set_num_threads(1)


def _cmd_train(args) -> int:
    from .app.config import RunConfig
    from .app.run import default_config, train_run

    if args.resume:
        if args.out is None:
            raise _Usage("--resume needs --out DIR (the run to continue)")
        given = [f"--{n}" for n in ("data", "model", "config", "seed") if getattr(args, n)]
        if given:
            raise _Usage(f"--resume continues the saved run; drop {', '.join(given)}")
        _set_threads(args.threads, "")
        metrics = train_run(
            RunConfig(),
            args.out,
            resume=True,
            steps=args.steps,
            device=args.device,
            plots=not args.no_plots,
            quiet=args.quiet,
        )
        _print_metrics(metrics, Path(args.out))
        return 0
    if args.seed is not None:
        check_seed(args.seed, "--seed")
    data, model = args.data, args.model
    cfg = None
    if args.config:
        # the file's data/model pick the per-dataset defaults it is laid over
        import tomllib

        try:
            head = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            head = {}
        data = data or head.get("data")
        model = model or head.get("model")
    data, model = str(data or "moons"), str(model or "nsf")
    _set_threads(args.threads, data)
    cfg = default_config(data, model)
    if args.config:
        cfg = RunConfig.read(args.config, base=cfg)
    cfg.data, cfg.model = data, model
    _context_options(args, cfg)
    train = cfg.train
    for name, value in (
        ("steps", args.steps),
        ("batch_size", args.batch_size),
        ("lr", args.lr),
        ("device", args.device),
    ):
        if value is not None:
            setattr(train, name, value)
    if args.seed is not None:
        cfg.seed = train.seed = args.seed
    if args.quiet:
        train.progress = False
    if args.compile:
        train.compile = True
    train.validate()
    out = Path(args.out) if args.out else _default_out(data, model)
    metrics = train_run(cfg, out, force=args.force, plots=not args.no_plots, quiet=args.quiet)
    _print_metrics(metrics, out)
    return 0


def _context_options(args, cfg) -> None:
    """--context-columns / --context / --condition / --simulations into ``[data_args]``."""
    from .app.run import SBI_PREFIX

    given = [
        f"--{n.replace('_', '-')}"
        for n in ("context_columns", "context", "condition")
        if getattr(args, n) is not None
    ]
    if len(given) > 1:
        raise _Usage(f"give one way to condition, not {' and '.join(given)}")
    sbi = cfg.data.startswith(SBI_PREFIX)
    is_file = Path(cfg.data).suffix.lower() in (".npy", ".csv")
    if (args.context_columns is not None or args.context is not None) and not is_file:
        raise _Usage(f"{given[0]} needs --data to be a .npy/.csv file, got {cfg.data!r}")
    if args.condition is not None and is_file:
        raise _Usage(
            "--condition label needs a data set with class labels (digits, iris, moons, "
            "8gaussians); for a file, name its label columns with --context-columns"
        )
    if args.simulations is not None and not sbi:
        raise _Usage(f"--simulations goes with --data sbi:TASK, got --data {cfg.data!r}")
    if sbi and given:
        raise _Usage(f"{given[0]}: sbi:TASK data is conditioned on the simulations already")
    if args.context_columns is not None:
        cfg.data_args["context_columns"] = args.context_columns
    if args.context is not None:
        cfg.data_args["context"] = args.context
    if args.condition is not None:
        cfg.data_args["condition"] = args.condition
    if args.simulations is not None:
        cfg.data_args["simulations"] = args.simulations


def _fmt(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else str(v)


def _print_metrics(m: dict, out: Path) -> None:
    from .train.distributed import is_main_process

    if not is_main_process():  # under torchrun every rank returns the metrics: print once
        return
    line = f"test NLL {_fmt(m['test_nll'])} ± {_fmt(m['test_nll_se'])} nats"
    if "bits_per_dim" in m:
        line += f"  ({_fmt(m['bits_per_dim'])} ± {_fmt(m['bits_per_dim_se'])} bits/dim)"
    line += f"  after {m['steps']} steps in {m['wall_time_s']:.1f} s"
    if m.get("stopped_early"):
        line += f" (early stop; best step {m['best_step']})"
    if m.get("skipped_steps"):
        line += f"; {m['skipped_steps']} non-finite steps skipped"
    print(line)
    print(f"outputs in {out}/")


def _cmd_eval(args) -> int:
    from .app.run import evaluate_run

    if args.seed is not None:
        check_seed(args.seed, "--seed")
    r = evaluate_run(
        args.run,
        data=args.data,
        seed=args.seed,
        context=args.context,
        allow_nonfinite=args.allow_nonfinite,
    )
    line = f"{r['source']}: NLL {_fmt(r['nll'])} ± {_fmt(r['nll_se'])} nats over {r['n']} rows"
    if "bits_per_dim" in r:
        line += f"  ({_fmt(r['bits_per_dim'])} ± {_fmt(r['bits_per_dim_se'])} bits/dim)"
    print(line)
    print(json.dumps(r))
    return 0


def _cmd_sample(args) -> int:
    from .app.run import sample_run

    check_seed(args.seed, "--seed")
    arr = sample_run(
        args.run,
        args.n,
        args.out,
        seed=args.seed,
        force=args.force,
        context=args.context,
        context_file=args.context_file,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(f"wrote {arr.shape[0]} samples of shape {tuple(arr.shape[1:])} to {args.out}")
    return 0


def _check_shape(text: str) -> tuple[int, int, int]:
    """``"C,H,W"`` (or ``CxHxW``) as a tuple of three positive ints, else a ConfigError."""
    from .errors import ConfigError

    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--shape must be C,H,W with three positive integers, got {text!r}")
    return shape  # type: ignore[return-value]


def _check_input(model: str, builder, features: int | None, shape: str | None):
    """The builder's first argument for ``exactflow check`` and its label: ``--features`` for a
    vector model, ``--shape`` (default :data:`CHECK_IMAGE_SHAPE`) for an image model."""
    from .errors import ConfigError

    if getattr(builder, "input", "vector") == "image":
        if features is not None:
            raise ConfigError(f"{model} is an image model: give --shape C,H,W, not --features")
        first = _check_shape(shape) if shape is not None else CHECK_IMAGE_SHAPE
        return first, "shape=" + ",".join(map(str, first))
    if shape is not None:
        raise ConfigError(f"{model} is a vector model: give --features D, not --shape")
    first = 2 if features is None else features
    return first, f"features={first}"


def _cmd_check(args) -> int:
    import torch

    from .check import check_flow

    path = Path(args.model)
    if path.is_dir():
        from .app.run import load_run

        flow = load_run(path).flow
        label = f"trained model in {path}"
    else:
        from .app.run import resolve_model

        builder = resolve_model(args.model)
        first, described = _check_input(args.model, builder, args.features, args.shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            kwargs = {"context": args.context} if args.context else {}
            flow = builder(first, **kwargs)
            # perturb the identity initialisation so the checks see a non-trivial map
            with torch.no_grad():
                for p in flow.parameters():
                    p.add_(0.1 * torch.randn_like(p))
        label = f"{args.model} ({described}, context={args.context})"
    g = torch.Generator().manual_seed(args.seed)
    context = torch.randn(args.context, generator=g) if args.context else None
    report = check_flow(flow, context=context, generator=g, raise_on_failure=False)
    print(f"certifying {label}")
    print(report)
    return 0 if report.passed else EXIT_FAILED


def _cmd_detect(args) -> int:
    from .app.detect import detect_run

    r = detect_run(
        args.run,
        args.data,
        args.labels,
        args.quantile,
        args.out,
        context=args.context,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(
        f"threshold {r['threshold']:.4f} {r['unit']} ({r['quantile']} quantile of validation "
        f"scores): {r['flagged']} of {r['n']} rows flagged"
    )
    if "auroc" in r:
        print(
            f"AUROC {r['auroc']:.4f}  AP {r['average_precision']:.4f}  F1 {r['f1']:.4f}  "
            f"FPR@95%TPR {r['fpr_at_95_tpr']:.4f}"
        )
    print(f"outputs in {r['out']}/")
    return 0


def _cmd_export(args) -> int:
    from .app.run import load_run
    from .export import to_onnx

    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise _Usage(f"--out must end in .onnx, got {out.name!r}")
    if out.exists() and not args.force:
        raise _Usage(f"{out} exists; pass --force to overwrite")
    if not out.parent.is_dir():
        raise _Usage(f"directory {out.parent} does not exist")
    run = load_run(args.run, allow_nonfinite=args.allow_nonfinite)
    to_onnx(run.flow, out, what=args.what, solver=args.solver, steps=args.steps)
    event = "x".join(str(s) for s in run.event_shape)
    c = run.flow.context_features
    ctx = f", context (N, {c}) in raw units" if c else ""
    if args.what == "log_prob":
        io = f"x (N, {event}){ctx} -> log_prob (N,) in nats of the original data space"
    elif args.what == "sample":
        io = f"noise (N, {event}) ~ N(0, I), temperature (){ctx} -> x (N, {event}) in data units"
    else:
        io = f"x (N, {event}){ctx} -> z, ladj (pre-processing included)"
    print(f"wrote {out}: {io}")
    if run.data_meta.get("levels") is not None:
        print("note: discrete data: x is the dequantised value (integer levels + U[0, 1) noise)")
    from .continuous import ADAPTIVE_SOLVERS, CNF

    for m in run.flow.modules():
        if isinstance(m, CNF) and m.solver in ADAPTIVE_SOLVERS and args.solver is None:
            steps = m.steps if args.steps is None else args.steps
            print(
                f"note: the model's adaptive {m.solver} solve is exported as rk4 with {steps} "
                "fixed steps (choose with --solver/--steps)"
            )
            break
    return 0


def _cmd_score(args) -> int:
    import numpy as np

    from .data import read_table
    from .errors import DataError

    check_count(args.batch_size, "--batch-size", minimum=1, error=_Usage)
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".npy", ".csv"):
        raise _Usage(f"--out must end in .npy or .csv, got {out.name!r}")
    path = Path(args.model)
    if not path.is_file():
        raise DataError(f"{path}: no such ONNX file")
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise _Usage("score needs onnxruntime: pip install 'exactflow[onnx]'") from err
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own (non-builtin) error types
        raise DataError(f"{path}: not a loadable ONNX model ({str(err).splitlines()[0]})") from err
    inputs = {i.name: i for i in session.get_inputs()}
    if set(inputs) - {"context"} != {"x"} or [o.name for o in session.get_outputs()] != [
        "log_prob"
    ]:
        raise DataError(
            f"{path}: score needs a log_prob export (input x[, context], output log_prob); "
            f"this model has inputs {', '.join(inputs)}"
        )
    conditional = "context" in inputs
    if conditional and args.context is None:
        raise _Usage(f"{path} is conditional: pass --context FILE with one row per data row")
    if not conditional and args.context is not None:
        raise _Usage(f"{path} is unconditional: it takes no --context")
    event = inputs["x"].shape[1:]
    if not all(isinstance(s, int) for s in event):
        raise DataError(f"{path}: the model's event shape {event} is not fixed")
    rows = read_table(args.data)
    width = math.prod(event)
    if rows.shape[1] != width:
        raise DataError(
            f"{args.data}: rows have {rows.shape[1]} columns but the model expects {width}"
        )
    x = rows.astype(np.float32).reshape(rows.shape[0], *event)
    feeds = {"x": x}
    if conditional:
        c = read_table(args.context).astype(np.float32)
        width_c = inputs["context"].shape[-1]
        if c.shape[0] != x.shape[0] or (isinstance(width_c, int) and c.shape[1] != width_c):
            raise DataError(
                f"{args.context}: context of shape {c.shape}; the data has {x.shape[0]} rows "
                f"and the model takes {width_c} context column(s)"
            )
        feeds["context"] = c
    chunks = [
        session.run(None, {k: v[i : i + args.batch_size] for k, v in feeds.items()})[0]
        for i in range(0, x.shape[0], args.batch_size)
    ]
    scores = np.concatenate(chunks).astype(np.float64)
    if out is None:
        print("\n".join(f"{v:.9g}" for v in scores))
        return 0
    if out.suffix.lower() == ".npy":
        np.save(out, scores, allow_pickle=False)
    else:
        np.savetxt(out, scores, fmt="%.9g", header="log_prob", comments="")
    finite = scores[np.isfinite(scores)]
    mean = f"{finite.mean():.4f}" if finite.size else "nan"
    print(f"scored {scores.shape[0]} rows: mean log p {mean} nats; wrote {out}")
    return 0


class _Usage(ExactflowError, ValueError):
    """A command-line usage error."""


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failed check/run, 2 bad input)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _ParseError as err:
        print(f"{err.prog}: error: {err.message} (see {err.prog} --help)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    commands = {
        "train": _cmd_train,
        "eval": _cmd_eval,
        "sample": _cmd_sample,
        "check": _cmd_check,
        "detect": _cmd_detect,
        "export": _cmd_export,
        "score": _cmd_score,
    }
    try:
        with warnings.catch_warnings():
            # one line per warning, without the source line, keeps the output readable
            warnings.simplefilter("default")
            return commands[args.command](args)
    except ExactflowError as err:
        # bad input is a ValueError/TypeError subclass; CheckFailed, NonFiniteTraining are not
        bad_input = isinstance(err, (ValueError, TypeError))
        print(f"exactflow {args.command}: error: {err}".splitlines()[0], file=sys.stderr)
        return EXIT_BAD_INPUT if bad_input else EXIT_FAILED
    except OSError as err:
        where = f" {err.filename}:" if err.filename else ""
        print(f"exactflow {args.command}: error:{where} {err.strerror or err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"exactflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input: one line here, the traceback on request
        if os.environ.get("EXACTFLOW_TRACEBACK"):
            raise
        text = str(err).strip().splitlines()
        print(
            f"exactflow {args.command}: internal error: {type(err).__name__}"
            + (f": {text[0]}" if text else "")
            + " (a bug: please report it; EXACTFLOW_TRACEBACK=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
