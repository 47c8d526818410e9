"""User data from ``.npy`` or ``.csv`` files, with one-line errors for bad files.

Rows are samples, columns are features. Missing, unreadable, empty, ragged or non-finite
files raise :class:`~exactflow.errors.DataError` naming the file and the problem. ``.npy``
files are read with ``allow_pickle=False``: object arrays are refused, never unpickled.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import Dataset, continuous_preprocessing
from .splits import TABLE_SPLIT, split

__all__ = ["file_dataset", "read_table"]

SUFFIXES = (".npy", ".csv")


def _read_npy(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from err
    if magic != b"\x93NUMPY":
        raise DataError(f"{path}: not a readable .npy array (no NumPy header)")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise DataError(
                f"{path}: contains Python objects (pickled data); only numeric arrays load"
            ) from err
        raise DataError(f"{path}: not a readable .npy array ({err})") from err
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err})") from err
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: expected one array, got {type(arr).__name__}")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: expected a numeric array, got dtype {arr.dtype}")
    return arr


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _read_csv(path: Path) -> np.ndarray:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read as CSV text ({err})") from err
    if rows and not all(_is_number(c) for c in rows[0]):
        rows = rows[1:]  # a header line
    if not rows:
        raise DataError(f"{path}: no data rows")
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            raise DataError(
                f"{path}: ragged rows: data row {i + 1} has {len(row)} columns, "
                f"the first has {width}"
            )
        for j, cell in enumerate(row):
            if not _is_number(cell):
                raise DataError(
                    f"{path}: data row {i + 1}, column {j + 1} is not a number: {cell.strip()!r}"
                )
    return np.asarray(rows, dtype=np.float64)


def read_table(path: str | Path) -> np.ndarray:
    """Read a ``(N, D)`` float64 table from a ``.npy`` or ``.csv`` file.

    A 1-D array is read as one column. Raises :class:`DataError` for a missing, unreadable,
    empty, ragged or non-finite file, or a wrong suffix.
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .npy or .csv")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    arr = _read_npy(path) if path.suffix.lower() == ".npy" else _read_csv(path)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D table (rows, columns), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{path}: empty table of shape {arr.shape}")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"{path}: {int(bad.sum())} non-finite value(s) (NaN or inf), first at data row "
            f"{row + 1}, column {col + 1}"
        )
    return arr


def file_dataset(
    path: str | Path,
    seed: int = 0,
    val: float = TABLE_SPLIT[0],
    test: float = TABLE_SPLIT[1],
    preprocessing: str | None = None,
    features: int | None = None,
) -> Dataset:
    """A user file as a continuous :class:`Dataset`, split with ``seed``.

    Args:
        path: ``.npy`` or ``.csv`` file of shape ``(N, D)``.
        preprocessing: ``"whiten"`` (default; ``"standardize"`` with a warning when columns
            are linearly dependent), ``"standardize"`` or ``"none"``; statistics come from
            the training split only.
        features: if given, the required number of columns D (e.g. a checkpoint's).
    """
    table = read_table(path)
    if features is not None and table.shape[1] != features:
        raise DataError(f"{path}: has {table.shape[1]} columns but the model expects {features}")
    data = torch.as_tensor(table.astype(np.float32))
    if not math.isfinite(float(data.abs().max())):
        raise DataError(f"{path}: values overflow float32")
    parts = split(data, val, test, generator=torch.Generator().manual_seed(int(seed)))
    if preprocessing is None:
        preprocessing = continuous_preprocessing(parts.train)
    return Dataset(
        name=str(path),
        train=parts.train,
        val=parts.val,
        test=parts.test,
        shape=(data.shape[1],),
        preprocessing=preprocessing,
    )
