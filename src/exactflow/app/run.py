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

import contextlib
import json
import math
import re
import secrets
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import Dataset, bits_per_dim, load_dataset
from ..data.dataset import make_preprocess
from ..errors import ConfigError, DataError, ExactflowError
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
from ..train.engine import TrainConfig, Trainer, resolve_device
from ..transforms.base import Compose
from ..validation import check_count, check_seed
from .config import RunConfig, dump_toml

__all__ = [
    "OUTPUT_FILES",
    "LoadedRun",
    "build_checked",
    "build_flow",
    "default_config",
    "evaluate_run",
    "load_run",
    "sample_run",
    "train_run",
]

MODEL_FORMAT = "exactflow-model"
# ``data = "sbi:TASK"``: neural posterior estimation on simulations of a benchmark task
SBI_PREFIX = "sbi:"
OUTPUT_FILES = (
    "config.toml",
    "checkpoint.safetensors",
    "model.safetensors",
    "metrics.json",
    "loss.png",
    "density.png",
    "samples.png",
)


def _models() -> dict[str, Any]:
    from ..models import MODELS

    return MODELS


def resolve_model(name: str):
    """The :class:`~exactflow.models.ModelSpec` registered as ``name`` (case-insensitive) in
    :data:`exactflow.models.MODELS`; it is called like its builder."""
    models = _models()
    key = name.lower()
    if key not in models:
        raise ConfigError(f"unknown model {name!r}; valid: {', '.join(models)}")
    return models[key]


def data_kind(data: str) -> str | None:
    """The kind of a data set name or file path, one of
    :data:`exactflow.models.DATA_KINDS` (``"toy"``, ``"tabular"``, ``"image"``), else ``None``.

    scikit-learn's ``digits`` counts as image data (discrete pixels), whatever its layout."""
    from ..data import IMAGES, TABULAR, TOY

    if data.startswith(SBI_PREFIX):
        return "simulation"
    if data in TOY:
        return "toy"
    if data == "digits" or data in IMAGES:
        return "image"
    if data in TABULAR or Path(data).suffix.lower() in (".npy", ".csv"):
        return "tabular"
    return None


def default_config(data: str = "moons", model: str = "nsf") -> RunConfig:
    """Defaults chosen per data set so a plain ``exactflow train --data X`` is sensible.

    * 2-D toys: NSF 5 x (128, 128), 1,000 steps at batch 256 (under a minute on 2 cores).
    * small tables (breast_cancer, iris, user files): weight decay, EMA, validation from
      step 0 and early stopping, so 400-row sets do not overfit to a useless test NLL. The
      data are whitened with the training covariance, so the identity-initialised flow *is*
      the full-covariance Gaussian fit and the best-on-validation weights start from it.
    * digits / images: dequantisation + logit handled by the data set; strong AdamW weight
      decay against overfitting the ~1,200 training images.

    The model's own defaults for the data kind (:func:`data_kind`) come from its
    :class:`~exactflow.models.ModelSpec`: e.g. the coupling and autoregressive models take a
    smaller size (3 x (64, 64)) on tables, and NSF models, whose LU-linear layers learn the
    correlations themselves, per-feature standardisation instead of whitening (measured
    better on breast_cancer for NSF in all of 3 seeds; whitening is better for MAF and
    RealNVP).
    """
    cfg = RunConfig(data=data, model=model)
    t = cfg.train
    kind = data_kind(data)
    if kind == "toy":
        t.steps, t.batch_size, t.lr, t.warmup = 1000, 256, 2e-3, 50
        t.eval_every = 100
    elif kind == "image":
        # ~1,250 training images overfit within a few hundred steps at weight decay 0; the
        # figures behind this budget: benchmarks/README.md, "Quality (digits)"
        t.steps, t.batch_size, t.lr, t.warmup = 800, 256, 1e-3, 100
        t.weight_decay, t.ema, t.eval_every, t.patience = 1.0, 0.995, 100, 5
    elif kind == "simulation":
        # what exactflow.sbi.train_npe trains with, so the CLI and the API agree
        t.steps, t.batch_size, t.lr, t.warmup = 5000, 256, 5e-4, 100
        t.eval_every = 250
    elif kind == "tabular":
        t.steps, t.batch_size, t.lr, t.warmup = 2000, 128, 1e-3, 50
        t.weight_decay, t.ema, t.eval_every, t.patience = 1e-2, 0.99, 25, 8
    spec = _models().get(model.lower())
    if spec is not None:  # an unknown name fails later, listing the valid ones
        cfg.model_args = spec.defaults_for(kind)
        cfg.data_args.update(spec.data_args_for(kind))
    return cfg


