"""Anomaly detection with an exact likelihood: score, calibrate a threshold, evaluate.

``score(x) = -log p(x)`` in nats, or bits per dimension ``-log p(x) / (D ln 2)`` for images.
A point is flagged when its score exceeds a threshold set at a quantile (default 0.99) of the
scores of in-distribution calibration data (a training or validation split), so about
``1 - quantile`` of inliers are flagged by construction.

    det = Detector(flow).calibrate(x_val)      # threshold = 0.99-quantile of val scores
    det.predict(x_new)                         # boolean anomaly labels
    det.evaluate(x_test, labels)               # AUROC, AP, F1 at the threshold, FPR@95%TPR
    det.save("detector.safetensors")           # weights + threshold, safetensors + JSON

Inputs may be tensors, NumPy arrays or (nested) lists of numbers. The trained-run side (a
detector calibrated on a run directory's validation split, ``exactflow detect``) lives in
:mod:`exactflow.app.detect`, above this module.

Caveat (Nalisnick et al., 2019): flows can assign *higher* likelihood to simple
out-of-distribution inputs than to their own data; see :func:`complexity_corrected` for the
input-complexity correction of Serra et al. (2020).
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, DataError, DTypeError, ShapeError
from .flow import Flow
from .validation import as_tensor, check_count, check_real, check_seed

__all__ = [
    "Detector",
    "anomaly_metrics",
    "complexity_bits",
    "complexity_corrected",
    "fpr_at_tpr",
    "plot_score_histogram",
    "quantile_threshold",
    "read_labels",
    "score",
]

DETECTOR_FORMAT = "exactflow-detector"


def _check_quantile(q: float) -> float:
    q = check_real(q, "quantile")
    if not 0.0 < q < 1.0:
        raise ConfigError(f"quantile must be in (0, 1), got {q!r}")
    return q


def _as_1d(values, name: str) -> np.ndarray:
    if not isinstance(values, (Tensor, np.ndarray, list, tuple)):
        raise DTypeError(
            f"{name} must be a tensor, a NumPy array or a list, got {type(values).__name__}"
        )
    try:
        arr = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values)
    except ValueError as err:  # NumPy refuses ragged nesting
        raise ShapeError(f"{name} must be 1-D of shape (N,), got ragged rows") from err
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ShapeError(f"{name} must be 1-D of shape (N,), got shape {arr.shape}")
    if arr.size == 0:
        raise DataError(f"{name} is empty")
    return arr


def _check_labels(labels, n: int) -> np.ndarray:
    lab = _as_1d(labels, "labels")
    if lab.shape[0] != n:
        raise ShapeError(f"labels has {lab.shape[0]} rows but there are {n} scores")
    if lab.dtype.kind not in "biuf" or not np.isin(lab, (0, 1)).all():
        raise DataError("labels must be 0 (inlier) or 1 (anomaly)")
    lab = lab.astype(np.int64)
    if lab.min() == lab.max():
        raise DataError(
            f"labels are all {int(lab[0])}: metrics need both inliers (0) and anomalies (1)"
        )
    return lab


# -- scores -------------------------------------------------------------------------------------
@torch.no_grad()
def score(
    flow: Flow,
    x: Tensor,
    *,
    bits: bool = False,
    levels: int | None = None,
    batch_size: int = 4096,
    generator: torch.Generator | None = None,
    context: Tensor | None = None,
) -> np.ndarray:
    """Anomaly scores ``-log p(x)`` of every row, ``(N,)`` float64.

    Args:
        flow: a trained :class:`~exactflow.Flow` (its pre-processing included).
        x: ``(N, *event_shape)`` rows, or ``(N, prod(event_shape))`` flattened rows.
        bits: report bits per dimension ``-log p / (D ln 2)`` instead of nats.
        levels: for discrete data (pixels in ``0..levels-1``): add uniform dequantisation
            noise from ``generator`` before scoring, as in training.
        batch_size: rows per forward pass.
        context: ``(N, C)`` context of a conditional flow.
    """
    if not isinstance(flow, Flow):
        raise DTypeError(f"flow must be an exactflow Flow, got {type(flow).__name__}")
    batch_size = check_count(batch_size, "batch_size", minimum=1)
    x = as_tensor(x, "x", torch.float64)
    ev = tuple(flow.event_shape)
    d = math.prod(ev)
    if x.dim() == 2 and ev != (x.shape[1],) and x.shape[1] == d:
        x = x.reshape(x.shape[0], *ev)
    if x.dim() != len(ev) + 1 or tuple(x.shape[1:]) != ev:
        raise ShapeError(
            f"x must have shape (N, {', '.join(map(str, ev))}) or (N, {d}), got {tuple(x.shape)}"
        )
    was_training = flow.training
    flow.eval()
    out = []
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device=flow.device, dtype=flow.dtype)
            if levels is not None:
                u = torch.rand(xb.shape, generator=generator, dtype=torch.float64)
                xb = xb + u.to(xb)
            cb = None if context is None else context[i : i + batch_size]
            out.append(-flow.log_prob(xb, cb).double().cpu())
    finally:
        flow.train(was_training)
    s = torch.cat(out).numpy()
    return s / (d * math.log(2.0)) if bits else s


def complexity_bits(images: Tensor | np.ndarray, levels: int = 256) -> np.ndarray:
    """Input complexity ``L(x)``: zlib-compressed length of each image in bits, ``(N,)``.

    Pixels are quantised to 8 bits (``levels`` is the data's number of levels) and
    compressed at level 9; a simple image (a thin "1") compresses to fewer bits.
    """
    arr = np.asarray(images.detach().cpu() if isinstance(images, Tensor) else images)
    arr = arr.reshape(arr.shape[0], -1).astype(np.float64)
    q = np.clip(np.floor(arr * (256.0 / levels)), 0, 255).astype(np.uint8)
    return np.array([8.0 * len(zlib.compress(row.tobytes(), 9)) for row in q])


def complexity_corrected(nll_bits_total: np.ndarray, images, levels: int = 256) -> np.ndarray:
    """Serra et al. (2020) score ``S(x) = -log2 p(x) - L(x)`` (bits, per image).

    ``-log2 p(x)`` is the flow's code length and ``L(x)`` a generic compressor's
    (:func:`complexity_bits`); their difference is a log likelihood ratio against the
    compressor as a universal background model.

    Args:
        nll_bits_total: ``(N,)`` total ``-log2 p(x)`` (not per dimension).
        images: the ``(N, ...)`` images in pixel levels.
    """
    nll = _as_1d(nll_bits_total, "nll_bits_total").astype(np.float64)
    comp = complexity_bits(images, levels)
    if comp.shape[0] != nll.shape[0]:
        raise ShapeError(f"{nll.shape[0]} scores but {comp.shape[0]} images")
    return nll - comp


# -- threshold and metrics ----------------------------------------------------------------------
def quantile_threshold(scores, quantile: float = 0.99) -> float:
    """The ``quantile`` of in-distribution ``scores`` (linear interpolation): the threshold
    above which a score is flagged, so a fraction ``~1 - quantile`` of inliers is flagged."""
    q = _check_quantile(quantile)
    s = _as_1d(scores, "scores").astype(np.float64)
    if not np.isfinite(s).all():
        raise DataError(f"{int((~np.isfinite(s)).sum())} calibration score(s) are not finite")
    return float(np.quantile(s, q))


def fpr_at_tpr(scores, labels, tpr: float = 0.95) -> float:
    """False-positive rate at the first ROC threshold reaching true-positive rate ``tpr``."""
    from sklearn.metrics import roc_curve

    s = _as_1d(scores, "scores").astype(np.float64)
    lab = _check_labels(labels, s.shape[0])
    fpr_v, tpr_v, _ = roc_curve(lab, s)
    idx = int(np.searchsorted(tpr_v, tpr - 1e-12, side="left"))
    return float(fpr_v[min(idx, len(fpr_v) - 1)])


def anomaly_metrics(scores, labels, threshold: float | None = None) -> dict[str, Any]:
    """Detection metrics of ``scores`` (higher = more anomalous) against ``labels`` (1 = anomaly).

    Returns a dict with ``auroc``, ``average_precision``, ``fpr_at_95_tpr`` (threshold-free),
    ``n``, ``n_anomalies``; with ``threshold`` also ``f1``, ``precision``, ``recall`` and
    ``flagged`` of the rule ``score > threshold``.
    """
    from sklearn.metrics import (
        average_precision_score,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    s = _as_1d(scores, "scores").astype(np.float64)
    lab = _check_labels(labels, s.shape[0])
    if not np.isfinite(s).all():
        # an infinite score is a certain anomaly; NaN is a bug upstream
        if np.isnan(s).any():
            raise DataError(f"{int(np.isnan(s).sum())} score(s) are NaN")
        s = np.nan_to_num(s, posinf=np.finfo(np.float64).max, neginf=-np.finfo(np.float64).max)
    out: dict[str, Any] = {
        "n": int(s.shape[0]),
        "n_anomalies": int(lab.sum()),
        "auroc": float(roc_auc_score(lab, s)),
        "average_precision": float(average_precision_score(lab, s)),
        "fpr_at_95_tpr": fpr_at_tpr(s, lab, 0.95),
    }
    if threshold is not None:
        pred = (s > float(threshold)).astype(np.int64)
        out["threshold"] = float(threshold)
        out["flagged"] = int(pred.sum())
        out["f1"] = float(f1_score(lab, pred, zero_division=0))
        out["precision"] = float(precision_score(lab, pred, zero_division=0))
        out["recall"] = float(recall_score(lab, pred, zero_division=0))
    return out


def read_labels(path: str | Path) -> np.ndarray:
    """Read a one-column ``.npy``/``.csv`` file of 0/1 labels (1 = anomaly), ``(N,)`` int64."""
    from .data import read_table

    table = read_table(path)
    if table.shape[1] != 1:
        raise DataError(f"{path}: labels must be one column, got {table.shape[1]}")
    lab = table[:, 0]
    if not np.isin(lab, (0.0, 1.0)).all():
        raise DataError(f"{path}: labels must be 0 (inlier) or 1 (anomaly)")
    return lab.astype(np.int64)


def plot_score_histogram(
    scores,
    threshold: float,
    path: str | Path,
    labels=None,
    unit: str = "nats",
    title: str = "anomaly scores",
) -> None:
    """Histogram of ``scores`` with the threshold as a vertical line; split by ``labels``."""
    from .plotting import new_figure, save_figure

    s = _as_1d(scores, "scores").astype(np.float64)
    s = s[np.isfinite(s)]
    fig = new_figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    # heavy right tails (far anomalies) would squash the bulk: values beyond the 97th
    # percentile (or the threshold, if higher) pile up in the last bin
    lo, hi = np.quantile(s, [0.005, 0.97]) if s.size > 20 else (s.min(), s.max())
    lo, hi = min(lo, threshold), max(hi, threshold + 0.05 * (hi - lo))
    bins = np.linspace(lo, hi + 1e-9 * (1 + abs(hi)), 50)
    if labels is None:
        ax.hist(np.clip(s, lo, hi), bins=bins, color="tab:blue", alpha=0.8, label="scores")
    else:
        lab = _check_labels(labels, _as_1d(scores, "scores").shape[0])
        lab = lab[np.isfinite(_as_1d(scores, "scores"))]
        for value, name, colour in ((0, "inliers", "tab:blue"), (1, "anomalies", "tab:red")):
            ax.hist(
                np.clip(s[lab == value], lo, hi),
                bins=bins,
                color=colour,
                alpha=0.6,
                label=f"{name} ({int((lab == value).sum())})",
            )
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3g}")
    clipped = int((s > hi).sum())
    note = f" ({clipped} above {hi:.3g} in the last bin)" if clipped else ""
    ax.set_xlabel(f"score = -log p(x) [{unit}]{note}")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend(frameon=False)
    save_figure(fig, path)


# -- the detector -------------------------------------------------------------------------------
class Detector:
    """A flow plus a calibrated threshold on ``-log p(x)``.

    Args:
        flow: any trained :class:`~exactflow.Flow`.
        threshold: a known threshold, or ``None`` until :meth:`calibrate`.
        quantile: quantile of the calibration scores used as the threshold.
        bits: score in bits per dimension (images) rather than nats.
        levels: number of discrete levels of pixel data (dequantised before scoring), or
            ``None`` for continuous data.
        seed: seeds the dequantisation noise so scores are reproducible.
        batch_size: rows per forward pass.
    """

    def __init__(
        self,
        flow: Flow,
        threshold: float | None = None,
        quantile: float = 0.99,
        *,
        bits: bool = False,
        levels: int | None = None,
        seed: int = 0,
        batch_size: int = 4096,
    ):
        if not isinstance(flow, Flow):
            raise DTypeError(f"flow must be an exactflow Flow, got {type(flow).__name__}")
        self.flow = flow
        self.threshold = None if threshold is None else check_real(threshold, "threshold")
        self.quantile = _check_quantile(quantile)
        self.bits = bool(bits)
        self.levels = None if levels is None else check_count(levels, "levels", minimum=2)
        self.seed = check_seed(seed)
        self.batch_size = check_count(batch_size, "batch_size", minimum=1)
        self.calibration: dict[str, float] = {}

    @property
    def unit(self) -> str:
        """Unit of the scores and threshold: ``"bits/dim"`` or ``"nats"``."""
        return "bits/dim" if self.bits else "nats"

    def score(self, x, context: Tensor | None = None) -> np.ndarray:
        """``(N,)`` scores ``-log p(x)`` (nats, or bits/dim with ``bits``); see :func:`score`."""
        g = torch.Generator().manual_seed(self.seed)
        return score(
            self.flow,
            x,
            bits=self.bits,
            levels=self.levels,
            batch_size=self.batch_size,
            generator=g,
            context=context,
        )

    def score_file(self, path: str | Path) -> np.ndarray:
        """Scores of every row of a ``.npy``/``.csv`` table (columns = flattened event)."""
        from .data import read_table

        table = read_table(path)
        d = math.prod(self.flow.event_shape)
        if table.shape[1] != d:
            raise DataError(f"{path}: has {table.shape[1]} columns but the model expects {d}")
        return self.score(torch.as_tensor(table))

    def calibrate(
        self, x, quantile: float | None = None, context: Tensor | None = None
    ) -> Detector:
        """Set the threshold to the ``quantile`` of the scores of in-distribution ``x``
        (given its ``(N, C)`` ``context`` rows for a conditional flow)."""
        if quantile is not None:
            self.quantile = _check_quantile(quantile)
        s = self.score(x, context)
        self.threshold = quantile_threshold(s, self.quantile)
        self.calibration = {"n": int(s.size), "mean": float(s.mean()), "std": float(s.std())}
        return self

    def _need_threshold(self) -> float:
        if self.threshold is None:
            raise ConfigError("the detector has no threshold yet; call calibrate(x) first")
        return self.threshold

    def predict(self, x, context: Tensor | None = None) -> np.ndarray:
        """``(N,)`` booleans: ``score > threshold`` (True = anomaly)."""
        return self.score(x, context) > self._need_threshold()

    def evaluate(self, x, labels, context: Tensor | None = None) -> dict[str, Any]:
        """:func:`anomaly_metrics` of the scores of ``x`` against ``labels`` (1 = anomaly)."""
        return anomaly_metrics(self.score(x, context), labels, self.threshold)

    # -- persistence ----------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """The JSON-ready settings saved next to the weights."""
        return {
            "format": DETECTOR_FORMAT,
            "version": 1,
            "threshold": self.threshold,
            "quantile": self.quantile,
            "bits": self.bits,
            "levels": self.levels,
            "seed": self.seed,
            "event_shape": list(self.flow.event_shape),
            "calibration": self.calibration,
        }

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write the flow's weights and the threshold to one safetensors file (atomic, no
        pickle); ``extra`` JSON-ready metadata is stored alongside."""
        from .train.checkpoint import save_checkpoint

        meta = self.meta()
        if extra:
            meta["extra"] = extra
        save_checkpoint(path, dict(self.flow.state_dict()), meta)

    @classmethod
    def load(
        cls,
        path: str | Path,
        flow: Flow,
        batch_size: int = 4096,
        *,
        allow_nonfinite: bool = False,
    ) -> Detector:
        """Restore a detector saved by :meth:`save` into ``flow`` (same architecture).

        A run directory's detector (as ``exactflow detect`` saves it) loads with
        :func:`exactflow.app.detect.load_detector`. Weights holding NaN or inf are refused
        unless ``allow_nonfinite``.
        """
        from .train.checkpoint import load_checkpoint

        if not isinstance(flow, Flow):
            raise DTypeError(
                f"Detector.load needs the Flow to load into, got {type(flow).__name__}; for a "
                "run directory use exactflow.app.detect.load_detector(path, run)"
            )
        tensors, meta = load_checkpoint(path, allow_nonfinite=allow_nonfinite)
        if meta.get("format") != DETECTOR_FORMAT:
            raise ConfigError(f"{path}: not an exactflow detector (format {meta.get('format')!r})")
        _check_detector_meta(meta, path)
        if list(flow.event_shape) != list(meta["event_shape"]):
            raise ShapeError(
                f"{path}: saved for event shape {tuple(meta['event_shape'])}, the flow has "
                f"{tuple(flow.event_shape)}"
            )
        try:
            flow.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            raise ConfigError(
                f"{path}: weights do not fit this flow ({str(err).splitlines()[0]})"
            ) from err
        try:
            det = cls(
                flow,
                meta["threshold"],
                meta["quantile"],
                bits=meta["bits"],
                levels=meta["levels"],
                seed=meta["seed"],
                batch_size=batch_size,
            )
        except (ConfigError, DTypeError) as err:
            raise DataError(f"{path}: saved detector settings: {err}") from err
        det.calibration = dict(meta.get("calibration") or {})
        return det

    def __repr__(self) -> str:
        return (
            f"Detector(threshold={self.threshold}, quantile={self.quantile}, unit={self.unit!r}, "
            f"levels={self.levels})"
        )


def _check_detector_meta(meta: dict[str, Any], path: str | Path) -> None:
    missing = [
        k
        for k in ("threshold", "quantile", "bits", "levels", "seed", "event_shape")
        if k not in meta
    ]
    if missing:
        raise DataError(f"{path}: detector metadata has no {', '.join(map(repr, missing))} entry")
    shape = meta["event_shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
        raise DataError(f"{path}: detector metadata 'event_shape' must list ints, got {shape!r}")
    if not isinstance(meta.get("calibration") or {}, dict):
        raise DataError(f"{path}: detector metadata 'calibration' must be a JSON object")
