"""Tabular data sets bundled with scikit-learn (offline): digits, breast cancer, iris.

Splits are seeded; standardisation uses training statistics only (see :class:`Dataset`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .dataset import Dataset, check_condition, continuous_preprocessing, one_hot
from .splits import DIGITS_SPLIT, TABLE_SPLIT, split, split_pairs

__all__ = ["TABULAR", "tabular_dataset"]


def _sklearn(loader_name: str, field: str = "data") -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            from sklearn import datasets
        except ImportError as err:  # pragma: no cover - sklearn is in the [train] extra
            raise DataError(
                "scikit-learn data sets need scikit-learn: pip install 'exactflow[train]'"
            ) from err
        return getattr(getattr(datasets, loader_name)(), field)

    return load


# name -> (loader, levels of discrete data or None, image shape or None)
TABULAR: dict[str, tuple[Callable[[], np.ndarray], int | None, tuple[int, ...] | None]] = {
    "digits": (_sklearn("load_digits"), 17, (1, 8, 8)),
    "breast_cancer": (_sklearn("load_breast_cancer"), None, None),
    "iris": (_sklearn("load_iris"), None, None),
}
# class labels a table can be conditioned on: name -> (loader, classes)
LABELS: dict[str, tuple[Callable[[], np.ndarray], int]] = {
    "digits": (_sklearn("load_digits", "target"), 10),
    "iris": (_sklearn("load_iris", "target"), 3),
}
# default (val, test) fractions; digits shares its split with the image view digits_image
_SPLITS: dict[str, tuple[float, float]] = {"digits": DIGITS_SPLIT}


def tabular_dataset(
    name: str,
    seed: int = 0,
    val: float | None = None,
    test: float | None = None,
    preprocessing: str | None = None,
    alpha: float = 0.05,
    condition: str | None = None,
) -> Dataset:
    """A scikit-learn table as a :class:`Dataset` of ``(N, D)`` float32 rows.

    ``digits`` is 64-D integer data in ``0..16``: it is uniformly dequantised per batch and
    reported in bits/dim; ``breast_cancer`` (30-D) and ``iris`` (4-D) are continuous.

    Args:
        name: one of :data:`TABULAR`.
        seed: seeds the shuffle into train/val/test.
        val, test: split fractions; default 0.15/0.2 (:data:`~.splits.TABLE_SPLIT`), for
            ``digits`` 0.1/0.2 (:data:`~.splits.DIGITS_SPLIT`, shared with ``digits_image``:
            1258/180/359 rows, the same rows for the same seed).
        preprocessing: ``"whiten"`` (training mean and covariance; the default for
            continuous tables, so an identity-initialised flow starts at the full-covariance
            Gaussian fit), ``"standardize"`` (per-feature training mean and std), ``"logit"``
            (discrete data only; the default for digits, where it gives better bits/dim than
            standardising) or ``"none"``.
        alpha: logit boundary margin.
        condition: ``"label"`` makes a class-conditional set (digits: the digit 0-9, iris:
            the species), the one-hot label as each row's context; the same rows and split.
    """
    if name not in TABULAR:
        raise ConfigError(f"unknown tabular dataset {name!r}; valid: {', '.join(TABULAR)}")
    loader, levels, image_shape = TABULAR[name]
    default_val, default_test = _SPLITS.get(name, TABLE_SPLIT)
    val = default_val if val is None else val
    test = default_test if test is None else test
    if preprocessing == "logit" and levels is None:
        raise ConfigError(f"logit pre-processing needs discrete data; {name!r} is continuous")
    data = torch.as_tensor(np.asarray(loader(), dtype=np.float32))
    g = torch.Generator().manual_seed(int(seed))
    context: dict = {}
    if condition is None:
        parts = split(data, val, test, generator=g)
    else:
        check_condition(condition, name)
        if name not in LABELS:
            raise ConfigError(
                f"{name!r} has no label to condition on; labelled tables: {', '.join(LABELS)}"
            )
        label_loader, classes = LABELS[name]
        labels = one_hot(torch.as_tensor(np.asarray(label_loader())), classes)
        # one shuffle for both, so the rows (and the split) are those of the plain set
        parts, cparts = split_pairs(data, labels, val, test, generator=g)
        context = {
            "train_context": cparts.train,
            "val_context": cparts.val,
            "test_context": cparts.test,
            "context_names": tuple(f"label={k}" for k in range(classes)),
            "context_kind": "label",
        }
    if preprocessing is None:
        preprocessing = "logit" if levels is not None else continuous_preprocessing(parts.train)
    return Dataset(
        name=name,
        train=parts.train,
        val=parts.val,
        test=parts.test,
        shape=(data.shape[1],),
        preprocessing=preprocessing,
        levels=levels,
        alpha=alpha,
        image_shape=image_shape,
        **context,
    )
