"""Judging a posterior approximation: the classifier two-sample test and simulation-based
calibration.

* :func:`c2st`: train a classifier to tell samples of ``q`` (e.g. an NPE flow at ``x_o``) from
  samples of ``p`` (the reference posterior); its cross-validated accuracy is 0.5 when they are
  indistinguishable and 1.0 when they are disjoint (Lopez-Paz & Oquab 2017; the SBI benchmark's
  main metric).
* :func:`sbc_ranks`: for ``theta* ~ p(theta)``, ``x* ~ p(x | theta*)`` and ``L`` posterior
  samples at ``x*``, the rank of ``theta*_i`` among the samples' ``i``-th coordinates is uniform
  on ``{0, ..., L}`` for every ``i`` if the posterior is calibrated (Talts et al. 2018).
  :func:`sbc_uniformity` tests that with Kolmogorov-Smirnov, :func:`plot_sbc` draws the rank
  histograms. An over-confident posterior piles ranks at both ends, an under-confident one in
  the middle, a biased one on one side.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DomainError, DTypeError, ShapeError
from ._validate import positive_int
from .tasks import Simulator

__all__ = ["c2st", "plot_sbc", "sbc_ranks", "sbc_uniformity"]


def _samples(s, name: str) -> np.ndarray:
    if isinstance(s, Tensor):
        s = s.detach().cpu().double().numpy()
    elif isinstance(s, np.ndarray):
        s = s.astype(np.float64, copy=False)
    else:
        raise DTypeError(f"{name} must be a torch.Tensor or numpy array, got {type(s).__name__}")
    if s.ndim == 1:
        s = s[:, None]
    if s.ndim != 2:
        raise ShapeError(f"{name} must have shape (n, D), got {s.shape}")
    if not np.isfinite(s).all():
        raise DomainError(f"{name} contains non-finite value(s) (NaN or inf)")
    return s


def c2st(
    samples_p: Tensor | np.ndarray,
    samples_q: Tensor | np.ndarray,
    seed: int = 0,
    folds: int = 5,
    *,
    hidden: int | None = None,
    max_iter: int = 1000,
) -> float:
    """Classifier two-sample test accuracy between two equal-sized samples ``(n, D)``.

    Both samples are z-scored with their pooled mean and standard deviation; scikit-learn's
    ``MLPClassifier`` (two ReLU hidden layers of ``hidden = 10 D`` units, Adam, early stopping,
    as in the SBI benchmark) is scored by ``folds``-fold stratified cross-validation, and the
    mean held-out accuracy is returned: 0.5 means indistinguishable, 1.0 fully separable.
    ``seed`` fixes the folds and the network's initialisation.
    """
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.neural_network import MLPClassifier
    except ImportError as err:  # pragma: no cover - scikit-learn is in the [train] extra
        raise ConfigError("c2st needs scikit-learn: pip install 'exactflow[train]'") from err
    p, q = _samples(samples_p, "samples_p"), _samples(samples_q, "samples_q")
    if p.shape[1] != q.shape[1]:
        raise ShapeError(
            f"samples_p and samples_q must have the same dimension, got {p.shape[1]} and "
            f"{q.shape[1]}"
        )
    if p.shape[0] != q.shape[0]:
        raise ShapeError(
            f"c2st needs the same number of samples from both (so chance is 0.5), got "
            f"{p.shape[0]} and {q.shape[0]}; subsample the larger one"
        )
    folds = positive_int(folds, "folds")
    if folds < 2 or p.shape[0] < folds:
        raise DomainError(f"c2st needs 2 <= folds <= n, got folds={folds} with n={p.shape[0]}")
    x = np.concatenate([p, q])
    y = np.concatenate([np.zeros(p.shape[0]), np.ones(q.shape[0])])
    std = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    width = hidden or 10 * x.shape[1]
    clf = MLPClassifier(
        hidden_layer_sizes=(width, width),
        activation="relu",
        solver="adam",
        max_iter=max_iter,
        early_stopping=True,
        n_iter_no_change=50,
        random_state=seed,
    )
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # hitting max_iter is fine for a test statistic; the warning is noise here
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = cross_val_score(clf, x, y, cv=cv, scoring="accuracy")
    return float(np.mean(scores))


def sbc_ranks(
    posterior_sampler: Callable[[Tensor, int, torch.Generator | None], Tensor],
    task: Simulator,
    n_runs: int,
    n_posterior_samples: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Simulation-based calibration ranks, ``(n_runs, D_theta)`` int64 in ``{0, ..., L}``.

    Run ``r``: ``theta* ~ prior``, ``x* = task.simulate(theta*)``, ``L = n_posterior_samples``
    draws ``posterior_sampler(x*, L, generator)`` of shape ``(L, D_theta)``, and rank ``=`` the
    number of draws whose coordinate is below ``theta*``'s. ``task.reference_posterior`` is a
    valid sampler (calibrated by construction), and so is ``lambda x, n, g: flow.sample(n,
    context=x)`` for a conditional flow.
    """
    n_runs = positive_int(n_runs, "n_runs")
    n_post = positive_int(n_posterior_samples, "n_posterior_samples")
    theta = task.prior.sample(n_runs, generator, torch.float64)
    x = task.simulate(theta, generator)
    ranks = torch.empty((n_runs, task.theta_dim), dtype=torch.int64)
    for r in range(n_runs):
        draws = posterior_sampler(x[r], n_post, generator)
        if not isinstance(draws, Tensor) or tuple(draws.shape) != (n_post, task.theta_dim):
            got = tuple(draws.shape) if isinstance(draws, Tensor) else type(draws).__name__
            raise ShapeError(
                f"posterior_sampler must return ({n_post}, {task.theta_dim}) samples, got {got}"
            )
        ranks[r] = (draws.detach().double().cpu() < theta[r]).sum(dim=0)
    return ranks


