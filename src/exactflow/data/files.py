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
from .splits import TABLE_SPLIT, Splits, split, split_pairs

__all__ = [
    "column_indices",
    "file_dataset",
    "read_conditional_table",
    "read_table",
    "read_table_with_names",
]

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


def _read_csv(path: Path) -> tuple[np.ndarray, list[str] | None]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read as CSV text ({err})") from err
    header = None
    if rows and not all(_is_number(c) for c in rows[0]):
        header, rows = [c.strip() for c in rows[0]], rows[1:]  # a header line
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
    if header is not None and len(header) != width:
        raise DataError(f"{path}: the header has {len(header)} names for {width} columns")
    return np.asarray(rows, dtype=np.float64), header


def read_table(path: str | Path) -> np.ndarray:
    """Read a ``(N, D)`` float64 table from a ``.npy`` or ``.csv`` file.

    A 1-D array is read as one column. Raises :class:`DataError` for a missing, unreadable,
    empty, ragged or non-finite file, or a wrong suffix.
    """
    return read_table_with_names(path)[0]


def read_table_with_names(path: str | Path) -> tuple[np.ndarray, list[str] | None]:
    """:func:`read_table` and the column names of a CSV header (``None`` without one, and
    for ``.npy`` files)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .npy or .csv")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    if path.suffix.lower() == ".npy":
        arr, names = _read_npy(path), None
    else:
        arr, names = _read_csv(path)
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
    return arr, names


def column_indices(spec, names: list[str] | None, width: int, path) -> list[int]:
    """Column indices from ``spec``: a comma-separated string or a list of header names
    and/or 0-based indices. :class:`DataError` names an unknown name or index (and lists
    the header), a duplicate, or a selection of every column."""
    if isinstance(spec, str):
        items: list = [t.strip() for t in spec.split(",") if t.strip()]
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        raise DataError(f"context columns must be names or indices, got {spec!r}")
    if not items:
        raise DataError("context columns: the list is empty")
    out: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise DataError(f"context column {item!r} is neither a name nor an index")
        if isinstance(item, str) and names is not None and item in names:
            idx = names.index(item)
        elif isinstance(item, int) or (isinstance(item, str) and item.lstrip("-").isdigit()):
            idx = int(item)
            if not 0 <= idx < width:
                raise DataError(
                    f"{path}: context column index {idx} is out of range: the file has "
                    f"{width} columns (0..{width - 1})"
                )
        else:
            known = f"its header has {', '.join(names)}" if names else "it has no header"
            raise DataError(f"{path}: unknown context column {item!r}; {known}")
        if idx in out:
            raise DataError(f"{path}: context column {item!r} is listed twice")
        out.append(idx)
    if len(out) >= width:
        raise DataError(f"{path}: every column is a context column; leave some data columns")
    return out


def read_conditional_table(
    path: str | Path, context_columns: str | list | None = None, context: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """The rows of ``path`` in file order, split into data and context: ``(x (N, D), c (N, C)
    or None, the context column names or None)``; the context is ``context_columns`` of the
    file or the rows of the ``context`` file (see :func:`file_dataset`)."""
    table, names = read_table_with_names(path)
    if context_columns is not None and context is not None:
        raise DataError("give the context as columns of the file or as a second file, not both")
    if context_columns is not None:
        idx = column_indices(context_columns, names, table.shape[1], path)
        rest = [j for j in range(table.shape[1]) if j not in idx]
        context_names = [names[j] if names else f"column {j}" for j in idx]
        return table[:, rest], table[:, idx], context_names
    if context is not None:
        ctx, cnames = read_table_with_names(context)
        if ctx.shape[0] != table.shape[0]:
            raise DataError(
                f"{context}: {ctx.shape[0]} context rows for the {table.shape[0]} data rows of "
                f"{path}; give one context row per data row"
            )
        return table, ctx, cnames or [f"c{j}" for j in range(ctx.shape[1])]
    return table, None, None


def file_dataset(
    path: str | Path,
    seed: int = 0,
    val: float = TABLE_SPLIT[0],
    test: float = TABLE_SPLIT[1],
    preprocessing: str | None = None,
    features: int | None = None,
    context_columns: str | list | None = None,
    context: str | Path | None = None,
) -> Dataset:
    """A user file as a continuous :class:`Dataset`, split with ``seed``.

    Args:
        path: ``.npy`` or ``.csv`` file of shape ``(N, D)``.
        preprocessing: ``"whiten"`` (default; ``"standardize"`` with a warning when columns
            are linearly dependent), ``"standardize"`` or ``"none"``; statistics come from
            the training split only.
        features: if given, the required number of (data) columns D (e.g. a checkpoint's).
        context_columns: columns of the file that are the context ``c`` of ``p(x | c)``
            (header names or 0-based indices, a list or a comma-separated string); the
            other columns are ``x``.
        context: a second ``.npy``/``.csv`` file with one context row per data row.

    The context rows are split with their data rows (the same shuffle).
    """
    table, ctx, context_names = read_conditional_table(path, context_columns, context)
    kind = None if ctx is None else ("columns" if context_columns is not None else "file")
    if features is not None and table.shape[1] != features:
        raise DataError(f"{path}: has {table.shape[1]} columns but the model expects {features}")
    data = torch.as_tensor(table.astype(np.float32))
    if not math.isfinite(float(data.abs().max())):
        raise DataError(f"{path}: values overflow float32")
    g = torch.Generator().manual_seed(int(seed))
    if ctx is None:
        parts, cparts = split(data, val, test, generator=g), Splits(None, None, None)
    else:
        c = torch.as_tensor(ctx.astype(np.float32))
        parts, cparts = split_pairs(data, c, val, test, generator=g)
    if preprocessing is None:
        preprocessing = continuous_preprocessing(parts.train)
    return Dataset(
        name=str(path),
        train=parts.train,
        val=parts.val,
        test=parts.test,
        shape=(data.shape[1],),
        preprocessing=preprocessing,
        train_context=cparts.train,
        val_context=cparts.val,
        test_context=cparts.test,
        context_names=None if context_names is None else tuple(context_names),
        context_kind=kind,
    )
