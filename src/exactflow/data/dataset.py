"""The :class:`Dataset` record every loader returns, and its pre-processing.

A dataset holds train/val/test tensors in the *original* data space plus what is needed
to map them to the model's space with exact log-dets:

* continuous data (toys, tabular, user files): optionally standardised with training
  statistics, ``s = (x - mean) / std``, an :class:`~exactflow.transforms.Affine` with
  ``log|ds/dx| = -sum log std``;
* discrete data (pixels, counts) with ``levels`` K: uniformly dequantised on every batch,
  then either standardised (tabular view) or logit-transformed (image view, see
  :class:`~.preprocessing.LogitPreprocess`).

``dataset.preprocess()`` is prepended to a model's transform, so ``log_prob`` of the
resulting flow is the density in the original space and NLLs need no correction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from ..transforms.base import Compose, Inverse, Transform
from ..transforms.elementwise import Affine, Sigmoid
from .preprocessing import LogitPreprocess, Whiten, dequantize

__all__ = [
    "Dataset",
    "continuous_preprocessing",
    "make_preprocess",
    "one_hot",
    "standardization_stats",
    "support_bijection",
    "whitening_stats",
]

PREPROCESSING = ("none", "standardize", "whiten", "logit")


@dataclass
class Dataset:
    """Train/val/test splits in the original data space with their pre-processing.

    Attributes:
        name: data set name or file path.
        train, val, test: ``(N, *shape)`` float32 tensors (integer-valued for discrete data).
        shape: event shape of one sample, ``(D,)`` or ``(C, H, W)``.
        preprocessing: ``"none"``, ``"standardize"``, ``"whiten"`` or ``"logit"``.
        levels: number of discrete levels K for discrete data (dequantised per batch, and
            bits/dim are reported), ``None`` for continuous data.
        alpha: logit boundary margin (``"logit"`` only).
        mean, std: training statistics (``"standardize"``/``"whiten"``), each of shape
            ``shape``, computed on the dequantised training data for discrete data.
        scale_tril: Cholesky factor of the training covariance (``"whiten"`` only).
        image_shape: ``(C, H, W)`` when samples can be shown as images, else ``None``.
        train_context, val_context, test_context: ``(N, C)`` float32 context rows of a
            conditional data set (row ``i`` conditions row ``i`` of the split), else ``None``.
        context_names: one name per context column (``("c1", "c2")``, ``("label=0", ...)``).
        context_kind: where the context came from: ``"columns"`` (columns of the data file),
            ``"file"`` (a second file of rows), ``"label"`` (one-hot class labels),
            ``"simulation"`` (the simulated data of an SBI task), else ``None``.
        support: a box ``(low, high)`` (lists of ``D`` floats) the data lies in, or ``None``;
            the pre-processing then starts with the bijection box -> R^D (a scaled logit), so
            the model puts no mass outside the box, and standardises in that space.
    """

    name: str
    train: Tensor
    val: Tensor
    test: Tensor
    shape: tuple[int, ...]
    preprocessing: str = "none"
    levels: int | None = None
    alpha: float = 0.05
    mean: Tensor | None = None
    std: Tensor | None = None
    image_shape: tuple[int, ...] | None = None
    scale_tril: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    train_context: Tensor | None = None
    val_context: Tensor | None = None
    test_context: Tensor | None = None
    context_names: tuple[str, ...] | None = None
    context_kind: str | None = None
    support: tuple[list[float], list[float]] | None = None

    def __post_init__(self) -> None:
        if self.preprocessing not in PREPROCESSING:
            raise ConfigError(
                f"preprocessing must be one of {PREPROCESSING}, got {self.preprocessing!r}"
            )
        self._check_context()
        if self.support is not None:
            if self.preprocessing not in ("none", "standardize") or len(self.shape) != 1:
                raise ConfigError("a support box needs vector data and 'standardize' or 'none'")
            if self.preprocessing == "standardize" and (self.mean is None or self.std is None):
                z, _ = support_bijection(*self.support)(self.train.double())
                self.mean, self.std = standardization_stats(z.float())
        if self.preprocessing == "standardize" and (self.mean is None or self.std is None):
            self.mean, self.std = standardization_stats(self.train, self.levels)
        if self.preprocessing == "whiten" and self.scale_tril is None:
            if len(self.shape) != 1:
                raise ConfigError(f"whitening needs vector data, got shape {self.shape}")
            self.mean, self.scale_tril = whitening_stats(self.train, self.levels)
        if self.preprocessing == "logit" and self.levels is None:
            raise ConfigError("logit pre-processing needs discrete data with `levels`")

    def _check_context(self) -> None:
        parts = [self.train_context, self.val_context, self.test_context]
        if all(c is None for c in parts):
            return
        for name, rows, c in zip(
            ("train", "val", "test"), (self.train, self.val, self.test), parts
        ):
            if c is None or c.dim() != 2 or c.shape[0] != rows.shape[0]:
                got = None if c is None else tuple(c.shape)
                raise DataError(
                    f"{self.name}: the {name} context must have one row per data row "
                    f"({rows.shape[0]}, C), got {got}"
                )
        widths = {c.shape[1] for c in parts}
        if len(widths) != 1 or 0 in widths:
            raise DataError(f"{self.name}: context widths differ across splits: {widths}")
        names = self.context_names or tuple(f"c{i}" for i in range(parts[0].shape[1]))
        if len(names) != parts[0].shape[1]:
            raise DataError(
                f"{self.name}: {len(names)} context names for {parts[0].shape[1]} columns"
            )
        self.context_names = tuple(str(n) for n in names)

    @property
    def features(self) -> int:
        """Number of scalar dimensions D of one sample."""
        return math.prod(self.shape)

    @property
    def context(self) -> int:
        """Context size C (0 for an unconditional data set)."""
        return 0 if self.train_context is None else int(self.train_context.shape[1])

    @property
    def discrete(self) -> bool:
        """True for integer-valued data with ``levels`` (dequantised before training)."""
        return self.levels is not None

    def batch(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Model-ready input from raw rows: dequantised (discrete data) float tensor."""
        return dequantize(x, generator) if self.discrete else x

    def preprocess(self, event_shape: tuple[int, ...] | None = None) -> Transform:
        """The transform from the original space to the model space (with its log-det).

        Args:
            event_shape: the model's event shape (``(D,)`` for vector models, ``(C, H, W)``
                for image models); defaults to the data shape.
        """
        return make_preprocess(
            self.preprocessing,
            tuple(event_shape or self.shape),
            levels=self.levels,
            alpha=self.alpha,
            mean=self.mean,
            std=self.std,
            scale_tril=self.scale_tril,
            support=self.support,
        )

    def meta(self) -> dict[str, Any]:
        """JSON/TOML-ready description, enough to rebuild the pre-processing structure."""
        out: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "preprocessing": self.preprocessing,
            "n_train": int(self.train.shape[0]),
            "n_val": int(self.val.shape[0]),
            "n_test": int(self.test.shape[0]),
        }
        if self.levels is not None:
            out["levels"] = int(self.levels)
        if self.preprocessing == "logit":
            out["alpha"] = float(self.alpha)
        if self.image_shape is not None:
            out["image_shape"] = list(self.image_shape)
        if self.context:
            out["context"] = self.context
            out["context_names"] = list(self.context_names or ())
            out["context_kind"] = self.context_kind
        if self.support is not None:
            out["support"] = [list(map(float, self.support[0])), list(map(float, self.support[1]))]
        return out


