"""Argument checks of the public API, in one place (bottom layer: errors, torch and NumPy only).

Each check returns the value in its canonical form or raises an
:class:`~exactflow.errors.ExactflowError` subclass whose message names the argument, what it
must be and what was received:

* a wrong *type* (a bool, float, string or ``None`` where an int belongs, a string where a
  number belongs) is a :class:`~exactflow.errors.DTypeError` (a ``TypeError``);
* a value of the right type outside its range is a :class:`~exactflow.errors.ConfigError`
  (a ``ValueError``) unless the caller names another class.

What counts as an int: a Python ``int``, a NumPy integer scalar, or a 0-dim integer tensor
(``flow.sample(torch.tensor(3))`` draws 3). Bools are refused everywhere (``True`` is an int to
Python but never a sample count a user meant). What counts as array data
(:func:`as_tensor`): a tensor, a NumPy array of bools-excluded numbers, or a (nested)
list/tuple of numbers; ragged or non-numeric data is refused with the offending row or element.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, DTypeError, ExactflowError, ShapeError

__all__ = [
    "MAX_SEED",
    "as_tensor",
    "check_count",
    "check_map_kwargs",
    "check_positive_finite",
    "check_real",
    "check_sample_shape",
    "check_seed",
]

MAX_SEED = 2**63 - 1
"""Largest accepted seed: ``seed + 1`` (used for evaluation noise) still fits torch's uint64."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _got(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {_show(value)}"


def _as_int(value: Any, name: str) -> int:
    """``value`` as a Python int, or :class:`DTypeError` (bools, floats, strings refused)."""
    if isinstance(value, (bool, np.bool_)):
        raise DTypeError(f"{name} must be an int, got bool {value!r}")
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.is_floating_point() or value.is_complex():
            raise DTypeError(f"{name} must be an int or a 0-dim integer tensor, got {_got(value)}")
        if value.dtype == torch.bool:
            raise DTypeError(f"{name} must be an int, got a bool tensor")
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    raise DTypeError(f"{name} must be an int, got {_got(value)}")


def check_count(
    value: Any,
    name: str,
    *,
    minimum: int = 0,
    error: type[ExactflowError] = ConfigError,
) -> int:
    """``value`` as a Python int ``>= minimum`` (default: non-negative).

    Raises:
        DTypeError: not an int (see the module docstring).
        error: (default :class:`ConfigError`) an int below ``minimum``.
    """
    n = _as_int(value, name)
    if n < minimum:
        what = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise error(f"{name} must be {what}, got {n}")
    return n


def check_sample_shape(value: Any, name: str = "number of samples") -> tuple[int, ...]:
    """A sample count or shape as a tuple of ints: ``3 -> (3,)``, ``(2, 3) -> (2, 3)``.

    Accepts an int (as :func:`check_count`), a list/tuple/``torch.Size`` of ints or a 1-d
    integer tensor. Only the types are checked here: callers state the range they need.
    """
    if isinstance(value, Tensor) and value.dim() == 1:
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise DTypeError(f"{name} must be ints, got {_got(value)}")
        return tuple(int(v) for v in value.tolist())
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return tuple(_as_int(v, f"{name} {tuple(value)!r}: each entry") for v in value)
    if isinstance(value, (str, bytes)):
        raise DTypeError(f"{name} must be an int or a tuple of ints, got {_got(value)}")
    return (_as_int(value, name),)


def check_real(
    value: Any,
    name: str,
    *,
    positive: bool = False,
    nonnegative: bool = False,
    finite: bool = True,
    error: type[ExactflowError] = ConfigError,
) -> float:
    """``value`` as a Python float; bools, strings and tensors of more than one element are
    refused (:class:`DTypeError`), NaN always, infinities when ``finite``, and values ``<= 0``
    (``positive``) or ``< 0`` (``nonnegative``) with ``error``."""
    if isinstance(value, (bool, np.bool_)) or (
        isinstance(value, Tensor) and value.dtype == torch.bool
    ):
        raise DTypeError(f"{name} must be a number, got {_got(value)}")
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise DTypeError(f"{name} must be a number, got {_got(value)}")
        x = float(value)
    elif isinstance(value, numbers.Real):
        x = float(value)
    else:
        raise DTypeError(f"{name} must be a number, got {_got(value)}")
    if math.isnan(x) or (finite and math.isinf(x)):
        what = "a finite number" if finite else "a number (not NaN)"
        raise error(f"{name} must be {what}, got {x}")
    if positive and not x > 0:
        raise error(f"{name} must be > 0, got {x:g}")
    if nonnegative and not x >= 0:
        raise error(f"{name} must be >= 0, got {x:g}")
    return x