def _check_builder_args(spec, args: dict[str, Any], name: str) -> None:
    valid = spec.options()
    if valid is None:
        return
    unknown = sorted(set(args) - set(valid) - set(spec.renamed))  # old names still warn
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for model {name!r}; valid: {', '.join(valid)}"
        )


def build_flow(
    model: str,
    model_args: dict[str, Any],
    data_meta: dict[str, Any],
    dataset: Dataset | None = None,
) -> tuple[Flow, tuple[int, ...]]:
    """``Flow(Compose([pre-processing, model]), base)`` for data described by ``data_meta``.

    Vector models get the flattened data (``features = prod(shape)``), image models (their
    :class:`~exactflow.models.ModelSpec` says which) the image shape. With ``dataset`` the
    pre-processing uses its training statistics; without, placeholders that a checkpoint's
    state overwrites.

    Returns:
        the flow and its event shape (batches are reshaped to it).
    """
    spec = resolve_model(model)
    _check_builder_args(spec, model_args, model)
    shape = tuple(data_meta["shape"])
    first = spec.first_argument(shape)
    model_args = _with_context(model, model_args, int(data_meta.get("context") or 0))
    try:
        inner = spec(first, **model_args)
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
            support=data_meta.get("support"),
        )
    # a model with its own Flow subclass (flow matching: training_loss, solver overrides)
    # keeps it around the pre-processing
    wrap = getattr(inner, "with_preprocessing", None)
    if callable(wrap):
        return wrap(pre), event_shape
    return Flow(Compose([pre, inner.transform]), inner.base), event_shape


def _with_context(model: str, model_args: dict[str, Any], context: int) -> dict[str, Any]:
    """``model_args`` with the data's context size: a conditional data set sets ``context``
    itself (a different ``[model_args] context`` is an error, as is one for plain data)."""
    given = model_args.get("context")
    if context == 0:
        if given:
            raise ConfigError(
                f"[model_args] context = {given!r} but the data has no context; condition the "
                "data (--context-columns, --context, --condition) or drop the key"
            )
        return model_args
    if given not in (None, context):
        raise ConfigError(
            f"[model_args] context = {given!r} but the data has {context} context column(s); "
            "drop the key: the context size comes from the data"
        )
    return {**model_args, "context": context}


def load_run_data(cfg: RunConfig) -> Dataset:
    """The :class:`~exactflow.data.Dataset` of a run: ``load_dataset(cfg.data, cfg.seed,
    **cfg.data_args)``, or for ``data = "sbi:TASK"`` simulations of that benchmark task
    (``[data_args] simulations``, ``val``, ``test``), theta as the data and x as the context."""
    if cfg.data.startswith(SBI_PREFIX):
        return sbi_dataset(cfg.data[len(SBI_PREFIX) :], cfg.seed, **cfg.data_args)
    return load_dataset(cfg.data, cfg.seed, **cfg.data_args)


