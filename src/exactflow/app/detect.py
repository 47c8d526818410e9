"""Anomaly detection with a trained run directory: what ``exactflow detect`` does.

:mod:`exactflow.anomaly` scores and thresholds any :class:`~exactflow.Flow`; this module adds
what needs a run directory (its model, its data set's validation split), so the dependency
points down: the application layer loads the run and hands the flow to the detector.

    det = detector_from_run("runs/bc")                 # threshold: 0.99-quantile of val
    summary = detect_run("runs/bc", "new.csv", labels="y.csv")
    det = load_detector("runs/bc/detect/detector.safetensors", "runs/bc")
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..anomaly import Detector, anomaly_metrics, plot_score_histogram, read_labels
from ..data.files import read_conditional_table
from ..errors import ConfigError, DataError
from ..train.checkpoint import atomic_write_text
from .run import load_run, load_run_data

__all__ = ["detect_run", "detector_from_run", "load_detector"]


def detector_from_run(
    run: str | Path,
    quantile: float = 0.99,
    split: str = "val",
    *,
    allow_nonfinite: bool = False,
) -> Detector:
    """A :class:`~exactflow.anomaly.Detector` for a trained run directory, calibrated on the
    run's own ``split`` (``"train"``, ``"val"`` or ``"test"``) of its data set; image data
    score in bits/dim. ``allow_nonfinite`` as in :func:`~exactflow.app.run.load_run`."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be 'train', 'val' or 'test', got {split!r}")
    loaded = load_run(run, allow_nonfinite=allow_nonfinite)
    meta = loaded.data_meta
    det = Detector(
        loaded.flow,
        quantile=quantile,
        bits=meta.get("image_shape") is not None,
        levels=meta.get("levels"),
        seed=loaded.config.seed + 1,
    )
    data = load_run_data(loaded.config)
    rows = getattr(data, split)
    if rows.shape[0] < 2:
        raise DataError(f"the run's {split} split has {rows.shape[0]} rows; cannot calibrate")
    context = getattr(data, f"{split}_context")
    return det.calibrate(rows.reshape(rows.shape[0], *loaded.event_shape), context=context)


def _score_file(det: Detector, loaded, data, context) -> np.ndarray:
    """Scores of the rows of ``data``; a conditional run reads the context from the same
    columns as in training, or from the ``context`` file."""
    meta = loaded.data_meta
    kind = meta.get("context_kind")
    if kind is None:
        if context is not None:
            raise ConfigError("this run is unconditional: it takes no --context")
        return det.score_file(data)
    options: dict[str, Any] = {}
    if kind == "columns":
        if context is not None:
            raise ConfigError("this run reads its context from columns of the data file")
        options["context_columns"] = loaded.config.data_args["context_columns"]
    elif kind == "file":
        if context is None:
            raise ConfigError(
                "this run was trained with a context file: pass --context FILE with one "
                "context row per row of --data"
            )
        options["context"] = context
    else:
        raise ConfigError(f"detect on a file is not supported for a run conditioned on {kind}")
    x, ctx, _ = read_conditional_table(data, **options)  # file order: scores.csv rows
    d, c = math.prod(meta["shape"]), int(meta.get("context") or 0)
    if x.shape[1] != d:
        raise DataError(f"{data}: has {x.shape[1]} data columns but the model expects {d}")
    if ctx.shape[1] != c:
        raise DataError(
            f"{context or data}: {ctx.shape[1]} context column(s), but the run is conditional "
            f"on {c}"
        )
    rows = torch.as_tensor(x, dtype=torch.float32).reshape(x.shape[0], *loaded.event_shape)
    return det.score(rows, torch.as_tensor(ctx, dtype=torch.float32))


def load_detector(path: str | Path, run: str | Path, *, allow_nonfinite: bool = False) -> Detector:
    """:meth:`Detector.load <exactflow.anomaly.Detector.load>` into the model of the run
    directory ``run`` (as ``exactflow detect`` saves it)."""
    flow = load_run(run, allow_nonfinite=allow_nonfinite).flow
    return Detector.load(path, flow, allow_nonfinite=allow_nonfinite)


def detect_run(
    run: str | Path,
    data: str | Path,
    labels: str | Path | None = None,
    quantile: float = 0.99,
    out: str | Path | None = None,
    *,
    context: str | Path | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """What ``exactflow detect`` does: score every row of ``data`` with a trained run
    (``-log p(x | c)`` for a conditional run: the context columns of ``data`` as in
    training, or the rows of the ``context`` file).

    The threshold is the ``quantile`` of the scores of the run's validation split. Writes
    into ``out`` (default ``RUN/detect``): ``scores.csv`` (row, score, anomaly[, label]),
    ``scores.png`` (histogram with the threshold line), ``detector.safetensors`` and
    ``metrics.json``. Returns the summary (metrics included when ``labels`` is given).
    Everything is scored and checked before ``out`` is created.
    """
    det = detector_from_run(run, quantile=quantile, allow_nonfinite=allow_nonfinite)
    s = _score_file(det, load_run(run, allow_nonfinite=allow_nonfinite), data, context)
    lab = None
    if labels is not None:
        lab = read_labels(labels)
        if lab.shape[0] != s.shape[0]:
            raise DataError(f"{labels}: {lab.shape[0]} labels for {s.shape[0]} data rows")
    threshold = det._need_threshold()
    flagged = s > threshold
    summary: dict[str, Any] = {
        "data": str(data),
        "n": int(s.shape[0]),
        "unit": det.unit,
        "quantile": det.quantile,
        "threshold": threshold,
        "flagged": int(flagged.sum()),
    }
    if lab is not None:
        summary.update(anomaly_metrics(s, lab, threshold))
    out = Path(run) / "detect" if out is None else Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    lines = ["row,score,anomaly" + (",label" if lab is not None else "")]
    for i in range(s.shape[0]):
        row = f"{i},{s[i]:.9g},{int(flagged[i])}"
        lines.append(row + (f",{int(lab[i])}" if lab is not None else ""))
    atomic_write_text(out / "scores.csv", "\n".join(lines) + "\n")
    plot_score_histogram(s, threshold, out / "scores.png", labels=lab, unit=det.unit)
    det.save(out / "detector.safetensors", extra={"run": str(run)})
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    summary["out"] = str(out)
    return summary