def check_positive_finite(value: Any, name: str) -> float:
    """``value`` as a finite float ``> 0`` (a bound, scale or tolerance); see :func:`check_real`."""
    return check_real(value, name, positive=True)


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed: an int in ``[0, 2**63 - 1]`` (:data:`MAX_SEED`)."""
    n = _as_int(value, name)
    if not 0 <= n <= MAX_SEED:
        raise ConfigError(f"{name} must be an int in [0, 2**63 - 1], got {n}")
    return n


def _entries(n: int | None) -> str:
    return "a number" if n is None else f"{n} entr{'y' if n == 1 else 'ies'}"


def _first_problem(node: Any, name: str, path: tuple[int, ...] = ()) -> ExactflowError | None:
    """The first ragged row or non-numeric element of nested lists, as an error (or None)."""
    where = "".join(f"[{i}]" for i in path)
    if not isinstance(node, (list, tuple)):
        if isinstance(node, (bool, np.bool_)) or not isinstance(node, numbers.Real):
            return DTypeError(f"{name}{where} must be a number, got {_got(node)}")
        return None
    lengths = [len(c) if isinstance(c, (list, tuple)) else None for c in node]
    for i, n in enumerate(lengths[1:], start=1):
        if n != lengths[0]:
            return ShapeError(
                f"{name} is ragged: {name}{where}[{i}] has {_entries(n)} but "
                f"{name}{where}[0] has {_entries(lengths[0])}"
            )
    for i, child in enumerate(node):
        found = _first_problem(child, name, (*path, i))
        if found is not None:
            return found
    return None


def as_tensor(data: Any, name: str = "x", dtype: torch.dtype | None = None) -> Tensor:
    """Array data as a floating tensor; a tensor is returned unchanged (callers check its dtype).

    Accepts Python numbers, (nested) lists/tuples of numbers and NumPy arrays of integers or
    floats. The result has ``dtype`` if given; otherwise NumPy float arrays keep their dtype
    and everything else takes torch's default dtype (as ``torch.as_tensor`` does for floats).

    Raises:
        ShapeError: ragged nested lists (rows of different lengths), naming the first one.
        DTypeError: strings, bools, complex numbers, ``None`` or other objects, naming the
            first offending element; a type that is not array data at all.
    """
    if isinstance(data, Tensor):
        return data
    if isinstance(data, (bool, np.bool_)):
        raise DTypeError(f"{name} must be numeric, got bool {data!r}")
    if isinstance(data, (str, bytes)) or not isinstance(
        data, (numbers.Number, list, tuple, np.ndarray, np.generic)
    ):
        raise DTypeError(
            f"{name} must be a torch.Tensor, a NumPy array or a (nested) list of numbers, "
            f"got {type(data).__name__}"
        )
    if isinstance(data, (list, tuple)):
        problem = _first_problem(data, name)
        if problem is not None:
            raise problem
    arr = np.asarray(data)
    if arr.dtype.kind == "O":  # an object array: every element must be a real number
        for v in arr.reshape(-1):
            if _first_problem(v, name) is not None:
                raise DTypeError(f"{name} must be numeric, got an element {_got(v)}")
        arr = arr.astype(np.float64)
    kind = arr.dtype.kind
    if kind in "US":
        first = arr.reshape(-1)[0] if arr.size else ""
        raise DTypeError(f"{name} must be numeric, got strings such as {str(first)!r}")
    if kind == "b":
        raise DTypeError(f"{name} must be numeric, got booleans; convert with .astype(float)")
    if kind == "c":
        raise DTypeError(f"{name} must be real, got complex numbers")
    if kind not in "iuf":
        raise DTypeError(f"{name} must be numeric, got a NumPy array of dtype {arr.dtype}")
    t = torch.tensor(arr)  # a copy: the caller's array is never shared or written
    if dtype is None:
        keep = kind == "f" and isinstance(data, (np.ndarray, np.generic))
        dtype = t.dtype if keep else torch.get_default_dtype()
    return t.to(dtype)


def check_map_kwargs(map_cls: type, kwargs: Any, name: str = "map_kwargs") -> dict[str, Any]:
    """``kwargs`` as a dict whose keys ``map_cls``'s constructor accepts.

    Raises:
        DTypeError: ``kwargs`` is not a mapping with string keys.
        ConfigError: an unknown key, naming it and the valid ones.
    """
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise DTypeError(f"{name} must be a dict of keyword arguments, got {_got(kwargs)}")
    bad = [k for k in kwargs if not isinstance(k, str)]
    if bad:
        raise DTypeError(f"{name} keys must be strings, got {_show(bad[0])}")
    params = inspect.signature(map_cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    valid = [
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise ConfigError(
            f"unknown {name} key(s) {', '.join(unknown)} for {map_cls.__name__}; "
            f"valid: {', '.join(valid) or '(none)'}"
        )
    return dict(kwargs)
