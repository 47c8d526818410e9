"""The training engine: maximum likelihood with the safety rails users expect.

:class:`Trainer` minimises a :class:`~exactflow.Flow`'s training objective,
:meth:`~exactflow.Flow.training_loss` (the mean negative log-likelihood ``-log p(x)`` plus any
penalty the model declares, such as RNODE's; flow matching's regression for those models), on
a tensor of training rows, with

* Adam/AdamW, linear warm-up then cosine decay, gradient-norm clipping;
* an exponential moving average (EMA) of the weights for evaluation;
* validation every ``eval_every`` steps, keeping the best weights, early stopping;
* a non-finite guard: a NaN/inf loss or gradient never reaches the weights (the update
  is skipped with a warning), and ``max_nonfinite`` skips in a row abort the run;
* seeded determinism: batches, dequantisation noise and model samples come from one
  ``torch.Generator`` whose state is checkpointed, so a resumed run continues bit-for-bit
  on CPU;
* atomic safetensors checkpoints (:mod:`.checkpoint`) and a tqdm progress bar;
* an optional MMD penalty between model samples and data (:mod:`.mmd`);
* conditional training of ``p(x | c)``: ``train_context``/``val_context`` rows travel with the
  data rows (every batch takes the same indices of both), and the flow's context
  standardisation (:class:`~exactflow.flow.ContextStandardizer`) is fitted on the training
  context, so it is saved, resumed and exported with the model.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, ContextError, DataError, DTypeError, ExactflowError, ShapeError
from ..flow import Flow
from .checkpoint import (
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
    state_dict_mismatch,
)
from .ema import EMA
from .mmd import mmd2_rbf
from .schedule import warmup_cosine

__all__ = ["NonFiniteTraining", "TrainConfig", "TrainResult", "Trainer"]

CHECKPOINT_FORMAT = "exactflow-train-state"
CHECKPOINT_VERSION = 1


class NonFiniteTraining(ExactflowError, RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainConfig:
    """Options of :class:`Trainer` (every field can be set from a TOML ``[train]`` table).

    Attributes:
        steps: optimisation steps (a skipped non-finite step counts as a step).
        batch_size: rows per step; batches are drawn in shuffled epochs.
        lr: peak learning rate.
        optimizer: ``"adam"`` or ``"adamw"`` (decoupled weight decay).
        weight_decay: L2 (adam) or decoupled (adamw) weight decay.
        warmup: linear warm-up steps before the cosine decay.
        final_lr_ratio: learning rate at the last step as a fraction of ``lr``.
        clip_norm: clip the global gradient norm to this value (0 = no clipping).
        ema: EMA decay of the evaluation weights (0 = evaluate the raw weights).
        eval_every: validate every this many steps (and at the end).
        eval_batch_size: rows per forward pass when evaluating.
        patience: stop after this many validations without improvement (0 = never).
        min_delta: improvement (nats) a validation must make to count as better.
        max_nonfinite: abort after this many non-finite steps in a row.
        checkpoint_every: write the resumable checkpoint every this many steps (0 = only at
            the end); needs a checkpoint path.
        seed: seeds batches, dequantisation and sampling (model init is the caller's).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        progress: show a tqdm progress bar.
        mmd_weight: weight of the MMD^2 penalty between model samples and data (0 = off).
        mmd_bandwidths: RBF bandwidths; empty = median heuristic.
        mmd_samples: model samples per step for the MMD penalty.
        compile: compile the model's objective (see ``Trainer(compile=...)``); what
            ``exactflow train --compile`` and ``[train] compile = true`` set.
    """

    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    warmup: int = 100
    final_lr_ratio: float = 0.01
    clip_norm: float = 5.0
    ema: float = 0.0
    eval_every: int = 100
    eval_batch_size: int = 4096
    patience: int = 0
    min_delta: float = 0.0
    max_nonfinite: int = 20
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    mmd_weight: float = 0.0
    mmd_bandwidths: list[float] = field(default_factory=list)
    mmd_samples: int = 256
    compile: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> TrainConfig:
        """Build from a mapping, refusing unknown keys (the error lists the valid ones)."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown training option(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
            )
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)

    def validate(self) -> None:
        """Check types and ranges; raises :class:`ConfigError` naming the field."""
        for f in fields(self):
            value = getattr(self, f.name)
            default = f.default
            if f.name == "mmd_bandwidths":
                if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value
                ):
                    raise ConfigError(
                        f"mmd_bandwidths must be a list of positive numbers, got {value!r}"
                    )
                self.mmd_bandwidths = [float(v) for v in value]
                continue
            kind = type(default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, kind)):
                raise ConfigError(
                    f"training option {f.name} must be {kind.__name__}, got {value!r}"
                )
            if kind in (bool, str) and not isinstance(value, kind):
                raise ConfigError(
                    f"training option {f.name} must be {kind.__name__}, got {value!r}"
                )
        positive = (
            "steps",
            "batch_size",
            "eval_every",
            "eval_batch_size",
            "max_nonfinite",
            "mmd_samples",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"training option {name} must be >= 1, got {getattr(self, name)}")
        nonneg = (
            "weight_decay",
            "warmup",
            "clip_norm",
            "patience",
            "min_delta",
            "checkpoint_every",
            "mmd_weight",
        )
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(f"training option {name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema decay must be in [0, 1), got {self.ema}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ConfigError(f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        if self.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu', 'cuda[:N]' or 'auto', got {self.device!r}")


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did.

    Attributes:
        steps: steps completed (fewer than configured after early stopping).
        best_val: best validation NLL (nats per sample), NaN without validation data.
        best_step: step of ``best_val``.
        stopped_early: stopped by patience.
        skipped: steps whose update was skipped for a non-finite loss or gradient.
        wall_time: seconds spent in :meth:`fit`, summed over resumed segments.
        losses: training loss of every step (NaN for skipped steps).
        val_history: ``[step, val_nll]`` pairs.
    """

    steps: int
    best_val: float
    best_step: int
    stopped_early: bool
    skipped: int
    wall_time: float
    losses: list[float]
    val_history: list[list[float]]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` picks CUDA when available; an unavailable CUDA is a :class:`ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use 'cpu'")
    return torch.device(name)


class Trainer:
    """Fit a :class:`~exactflow.Flow` by maximum likelihood (see the module docstring).

    Raises:
        ContextError: a context for an unconditional flow, none for a conditional one, a
            context of the wrong width (not ``(rows, flow.context_features)``), or
            ``val_context`` without ``val``.
        DataError: context rows that do not match the data rows, non-finite context values,
            a constant context column (with ``standardize_context``).
        ConfigError: the MMD penalty with a conditional flow (not supported).

    Args:
        flow: the model; trained in place.
        train: ``(N, ...)`` training rows (kept on the CPU, batches moved to the device).
        val: validation rows for best-weight selection and early stopping, or ``None``.
        config: a :class:`TrainConfig`.
        train_context: ``(N, C)`` context rows of a conditional flow (``C =
            flow.context_features``), row ``i`` the context of ``train[i]``; required for a
            conditional flow, refused for an unconditional one. Every batch draws the same
            row indices of ``train`` and ``train_context``; ``batch_fn`` sees only the data.
        val_context: ``(M, C)`` context rows of ``val`` (required with ``val`` for a
            conditional flow).
        standardize_context: fit ``flow.context_encoder`` (per-column mean and standard
            deviation) on ``train_context`` before training. ``None`` (default) means on for
            a conditional flow; pass ``False`` to keep the flow's current standardisation
            (fine-tuning a trained model, or contexts that are already standardised). The
            statistics are part of the model (state dict, checkpoints, ONNX export), so
            callers always pass raw contexts.
        checkpoint: path of the resumable checkpoint file, or ``None``.
        meta: extra JSON-ready metadata stored in every checkpoint.
        compile: the compiled training step. The model's objective, ``flow.training_loss``,
            runs through ``torch.compile(dynamic=False)`` (its forward and backward become
            one compiled graph each, so what is compiled is what the eager and the
            distributed steps train), the optimiser is torch's fused Adam/AdamW (one kernel
            for every parameter), and on CUDA the compiled graphs are replayed as CUDA graphs
            (``mode="reduce-overhead"``). The guard is unchanged: a non-finite loss or
            gradient norm still leaves weights, optimiser state and EMA untouched. Batches
            always have ``batch_size`` rows, so the first step compiles (tens of seconds on
            a small CPU) and no later one recompiles (the speed-ups measured:
            benchmarks/README.md). ``None`` (default) takes ``config.compile``.
            The MMD term stays eager; validation and checkpoints are unchanged. A CNF's
            trace is a double backward, which torch.compile's autograd does not support,
            so leave ``compile`` off for continuous flows trained by likelihood.
    """

    def __init__(
        self,
        flow: Flow,
        train: Tensor,
        val: Tensor | None = None,
        config: TrainConfig | None = None,
        *,
        train_context: Tensor | None = None,
        val_context: Tensor | None = None,
        standardize_context: bool | None = None,
        batch_fn: Callable[[Tensor, torch.Generator], Tensor] | None = None,
        checkpoint: str | Path | None = None,
        meta: dict[str, Any] | None = None,
        compile: bool | None = None,
    ):
        if compile is not None and not isinstance(compile, bool):
            raise DTypeError(f"compile must be a bool or None, got {type(compile).__name__}")
        if not isinstance(flow, Flow):
            raise DTypeError(f"Trainer needs an exactflow Flow, got {type(flow).__name__}")
        for name, data in (("train", train), ("val", val)):
            if data is None and name == "val":
                continue
            if not isinstance(data, Tensor) or data.dim() < 1 or data.shape[0] < 1:
                raise ShapeError(
                    f"{name} data must be a non-empty tensor (N, ...), got {data!r:.60}"
                )
        if val is None and val_context is not None:
            raise ContextError("val_context was given without val data; pass both or neither")
        self.train_context = _check_context(flow, train_context, train.shape[0], "train")
        self.val_context = (
            None if val is None else _check_context(flow, val_context, val.shape[0], "val")
        )
        if standardize_context is None:
            standardize_context = flow.context_features > 0
        elif not isinstance(standardize_context, bool):
            raise DTypeError(
                f"standardize_context must be a bool or None, got "
                f"{type(standardize_context).__name__}"
            )
        elif standardize_context and flow.context_features == 0:
            raise ConfigError("standardize_context=True needs a conditional flow (context > 0)")
        self.config = config or TrainConfig()
        if self.train_context is not None and self.config.mmd_weight > 0:
            raise ConfigError(
                "the MMD penalty compares unconditional samples with the data; it is not "
                "defined for a conditional flow: set mmd_weight = 0"
            )
        self.device = self._select_device(self.config.device)
        self.flow = flow.to(self.device)
        if standardize_context:
            flow.context_encoder.fit(self.train_context)
        self.train_data = train.detach().cpu()
        self.val_data = None if val is None else val.detach().cpu()
        self.batch_fn = batch_fn or (lambda x, g: x)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.meta = dict(meta or {})
        if compile is None:
            compile = self.config.compile
        self.compiled = compile
        # CUDA graphs replay the whole compiled forward and backward as one launch each
        self._cudagraphs = compile and self.device.type == "cuda"
        # compiled lazily by torch.compile on the first call; the eager path is the default
        self._loss_fn = self._model_loss
        if compile:
            with _quiet_torch_compiler():
                self._loss_fn = torch.compile(
                    self._model_loss,
                    dynamic=False,
                    **({"mode": "reduce-overhead"} if self._cudagraphs else {}),
                )
        c = self.config
        params = [p for p in flow.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the flow has no trainable parameters")
        self.params = params
        self.optimizer = _optimizer(params, c, fused=compile)
        self.ema = EMA(flow, c.ema) if c.ema > 0 else None
        self.generator = torch.Generator().manual_seed(c.seed)
        self.sample_generator = (
            self.generator
            if self.device.type == "cpu"
            else torch.Generator(device=self.device).manual_seed(c.seed + 1)
        )
        # training position and bookkeeping (all checkpointed)
        self.step = 0
        self.perm = torch.randperm(self.train_data.shape[0], generator=self.generator)
        self.pos = 0
        self.best_val = math.inf
        self.best_step = -1
        self.best_state: dict[str, Tensor] | None = None
        self.bad_evals = 0
        self.stopped_early = False
        self.nonfinite_streak = 0
        self.skipped = 0
        self.wall_time = 0.0
        self.losses: list[float] = []
        self.val_history: list[list[float]] = []

    # -- hooks a data-parallel trainer overrides (see .distributed) ----------------------------
    def _select_device(self, name: str) -> torch.device:
        return resolve_device(name)

    def _warn(self, message: str) -> None:
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _read_checkpoint(self, path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return load_checkpoint(path)

    def _objective(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, float]:
        """The loss to differentiate and its value for the whole (global) batch."""
        loss = self._loss(x, context)
        return loss, float(loss.detach())

    def _clip_gradients(self) -> float:
        """Clip the gradient norm to ``clip_norm``; returns the norm before clipping."""
        max_norm = self.config.clip_norm if self.config.clip_norm > 0 else math.inf
        return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))

    # -- data ----------------------------------------------------------------------------------
    def _to_device(self, rows: Tensor | None) -> Tensor | None:
        return None if rows is None else rows.to(self.device, self.flow.dtype)

    def _next_batch(self) -> tuple[Tensor, Tensor | None]:
        """The next model input and its context rows (``None`` when unconditional), on the
        device."""
        x, context = self._next_rows()
        return self._to_device(x), self._to_device(context)

    def _next_rows(self) -> tuple[Tensor, Tensor | None]:
        """The next batch of ``batch_size`` rows after ``batch_fn`` and the context rows of
        the same indices, on the CPU."""
        n, b = self.train_data.shape[0], min(self.config.batch_size, self.train_data.shape[0])
        if self.pos + b > n:
            self.perm = torch.randperm(n, generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + b]
        self.pos += b
        context = None if self.train_context is None else self.train_context[idx]
        return self.batch_fn(self.train_data[idx], self.generator), context

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def nll(
        self, data: Tensor, seed: int | None = None, *, context: Tensor | None = None
    ) -> tuple[float, float]:
        """Mean and standard error of ``-log p(x | c)`` over ``data`` with the current weights.

        The pre-processing noise (dequantisation) is drawn from a generator seeded with
        ``seed`` (default: the config seed), so repeated evaluations are comparable.
        ``context``: ``(N, C)`` rows for a conditional flow (checked as ``train_context``).
        """
        context = _check_context(self.flow, context, _rows(data, "data"), "data")
        g = torch.Generator().manual_seed(self.config.seed if seed is None else seed)
        was_training = self.flow.training
        self.flow.eval()
        values = []
        step = self.config.eval_batch_size
        try:
            for i in range(0, data.shape[0], step):
                x = self._to_device(self.batch_fn(data[i : i + step], g))
                c = None if context is None else self._to_device(context[i : i + step])
                values.append(-self.flow.log_prob(x, c).double().cpu())
        finally:
            self.flow.train(was_training)
        v = torch.cat(values)
        se = float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else math.nan
        return float(v.mean()), se

    def _eval_state(self) -> dict[str, Tensor]:
        if self.ema is None:
            return {k: v.detach().clone() for k, v in self.flow.state_dict().items()}
        with self.ema.applied():
            return {k: v.detach().clone() for k, v in self.flow.state_dict().items()}

    def _validate(self) -> None:
        if self.val_data is None:
            return
        if self.ema is None:
            val, _ = self.nll(self.val_data, context=self.val_context)
        else:
            with self.ema.applied():
                val, _ = self.nll(self.val_data, context=self.val_context)
        self.val_history.append([self.step, val])
        if val < self.best_val - self.config.min_delta:
            self.best_val, self.best_step = val, self.step
            self.best_state = self._eval_state()
            self.bad_evals = 0
        else:
            self.bad_evals += 1
            if self.config.patience and self.bad_evals >= self.config.patience:
                self.stopped_early = True

    # -- one step ------------------------------------------------------------------------------
    def _loss(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The step's loss: the model's objective, plus the MMD penalty when configured."""
        loss = self._loss_fn(x, context)
        c = self.config
        if c.mmd_weight > 0:
            samples = self.flow.rsample(c.mmd_samples, generator=self.sample_generator)
            loss = loss + c.mmd_weight * mmd2_rbf(samples, x, c.mmd_bandwidths or None)
        return loss

    def _model_loss(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``flow.training_loss`` of the batch ``x`` given its ``context`` rows (the function
        ``compile`` wraps).

        The model owns its objective (NLL plus declared penalties, or flow matching's
        regression), so the engine stays model-agnostic; validation is always the exact NLL.
        """
        return self.flow.training_loss(x, context, generator=self.generator)

    def _set_lr(self) -> None:
        c = self.config
        lr = warmup_cosine(self.step, c.steps, c.lr, c.warmup, c.final_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, x: Tensor, context: Tensor | None = None) -> float:
        """One guarded update on the model input ``x`` (and its ``context`` rows, for a
        conditional flow); returns the loss (NaN if skipped).

        A non-finite loss or gradient leaves weights, optimiser and EMA untouched, warns,
        and counts towards ``max_nonfinite``.
        """
        if not self.compiled:
            return self._guarded_step(x, context)
        with _quiet_torch_compiler():
            return self._guarded_step(x, context)

    def _guarded_step(self, x: Tensor, context: Tensor | None) -> float:
        self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        if self._cudagraphs:
            # a new step begins: the previous replay's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        loss, value = self._objective(x, context)
        problem = None
        if not math.isfinite(value):
            problem = f"loss is {value}"
        else:
            loss.backward()
            norm = self._clip_gradients()
            if not math.isfinite(norm):
                problem = f"gradient norm is {norm}"
        if problem is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.nonfinite_streak += 1
            self._warn(
                f"step {self.step}: {problem}; update skipped "
                f"({self.nonfinite_streak} in a row, limit {self.config.max_nonfinite})"
            )
            if self.nonfinite_streak >= self.config.max_nonfinite:
                raise NonFiniteTraining(
                    f"training aborted at step {self.step}: {self.nonfinite_streak} consecutive "
                    f"steps had a non-finite loss or gradient ({problem}); the weights are "
                    "those of the last good step. Lower lr, check the data for outliers, or "
                    "use a model with bounded scales"
                )
            return math.nan
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.nonfinite_streak = 0
        return value

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Everything needed to resume: ``(tensors, JSON metadata)``."""
        tensors: dict[str, Tensor] = {}
        for k, v in self.flow.state_dict().items():
            tensors[f"model.{k}"] = v
        opt_tensors, opt_rest = optimizer_to_flat(self.optimizer)
        for k, v in opt_tensors.items():
            tensors[f"optim.{k}"] = v
        if self.ema is not None:
            for k, v in self.ema.state_tensors().items():
                tensors[f"ema.{k}"] = v
        if self.best_state is not None:
            for k, v in self.best_state.items():
                tensors[f"best.{k}"] = v
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.sample_generator is not self.generator:
            tensors["rng.sample_generator"] = self.sample_generator.get_state()
        tensors["data.perm"] = self.perm
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "optimizer": opt_rest,
            "step": self.step,
            "pos": self.pos,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "stopped_early": self.stopped_early,
            "nonfinite_streak": self.nonfinite_streak,
            "skipped": self.skipped,
            "ema_updates": 0 if self.ema is None else self.ema.updates,
            "wall_time": self.wall_time,
            "losses": self.losses,
            "val_history": self.val_history,
            "meta": self.meta,
        }
        return tensors, meta

    def save(self, path: str | Path | None = None) -> None:
        """Write the resumable checkpoint atomically."""
        path = Path(path) if path is not None else self.checkpoint
        if path is None:
            raise ConfigError("no checkpoint path given")
        tensors, meta = self.state()
        save_checkpoint(path, tensors, meta)

    def load(self, path: str | Path | None = None) -> None:
        """Restore model, optimiser, EMA, RNG and counters from a checkpoint."""
        path = Path(path) if path is not None else self.checkpoint
        if path is None:
            raise ConfigError("no checkpoint path given")
        tensors, meta = self._read_checkpoint(path)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{path}: not a training checkpoint (format {meta.get('format')!r})")
        groups: dict[str, dict[str, Tensor]] = {}
        for k, v in tensors.items():
            head, _, rest = k.partition(".")
            groups.setdefault(head, {})[rest] = v
        weights = groups.get("model", {})
        try:
            self.flow.load_state_dict(weights, strict=True)
        except RuntimeError as err:
            detail = state_dict_mismatch(self.flow, weights) or str(err).splitlines()[0]
            raise ConfigError(f"{path}: checkpoint does not match this model ({detail})") from err
        optimizer_from_flat(self.optimizer, groups.get("optim", {}), meta["optimizer"])
        if self.ema is not None:
            self.ema.load_tensors(groups.get("ema", {}), meta["ema_updates"])
        best = groups.get("best")
        self.best_state = {k: v.to(self.device) for k, v in best.items()} if best else None
        rng = groups["rng"]
        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if "sample_generator" in rng and self.sample_generator is not self.generator:
            self.sample_generator.set_state(rng["sample_generator"])
        self.perm = groups["data"]["perm"]
        for key in ("step", "pos", "best_step", "bad_evals", "nonfinite_streak", "skipped"):
            setattr(self, key, int(meta[key]))
        self.best_val = float(meta["best_val"])
        self.stopped_early = bool(meta["stopped_early"])
        self.wall_time = float(meta["wall_time"])
        self.losses = [float(v) for v in meta["losses"]]
        self.val_history = [list(v) for v in meta["val_history"]]

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TrainResult:
        """Train until ``config.steps`` or early stopping; returns a :class:`TrainResult`.

        With ``resume=True`` the state is first restored from the checkpoint file. At the
        end the flow holds the best validation weights (EMA weights if enabled; the last
        weights without validation data).
        """
        c = self.config
        if resume:
            self.load()
        start = time.perf_counter()
        bar = _progress(c, self.step)
        smooth = math.nan
        try:
            self.flow.train()
            if self.step == 0 and not self.val_history:
                # the initial model is a candidate too: flows start at the identity, which on
                # whitened data is the Gaussian fit, and training must not end up worse
                self._validate()
            while self.step < c.steps and not self.stopped_early:
                x, context = self._next_batch()
                # the one-argument call for an unconditional run keeps train_step wrappers
                # written for it working
                loss = self.train_step(x) if context is None else self.train_step(x, context)
                self.losses.append(loss)
                self.step += 1
                if math.isfinite(loss):
                    smooth = loss if math.isnan(smooth) else 0.95 * smooth + 0.05 * loss
                if self.step % c.eval_every == 0 or self.step == c.steps:
                    self._validate()
                if self.checkpoint is not None and (
                    (c.checkpoint_every and self.step % c.checkpoint_every == 0)
                    or self.step == c.steps
                    or self.stopped_early
                ):
                    self.wall_time += time.perf_counter() - start
                    start = time.perf_counter()
                    self.save()
                if bar is not None:
                    bar.update(1)
                    if self.step % 10 == 0 or self.step == c.steps:
                        post = {"loss": f"{smooth:.3f}"}
                        if self.val_history:
                            post["val_nll"] = f"{self.val_history[-1][1]:.3f}"
                        bar.set_postfix(post, refresh=False)
        finally:
            if bar is not None:
                bar.close()
        self.wall_time += time.perf_counter() - start
        self._finalize()
        return TrainResult(
            steps=self.step,
            best_val=self.best_val if self.val_data is not None else math.nan,
            best_step=self.best_step,
            stopped_early=self.stopped_early,
            skipped=self.skipped,
            wall_time=self.wall_time,
            losses=list(self.losses),
            val_history=[list(v) for v in self.val_history],
        )

    def _finalize(self) -> None:
        if self.best_state is not None:
            self.flow.load_state_dict(self.best_state)
        elif self.ema is not None:
            self.flow.load_state_dict(self._eval_state())
        self.flow.eval()