def sbi_dataset(
    task: str, seed: int = 0, simulations: int = 10_000, val: float = 0.1, test: float = 0.1
) -> Dataset:
    """``simulations`` seeded pairs ``theta ~ p(theta)``, ``x ~ p(x | theta)`` of the
    benchmark task ``task`` as a conditional :class:`~exactflow.data.Dataset` of ``theta``
    given ``x``, split with ``seed``. A bounded prior's box is the data's ``support`` (the
    flow then starts with the box -> R^d bijection and can only sample inside it); ``theta``
    is standardised in that space, as :func:`exactflow.sbi.train_npe` does."""
    from ..data.splits import split_pairs
    from ..sbi import get_task

    n = check_count(simulations, "[data_args] simulations", minimum=2)
    sim = get_task(task)
    g = torch.Generator().manual_seed(int(seed))
    theta, x = sim.sample_finite_joint(n, g, torch.float32)
    parts, cparts = split_pairs(theta, x, val, test, generator=g)
    bounds = sim.bounds
    return Dataset(
        name=SBI_PREFIX + sim.name,
        train=parts.train,
        val=parts.val,
        test=parts.test,
        shape=(theta.shape[1],),
        preprocessing="standardize",
        train_context=cparts.train,
        val_context=cparts.val,
        test_context=cparts.test,
        context_names=tuple(f"x{i}" for i in range(x.shape[1])),
        context_kind="simulation",
        support=None if bounds is None else tuple(b.tolist() for b in bounds),
    )


