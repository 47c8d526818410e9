"""Linear flows: dense (log-det by ``slogdet``, O(D^3)), LU-parameterised (O(D) log-det) and
permutations (volume preserving)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from ..validation import check_count
from .base import Transform, zeros_like_batch

__all__ = ["FrozenLinear", "LULinear", "Linear", "Permutation", "RandomPermutation", "Reverse"]


def _check_features(features: int) -> int:
    return check_count(features, "features", minimum=1)


class Linear(Transform):
    """Dense invertible linear map ``z = W x + b``; ``ladj = log|det W|`` via ``slogdet``.

    The general case: the log-det costs O(D^3) per evaluation (compare :class:`LULinear`).

    Args:
        features: D.
        weight: optional initial ``(D, D)`` matrix; default a random orthogonal matrix.
        bias: learn a bias ``b`` (default True).
    """

    def __init__(self, features: int, weight: Tensor | None = None, bias: bool = True):
        super().__init__()
        d = _check_features(features)
        if weight is None:
            weight, _ = torch.linalg.qr(torch.randn(d, d))
        elif tuple(weight.shape) != (d, d):
            raise ShapeError(f"weight must have shape ({d}, {d}), got {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = x @ self.weight.T
        if self.bias is not None:
            z = z + self.bias
        ladj = torch.linalg.slogdet(self.weight)[1]
        return z, ladj.expand(x.shape[:-1])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.bias is not None:
            z = z - self.bias
        flat = z.reshape(-1, z.shape[-1]).T
        x = torch.linalg.solve(self.weight, flat).T.reshape(z.shape)
        ladj = torch.linalg.slogdet(self.weight)[1]
        return x, -ladj.expand(z.shape[:-1])

    def export_form(self) -> FrozenLinear:
        """Export-ready copy: ``W``, ``W^-1`` and ``log|det W|`` precomputed (ONNX has no
        ``slogdet``/``solve``)."""
        return FrozenLinear(self.weight.detach(), None if self.bias is None else self.bias.detach())


class LULinear(Transform):
    """Linear map ``z = P L U x + b`` with L unit lower-, U upper-triangular, ``diag(U) > 0``.

    ``log|det| = sum(log diag U)`` costs O(D); the inverse is two triangular solves.
    Starts at ``W = P`` (identity by default).

    Args:
        features: D.
        permutation: optional fixed permutation (a LongTensor of size D) for P.
        bias: learn a bias ``b`` (default True).
    """

    def __init__(self, features: int, permutation: Tensor | None = None, bias: bool = True):
        super().__init__()
        d = _check_features(features)
        perm = torch.arange(d) if permutation is None else torch.as_tensor(permutation)
        if sorted(perm.tolist()) != list(range(d)):
            raise ConfigError(
                f"permutation must be a permutation of range({d}), got {perm.tolist()}"
            )
        self.register_buffer("perm", perm.long())
        # saved with perm (as in Permutation) so a forward pass does not sort every call
        self.register_buffer("inv_perm", torch.argsort(perm.long()))
        self.lower = nn.Parameter(torch.zeros(d, d))
        self.upper = nn.Parameter(torch.zeros(d, d))
        self.log_diag = nn.Parameter(torch.zeros(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def _lu(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower.tril(-1) + eye
        upper = self.upper.triu(1) + torch.diag(self.log_diag.exp())
        return lower, upper

    def weight(self) -> Tensor:
        """The dense matrix ``W = P L U``, ``(D, D)``."""
        lower, upper = self._lu()
        # row i of P L U is row perm^{-1}(i) of L U
        return torch.index_select(lower @ upper, 0, self.inv_perm)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # one D x D product per call, then a single (B, D) x (D, D) matmul with the bias
        # fused in: cheaper than two batch-sized matmuls and a gather of the output
        return F.linear(x, self.weight(), self.bias), self.log_diag.sum().expand(x.shape[:-1])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        lower, upper = self._lu()
        if self.bias is not None:
            z = z - self.bias
        y = torch.index_select(z, -1, self.perm).reshape(-1, z.shape[-1]).T
        y = torch.linalg.solve_triangular(lower, y, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(upper, y, upper=True).T.reshape(z.shape)
        return x, -self.log_diag.sum().expand(z.shape[:-1])

    def export_form(self) -> FrozenLinear:
        """Export-ready copy with ``W``, ``W^-1`` and the log-det precomputed (ONNX has no
        triangular solve)."""
        with torch.no_grad():
            return FrozenLinear(self.weight(), None if self.bias is None else self.bias)


class FrozenLinear(Transform):
    """A fixed linear map with its inverse and log-det precomputed in float64.

    Used for export (``exactflow.export``): forward and inverse are plain matmuls.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        w64 = weight.detach().double()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("inv_weight", torch.linalg.inv(w64).to(weight.dtype))
        self.register_buffer("logdet", torch.linalg.slogdet(w64)[1].to(weight.dtype))
        b = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias.detach()
        self.register_buffer("bias", b.clone())

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x @ self.weight.T + self.bias, self.logdet.expand(x.shape[:-1])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return (z - self.bias) @ self.inv_weight.T, -self.logdet.expand(z.shape[:-1])


class Permutation(Transform):
    """Fixed permutation of the last dimension, ``z = x[..., perm]``; ``ladj = 0``."""

    def __init__(self, permutation: Tensor):
        super().__init__()
        perm = torch.as_tensor(permutation).long()
        if perm.dim() != 1 or sorted(perm.tolist()) != list(range(perm.numel())):
            raise ConfigError(f"not a permutation of range({perm.numel()}): {perm.tolist()}")
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    # index_select rather than x[..., perm]: same values, and its backward is an index_add
    # instead of an accumulating index_put (3x faster for a (1024, 16) batch on CPU)
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return torch.index_select(x, -1, self.perm), zeros_like_batch(x, 1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return torch.index_select(z, -1, self.inv_perm), zeros_like_batch(z, 1)


class Reverse(Permutation):
    """Reverse the order of the features (the usual permutation between MAF layers)."""

    def __init__(self, features: int):
        super().__init__(torch.arange(_check_features(features) - 1, -1, -1))

    # a flip is its own inverse and needs no index tensor (half the time of index_select)
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x.flip(-1), zeros_like_batch(x, 1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z.flip(-1), zeros_like_batch(z, 1)


class RandomPermutation(Permutation):
    """A random permutation drawn from ``torch.Generator().manual_seed(seed)``."""

    def __init__(self, features: int, seed: int = 0):
        gen = torch.Generator().manual_seed(int(seed))
        super().__init__(torch.randperm(_check_features(features), generator=gen))