@contextmanager
def _quiet_torch_compiler() -> Iterator[None]:
    """Hide the deprecation notices torch's compiler raises about its own internals while it
    loads and builds graphs (``torch.jit.script_method``, ``torch._prims_common.check``):
    nothing a user of the compiled step can act on. Other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        yield


def _optimizer(params: list[Tensor], config: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """Adam or AdamW over ``params``; with ``fused`` torch's fused kernel (one pass over all
    parameters per step instead of a few multi-tensor ops), where the device supports it.

    Fused and multi-tensor Adam compute the same update up to float rounding, and their
    state has the same keys, so checkpoints move between the two.
    """
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    if fused:
        try:
            return cls(params, fused=True, **kwargs)
        except RuntimeError:  # a device or dtype without fused kernels: the default below
            pass
    return cls(params, **kwargs)


def _rows(data, name: str) -> int:
    if not isinstance(data, Tensor) or data.dim() < 1:
        raise ShapeError(f"{name} must be a tensor (N, ...), got {type(data).__name__}")
    return data.shape[0]


def _check_context(flow: Flow, context, rows: int, name: str) -> Tensor | None:
    """``context`` for the ``rows`` rows of data set ``name`` as a CPU tensor, checked: present
    exactly when ``flow`` is conditional, ``(rows, C)``, finite."""
    c = flow.context_features
    label = f"{name}_context" if name in ("train", "val") else "context"
    if context is None:
        if c > 0:
            raise ContextError(
                f"this flow is conditional (context_features={c}) but no {label} was given; "
                f"pass the ({rows}, {c}) context rows of {name}"
            )
        return None
    shape = tuple(getattr(context, "shape", ()))
    if c == 0:
        raise ContextError(
            f"this flow is unconditional (context_features=0) but {label} of shape {shape} "
            "was given; build the model with context=C to train p(x | c)"
        )
    if not isinstance(context, Tensor):
        raise DTypeError(
            f"{label} must be a torch.Tensor ({rows}, {c}), got {type(context).__name__}"
        )
    if context.is_complex():
        raise DTypeError(f"{label} must be real, got {context.dtype}")
    if context.dim() != 2 or context.shape[1] != c:
        got = context.shape[-1] if context.dim() >= 1 else "no"
        raise ContextError(
            f"{label} must have shape ({rows}, {c}) for this flow (context_features={c}), got "
            f"{shape} ({got} column(s))"
        )
    if context.shape[0] != rows:
        raise DataError(
            f"{label} has {context.shape[0]} row(s) but {name} has {rows}; give one context "
            "row per data row"
        )
    context = context.detach().cpu()
    if context.is_floating_point():
        bad = ~torch.isfinite(context)
        if bool(bad.any()):
            row, col = (int(v) for v in bad.nonzero()[0])
            raise DataError(
                f"{label} contains {int(bad.sum())} non-finite value(s) (NaN or inf), the first "
                f"at row {row}, column {col}"
            )
    return context


def _progress(config: TrainConfig, initial: int):
    if not config.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the [train] extra
        return None
    return tqdm(total=config.steps, initial=initial, unit="step", dynamic_ncols=True, leave=False)