def _batch_fn(dataset_discrete: bool, event_shape: tuple[int, ...]):
    from ..data import dequantize

    def fn(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = dequantize(x, g) if dataset_discrete else x
        return x.reshape(x.shape[0], *event_shape)

    return fn


def _check_out(out: Path, force: bool) -> None:
    """Refuse an output path that is a file, or a directory holding anything without
    ``force`` (nothing is deleted here: that waits until the whole run is validated)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        present = [f for f in OUTPUT_FILES if (out / f).exists()]
        what = f"holds {', '.join(present)}" if present else "is not empty"
        raise ConfigError(
            f"output directory {out} {what}; pass --force to overwrite or --resume to continue"
        )


def _renamed(err: OSError, path: Path) -> OSError:
    # the user asked for ``path``: name it, not the hidden temporary directory
    return OSError(err.errno, err.strerror or str(err), str(path))


def _create_out(out: Path, config_text: str | None, force: bool) -> None:
    """Make ``out`` a run directory holding ``config_text`` as config.toml, once the whole
    run is validated.

    A new directory appears atomically: it is filled in a hidden sibling
    (``.NAME.XXXXXXXX.tmp``) and renamed into place, so a start that fails (a read-only
    or full disk) leaves nothing behind. An existing directory (empty, ``force``, or a
    resumed run) loses the previous run's outputs (``force``) and stale temporary files.
    """
    if out.is_dir():
        if force:
            for f in OUTPUT_FILES:
                (out / f).unlink(missing_ok=True)
        for stale in out.glob(".*.tmp"):  # left by a killed writer; never a valid file
            stale.unlink(missing_ok=True)
        if config_text is not None:
            atomic_write_text(out / "config.toml", config_text)
        return
    parent = out.parent
    made = next((p for p in reversed(out.parents) if not p.exists()), None)
    tmp = None
    try:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            while tmp is None:
                candidate = parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
                with contextlib.suppress(FileExistsError):
                    candidate.mkdir()  # not tempfile.mkdtemp: its mode 0o700 ignores the umask
                    tmp = candidate
        except OSError as err:
            raise _renamed(err, out) from err
        if config_text is not None:
            try:
                atomic_write_text(tmp / "config.toml", config_text)
            except OSError as err:
                raise _renamed(err, out / "config.toml") from err
        try:
            tmp.rename(out)
        except OSError as err:
            raise _renamed(err, out) from err
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(parent, made)
        raise


def _remove_empty(directory: Path, top: Path | None) -> None:
    """Remove ``directory`` and its parents up to ``top`` (folders made for a run that then
    failed to start), stopping at the first that is not empty."""
    if top is None:
        return
    for p in [directory, *directory.parents]:
        try:
            p.rmdir()
        except OSError:
            return
        if p == top:
            return


def _seeded_build(cfg: RunConfig, dataset: Dataset) -> tuple[Flow, tuple[int, ...]]:
    # fork_rng keeps the caller's global RNG untouched while seeding the initialisation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_checked(cfg.model, cfg.model_args, dataset.meta(), dataset)


def build_checked(
    model: str,
    model_args: dict[str, Any],
    data_meta: dict[str, Any],
    dataset: Dataset | None = None,
) -> tuple[Flow, tuple[int, ...]]:
    """:func:`build_flow`, with *any* failure of the builder turned into one
    :class:`ConfigError` that names the ``[model_args]`` key at fault.

    Builders raise what their arguments deserve (``ValueError`` for ``hidden = [0]``, a
    ``ConfigError`` for an unknown map); a run file's reader needs one line saying which
    key to change. The key is found by rebuilding without each key in turn (only on
    failure): the one whose removal lets the model build is named. Warnings of the build
    (a deprecated option name) are shown only when it succeeds.
    """
    resolve_model(model)  # an unknown model name is its own, already clear, error
    if not isinstance(model_args, dict):
        raise ConfigError(f"[model_args] must be a table, got {model_args!r}")
    # after a failure the one error line says what to change; warnings would only add lines
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            built = build_flow(model, model_args, data_meta, dataset)
        except Exception as err:
            raise _build_error(model, model_args, data_meta, err) from err
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return built


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else ""
    if isinstance(err, ExactflowError):
        return line or type(err).__name__
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _build_error(
    model: str, model_args: dict[str, Any], data_meta: dict[str, Any], err: Exception
) -> ConfigError:
    culprits = []
    if 0 < len(model_args) <= 16:
        for key in model_args:
            rest = {k: v for k, v in model_args.items() if k != key}
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    build_flow(model, rest, data_meta)
                except Exception:
                    continue
            culprits.append(key)
    if len(culprits) == 1:
        key = culprits[0]
        where = f"[model_args] {key} = {_toml_value(model_args[key])}"
    elif model_args:
        shown = ", ".join(f"{k} = {_toml_value(v)}" for k, v in model_args.items())
        where = f"[model_args] {{{shown}}}"
    else:
        where = f"the defaults, data shape {tuple(data_meta.get('shape', ()))}"
    reason = _first_line(err).removeprefix(f"model {model!r}: ")  # build_flow's own prefix
    return ConfigError(f"model {model!r} cannot be built from {where}: {reason}")


def _toml_value(value: Any) -> str:
    """``value`` as the user wrote it in the run file (TOML, inline tables included)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    try:
        return dump_toml({"v": value}).strip()[len("v = ") :]
    except ConfigError:
        return repr(value)


def _check_device(name: str, dist: DistributedContext | None) -> None:
    """Refuse a device this machine does not have before anything is written (under
    torchrun each rank's device is checked by :class:`DistributedTrainer`)."""
    if dist is not None:
        return
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", name):
        raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {name!r}")
    resolve_device(name)  # an unavailable CUDA is a ConfigError
    if name.startswith("cuda:"):
        index, count = int(name.split(":")[1]), torch.cuda.device_count()
        if index >= count:
            raise ConfigError(
                f"device {name!r} requested but this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1})"
            )


def _check_splits(cfg: RunConfig, dataset: Dataset) -> None:
    """Every split needs a row: training, best-on-validation and the test NLL read them."""
    for part in ("train", "val", "test"):
        rows = getattr(dataset, part)
        if rows.shape[0] < 1:
            given = {k: v for k, v in cfg.data_args.items() if k in _SPLIT_KEYS[part]}
            why = ", ".join(f"{k} = {v!r}" for k, v in given.items()) or "the data set is too small"
            raise ConfigError(
                f"the {part} split of {cfg.data!r} is empty ([data_args] {why}); "
                "train, val and test each need at least one row"
            )


_SPLIT_KEYS = {
    "train": ("n_train", "val", "test"),
    "val": ("n_val", "val"),
    "test": ("n_test", "test"),
}


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
    # everything is validated before the run directory exists, so a start that fails
    # (bad config, data, model arguments, device) leaves nothing behind
    if resume:

        def read() -> bytes:
            if not ckpt.is_file():
                raise ConfigError(f"nothing to resume: {ckpt} does not exist")
            return read_checkpoint_bytes(ckpt)

        _, meta = parse_checkpoint(read() if dist is None else dist.run_on_main(read), ckpt)
        inner = meta.get("meta")
        saved = inner.get("run") if isinstance(inner, dict) else None
        if not isinstance(saved, dict):
            raise DataError(f"{ckpt}: no run configuration inside")
        try:
            cfg = RunConfig.from_dict(saved)
        except ConfigError as err:
            raise ConfigError(f"{ckpt}: saved run configuration: {err}") from err
        if steps is not None:
            cfg.train.steps = steps
        if device is not None:
            cfg.train.device = device
        if quiet:
            cfg.train.progress = False
    elif not isinstance(cfg, RunConfig):
        raise ConfigError(f"train_run needs a RunConfig, got {type(cfg).__name__}")
    cfg.validate()
    _check_device(cfg.train.device, dist)
    if not resume:
        on_main(dist, lambda: _check_out(out, force))
    dataset = _load_main_first(cfg, dist)
    _check_splits(cfg, dataset)
    flow, event_shape = _seeded_build(cfg, dataset)
    n_params = sum(p.numel() for p in flow.parameters() if p.requires_grad)
    trainer = (Trainer if dist is None else DistributedTrainer)(
        flow,
        dataset.train,
        dataset.val,
        cfg.train,
        train_context=dataset.train_context,
        val_context=dataset.val_context,
        batch_fn=_batch_fn(dataset.discrete, event_shape),
        checkpoint=ckpt,
        meta={"run": cfg.to_dict(), "data": dataset.meta(), "event_shape": list(event_shape)},
    )
    # validated: now the directory (on resume: only its stale temporary files)
    config_text = None if resume else cfg.to_toml()
    on_main(dist, lambda: _create_out(out, config_text, force and not resume))
    given = f" given {dataset.context} context column(s)" if dataset.context else ""
    _log(
        f"training {cfg.model} ({n_params:,} parameters) on {cfg.data}{given}: "
        f"{dataset.train.shape[0]} train / {dataset.val.shape[0]} val / "
        f"{dataset.test.shape[0]} test rows, {cfg.train.steps} steps"
        + (" (resumed)" if resume else ""),
        quiet,
    )
    result = trainer.fit(resume=resume)
    test_nll, test_se = trainer.nll(dataset.test, seed=cfg.seed + 1, context=dataset.test_context)
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
        "context": dataset.context,
        "n_test": int(dataset.test.shape[0]),
    }
    extra = getattr(flow, "evaluation_metrics", None)  # e.g. NFE and straightness
    if callable(extra) and not dataset.context:
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
    on_main(dist, lambda: loaded.append(load_run_data(cfg)))
    return loaded[0] if loaded else load_run_data(cfg)


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
    if dataset.context:
        if dataset.context_kind == "label" and dataset.image_shape is not None:
            # one row of samples per class
            classes = dataset.context
            c = torch.eye(classes, device=flow.device, dtype=flow.dtype).repeat_interleave(8, 0)
            x = flow.sample(1, c, generator=g).reshape(classes * 8, -1)
            plot_images(_to_images(x, dataset.meta()), out / "samples.png", nrow=8)
        return
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


