"""What a :data:`exactflow.models.MODELS` entry knows about its builder.

A :class:`ModelSpec` is callable like its builder (``MODELS["nsf"](2, transforms=3)``) and
carries the facts the CLI and the tests used to guess from names: the input kind (a feature
count or an image shape), the ``model_args``/``data_args`` defaults per data kind, and a tiny
configuration that builds in milliseconds.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..flow import Flow

__all__ = ["DATA_KINDS", "INPUT_KINDS", "ModelSpec"]

# "toy": 2-D samplers; "tabular": small real-valued tables (and user .npy/.csv files);
# "image": discrete pixels (dequantised), flattened for vector models
DATA_KINDS = ("toy", "tabular", "image")
INPUT_KINDS = ("vector", "image")


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A registered builder and its metadata.

    Attributes:
        builder: ``builder(first, **kwargs) -> Flow``; ``first`` is a feature count for
            ``input="vector"`` and a ``(C, H, W)`` shape for ``input="image"``.
        input: ``"vector"`` or ``"image"``.
        defaults: per data kind (:data:`DATA_KINDS`), the builder keywords the CLI starts
            from (a run file's ``[model_args]`` overrides them).
        data_args: per data kind, the data-loader options the model prefers.
        tiny: keywords of a small, fast build (tests, smoke checks).
        example: the first argument of that small build (``2`` or ``(1, 4, 4)``).
        continuous: the model integrates an ODE (likelihoods carry the solver's error).
    """

    builder: Callable[..., Flow]
    input: str = "vector"
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    data_args: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tiny: Mapping[str, Any] = field(default_factory=dict)
    example: int | tuple[int, ...] = 2
    continuous: bool = False

    def __post_init__(self) -> None:
        if self.input not in INPUT_KINDS:
            raise ConfigError(f"input must be one of {INPUT_KINDS}, got {self.input!r}")
        for what in ("defaults", "data_args"):
            unknown = sorted(set(getattr(self, what)) - set(DATA_KINDS))
            if unknown:
                raise ConfigError(f"{what} keys must be data kinds {DATA_KINDS}, got {unknown}")

    def __call__(self, *args: Any, **kwargs: Any) -> Flow:
        """``builder(*args, **kwargs)``."""
        return self.builder(*args, **kwargs)

    @property
    def __name__(self) -> str:  # so that a spec reads like its builder in messages
        return self.builder.__name__

    def first_argument(self, shape: Sequence[int]) -> int | tuple[int, ...]:
        """The builder's first argument for data events of ``shape``: ``prod(shape)``
        features for a vector model, the ``(C, H, W)`` shape itself for an image model."""
        shape = tuple(int(s) for s in shape)
        if self.input == "vector":
            return math.prod(shape)
        if len(shape) != 3:
            raise ConfigError(
                f"{self.__name__} is an image model: it needs (C, H, W) data, got data of "
                f"shape {shape}"
            )
        return shape

    def defaults_for(self, kind: str | None) -> dict[str, Any]:
        """A fresh copy of the builder keywords for data of ``kind`` (``{}`` if none)."""
        return copy.deepcopy(dict(self.defaults.get(kind, {}))) if kind else {}

    def data_args_for(self, kind: str | None) -> dict[str, Any]:
        """A fresh copy of the data-loader options for data of ``kind`` (``{}`` if none)."""
        return copy.deepcopy(dict(self.data_args.get(kind, {}))) if kind else {}

    def options(self) -> list[str] | None:
        """The keyword names the builder takes after its first argument (``None`` when it
        takes any keyword); the deprecated ones are in :attr:`renamed`."""
        params = list(inspect.signature(self.builder).parameters.values())
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        return [p.name for p in params[1:]]

    @property
    def renamed(self) -> dict[str, str]:
        """``{old: new}`` for the keyword names still accepted with a DeprecationWarning."""
        return dict(getattr(self.builder, "__renamed_kwargs__", {}))

    def build_tiny(self, context: int = 0, **overrides: Any) -> Flow:
        """The small build: ``builder(example, context=context, **tiny, **overrides)``."""
        return self.builder(self.example, context=context, **{**self.tiny, **overrides})
