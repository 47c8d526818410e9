"""Whole training runs on disk: what ``exactflow train/eval/sample`` do, as functions.

A run directory holds::

    config.toml              the RunConfig (human-readable)
    checkpoint.safetensors   resumable state: weights, optimiser, EMA, RNG, counters
    model.safetensors        final weights (best on validation) + what is needed to rebuild
    metrics.json             test_nll, test_nll_se, bits_per_dim (discrete data), steps, time
    loss.png                 training loss and validation NLL
    density.png              2-D data: model density next to samples and data
    samples.png              image data: a grid of samples

The model's flow includes the data pre-processing (standardisation, or dequantisation +
logit) as its first transform, so every NLL is in the original data space.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import Dataset, bits_per_dim, file_dataset, load_dataset
from ..data.dataset import make_preprocess
from ..errors import ConfigError, DataError
from ..flow import Flow
from ..train.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    parse_checkpoint,
    read_checkpoint_bytes,
    save_checkpoint,
    state_dict_mismatch,
)
from ..train.distributed import DistributedContext, DistributedTrainer, on_main, session
from ..train.engine import TrainConfig, Trainer
from ..transforms.base import Compose
from .config import RunConfig

__all__ = [
    "OUTPUT_FILES",
    "LoadedRun",
    "build_flow",
    "default_config",
    "evaluate_run",
    "load_run",
    "sample_run",
    "train_run",
]

MODEL_FORMAT = "exactflow-model"
OUTPUT_FILES = (
    "config.toml",
    "checkpoint.safetensors",
    "model.safetensors",
    "metrics.json",
    "loss.png",
    "density.png",
    "samples.png",
)
_SHAPE_PARAMS = ("shape", "in_shape", "image_shape", "input_shape")


def _models() -> dict[str, Any]:
    from ..models import MODELS

    return MODELS


def resolve_model(name: str):
    """The builder registered as ``name`` (case-insensitive) in :data:`exactflow.models.MODELS`."""
    models = _models()
    key = name.lower()
    if key not in models:
        raise ConfigError(f"unknown model {name!r}; valid: {', '.join(models)}")
    return models[key]


def default_config(data: str = "moons", model: str = "nsf") -> RunConfig:
    """Defaults chosen per data set so a plain ``exactflow train --data X`` is sensible.

    * 2-D toys: NSF 5 x (128, 128), 1,000 steps at batch 256 (under a minute on 2 cores).
    * small tables (breast_cancer, iris, user files): a smaller model (3 x (64, 64)), weight
      decay, EMA, validation from step 0 and early stopping, so 400-row sets do not overfit
      to a useless test NLL. The data are whitened with the training covariance, so the
      identity-initialised flow *is* the full-covariance Gaussian fit and the best-on-
      validation weights start from it; NSF models, whose LU-linear layers learn the
      correlations themselves, get per-feature standardisation instead (measured better on
      breast_cancer for NSF in all of 3 seeds; whitening is better for MAF and RealNVP).
    * digits / images: dequantisation + logit handled by the data set; strong AdamW weight
      decay against overfitting the ~1,200 training images.
    """
    cfg = RunConfig(data=data, model=model)
    t = cfg.train
    from ..data import IMAGES, TABULAR, TOY

    if data in TOY:
        t.steps, t.batch_size, t.lr, t.warmup = 1000, 256, 2e-3, 50
        t.eval_every = 100
    elif data == "digits" or data in IMAGES:
        # 1,200 training images overfit within ~400 steps at weight decay 0 (NSF on digits:
        # 2.017 bits/dim); AdamW decay 1.0 with EMA 0.995 and an 800-step cosine gave 1.990
        t.steps, t.batch_size, t.lr, t.warmup = 800, 256, 1e-3, 100
        t.weight_decay, t.ema, t.eval_every, t.patience = 1.0, 0.995, 100, 5
        if data == "digits":
            cfg.data_args = {"val": 0.1}
    elif data in TABULAR or Path(data).suffix.lower() in (".npy", ".csv"):
        t.steps, t.batch_size, t.lr, t.warmup = 2000, 128, 1e-3, 50
        t.weight_decay, t.ema, t.eval_every, t.patience = 1e-2, 0.99, 25, 8
        if model.lower().startswith(("nsf", "maf", "realnvp", "nice", "iaf")):
            cfg.model_args = {"transforms": 3, "hidden": [64, 64]}
        if model.lower().startswith("nsf"):
            cfg.data_args = {"preprocessing": "standardize"}
    return cfg


def _check_builder_args(builder, args: dict[str, Any], name: str) -> None:
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [p for p in list(params)[1:]]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for model {name!r}; valid: {', '.join(valid)}"
        )


def _builder_input(builder, shape: tuple[int, ...]):
    first = next(iter(inspect.signature(builder).parameters), "")
    return tuple(shape) if first in _SHAPE_PARAMS else math.prod(shape)


def build_flow(
    model: str,
    model_args: dict[str, Any],
    data_meta: dict[str, Any],
    dataset: Dataset | None = None,
) -> tuple[Flow, tuple[int, ...]]:
    """``Flow(Compose([pre-processing, model]), base)`` for data described by ``data_meta``.

    Vector models get the flattened data (``features = prod(shape)``); builders whose first
    parameter is a shape get the image shape. With ``dataset`` the pre-processing uses its
    training statistics; without, placeholders that a checkpoint's state overwrites.

    Returns:
        the flow and its event shape (batches are reshaped to it).
    """
    builder = resolve_model(model)
    _check_builder_args(builder, model_args, model)
    shape = tuple(data_meta["shape"])
    try:
        inner = builder(_builder_input(builder, shape), **model_args)
    except TypeError as err:
        raise ConfigError(f"model {model!r}: {err}") from err
    if not isinstance(inner, Flow):
        raise ConfigError(f"builder {model!r} returned {type(inner).__name__}, not a Flow")
    event_shape = tuple(inner.event_shape)
    if math.prod(event_shape) != math.prod(shape):
        raise ConfigError(
            f"model {model!r} has event shape {event_shape}, incompatible with data shape {shape}"
        )
    if dataset is not None:
        pre = dataset.preprocess(event_shape)
    else:
        pre = make_preprocess(
            data_meta["preprocessing"],
            event_shape,
            levels=data_meta.get("levels"),
            alpha=data_meta.get("alpha", 0.05),
        )
    # a model with its own Flow subclass (flow matching: training_loss, solver overrides)
    # keeps it around the pre-processing
    wrap = getattr(inner, "with_preprocessing", None)
    if callable(wrap):
        return wrap(pre), event_shape
    return Flow(Compose([pre, inner.transform]), inner.base), event_shape


def _batch_fn(dataset_discrete: bool, event_shape: tuple[int, ...]):
    from ..data import dequantize

    def fn(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = dequantize(x, g) if dataset_discrete else x
        return x.reshape(x.shape[0], *event_shape)

    return fn


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            present = [f for f in OUTPUT_FILES if (out / f).exists()]
            what = f"holds {', '.join(present)}" if present else "is not empty"
            raise ConfigError(
                f"output directory {out} {what}; pass --force to overwrite or --resume to continue"
            )
        for f in OUTPUT_FILES:
            (out / f).unlink(missing_ok=True)


def _create_out(out: Path) -> None:
    """Create ``out`` once the data and the model are known to load, so that a run that
    fails on its input leaves no empty directory behind; clear stale temporary files."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # left by a killed writer; never a valid file
        stale.unlink(missing_ok=True)


