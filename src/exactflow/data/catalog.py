"""One entry point for every data set: a registered name or a ``.npy``/``.csv`` path."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .dataset import Dataset, check_condition, one_hot
from .files import SUFFIXES, file_dataset
from .images import IMAGES, image_dataset
from .tabular import TABULAR, tabular_dataset
from .toy import LABELED, TOY, labeled_toy_splits, toy_splits

__all__ = ["dataset_names", "load_dataset", "toy_dataset"]


def toy_dataset(
    name: str,
    seed: int = 0,
    n_train: int = 10_000,
    n_val: int = 2_000,
    n_test: int = 10_000,
    condition: str | None = None,
) -> Dataset:
    """A seeded 2-D toy density as a :class:`Dataset` (no pre-processing).

    ``condition="label"`` (moons: which moon; 8gaussians: which component) makes it a
    class-conditional set with the one-hot label as context (the same points)."""
    if condition is None:
        parts = toy_splits(name, n_train, n_val, n_test, seed)
        return Dataset(name, parts.train, parts.val, parts.test, shape=(2,))
    check_condition(condition, name)
    parts, labels = labeled_toy_splits(name, n_train, n_val, n_test, seed)
    classes = LABELED[name][1]
    ctx = [one_hot(y, classes) for y in labels]
    return Dataset(
        name,
        parts.train,
        parts.val,
        parts.test,
        shape=(2,),
        train_context=ctx[0],
        val_context=ctx[1],
        test_context=ctx[2],
        context_names=tuple(f"label={k}" for k in range(classes)),
        context_kind="label",
    )


def dataset_names() -> list[str]:
    """Every registered data set name (toys, tabular, images)."""
    return [*TOY, *TABULAR, *IMAGES]


def load_dataset(spec: str | Path, seed: int = 0, **options) -> Dataset:
    """Load a data set by name (see :func:`dataset_names`) or from a ``.npy``/``.csv`` path.

    ``options`` go to the loader (e.g. ``n_train`` for toys, ``val``/``test`` fractions,
    ``preprocessing`` for tables and files). Unknown names raise :class:`ConfigError` listing the valid
    ones; bad files raise :class:`~exactflow.errors.DataError`.
    """
    name = str(spec)
    try:
        if name in TOY:
            return toy_dataset(name, seed, **options)
        if name in TABULAR:
            return tabular_dataset(name, seed, **options)
        if name in IMAGES:
            return image_dataset(name, seed, **options)
        if Path(name).suffix.lower() in SUFFIXES:
            return file_dataset(name, seed, **options)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise ConfigError(f"bad option for dataset {name!r}: {err}") from err
        raise
    raise ConfigError(
        f"unknown dataset {name!r}; valid names: {', '.join(dataset_names())}, "
        "or a path to a .npy/.csv file"
    )
