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
from pathlib import Path
from typing import Any

from ..anomaly import Detector, anomaly_metrics, plot_score_histogram, read_labels
from ..errors import ConfigError, DataError
from ..train.checkpoint import atomic_write_text
from .run import LoadedRun, load_run, load_run_data, read_run_file

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
    return _calibrated(load_run(run, allow_nonfinite=allow_nonfinite), quantile, split)


def _calibrated(loaded: LoadedRun, quantile: float, split: str) -> Detector:
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
    loaded = load_run(run, allow_nonfinite=allow_nonfinite)
    det = _calibrated(loaded, quantile, "val")
    s = det.score(*read_run_file(loaded, data, context))  # file order: the rows of scores.csv
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
