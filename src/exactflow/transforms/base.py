"""The transform contract: every invertible map in exactflow is a :class:`Transform`.

Direction convention (one everywhere): ``forward`` is the *normalizing* direction,
data x -> noise z, and returns ``(z, ladj)`` with ``ladj = log|det dz/dx|``.
``inverse`` is the generative direction, z -> x, with ``ladj = log|det dx/dz|``.

In the usual textbook notation a flow is a generator f: z -> x, so ``forward = f^{-1}`` and

    log p(x) = log q(forward(x).z) + forward(x).ladj = log q(f^{-1}(x)) - log|det J_f(f^{-1}(x))|.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..errors import DTypeError, ShapeError

__all__ = ["Compose", "Inverse", "Transform", "sum_rightmost"]


def sum_rightmost(t: Tensor, n: int) -> Tensor:
    """Sum the ``n`` rightmost dimensions of ``t`` (``n = 0`` returns ``t``)."""
    return t.sum(dim=tuple(range(-n, 0))) if n > 0 else t


class Transform(nn.Module):
    """Base class of invertible maps with tractable log-Jacobian determinants.

    Subclasses implement :meth:`forward` (data -> noise) and :meth:`inverse` (noise -> data).
    Both take ``x`` of shape ``(*batch, *event)`` and an optional ``context`` of shape
    ``(*batch, context_features)`` and return ``(y, ladj)`` with ``ladj`` of shape ``batch``.

    Attributes:
        event_dim: number of rightmost dimensions that form one event (1 for vectors,
            3 for ``(C, H, W)`` images, 0 for scalars).
        context_features: size of the context vector this transform reads (0 = none).
    """

    event_dim: int = 1
    context_features: int = 0

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Normalizing direction, data -> noise: ``(z, log|det dz/dx|)``.

        Args:
            x: ``(*batch, *event)`` data.
            context: ``(*batch, context_features)`` or ``None``.

        Returns:
            ``z`` of the shape of ``x`` and ``ladj`` of shape ``batch``.
        """
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Generative direction, noise -> data: ``(x, log|det dx/dz|)``.

        Args:
            z: ``(*batch, *event)`` noise.
            context: ``(*batch, context_features)`` or ``None``.

        Returns:
            ``x`` of the shape of ``z`` and ``ladj`` of shape ``batch``.
        """
        raise NotImplementedError

    @property
    def inv(self) -> Transform:
        """The inverse transform as a module sharing this one's parameters."""
        return Inverse(self)


class Inverse(Transform):
    """The inverse of a transform: ``Inverse(t).forward == t.inverse`` and vice versa."""

    def __init__(self, transform: Transform):
        super().__init__()
        if not isinstance(transform, Transform):
            raise DTypeError(f"Inverse expects a Transform, got {type(transform).__name__}")
        self.transform = transform
        self.event_dim = transform.event_dim
        self.context_features = transform.context_features

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform.inverse(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform.forward(z, context)

    @property
    def inv(self) -> Transform:
        return self.transform


class Compose(Transform):
    """Composition ``t_n ∘ ... ∘ t_1`` in the forward direction; log-dets add up.

    ``Compose([a, b]).forward(x)`` applies ``a`` then ``b``; the inverse applies
    ``b.inverse`` then ``a.inverse``.
    """

    def __init__(self, transforms: Iterable[Transform]):
        super().__init__()
        transforms = list(transforms)
        for i, t in enumerate(transforms):
            if not isinstance(t, Transform):
                raise DTypeError(f"Compose item {i} is a {type(t).__name__}, not a Transform")
        self.transforms = nn.ModuleList(transforms)
        self.event_dim = max((t.event_dim for t in transforms), default=1)
        self.context_features = max((t.context_features for t in transforms), default=0)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = x.shape[: x.dim() - self.event_dim]
        total = x.new_zeros(batch) if not len(self.transforms) else None
        for i, t in enumerate(self.transforms):
            x, ladj = t(x, context)
            self._check_ladj(i, t, ladj, batch)
            total = ladj if total is None else total + ladj
        return x, total

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = z.shape[: z.dim() - self.event_dim]
        total = z.new_zeros(batch) if not len(self.transforms) else None
        for i in reversed(range(len(self.transforms))):
            t = self.transforms[i]
            z, ladj = t.inverse(z, context)
            self._check_ladj(i, t, ladj, batch)
            total = ladj if total is None else total + ladj
        return z, total

    def _check_ladj(self, i: int, t: Transform, ladj: Tensor, batch: torch.Size) -> None:
        # a shape comparison only (no tensor values), so it stays compile- and export-safe; a
        # lower event_dim (Affine(2.0, 3.0) is elementwise, event_dim 0) leaves per-element
        # log-dets that would otherwise broadcast into the sum, or fail with a bare RuntimeError
        if ladj.shape != batch:
            raise ShapeError(
                f"Compose item {i} ({type(t).__name__}, event_dim={t.event_dim}) returned a "
                f"log-det of shape {tuple(ladj.shape)}, expected the batch shape {tuple(batch)}"
                f" (the Compose has event_dim={self.event_dim}); give every transform of a "
                f"Compose the same event_dim, e.g. {type(t).__name__}(..., "
                f"event_dim={self.event_dim})"
            )

    def __len__(self) -> int:
        return len(self.transforms)

    def __getitem__(self, i: int) -> Transform:
        return self.transforms[i]


def zeros_like_batch(x: Tensor, event_dim: int) -> Tensor:
    """A zero log-det of batch shape for volume-preserving maps."""
    return torch.zeros(x.shape[: x.dim() - event_dim], dtype=x.dtype, device=x.device)
