"""Safe, atomic checkpoints: safetensors for tensors, JSON metadata for everything else.

One file holds a whole checkpoint: the tensors (model, optimiser moments, EMA, RNG states)
and, in the safetensors header's string metadata, a JSON document (config, step counters,
history, optimiser hyper-parameters). Writing goes to a temporary file in the same
directory, is flushed and ``fsync``-ed, then ``os.replace``-d over the target, so a crash or
``kill -9`` leaves either the old or the new checkpoint, never a torn one.

Loading never unpickles: the file must be a well-formed safetensors file (8-byte header
length, JSON header, raw tensor bytes); anything else, e.g. a ``torch.save`` pickle, is
refused with :class:`~exactflow.errors.DataError` before any of it is interpreted. Its
metadata must be a JSON object, and floating tensors holding NaN or inf are refused unless
the caller passes ``allow_nonfinite=True`` (weights that are NaN load silently otherwise and
every density or sample computed from them is NaN).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import DataError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "check_finite_tensors",
    "load_checkpoint",
    "optimizer_from_flat",
    "optimizer_to_flat",
    "parse_checkpoint",
    "read_checkpoint_bytes",
    "save_checkpoint",
    "state_dict_mismatch",
]

_META_KEY = "exactflow"
_MAX_HEADER = 100 * 1024 * 1024


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _naming(err: OSError, path: Path) -> OSError:
    # errors from the write carry no file name and those from mkstemp name the hidden temp
    # file; the user should read the file they asked for (the errno, hence the subclass such
    # as PermissionError, is kept)
    return OSError(err.errno, err.strerror or str(err), str(path))


def _umask() -> int:
    """The process umask (reading it means setting it: restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``).

    On failure (full disk, read-only directory) the previous file is untouched, the temporary
    file is removed, and the ``OSError`` raised names ``path``.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _naming(err, path) from err
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less umask)
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError):
            raise _naming(err, path) from err
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Atomically write ``tensors`` and JSON-serialisable ``meta`` to one safetensors file."""
    from safetensors.torch import save

    # safetensors wants contiguous CPU tensors that share no memory
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    payload = save(flat, metadata={_META_KEY: json.dumps(meta, allow_nan=True)})
    atomic_write_bytes(path, payload)


def _header(raw: bytes, path: Path) -> dict[str, Any]:
    refuse = (
        f"{path}: not an exactflow checkpoint (expected a safetensors file; pickled or "
        "other files are refused and never executed)"
    )
    if len(raw) < 8:
        raise DataError(refuse)
    (size,) = struct.unpack("<Q", raw[:8])
    if size < 2 or size > _MAX_HEADER or 8 + size > len(raw):
        raise DataError(refuse)
    try:
        header = json.loads(raw[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(refuse) from err
    if not isinstance(header, dict):
        raise DataError(refuse)
    return header


def load_checkpoint(
    path: str | Path, *, allow_nonfinite: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(tensors, meta)``.

    Raises :class:`DataError` for a missing, truncated, corrupt or non-safetensors file,
    metadata that is not a JSON object, and (unless ``allow_nonfinite``) a floating tensor
    holding NaN or inf.
    """
    return parse_checkpoint(read_checkpoint_bytes(path), path, allow_nonfinite=allow_nonfinite)


def read_checkpoint_bytes(path: str | Path) -> bytes:
    """The raw bytes of a checkpoint file; :class:`DataError` if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read checkpoint ({err.strerror})") from err


def parse_checkpoint(
    raw: bytes, path: str | Path, *, allow_nonfinite: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """:func:`load_checkpoint` on bytes already read (e.g. broadcast from another process).

    ``path`` only names the source in error messages.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    header = _header(raw, path)
    stored = header.get("__metadata__") or {}
    meta_str = stored.get(_META_KEY) if isinstance(stored, dict) else None
    if not isinstance(meta_str, str):
        raise DataError(f"{path}: safetensors file without exactflow metadata")
    try:
        meta = json.loads(meta_str)
        tensors = load(raw)
    except (json.JSONDecodeError, SafetensorError) as err:
        raise DataError(f"{path}: corrupt checkpoint ({err})") from err
    if not isinstance(meta, dict):
        raise DataError(
            f"{path}: exactflow metadata must be a JSON object, got a JSON {_json_type(meta)}"
        )
    if not allow_nonfinite:
        check_finite_tensors(tensors, path)
    return tensors, meta


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def check_finite_tensors(tensors: dict[str, Tensor], path: str | Path) -> None:
    """:class:`DataError` naming the first floating tensor of ``tensors`` with NaN or inf
    (and how many there are); ``path`` names the source."""
    bad = [  # sorted: the safetensors reader's order is not stable, the message must be
        k
        for k, v in sorted(tensors.items())
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())
    ]
    if bad:
        v = tensors[bad[0]]
        count = int((~torch.isfinite(v)).sum())
        raise DataError(
            f"{path}: {len(bad)} tensor(s) hold NaN or inf, e.g. {bad[0]!r} ({count} of "
            f"{v.numel()} values); the weights are unusable (load anyway with "
            "allow_nonfinite=True, on the command line --allow-nonfinite)"
        )


def state_dict_mismatch(module: torch.nn.Module, tensors: dict[str, Tensor]) -> str:
    """One line saying why ``tensors`` cannot load into ``module`` (``""`` if they can).

    Counts the missing keys, the unexpected keys and the tensors of another shape, each with
    a first example; torch's own error spreads this over many lines.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    reshaped = [k for k in own if k in tensors and own[k].shape != tensors[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[0]!r}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]!r}")
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} of another shape, e.g. {k!r}: {tuple(tensors[k].shape)} in the "
            f"file, {tuple(own[k].shape)} in the model"
        )
    return "; ".join(parts)


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Split an optimiser's state dict into tensors and a JSON-ready remainder."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], rest: dict
) -> None:
    """Inverse of :func:`optimizer_to_flat`: load the state into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = rest["param_groups"]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    # which kernels compute the update (fused, multi-tensor) is this run's choice, not the
    # checkpoint's: a compiled run resumes fused from an eager checkpoint and vice versa
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for group, own in zip(optimizer.param_groups, kernels, strict=False):
        group.update(own)
