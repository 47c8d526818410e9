"""Maximum mean discrepancy with RBF kernels, an optional extra training loss.

``MMD^2(P, Q) = E k(x, x') + E k(y, y') - 2 E k(x, y)``; with a characteristic kernel it is
zero only when ``P = Q``. Adding ``weight * MMD^2(model samples, data)`` to the NLL
penalises sample-space mismatch the likelihood is blind to (cf. Arbel et al.'s kernelised
flows). Samples must be reparameterised so the gradient reaches the flow.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ShapeError

__all__ = ["mmd2_rbf"]


def mmd2_rbf(x: Tensor, y: Tensor, bandwidths: Sequence[float] | None = None) -> Tensor:
    """Unbiased ``MMD^2`` between samples ``x (n, ...)`` and ``y (m, ...)``, a scalar.

    The kernel is a sum of RBFs ``exp(-|a - b|^2 / (2 h^2))`` over ``bandwidths``; by default
    ``h`` in (0.5, 1, 2) times the median pairwise distance of the pooled (detached) samples.
    Needs ``n, m >= 2``.
    """
    x = x.reshape(x.shape[0], -1)
    y = y.reshape(y.shape[0], -1)
    if x.shape[1] != y.shape[1]:
        raise ShapeError(f"mmd2_rbf: feature sizes differ, {x.shape[1]} vs {y.shape[1]}")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ShapeError(f"mmd2_rbf needs at least 2 samples on each side, got {n} and {m}")
    pooled = torch.cat([x, y])
    d2 = torch.cdist(pooled, pooled).square()
    if bandwidths is None:
        with torch.no_grad():
            off = d2[~torch.eye(n + m, dtype=torch.bool, device=d2.device)]
            med = off.median().clamp_min(1e-12).sqrt()
        scales = [0.5 * med, med, 2.0 * med]
    else:
        scales = [torch.as_tensor(float(h), dtype=x.dtype, device=x.device) for h in bandwidths]
    k = sum(torch.exp(-d2 / (2.0 * h * h)) for h in scales)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return sxx + syy - 2.0 * kxy.mean()