def load_run(path: str | Path, device: str = "cpu", *, allow_nonfinite: bool = False) -> LoadedRun:
    """Rebuild the model of a run directory from ``model.safetensors`` (never unpickles).

    Args:
        path: a run directory or a model file.
        device: where to put the flow.
        allow_nonfinite: load weights holding NaN or inf (refused by default: every density
            and sample computed from them would be NaN).

    Raises :class:`DataError` for a missing or corrupt file, metadata of the wrong form
    (a missing ``"run"`` entry, a JSON array where an object belongs, ...) and non-finite
    weights; :class:`ConfigError` if the weights do not fit the recorded model.
    """
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.exists():
        raise DataError(f"{path}: no model.safetensors (is this an exactflow run directory?)")
    tensors, meta = load_checkpoint(file, allow_nonfinite=allow_nonfinite)
    if meta.get("format") != MODEL_FORMAT:
        raise ConfigError(f"{file}: not an exactflow model file (format {meta.get('format')!r})")
    _check_model_meta(meta, file)
    try:
        cfg = RunConfig.from_dict(meta["run"])
        flow, event_shape = build_checked(cfg.model, cfg.model_args, meta["data"])
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from err
    try:
        flow.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ConfigError(
            f"{file}: weights do not match model {cfg.model!r} with {cfg.model_args} "
            f"({state_dict_mismatch(flow, tensors) or str(err).splitlines()[0]})"
        ) from err
    flow.to(device).eval()
    return LoadedRun(flow, cfg, meta["data"], event_shape, meta.get("metrics") or {})


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean"}
    return kinds.get(type(value), "number" if isinstance(value, (int, float)) else "value")


