"""Neural posterior estimation (NPE): a conditional flow ``q(theta | x)`` trained on simulations.

    from exactflow import sbi
    posterior = sbi.train_npe("two_moons", simulations=10_000, seed=0)
    theta_o, x_o = sbi.observations("two_moons", 3, seed=0)
    samples = posterior.sample(10_000, x_o[0])       # (10000, 2), inside the prior box
    log_q = posterior.log_prob(samples, x_o[0])      # (10000,)
    posterior.save("two_moons.safetensors"); sbi.Posterior.load("two_moons.safetensors")

:func:`train_npe` draws ``N`` pairs ``theta ~ p(theta)``, ``x ~ p(x | theta)`` from the task,
holds out a validation fraction, and fits ``q(theta | x)`` by maximum likelihood with
:class:`~exactflow.train.Trainer` (context = ``x``, standardised by the flow's own
:class:`~exactflow.flow.ContextStandardizer`). Minimising ``E_{p(theta, x)}[-log q(theta |
x)]`` is minimising the expected ``KL(p(theta | x) || q(theta | x))``, so the flow learns the
posterior at every ``x`` at once (amortised).

The flow's transform is ``Compose([support, standardise, inner])`` in the normalizing
direction: ``support`` is :func:`~exactflow.sbi.support_transform` (box -> R^d by a scaled
logit for a bounded prior, the identity otherwise), ``standardise`` a fixed
:class:`~exactflow.transforms.Affine` that z-scores the training ``theta`` in that space, and
``inner`` the chosen model's conditional transform. So ``log_prob`` is the density of
``theta`` itself (the support's log-det included) and a sample can only land in the box
(float32 saturation onto a face at worst).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, DataError, DTypeError
from ..flow import Flow
from ..models import MODELS
from ..train import TrainConfig, Trainer, TrainResult, load_checkpoint, save_checkpoint
from ..transforms import Affine, Compose, Transform
from ..validation import check_seed
from ._validate import as_rows, positive_int
from .support import support_transform
from .tasks import Simulator, get_task

__all__ = ["Posterior", "train_npe"]

POSTERIOR_FORMAT = "exactflow-npe-posterior"
POSTERIOR_VERSION = 1

ModelBuilder = Callable[..., Flow]


def _inner_flow(
    model: str | ModelBuilder, theta_dim: int, x_dim: int, model_kwargs: dict[str, Any]
) -> Flow:
    """The conditional flow on R^theta_dim given x_dim context features, before the support."""
    if isinstance(model, str):
        spec = MODELS.get(model)
        if spec is None:
            raise ConfigError(f"unknown model {model!r}; valid: {', '.join(sorted(MODELS))}")
        if spec.input != "vector":
            raise ConfigError(f"NPE needs a vector model, {model!r} is an image model")
        flow = spec(theta_dim, context=x_dim, **model_kwargs)
    elif callable(model):
        flow = model(theta_dim, x_dim, **model_kwargs)
    else:
        raise DTypeError(
            f"model must be a model name or a callable (features, context) -> Flow, got "
            f"{type(model).__name__}"
        )
    if not isinstance(flow, Flow):
        raise DTypeError(f"model built a {type(flow).__name__}, expected an exactflow Flow")
    if tuple(flow.event_shape) != (theta_dim,) or flow.context_features != x_dim:
        raise ConfigError(
            f"model built a flow with event shape {tuple(flow.event_shape)} and context "
            f"{flow.context_features}; NPE needs event shape ({theta_dim},) and context {x_dim}"
        )
    return flow


def _posterior_flow(inner: Flow, preprocessing: Transform) -> Flow:
    """``inner`` with ``preprocessing`` (support + standardisation) in front of its transform."""
    with_pre = getattr(inner, "with_preprocessing", None)
    if callable(with_pre):  # flow matching keeps its own class (and its objective)
        flow = with_pre(preprocessing)
    else:
        flow = Flow(Compose([preprocessing, inner.transform]), inner.base, inner.validate)
    return flow.to(inner.dtype)


def _preprocessing(task: Simulator, loc: Tensor, scale: Tensor, dtype: torch.dtype) -> Compose:
    return Compose(
        [support_transform(task, dtype), Affine(loc.to(dtype), scale.to(dtype), event_dim=1)]
    )


def _build(
    task: Simulator,
    model: str | ModelBuilder,
    model_kwargs: dict[str, Any],
    loc: Tensor,
    scale: Tensor,
    dtype: torch.dtype,
    seed: int,
) -> Flow:
    # the initialisation is seeded without touching the caller's global random stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inner = _inner_flow(model, task.theta_dim, task.x_dim, model_kwargs)
    flow = _posterior_flow(inner.to(dtype), _preprocessing(task, loc, scale, dtype))
    return flow.to(dtype)


class Posterior:
    """An amortised posterior ``q(theta | x)``: a conditional flow on ``theta`` given ``x``.

    Built by :func:`train_npe` (or :meth:`load`). ``x`` is always given in its raw units; the
    flow standardises it itself.

    Attributes:
        flow: the :class:`~exactflow.Flow` (event ``(D_theta,)``, context ``D_x``), in eval mode.
        task: the :class:`~exactflow.sbi.Simulator` it was trained on.
        result: the :class:`~exactflow.train.TrainResult` of the training run (``None`` after
            :meth:`load`).
    """

    def __init__(
        self,
        flow: Flow,
        task: Simulator,
        *,
        model: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        result: TrainResult | None = None,
    ):
        if not isinstance(flow, Flow):
            raise DTypeError(f"flow must be an exactflow Flow, got {type(flow).__name__}")
        if not isinstance(task, Simulator):
            raise DTypeError(f"task must be an sbi Simulator, got {type(task).__name__}")
        if tuple(flow.event_shape) != (task.theta_dim,) or flow.context_features != task.x_dim:
            raise ConfigError(
                f"a posterior for {task.name} needs a flow with event shape ({task.theta_dim},) "
                f"and context {task.x_dim}, got {tuple(flow.event_shape)} and "
                f"{flow.context_features}"
            )
        self.flow = flow.eval()
        self.task = task
        self.model = model
        self.model_kwargs = dict(model_kwargs or {})
        self.result = result

    def __repr__(self) -> str:
        return f"Posterior(task={self.task.name!r}, model={self.model!r})"

    def _x(self, x_o) -> tuple[Tensor, bool]:
        rows, single = as_rows(x_o, self.task.x_dim, "x_o")
        rows = rows.to(self.flow.device, self.flow.dtype)
        return rows, single

    def sample(self, n: int, x_o: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``n`` posterior samples at ``x_o``: ``(n, D_theta)`` for one ``(D_x,)``
        observation, ``(n, m, D_theta)`` for ``(m, D_x)`` observations (``n`` each)."""
        n = positive_int(n, "n")
        x, single = self._x(x_o)
        with torch.no_grad():
            theta = self.flow.sample(n, x[0] if single else x, generator)
        return theta

    def log_prob(self, theta: Tensor, x_o: Tensor) -> Tensor:
        """``log q(theta | x_o)``, shape ``(n,)`` for ``theta`` ``(n, D_theta)`` (``()`` for one
        ``(D_theta,)``); ``x_o`` is one ``(D_x,)`` observation for every row or ``(n, D_x)``.

        A density on the prior's support: ``-inf`` outside a bounded prior's box.
        """
        rows, single = as_rows(theta, self.task.theta_dim, "theta")
        rows = rows.to(self.flow.device, self.flow.dtype)
        x, x_single = self._x(x_o)
        if not x_single and x.shape[0] != rows.shape[0]:
            raise DataError(
                f"x_o has {x.shape[0]} rows but theta has {rows.shape[0]}; give one x_o per "
                f"theta or a single ({self.task.x_dim},) observation"
            )
        context = x[0] if x_single else x
        bounds = self.task.bounds
        if bounds is None:
            out = self.flow.log_prob(rows, context)
        else:
            low, high = (b.to(rows) for b in bounds)
            inside = ((rows >= low) & (rows <= high)).all(dim=-1)
            # the logit clamps an outside value onto the face: evaluate there, then mask
            out = self.flow.log_prob(torch.minimum(torch.maximum(rows, low), high), context)
            out = torch.where(inside, out, torch.full_like(out, -math.inf))
        return out[0] if single else out

    def sampler(self) -> Callable[[Tensor, int, torch.Generator | None], Tensor]:
        """``(x, n, generator) -> (n, D_theta)`` samples, the form
        :func:`~exactflow.sbi.sbc_ranks` takes."""
        return lambda x, n, generator=None: self.sample(n, x, generator)

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the flow's weights and how to rebuild it to a safetensors file (atomically).

        :meth:`load` rebuilds a named model by itself; a posterior trained with a callable
        ``model`` needs the callable again there.
        """
        path = Path(path)
        meta = {
            "format": POSTERIOR_FORMAT,
            "version": POSTERIOR_VERSION,
            "task": self.task.name,
            "model": self.model,
            "model_kwargs": self.model_kwargs,
            "theta_dim": self.task.theta_dim,
            "x_dim": self.task.x_dim,
            "dtype": str(self.flow.dtype).removeprefix("torch."),
        }
        try:
            json.dumps(meta)
        except TypeError as err:
            raise ConfigError(
                f"cannot save this posterior: model_kwargs must be JSON values ({err})"
            ) from err
        save_checkpoint(path, self.flow.state_dict(), meta)
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        task: Simulator | str | None = None,
        model: ModelBuilder | None = None,
    ) -> Posterior:
        """A posterior written by :meth:`save`.

        Args:
            path: the file.
            task: the simulator (default: the benchmark task named in the file; a custom
                simulator must be passed).
            model: the builder callable of a posterior trained with one.
        """
        tensors, meta = load_checkpoint(path)
        if meta.get("format") != POSTERIOR_FORMAT:
            raise ConfigError(f"{path}: not an NPE posterior (format {meta.get('format')!r})")
        task = get_task(meta["task"] if task is None else task)
        if (task.theta_dim, task.x_dim) != (meta["theta_dim"], meta["x_dim"]):
            raise ConfigError(
                f"{path}: a posterior for theta_dim={meta['theta_dim']}, x_dim={meta['x_dim']}; "
                f"{task.name} has {task.theta_dim}, {task.x_dim}"
            )
        name = meta["model"]
        if name is None and model is None:
            raise ConfigError(
                f"{path} was trained with a callable model: pass it again, load(path, model=...)"
            )
        dtype = getattr(torch, meta.get("dtype", "float32"))
        d = task.theta_dim
        flow = _build(
            task,
            model if name is None else name,
            meta["model_kwargs"],
            torch.zeros(d),
            torch.ones(d),
            dtype,
            seed=0,
        )
        try:
            flow.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            raise ConfigError(
                f"{path}: weights do not match the rebuilt model ({str(err).splitlines()[0]})"
            ) from err
        return cls(flow, task, model=name, model_kwargs=meta["model_kwargs"])


def _fraction(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DTypeError(f"validation_fraction must be a number, got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"validation_fraction must be in [0, 1), got {value}")
    return float(value)


def train_npe(
    task: Simulator | str,
    simulations: int,
    *,
    model: str | ModelBuilder = "nsf",
    model_kwargs: dict[str, Any] | None = None,
    steps: int = 5000,
    batch_size: int = 256,
    lr: float = 5e-4,
    seed: int = 0,
    validation_fraction: float = 0.1,
    train_options: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> Posterior:
    """Neural posterior estimation: fit ``q(theta | x)`` to ``simulations`` pairs of ``task``.

    Args:
        task: a :class:`~exactflow.sbi.Simulator` or a benchmark task name.
        simulations: number ``N`` of simulated pairs ``(theta, x)`` (at least 2).
        model: a vector model name of :data:`exactflow.models.MODELS` (default ``"nsf"``,
            5 autoregressive rational-quadratic spline layers of (128, 128) hidden units), or
            a callable ``(features, context, **model_kwargs) -> Flow`` building a conditional
            flow on ``R^features``; either way the support bijection is put in front.
        model_kwargs: keywords for the builder.
        steps, batch_size, lr: the training budget (:class:`~exactflow.train.TrainConfig`).
        seed: seeds the simulations, the split, the model initialisation and the training.
        validation_fraction: share of the simulations held out to pick the best weights
            (0 = none; the last weights are kept).
        train_options: further :class:`~exactflow.train.TrainConfig` fields (``ema``,
            ``patience``, ``eval_every``, ...).
        dtype: of the flow and the simulations.
        progress: show a progress bar.

    Returns:
        The trained :class:`Posterior` (``posterior.result`` holds the training record).
    """
    task = get_task(task)
    n = positive_int(simulations, "simulations")
    if n < 2:
        raise ConfigError(f"simulations must be >= 2, got {n}")
    seed = check_seed(seed, "seed")
    fraction = _fraction(validation_fraction)
    model_kwargs = dict(model_kwargs or {})
    g = torch.Generator().manual_seed(seed)
    theta, x = task.sample_finite_joint(n, g, dtype)
    perm = torch.randperm(theta.shape[0], generator=g)
    n_val = min(max(1, round(fraction * theta.shape[0])), theta.shape[0] - 1) if fraction else 0
    train_idx, val_idx = perm[n_val:], perm[:n_val]

    # z-score theta where the inner flow sees it: after the support bijection
    with torch.no_grad():
        z, _ = support_transform(task, torch.float64)(theta[train_idx].double())
    loc, scale = z.mean(0), z.std(0)
    flow = _build(task, model, model_kwargs, loc, scale, dtype, seed)

    options = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": min(100, max(0, steps // 20)),
        "eval_every": max(1, min(250, steps // 10)),
        "checkpoint_every": 0,
        "seed": seed,
        "progress": progress,
    }
    options.update(train_options or {})
    config = TrainConfig.from_dict(options)
    val = (theta[val_idx], x[val_idx]) if n_val else (None, None)
    trainer = Trainer(
        flow,
        theta[train_idx],
        val[0],
        config,
        train_context=x[train_idx],
        val_context=val[1],
    )
    result = trainer.fit()
    name = model if isinstance(model, str) else None
    return Posterior(flow, task, model=name, model_kwargs=model_kwargs, result=result)