def standardization_stats(train: Tensor, levels: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std of the training rows, shapes ``train.shape[1:]``.

    For discrete data the statistics are those of the dequantised data ``x + u`` in
    closed form (mean + 1/2, variance + 1/12), so they do not depend on one noise draw.
    Raises :class:`DataError` for a feature that is constant on the training split.
    """
    if train.shape[0] < 2:
        raise DataError(f"need at least 2 training rows to standardise, got {train.shape[0]}")
    x = train.double()
    mean = x.mean(0)
    var = x.var(0, unbiased=False)
    if levels is not None:
        mean, var = mean + 0.5, var + 1.0 / 12.0
    std = var.sqrt()
    constant = (std <= 1e-12 * (1.0 + mean.abs())).reshape(-1)
    if bool(constant.any()):
        cols = torch.nonzero(constant).reshape(-1).tolist()
        shown = ", ".join(map(str, cols[:10])) + (" ..." if len(cols) > 10 else "")
        raise DataError(
            f"{len(cols)} feature(s) are constant on the training split (columns {shown}); "
            "drop them: a flow has no density on a constant feature"
        )
    return mean.float(), std.float()


def continuous_preprocessing(train: Tensor) -> str:
    """The default pre-processing of continuous vector data: ``"whiten"``, or
    ``"standardize"`` (with a warning) when features are linearly dependent."""
    try:
        whitening_stats(train)
    except DataError as err:
        if "linearly dependent" not in str(err):
            raise
        import warnings

        warnings.warn(f"{err}; standardising instead", RuntimeWarning, stacklevel=3)
        return "standardize"
    return "whiten"


def whitening_stats(train: Tensor, levels: int | None = None) -> tuple[Tensor, Tensor]:
    """Training mean ``(D,)`` and Cholesky factor ``(D, D)`` of the training covariance.

    The maximum-likelihood covariance is used, with the dequantisation variance 1/12 added on
    the diagonal for discrete data. Raises :class:`DataError` for constant or linearly
    dependent features (no density exists on such data).
    """
    standardization_stats(train, levels)  # the constant-column check with its message
    x = train.double().reshape(train.shape[0], -1)
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / x.shape[0]
    if levels is not None:
        mean = mean + 0.5
        cov = cov + torch.eye(cov.shape[0], dtype=cov.dtype) / 12.0
    # scale-free check: Cholesky of the correlation matrix
    d = cov.diagonal().sqrt()
    corr = cov / d[:, None] / d[None, :]
    L_corr, info = torch.linalg.cholesky_ex(corr)
    if int(info) != 0 or bool((L_corr.diagonal() < 1e-6).any()):
        raise DataError(
            f"the {x.shape[1]} features are (nearly) linearly dependent on the training split; "
            'drop redundant columns or use preprocessing = "standardize"'
        )
    return mean.float(), (d[:, None] * L_corr).float()


def make_preprocess(
    preprocessing: str,
    event_shape: tuple[int, ...],
    levels: int | None = None,
    alpha: float = 0.05,
    mean: Tensor | None = None,
    std: Tensor | None = None,
    scale_tril: Tensor | None = None,
    support: tuple[list[float], list[float]] | None = None,
) -> Transform:
    """The pre-processing transform for a model with ``event_shape``.

    ``"standardize"``/``"whiten"`` without statistics build placeholders (0 and 1 / I) for a
    saved state dict to overwrite; ``"logit"`` needs ``levels``; ``"none"`` is an empty
    Compose. A ``support`` box ``(low, high)`` puts :func:`support_bijection` first (vector
    data, ``"standardize"`` or ``"none"``; the statistics are then those of the mapped data).
    """
    if support is not None:
        if preprocessing not in ("none", "standardize") or len(event_shape) != 1:
            raise ConfigError("a support box needs a vector model and 'standardize' or 'none'")
        rest = make_preprocess(preprocessing, event_shape, mean=mean, std=std)
        return Compose([support_bijection(*support), rest])
    event_shape = tuple(int(s) for s in event_shape)
    event_dim = len(event_shape)
    if preprocessing == "logit":
        if levels is None:
            raise ConfigError("logit pre-processing needs `levels`")
        return LogitPreprocess(int(levels), float(alpha), event_dim=event_dim)
    if preprocessing == "standardize":
        mean = torch.zeros(event_shape) if mean is None else mean.reshape(event_shape)
        std = torch.ones(event_shape) if std is None else std.reshape(event_shape)
        return Affine(mean, std, event_dim=event_dim)
    if preprocessing == "whiten":
        if event_dim != 1:
            raise ConfigError(f"whitening needs a vector model, got event shape {event_shape}")
        d = event_shape[0]
        mean = torch.zeros(d) if mean is None else mean.reshape(d)
        scale_tril = torch.eye(d) if scale_tril is None else scale_tril
        return Whiten(mean, scale_tril)
    if preprocessing == "none":
        return Compose([])
    raise ConfigError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")


def support_bijection(low, high, dtype: torch.dtype = torch.float32) -> Transform:
    """The bijection from the box ``[low, high]`` (``(D,)`` each) onto ``R^D``, normalizing
    direction: ``z = logit((x - low) / (high - low))``; its inverse lands inside the box.
    ``dtype``: of its buffers (``.to()`` moves them later)."""
    low = torch.as_tensor(low, dtype=dtype).reshape(-1)
    high = torch.as_tensor(high, dtype=dtype).reshape(-1)
    if low.shape != high.shape or not bool((high > low).all()):
        raise ConfigError(f"a support box needs low < high of one length, got {low} and {high}")
    return Compose([Affine(low, high - low), Inverse(Sigmoid())])


CONDITIONS = ("label",)


def one_hot(labels: Tensor, classes: int) -> Tensor:
    """``(N,)`` integer labels in ``0..classes-1`` as ``(N, classes)`` float32 one-hot rows."""
    return torch.nn.functional.one_hot(labels.long().reshape(-1), classes).float()


def check_condition(condition: Any, name: str) -> None:
    """``condition`` must be ``"label"`` (what a class-conditional data set conditions on)."""
    if condition not in CONDITIONS:
        raise ConfigError(f"condition for {name!r} must be one of {CONDITIONS}, got {condition!r}")