def _check_model_meta(meta: dict[str, Any], file: Path) -> None:
    """The metadata a model file needs, with its JSON types; :class:`DataError` naming the
    first entry that is missing or of the wrong type."""

    def need(where: dict, key: str, kind: type | tuple, label: str, optional: bool = False):
        if key not in where:
            if optional:
                return
            raise DataError(f"{file}: model metadata has no {label!r} entry")
        value = where[key]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in kind)
        if not ok:
            want = " or ".join(_json_kind(t()) if t is not type(None) else "null" for t in kind)
            raise DataError(
                f"{file}: model metadata {label!r} must be a JSON {want}, "
                f"got a JSON {_json_kind(value)}"
            )

    need(meta, "run", (dict,), "run")
    need(meta, "data", (dict,), "data")
    need(meta, "event_shape", (list,), "event_shape")
    need(meta, "metrics", (dict, type(None)), "metrics", optional=True)
    data = meta["data"]
    need(data, "shape", (list,), "data.shape")
    need(data, "preprocessing", (str,), "data.preprocessing")
    need(data, "levels", (int, type(None)), "data.levels", optional=True)
    need(data, "image_shape", (list, type(None)), "data.image_shape", optional=True)
    need(data, "context", (int,), "data.context", optional=True)
    need(data, "context_names", (list,), "data.context_names", optional=True)
    need(data, "support", (list,), "data.support", optional=True)
    for label, dims in (("data.shape", data["shape"]), ("event_shape", meta["event_shape"])):
        if not dims or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims
        ):
            raise DataError(f"{file}: model metadata {label!r} must list positive ints, got {dims}")