def _seeded_build(cfg: RunConfig, dataset: Dataset) -> tuple[Flow, tuple[int, ...]]:
    # fork_rng keeps the caller's global RNG untouched while seeding the initialisation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_flow(cfg.model, cfg.model_args, dataset.meta(), dataset)


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def train_run(
    cfg: RunConfig,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    steps: int | None = None,
    device: str | None = None,
    plots: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train ``cfg`` into the directory ``out`` and return the metrics (also metrics.json).

    Args:
        cfg: the run configuration (ignored with ``resume``: the checkpoint's is used).
        out: run directory; must be empty or absent unless ``force`` or ``resume``.
        resume: continue from ``out/checkpoint.safetensors`` with the saved optimiser,
            schedule, EMA and RNG state.
        force: overwrite the outputs of a previous run in ``out``.
        steps: on resume, a new total step budget (default: the saved one).
        device: on resume, the device to continue on (default: the saved one).
        plots: write loss.png and density.png / samples.png.

    Started by torchrun (or inside an initialised process group) the run is data-parallel
    (:mod:`.distributed`): every rank trains and returns the metrics, rank 0 writes the files.
    """
    with session() as dist:
        return _train(cfg, out, dist, resume, force, steps, device, plots, quiet)


def _train(
    cfg: RunConfig,
    out: str | Path,
    dist: DistributedContext | None,
    resume: bool,
    force: bool,
    steps: int | None,
    device: str | None,
    plots: bool,
    quiet: bool,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = Path(out)
    if dist is not None:  # rank 0's directory wins: a default name chosen per rank may race
        out = Path(dist.run_on_main(lambda: str(out).encode()).decode())
        quiet = quiet or not dist.is_main
    ckpt = out / "checkpoint.safetensors"
    if resume:

        def read() -> bytes:
            if not ckpt.is_file():
                raise ConfigError(f"nothing to resume: {ckpt} does not exist")
            return read_checkpoint_bytes(ckpt)

        _, meta = parse_checkpoint(read() if dist is None else dist.run_on_main(read), ckpt)
        saved = meta.get("meta", {}).get("run")
        if saved is None:
            raise ConfigError(f"{ckpt}: no run configuration inside")
        cfg = RunConfig.from_dict(saved)
        if steps is not None:
            cfg.train.steps = int(steps)
        if device is not None:
            cfg.train.device = device
        if quiet:
            cfg.train.progress = False
        cfg.train.validate()
    else:
        on_main(dist, lambda: _prepare_out(out, force))
    dataset = _load_main_first(cfg, dist)
    flow, event_shape = _seeded_build(cfg, dataset)
    on_main(dist, lambda: _create_out(out))  # on resume: a kill mid-write left a .tmp file
    if not resume:
        on_main(dist, lambda: atomic_write_text(out / "config.toml", cfg.to_toml()))
    n_params = sum(p.numel() for p in flow.parameters() if p.requires_grad)
    _log(
        f"training {cfg.model} ({n_params:,} parameters) on {cfg.data}: "
        f"{dataset.train.shape[0]} train / {dataset.val.shape[0]} val / "
        f"{dataset.test.shape[0]} test rows, {cfg.train.steps} steps"
        + (" (resumed)" if resume else ""),
        quiet,
    )
    trainer = (Trainer if dist is None else DistributedTrainer)(
        flow,
        dataset.train,
        dataset.val,
        cfg.train,
        batch_fn=_batch_fn(dataset.discrete, event_shape),
        checkpoint=ckpt,
        meta={"run": cfg.to_dict(), "data": dataset.meta(), "event_shape": list(event_shape)},
    )
    result = trainer.fit(resume=resume)
    test_nll, test_se = trainer.nll(dataset.test, seed=cfg.seed + 1)
    metrics: dict[str, Any] = {
        "data": cfg.data,
        "model": cfg.model,
        "seed": cfg.seed,
        "test_nll": test_nll,
        "test_nll_se": test_se,
        "val_nll": result.best_val,
        "best_step": result.best_step,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "skipped_steps": result.skipped,
        "train_time_s": result.wall_time,
        "n_params": n_params,
        "features": dataset.features,
        "n_test": int(dataset.test.shape[0]),
    }
    extra = getattr(flow, "evaluation_metrics", None)  # e.g. NFE and straightness
    if callable(extra):
        metrics.update(extra(dataset.test, seed=cfg.seed))
    if dataset.discrete:
        metrics["bits_per_dim"] = bits_per_dim(test_nll, dataset.features)
        metrics["bits_per_dim_se"] = bits_per_dim(test_se, dataset.features)

    def write_outputs() -> None:
        _save_model(out / "model.safetensors", flow, cfg, dataset.meta(), event_shape, metrics)
        if plots:
            _plots(out, flow, dataset, result, cfg.seed)
        metrics["wall_time_s"] = time.perf_counter() - t0
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")

    on_main(dist, write_outputs)
    metrics.setdefault("wall_time_s", time.perf_counter() - t0)  # ranks other than 0
    return metrics


def _load_main_first(cfg: RunConfig, dist: DistributedContext | None) -> Dataset:
    # rank 0 first: a data set fetched into a cache is downloaded once, and a bad file
    # fails on every rank alike
    loaded: list[Dataset] = []
    on_main(dist, lambda: loaded.append(load_dataset(cfg.data, cfg.seed, **cfg.data_args)))
    return loaded[0] if loaded else load_dataset(cfg.data, cfg.seed, **cfg.data_args)


def _save_model(path, flow, cfg, data_meta, event_shape, metrics) -> None:
    meta = {
        "format": MODEL_FORMAT,
        "version": 1,
        "run": cfg.to_dict(),
        "data": data_meta,
        "event_shape": list(event_shape),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))},
    }
    save_checkpoint(path, dict(flow.state_dict()), meta)


def _to_images(x: torch.Tensor, data_meta: dict[str, Any]) -> torch.Tensor:
    """Model-space samples in data units -> ``(N, C, H, W)`` in ``[0, 1]`` for display."""
    shape = tuple(data_meta["image_shape"])
    levels = data_meta.get("levels") or 1
    imgs = x.reshape(x.shape[0], *shape).float()
    return (torch.floor(imgs).clamp(0, levels - 1) / (levels - 1)).cpu()


def _plots(out: Path, flow: Flow, dataset: Dataset, result, seed: int) -> None:
    from ..plotting import plot_density_2d, plot_images, plot_loss

    plot_loss(result.losses, result.val_history, out / "loss.png")
    g = torch.Generator(device=flow.device).manual_seed(seed)
    if dataset.features == 2 and len(dataset.shape) == 1:
        plot_density_2d(flow, dataset.test, out / "density.png", generator=g)
    elif dataset.image_shape is not None:
        x = flow.sample(64, generator=g)
        plot_images(_to_images(x, dataset.meta()), out / "samples.png", nrow=8)


# -- loading finished runs --------------------------------------------------------------------
@dataclass
class LoadedRun:
    """A trained model read back from a run directory (or a model file)."""

    flow: Flow
    config: RunConfig
    data_meta: dict[str, Any]
    event_shape: tuple[int, ...]
    metrics: dict[str, Any]


def load_run(path: str | Path, device: str = "cpu") -> LoadedRun:
    """Rebuild the model of a run directory from ``model.safetensors`` (never unpickles).

    Raises :class:`DataError` for a missing/corrupt file and :class:`ConfigError` if the
    weights do not fit the recorded model.
    """
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.exists():
        raise DataError(f"{path}: no model.safetensors (is this an exactflow run directory?)")
    tensors, meta = load_checkpoint(file)
    if meta.get("format") != MODEL_FORMAT:
        raise ConfigError(f"{file}: not an exactflow model file (format {meta.get('format')!r})")
    cfg = RunConfig.from_dict(meta["run"])
    flow, event_shape = build_flow(cfg.model, cfg.model_args, meta["data"])
    try:
        flow.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ConfigError(
            f"{file}: weights do not match model {cfg.model!r} with {cfg.model_args} "
            f"({state_dict_mismatch(flow, tensors) or str(err).splitlines()[0]})"
        ) from err
    flow.to(device).eval()
    return LoadedRun(flow, cfg, meta["data"], event_shape, meta.get("metrics", {}))


def evaluate_run(
    path: str | Path, data: str | None = None, seed: int | None = None, batch_size: int = 4096
) -> dict[str, Any]:
    """Test NLL (nats) with standard error, and bits/dim for discrete data, of a saved run.

    Args:
        path: run directory.
        data: evaluate on every row of this ``.npy``/``.csv`` file instead of the run's test
            split (its column count must match the model).
        seed: seed of the dequantisation noise (default: the run's seed + 1).
    """
    run = load_run(path)
    meta = run.data_meta
    seed = run.config.seed + 1 if seed is None else seed
    if data is None:
        dataset = load_dataset(run.config.data, run.config.seed, **run.config.data_args)
        rows, source = dataset.test, f"{run.config.data} test split"
    else:
        if Path(data).suffix.lower() not in (".npy", ".csv"):
            raise ConfigError(f"--data for eval must be a .npy or .csv file, got {data!r}")
        if meta.get("levels") is not None or len(meta["shape"]) != 1:
            raise ConfigError("evaluating a file is supported for continuous vector data only")
        features = int(meta["shape"][0])
        table = file_dataset(data, features=features, val=0.0, test=0.0, preprocessing="none")
        rows, source = table.train, str(data)
    trainer_cfg = TrainConfig(progress=False, seed=seed, eval_batch_size=batch_size)
    trainer = Trainer(
        run.flow,
        rows,
        None,
        trainer_cfg,
        batch_fn=_batch_fn(meta.get("levels") is not None, run.event_shape),
    )
    nll, se = trainer.nll(rows, seed=seed)
    out: dict[str, Any] = {"source": source, "n": int(rows.shape[0]), "nll": nll, "nll_se": se}
    if meta.get("levels") is not None:
        d = math.prod(meta["shape"])
        out["bits_per_dim"] = bits_per_dim(nll, d)
        out["bits_per_dim_se"] = bits_per_dim(se, d)
    return out


def sample_run(
    path: str | Path, n: int, out: str | Path, seed: int = 0, force: bool = False
) -> np.ndarray:
    """Draw ``n`` samples from a saved run and write them to ``.npy`` (data units; integer
    levels for discrete data) or ``.png`` (scatter for vectors, a grid for images)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"number of samples must be a positive int, got {n!r}")
    out = Path(out)
    if out.suffix.lower() not in (".npy", ".png"):
        raise ConfigError(f"--out must end in .npy or .png, got {out.name!r}")
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to overwrite")
    run = load_run(path)
    g = torch.Generator().manual_seed(int(seed))
    x = run.flow.sample(n, generator=g).cpu()
    meta = run.data_meta
    x = x.reshape(n, *meta["shape"])
    if meta.get("levels") is not None:
        x = torch.floor(x).clamp(0, meta["levels"] - 1)
    arr = x.numpy().astype(np.float32)
    if out.suffix.lower() == ".npy":
        import io

        from ..train.checkpoint import atomic_write_bytes

        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        atomic_write_bytes(out, buf.getvalue())
    else:
        from ..plotting import plot_images, plot_scatter

        if meta.get("image_shape") is not None:
            plot_images(_to_images(x, meta), out)
        elif arr.shape[1] >= 2:
            plot_scatter(x, out)
        else:
            raise ConfigError("a .png of samples needs 2-D or image data; use .npy")
    return arr
