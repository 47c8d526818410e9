"""Figures for training runs: loss curves, 2-D density heat maps, image sample grids.

Uses matplotlib's object API with the Agg canvas only (no pyplot), so plotting never
changes global matplotlib state or needs a display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "image_grid",
    "new_figure",
    "plot_density_2d",
    "plot_images",
    "plot_loss",
    "plot_scatter",
    "save_figure",
]


def new_figure(width: float, height: float):
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches on its own Agg canvas (no
    pyplot, so no global state); :class:`ConfigError` if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is in the [train] extra
        from .errors import ConfigError

        raise ConfigError("plots need matplotlib: pip install 'exactflow[train]'") from err
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> None:
    """Write ``fig`` to ``path`` as a PNG, atomically (a crash never leaves half a file)."""
    import io

    from .train.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_loss(
    losses: Sequence[float], val_history: Sequence[Sequence[float]], path: str | Path
) -> None:
    """Training loss per step (raw and smoothed) and validation NLL against the step."""
    fig = new_figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    y = np.asarray(losses, dtype=np.float64)
    steps = np.arange(1, len(y) + 1)
    ok = np.isfinite(y)
    if ok.any():
        ax.plot(steps[ok], y[ok], color="0.75", lw=0.6, label="train loss")
        window = max(1, len(y) // 50)
        kernel = np.ones(window) / window
        filled = np.where(ok, y, np.interp(steps, steps[ok], y[ok]))
        smooth = np.convolve(filled, kernel, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="C0", lw=1.5, label="train (smoothed)")
        lo, hi = np.percentile(y[ok], [1, 99])
        pad = 0.1 * (hi - lo + 1e-9)
        ax.set_ylim(lo - pad, hi + pad)
    if len(val_history):
        v = np.asarray(val_history, dtype=np.float64)
        ax.plot(v[:, 0], v[:, 1], "o-", color="C3", ms=3, lw=1.2, label="validation NLL")
    ax.set_xlabel("step")
    ax.set_ylabel("NLL (nats)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


@torch.no_grad()
def plot_density_2d(
    flow,
    data: Tensor,
    path: str | Path,
    samples: int = 2000,
    grid: int = 200,
    generator: torch.Generator | None = None,
) -> None:
    """Three panels for a 2-D flow: model density heat map, model samples, data.

    The grid covers the data's 0.5-99.5 percentile box with a 10 % margin; the density is
    ``exp(flow.log_prob)`` evaluated in float64-safe chunks.
    """
    data = data.detach().cpu().double()
    lo = torch.quantile(data, 0.005, dim=0)
    hi = torch.quantile(data, 0.995, dim=0)
    pad = 0.1 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    xs = torch.linspace(float(lo[0]), float(hi[0]), grid)
    ys = torch.linspace(float(lo[1]), float(hi[1]), grid)
    mesh = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
    mesh = mesh.to(flow.dtype).to(flow.device)
    logp = torch.cat([flow.log_prob(chunk) for chunk in mesh.split(8192)]).cpu()
    dens = torch.exp(logp.double()).reshape(grid, grid).numpy()
    sample = flow.sample(samples, generator=generator).cpu().double().numpy()
    shown = data[:samples].numpy()
    extent = (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))

    fig = new_figure(12.0, 4.0)
    panels = (("model density", None), ("model samples", sample), ("data", shown))
    for i, (title, pts) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        if pts is None:
            ax.imshow(dens, origin="lower", extent=extent, cmap="magma", aspect="auto")
        else:
            ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, color="C0" if i == 1 else "0.3")
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, path)


def plot_scatter(points: Tensor, path: str | Path, title: str = "samples") -> None:
    """Scatter plot of the first two coordinates of ``points`` ``(N, D >= 2)``."""
    p = points.detach().cpu().double().reshape(points.shape[0], -1).numpy()
    fig = new_figure(4.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.5)
    ax.set_title(title)
    save_figure(fig, path)


def image_grid(images: Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images with values in ``[0, 1]`` into one ``(H', W', C)`` array."""
    imgs = images.detach().cpu().float().clamp(0.0, 1.0)
    n, c, h, w = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    out = np.ones((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        out[top : top + h, left : left + w] = imgs[i].permute(1, 2, 0).numpy()
    return out


def plot_images(images: Tensor, path: str | Path, nrow: int | None = None, title: str = "") -> None:
    """Save a grid of ``(N, C, H, W)`` images with values in ``[0, 1]`` as a PNG."""
    grid = image_grid(images, nrow)
    size = max(5.0, min(10.0, grid.shape[1] / 20))
    fig = new_figure(size, size * grid.shape[0] / grid.shape[1] + (0.3 if title else 0.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(
        grid.squeeze(-1) if grid.shape[-1] == 1 else grid,
        cmap="gray",
        vmin=0,
        vmax=1,
        interpolation="nearest",
    )
    ax.axis("off")
    if title:
        ax.set_title(title)
    save_figure(fig, path)