def read_run_file(
    run: LoadedRun, data: str | Path, context: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows of a ``.npy``/``.csv`` file for the model of ``run``, in file order: ``x`` as
    ``(N, *event_shape)`` and its ``(N, C)`` context rows (``None`` for an unconditional run),
    both float32 (what the runs' models take). The context comes from the columns the run
    was trained with or, for a run trained with a context file, from the ``context`` file;
    anything else is a :class:`ConfigError`, wrong widths and values beyond float32 a
    :class:`DataError`."""
    from ..data.files import read_conditional_table

    meta = run.data_meta
    kind = meta.get("context_kind")
    options: dict[str, Any] = {}
    if kind is None:
        if context is not None:
            raise ConfigError("this run is unconditional: it takes no --context")
    elif kind == "columns":
        if context is not None:
            raise ConfigError(
                "this run reads its context from columns of the data file; no --context"
            )
        options["context_columns"] = run.config.data_args["context_columns"]
    elif kind == "file":
        if context is None:
            raise ConfigError(
                "this run was trained with a context file: pass --context FILE with one "
                "context row per row of --data"
            )
        options["context"] = context
    else:
        raise ConfigError(f"reading a file is not supported for a run conditioned on {kind}")
    x, ctx, _ = read_conditional_table(data, **options)
    d, c = math.prod(meta["shape"]), int(meta.get("context") or 0)
    if x.shape[1] != d:
        raise DataError(f"{data}: has {x.shape[1]} columns but the model expects {d}")
    if ctx is not None and ctx.shape[1] != c:
        raise DataError(
            f"{context or data}: {ctx.shape[1]} context column(s), but the run is conditional "
            f"on {c}"
        )
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{data}: values overflow float32")
    rows = torch.as_tensor(x).reshape(x.shape[0], *run.event_shape)
    return rows, None if ctx is None else torch.as_tensor(ctx, dtype=torch.float32)


def evaluate_run(
    path: str | Path,
    data: str | None = None,
    seed: int | None = None,
    batch_size: int = 4096,
    *,
    context: str | Path | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Test NLL (nats) with standard error, and bits/dim for discrete data, of a saved run.

    Args:
        path: run directory.
        data: evaluate on every row of this ``.npy``/``.csv`` file instead of the run's test
            split (its column count must match the model). For a run trained with
            ``context_columns`` the file holds those columns too (the same names or
            indices); for a run trained with a context file, pass ``context``.
        seed: seed of the dequantisation noise (default: the run's seed + 1).
        context: a ``.npy``/``.csv`` file of one context row per row of ``data``.
        allow_nonfinite: evaluate weights holding NaN or inf (see :func:`load_run`).

    For a conditional run the NLL is ``-log p(x | c)``.
    """
    seed = None if seed is None else check_seed(seed)
    batch_size = check_count(batch_size, "batch_size", minimum=1)
    run = load_run(path, allow_nonfinite=allow_nonfinite)
    meta = run.data_meta
    seed = run.config.seed + 1 if seed is None else seed
    if data is None:
        if context is not None:
            raise ConfigError("--context for eval goes with --data (the file it conditions)")
        dataset = load_run_data(run.config)
        rows, source = dataset.test, f"{run.config.data} test split"
        rows_context = dataset.test_context
    else:
        if Path(data).suffix.lower() not in (".npy", ".csv"):
            raise ConfigError(f"--data for eval must be a .npy or .csv file, got {data!r}")
        if meta.get("levels") is not None or len(meta["shape"]) != 1:
            raise ConfigError("evaluating a file is supported for continuous vector data only")
        rows, rows_context = read_run_file(run, data, context)
        source = str(data)
    trainer_cfg = TrainConfig(progress=False, seed=seed, eval_batch_size=batch_size)
    trainer = Trainer(
        run.flow,
        rows,
        None,
        trainer_cfg,
        train_context=rows_context,
        standardize_context=False,  # the run's own standardisation, fitted in training
        batch_fn=_batch_fn(meta.get("levels") is not None, run.event_shape),
    )
    nll, se = trainer.nll(rows, seed=seed, context=rows_context)
    out: dict[str, Any] = {"source": source, "n": int(rows.shape[0]), "nll": nll, "nll_se": se}
    if meta.get("levels") is not None:
        d = math.prod(meta["shape"])
        out["bits_per_dim"] = bits_per_dim(nll, d)
        out["bits_per_dim_se"] = bits_per_dim(se, d)
    return out


def _context_names(meta: dict[str, Any]) -> list[str]:
    return list(meta.get("context_names") or [f"c{i}" for i in range(meta.get("context", 0))])


def parse_context(text: str, meta: dict[str, Any]) -> torch.Tensor:
    """One context row from ``"v1,v2,..."`` (one number per context column); for a
    class-conditional run also ``"3"`` or ``"label=3"``, the one-hot row of class 3."""
    c = int(meta.get("context") or 0)
    names = _context_names(meta)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"--context must be {c} comma-separated numbers ({', '.join(names)})")
    token = text.strip()
    if meta.get("context_kind") == "label" and c > 1:
        label = token.removeprefix("label=").strip()
        if label.lstrip("-").isdigit():
            k = int(label)
            if not 0 <= k < c:
                raise ConfigError(f"--context {text!r}: a class in 0..{c - 1}, got {k}")
            return torch.eye(c)[k : k + 1]
    parts = [t.strip() for t in token.split(",")]
    values = []
    for part in parts:
        try:
            v = float(part)
        except ValueError:
            raise ConfigError(f"--context {text!r}: {part!r} is not a number") from None
        if not math.isfinite(v):
            raise ConfigError(f"--context {text!r}: {part!r} is not finite")
        values.append(v)
    if len(values) != c:
        raise ConfigError(
            f"--context has {len(values)} value(s) but the run is conditional on {c} context "
            f"column(s) ({', '.join(names)})"
        )
    return torch.tensor([values])


def read_context_file(path: str | Path, meta: dict[str, Any]) -> torch.Tensor:
    """``(M, C)`` context rows from a ``.npy``/``.csv`` file: exactly ``C`` columns, or a CSV
    whose header holds the run's context column names (those columns are taken)."""
    from ..data.files import read_table_with_names

    table, header = read_table_with_names(path)
    c = int(meta.get("context") or 0)
    names = _context_names(meta)
    if header is not None and table.shape[1] != c and set(names) <= set(header):
        table = table[:, [header.index(nm) for nm in names]]
    if table.shape[1] != c:
        raise DataError(
            f"{path}: {table.shape[1]} context column(s), but the run is conditional on {c} "
            f"({', '.join(names)})"
        )
    return torch.as_tensor(table, dtype=torch.float32)


def _run_context(meta, context, context_file) -> torch.Tensor | None:
    """The context rows asked for on the command line, checked against the run."""
    c = int(meta.get("context") or 0)
    if context is not None and context_file is not None:
        raise ConfigError("give --context or --context-file, not both")
    if c == 0:
        if context is not None or context_file is not None:
            raise ConfigError("this run is unconditional: it takes no --context/--context-file")
        return None
    if context is None and context_file is None:
        raise ConfigError(
            f"this run is conditional on {c} context column(s) ({', '.join(_context_names(meta))}"
            "): pass --context v1,v2,... or --context-file FILE"
        )
    if context_file is not None:
        return read_context_file(context_file, meta)
    if isinstance(context, torch.Tensor):
        return context.reshape(-1, c).float()
    return parse_context(context, meta)


def sample_run(
    path: str | Path,
    n: int,
    out: str | Path,
    seed: int = 0,
    force: bool = False,
    *,
    context: str | torch.Tensor | None = None,
    context_file: str | Path | None = None,
    allow_nonfinite: bool = False,
) -> np.ndarray:
    """Draw ``n`` samples from a saved run and write them to ``.npy`` (data units; integer
    levels for discrete data), ``.csv`` (a header line; the context columns first for a
    conditional run) or ``.png`` (scatter for vectors, a grid for images).

    A conditional run needs ``context``, one row (``"v1,v2,..."`` in raw units, or a class
    ``"3"`` for a class-conditional run), or ``context_file`` with ``M`` rows: ``n`` samples
    per row, ``M * n`` in all, ordered by row.

    ``allow_nonfinite`` samples from weights holding NaN or inf (see :func:`load_run`)."""
    n = check_count(n, "number of samples", minimum=1)
    seed = check_seed(seed)
    out = Path(out)
    if out.suffix.lower() not in (".npy", ".png", ".csv"):
        raise ConfigError(f"--out must end in .npy, .csv or .png, got {out.name!r}")
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to overwrite")
    if not out.parent.is_dir():
        raise ConfigError(f"cannot write {out}: directory {out.parent} does not exist")
    run = load_run(path, allow_nonfinite=allow_nonfinite)
    meta = run.data_meta
    ctx = _run_context(meta, context, context_file)
    g = torch.Generator().manual_seed(seed)
    if ctx is None:
        x = run.flow.sample(n, generator=g).cpu()
    else:
        rows = ctx.to(run.flow.dtype).repeat_interleave(n, dim=0)
        x = run.flow.sample(1, rows, generator=g).cpu()[0]
        n = rows.shape[0]
    x = x.reshape(n, *meta["shape"])
    if meta.get("levels") is not None:
        x = torch.floor(x).clamp(0, meta["levels"] - 1)
    arr = x.numpy().astype(np.float32)
    if out.suffix.lower() == ".csv":
        flat = arr.reshape(n, -1)
        stem = "theta" if meta.get("context_kind") == "simulation" else "x"
        names = [f"{stem}{i}" for i in range(flat.shape[1])]
        if set(names) & set(_context_names(meta)):
            names = [f"sample_{nm}" for nm in names]
        table = flat
        if ctx is not None:
            names = _context_names(meta) + names
            table = np.concatenate([rows.cpu().numpy().astype(np.float32), flat], axis=1)
        lines = [",".join(names)] + [",".join(f"{v:.9g}" for v in row) for row in table]
        atomic_write_text(out, "\n".join(lines) + "\n")
    elif out.suffix.lower() == ".npy":
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