def _ranks(ranks, n_posterior_samples: int) -> np.ndarray:
    if not isinstance(ranks, (Tensor, np.ndarray)):
        raise DTypeError(f"ranks must be a tensor or array, got {type(ranks).__name__}")
    r = ranks.cpu().numpy() if isinstance(ranks, Tensor) else np.asarray(ranks)
    if r.ndim == 1:
        r = r[:, None]
    if r.ndim != 2:
        raise ShapeError(f"ranks must have shape (n_runs, D), got {r.shape}")
    if r.size and (r.min() < 0 or r.max() > n_posterior_samples):
        raise DomainError(
            f"ranks must lie in 0..{n_posterior_samples} (n_posterior_samples), got "
            f"{r.min()}..{r.max()}"
        )
    return r


def sbc_uniformity(ranks: Tensor, n_posterior_samples: int, seed: int = 0) -> Tensor:
    """Per-dimension Kolmogorov-Smirnov p-values ``(D,)`` (float64) that ``ranks`` are uniform.

    The discrete ranks are spread over their cells, ``u = (rank + U) / (L + 1)`` with
    ``U ~ U(0, 1)`` from ``seed``: under calibration ``u`` is exactly ``U(0, 1)`` for any ``L``,
    so the KS test (``scipy.stats.kstest``) keeps its level. Small p-values (e.g. < 0.01) mean
    miscalibration in that coordinate.
    """
    from scipy.stats import kstest

    n_post = positive_int(n_posterior_samples, "n_posterior_samples")
    r = _ranks(ranks, n_post)
    rng = np.random.default_rng(seed)
    u = (r + rng.random(r.shape)) / (n_post + 1)
    pvalues = [kstest(u[:, j], "uniform").pvalue for j in range(r.shape[1])]
    return torch.tensor(pvalues, dtype=torch.float64)


def plot_sbc(
    ranks: Tensor,
    path: str | Path,
    n_posterior_samples: int | None = None,
    *,
    bins: int | None = None,
    names: list[str] | None = None,
) -> None:
    """Rank histograms, one panel per dimension, with the 99% band of a uniform histogram.

    Args:
        ranks: ``(n_runs, D)`` from :func:`sbc_ranks`.
        path: PNG file to write (atomically).
        n_posterior_samples: ``L`` of the ranks (default: the largest rank seen).
        bins: histogram bins (default ``min(20, L + 1)``).
        names: panel titles (default ``theta_1 ... theta_D``).
    """
    from scipy.stats import binom

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is in the [train] extra
        raise ConfigError("plot_sbc needs matplotlib: pip install 'exactflow[train]'") from err

    r0 = ranks.cpu().numpy() if isinstance(ranks, Tensor) else np.asarray(ranks)
    n_post = int(r0.max()) if n_posterior_samples is None else n_posterior_samples
    n_post = positive_int(max(n_post, 1), "n_posterior_samples")
    r = _ranks(ranks, n_post)
    n_runs, dim = r.shape
    bins = min(20, n_post + 1) if bins is None else positive_int(bins, "bins")
    names = names or [f"theta_{i + 1}" for i in range(dim)]
    if len(names) != dim:
        raise ShapeError(f"names must have {dim} entries (one per dimension), got {len(names)}")
    edges = np.linspace(-0.5, n_post + 0.5, bins + 1)
    # each bin's share of the L + 1 equally likely ranks, for the band of a uniform histogram
    share = np.diff(np.clip(np.ceil(edges), 0, n_post + 1)) / (n_post + 1)
    # bins can hold unequal numbers of ranks (L + 1 need not divide), so plot count / expected
    # count: a calibrated histogram then scatters around 1 in every bin
    expected = n_runs * share
    lo = binom.ppf(0.005, n_runs, share) / expected
    hi = binom.ppf(0.995, n_runs, share) / expected

    cols = min(dim, 5)
    rows = -(-dim // cols)
    fig = Figure(figsize=(2.6 * cols, 2.2 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for j in range(dim):
        ax = fig.add_subplot(rows, cols, j + 1)
        counts, _ = np.histogram(r[:, j], bins=edges)
        ax.fill_between(
            edges,
            np.append(lo, lo[-1]),
            np.append(hi, hi[-1]),
            step="post",
            color="0.85",
        )
        ax.stairs(counts / expected, edges, baseline=None, color="C0", lw=1.5)
        ax.axhline(1.0, color="0.5", lw=0.8)
        ax.set_title(names[j], fontsize=9)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_ylim(bottom=0)
    fig.suptitle(
        f"SBC ranks ({n_runs} runs, L = {n_post}): count / expected, grey = 99% band if uniform",
        fontsize=10,
    )
    fig.tight_layout()

    import io

    from ..train.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
