"""Renamed keyword arguments kept for one release, and the builders' keyword-only rule.

One helper for every rename, so builders and transforms do not each grow their own shim::

    @renamed_kwargs(context_features="context")
    def __init__(self, features, context=0): ...

    @builder(depth="transforms", coupling="map")      # also: only `shape` positionally
    def Glow(shape, *, transforms=8, map="affine"): ...

An old keyword still works, with a :class:`DeprecationWarning` naming the new one; passing
both is an :class:`~exactflow.errors.ArgumentError`. A rename whose values change too (a flag
that became a choice) gives ``(new_name, convert)``. The wrapper keeps the signature
(``inspect.signature`` follows ``__wrapped__``) and lists its old names in
``__renamed_kwargs__`` (``{old: new}``), so configuration checks can accept them.

This module sits at the bottom of the layers, next to :mod:`exactflow.errors`.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .errors import ArgumentError

__all__ = ["builder", "deprecated_attributes", "renamed_kwargs"]

F = TypeVar("F", bound=Callable[..., Any])
Rename = str | tuple[str, Callable[[Any], Any]]
_MARK = "__renamed_kwargs__"
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside exactflow, seen from the function calling
    this one: a rename reached through ``MODELS[...]`` or a subclass is still reported at
    the user's line."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def _rules(renames: Mapping[str, Rename]) -> dict[str, tuple[str, Callable[[Any], Any] | None]]:
    rules: dict[str, tuple[str, Callable[[Any], Any] | None]] = {}
    for old, rule in renames.items():
        new, convert = (rule, None) if isinstance(rule, str) else rule
        rules[old] = (new, convert)
    return rules


def _owner(fn: Callable[..., Any], args: tuple) -> str:
    # for __init__ name the class actually built (a subclass inherits the rename)
    if fn.__name__ == "__init__" and args:
        return type(args[0]).__name__
    return fn.__name__


def _translate(owner: str, rules, kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    for old, (new, convert) in rules.items():
        if old not in out:
            continue
        if new in out:
            raise ArgumentError(
                f"{owner}() got both {old}= (its deprecated name) and {new}=; pass only {new}="
            )
        value = out.pop(old)
        out[new] = value if convert is None else convert(value)
        use = f"{new}=" if convert is None else f"{new}={out[new]!r}"
        warnings.warn(
            f"{owner}({old}=...) is deprecated and will be removed in the next release; "
            f"use {use} instead",
            DeprecationWarning,
            stacklevel=_caller_level(),
        )
    return out


def renamed_kwargs(**renames: Rename) -> Callable[[F], F]:
    """Decorator: accept each old keyword ``old=new`` for one release, warning
    :class:`DeprecationWarning` ``"... use new= instead"``.

    ``old=("new", convert)`` also maps the old value, e.g. ``batch_norm=("norm",
    lambda on: "batchnorm" if on else None)``.
    """
    rules = _rules(renames)

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not rules.keys().isdisjoint(kwargs):
                kwargs = _translate(_owner(fn, args), rules, kwargs)
            return fn(*args, **kwargs)

        setattr(wrapper, _MARK, {old: new for old, (new, _) in rules.items()})
        return wrapper  # type: ignore[return-value]

    return decorate


def builder(**renames: Rename) -> Callable[[F], F]:
    """Decorator of a model builder ``X(first, *, ...)``: old keyword names as in
    :func:`renamed_kwargs`, and a positional argument after the first raises an
    :class:`~exactflow.errors.ArgumentError` (a ``TypeError``) that states the rule."""
    rules = _rules(renames)

    def decorate(fn: F) -> F:
        params = list(inspect.signature(fn).parameters.values())
        positional = [
            p.name
            for p in params
            if p.kind
            in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ]
        keywords = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if len(args) > len(positional):
                shown = ", ".join(f"{k}=..." for k in keywords[:3])
                raise ArgumentError(
                    f"{fn.__name__}() takes only {', '.join(positional)} positionally; every "
                    f"other argument is keyword-only, e.g. {fn.__name__}({positional[0]}, "
                    f"{shown}, ...) (got {len(args)} positional arguments)"
                )
            if not rules.keys().isdisjoint(kwargs):
                kwargs = _translate(fn.__name__, rules, kwargs)
            return fn(*args, **kwargs)

        setattr(wrapper, _MARK, {old: new for old, (new, _) in rules.items()})
        return wrapper  # type: ignore[return-value]

    return decorate


def deprecated_attributes(
    module: str, aliases: Mapping[str, tuple[str, Any]]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving old names ``{old: (new, obj)}`` with a
    :class:`DeprecationWarning`; any other name raises ``AttributeError`` as usual."""

    def __getattr__(name: str) -> Any:
        if name in aliases:
            new, obj = aliases[name]
            warnings.warn(
                f"{module}.{name} is deprecated and will be removed in the next release; "
                f"use {module}.{new} instead",
                DeprecationWarning,
                stacklevel=2,
            )
            return obj
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
