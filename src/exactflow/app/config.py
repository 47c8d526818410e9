"""Run configuration: what to train on, which model, how; read from and written to TOML.

A run file looks like::

    data = "moons"          # a data set name or a .npy/.csv path
    model = "nsf"           # a key of exactflow.models.MODELS
    seed = 0
    [data_args]             # options of the data loader (n_train, val, test, ...)
    [model_args]            # builder keyword arguments (transforms, hidden, bins, ...)
    transforms = 5
    [train]                 # TrainConfig fields
    steps = 2000

Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ..errors import ConfigError, ExactflowError
from ..train.engine import TrainConfig
from ..validation import check_count, check_real, check_seed

__all__ = ["RunConfig", "dump_toml"]

_TOP_KEYS = ("data", "model", "seed", "data_args", "model_args", "train")


@dataclass
class RunConfig:
    """One training run: data, model and :class:`TrainConfig`.

    Attributes:
        data: data set name (see :func:`exactflow.data.dataset_names`) or file path.
        model: model name (a key of :data:`exactflow.models.MODELS`).
        seed: seeds the data split, the model initialisation and training.
        data_args: keyword options of the data loader.
        model_args: keyword arguments of the model builder.
        train: the training options.
    """

    data: str = "moons"
    model: str = "nsf"
    seed: int = 0
    data_args: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain values (what :meth:`to_toml` writes)."""
        return {
            "data": self.data,
            "model": self.model,
            "seed": self.seed,
            "data_args": dict(self.data_args),
            "model_args": dict(self.model_args),
            "train": self.train.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
        """Overlay the mapping ``d`` on ``base`` (default: the defaults); validates keys."""
        unknown = sorted(set(d) - set(_TOP_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown configuration key(s) {', '.join(unknown)}; valid: {', '.join(_TOP_KEYS)}"
            )
        base = base or cls()
        out = base.to_dict()
        for key in ("data", "model"):
            if key in d:
                if not isinstance(d[key], str):
                    raise ConfigError(f"{key} must be a string, got {d[key]!r}")
                out[key] = d[key]
        if "seed" in d:
            out["seed"] = _seed(d["seed"], "seed")
        for key in ("data_args", "model_args", "train"):
            if key in d:
                if not isinstance(d[key], dict):
                    raise ConfigError(f"[{key}] must be a table, got {d[key]!r}")
                out[key] = {**out[key], **d[key]}
        train_seed = d.get("train", {}).get("seed")
        if train_seed is not None:
            train_seed = _seed(train_seed, "[train] seed")
        if train_seed is not None and "seed" not in d:
            out["seed"] = train_seed
        elif train_seed is not None and train_seed != out["seed"]:
            raise ConfigError(
                f"seed = {out['seed']} but [train] seed = {train_seed}; give one seed"
            )
        out["train"]["seed"] = out["seed"]
        return cls(
            data=out["data"],
            model=out["model"],
            seed=out["seed"],
            data_args=out["data_args"],
            model_args=out["model_args"],
            train=TrainConfig.from_dict(out["train"]),
        )

    def validate(self) -> None:
        """Check what can be checked without loading data or building the model: types,
        the seed (an int in ``[0, 2**63 - 1]``, the same in ``[train]``), the training
        options, and split options that would leave a split empty (``val = 0.0``,
        ``n_test = 0``); raises :class:`ConfigError` (or :class:`DTypeError`) naming the key.
        """
        for key in ("data", "model"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError(f"{key} must be a non-empty string, got {getattr(self, key)!r}")
        for key in ("data_args", "model_args"):
            if not isinstance(getattr(self, key), dict):
                raise ConfigError(f"[{key}] must be a table, got {getattr(self, key)!r}")
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"train must be a TrainConfig, got {type(self.train).__name__}")
        self.seed = _seed(self.seed, "seed")
        if self.train.seed != self.seed:
            raise ConfigError(
                f"seed = {self.seed!r} but [train] seed = {self.train.seed!r}; give one seed"
            )
        self.train.validate()
        for key in ("n_train", "n_val", "n_test"):
            if key in self.data_args:
                n = check_count(self.data_args[key], f"[data_args] {key}")
                if n < 1:
                    raise ConfigError(
                        f"[data_args] {key} = {n} leaves the {key[2:]} split empty: every "
                        "split needs at least one row"
                    )
        for key in ("val", "test"):
            if key in self.data_args:
                f = check_real(self.data_args[key], f"[data_args] {key}")
                if not 0.0 < f < 1.0:
                    raise ConfigError(
                        f"[data_args] {key} = {f:g} must be a fraction in (0, 1): every "
                        "split needs at least one row"
                    )

    @classmethod
    def read(cls, path: str | Path, base: RunConfig | None = None) -> RunConfig:
        """Read a TOML run file over ``base``; bad files raise :class:`ConfigError`."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: no such configuration file") from err
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read configuration ({err})") from err
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML ({err})") from err
        try:
            return cls.from_dict(d, base)
        except ExactflowError as err:
            raise type(err)(f"{path}: {err}") from err

    def to_toml(self) -> str:
        """The configuration as TOML text."""
        return dump_toml(self.to_dict())


def _seed(value: Any, name: str) -> int:
    # the seed's type error is a configuration error too: one class for everything a run
    # file can get wrong
    try:
        return check_seed(value, name)
    except ExactflowError as err:
        raise ConfigError(str(err)) from err


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        escaped = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if v is None:
        raise ConfigError("TOML has no null value; leave the key out instead")
    raise ConfigError(f"cannot write a {type(v).__name__} to TOML")


def dump_toml(d: dict[str, Any], prefix: str = "") -> str:
    """Write a mapping of scalars, lists and nested mappings as TOML text."""
    lines = [f"{k} = {_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            name = f"{prefix}{k}"
            lines.append("")
            lines.append(f"[{name}]")
            body = dump_toml(v, prefix=f"{name}.")
            if body:
                lines.append(body)
    return "\n".join(lines).strip("\n") + ("\n" if not prefix else "")
