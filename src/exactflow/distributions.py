"""Base distributions q(z) for flows.

All share one small interface (they are modules, so their parameters train and move with
the flow):

* ``log_prob(z, context=None) -> (*batch,)`` for ``z`` of shape ``(*batch, *event_shape)``;
* ``sample(shape, context=None, generator=None) -> (*shape, *event_shape)``, reparameterised
  (gradients flow to the parameters) wherever the family allows it;
* ``event_shape`` and ``context_features`` attributes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._compat import renamed_kwargs
from .errors import ConfigError, ContextError, ShapeError

__all__ = [
    "BaseDistribution",
    "ConditionalGaussian",
    "DiagGaussian",
    "GaussianMixture",
    "StandardNormal",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _event_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if any(s < 1 for s in shape):
        raise ShapeError(f"event_shape must have positive sizes, got {shape}")
    return shape


def _sample_shape(shape) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


class BaseDistribution(nn.Module):
    """Interface of base distributions; see the module docstring."""

    event_shape: tuple[int, ...] = ()
    context_features: int = 0

    def __init__(self, event_shape) -> None:
        super().__init__()
        self.event_shape = _event_shape(event_shape)
        # tracks dtype/device through .to() so sampling needs no argument for them
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def event_dim(self) -> int:
        """Number of event dimensions, ``len(event_shape)``."""
        return len(self.event_shape)

    def _sum_event(self, t: Tensor) -> Tensor:
        return t.sum(dim=tuple(range(-self.event_dim, 0))) if self.event_dim else t

    def _noise(self, shape, generator: torch.Generator | None) -> Tensor:
        a = self._anchor
        return torch.randn(shape, generator=generator, dtype=a.dtype, device=a.device)

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``log q(z | context)`` of shape ``batch`` for ``z`` ``(*batch, *event_shape)``
        (``context``: ``(*batch, context_features)`` or ``None``)."""
        raise NotImplementedError

    def sample(self, shape=(), context: Tensor | None = None, generator=None) -> Tensor:
        """Draws of shape ``(*shape, *event_shape)`` (an int ``shape`` means ``(shape,)``;
        a conditional base puts the context's batch shape before the event), from
        ``generator`` if given; reparameterised where the family allows it."""
        raise NotImplementedError


class StandardNormal(BaseDistribution):
    """N(0, I) on any event shape (``()`` for scalars, ``(D,)``, ``(C, H, W)``).

    ``log q(z) = -|z|^2 / 2 - (n / 2) log 2 pi`` with ``n = prod(event_shape)``.
    """

    def __init__(self, event_shape=()) -> None:
        super().__init__(event_shape)

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self._sum_event(-0.5 * (z.square() + _LOG_2PI))

    def sample(self, shape=(), context: Tensor | None = None, generator=None) -> Tensor:
        return self._noise(_sample_shape(shape) + self.event_shape, generator)


class DiagGaussian(BaseDistribution):
    """Gaussian with learnable mean and per-dimension scale (``scale = exp(log_scale)``)."""

    def __init__(self, event_shape, loc: float | Tensor = 0.0, scale: float | Tensor = 1.0):
        super().__init__(event_shape)
        self.loc = nn.Parameter(torch.zeros(self.event_shape) + torch.as_tensor(loc))
        self.log_scale = nn.Parameter(torch.zeros(self.event_shape) + torch.as_tensor(scale).log())

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        u = (z - self.loc) * torch.exp(-self.log_scale)
        return self._sum_event(-0.5 * (u.square() + _LOG_2PI) - self.log_scale)

    def sample(self, shape=(), context: Tensor | None = None, generator=None) -> Tensor:
        eps = self._noise(_sample_shape(shape) + self.event_shape, generator)
        return self.loc + eps * self.log_scale.exp()


class GaussianMixture(BaseDistribution):
    """Learnable mixture of K diagonal Gaussians on vectors of size D.

    ``log q(z) = logsumexp_k [log pi_k + log N(z; mu_k, diag sigma_k^2)]``. Sampling picks a
    component (not differentiable w.r.t. the weights) and reparameterises within it.
    """

    def __init__(self, features: int, components: int = 8, spread: float = 2.0):
        super().__init__((features,))
        if components < 1:
            raise ConfigError(f"components must be >= 1, got {components}")
        self.logits = nn.Parameter(torch.zeros(components))
        self.loc = nn.Parameter(spread * torch.randn(components, features))
        self.log_scale = nn.Parameter(torch.zeros(components, features))

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        u = (z.unsqueeze(-2) - self.loc) * torch.exp(-self.log_scale)
        comp = (-0.5 * (u.square() + _LOG_2PI) - self.log_scale).sum(-1)
        return torch.logsumexp(comp + F.log_softmax(self.logits, -1), dim=-1)

    def sample(self, shape=(), context: Tensor | None = None, generator=None) -> Tensor:
        shape = _sample_shape(shape)
        n = math.prod(shape)
        probs = F.softmax(self.logits, -1).detach()
        k = torch.multinomial(probs, n, replacement=True, generator=generator)
        eps = self._noise((n, *self.event_shape), generator)
        z = self.loc[k] + eps * self.log_scale[k].exp()
        return z.reshape(*shape, *self.event_shape)


class ConditionalGaussian(BaseDistribution):
    """Diagonal Gaussian whose mean and log-scale are an MLP of the context.

    Output layer is zero-initialised, so it starts as N(0, I) for every context.

    Args:
        features: D.
        context: C, the context size.
        hidden: widths of the hidden layers.
    """

    @renamed_kwargs(context_features="context")
    def __init__(self, features: int, context: int, hidden: Sequence[int] = (64,)):
        super().__init__((features,))
        if context < 1:
            raise ConfigError(f"context must be >= 1, got {context}")
        self.context_features = int(context)
        layers: list[nn.Module] = []
        width = context
        for h in hidden:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        last = nn.Linear(width, 2 * features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def _params(self, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if context is None:
            raise ContextError("ConditionalGaussian needs a context tensor, got None")
        loc, log_scale = self.net(context).chunk(2, dim=-1)
        return loc, log_scale.clamp(-10.0, 10.0)

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        loc, log_scale = self._params(context)
        u = (z - loc) * torch.exp(-log_scale)
        return (-0.5 * (u.square() + _LOG_2PI) - log_scale).sum(-1)

    def sample(self, shape=(), context: Tensor | None = None, generator=None) -> Tensor:
        """Samples of shape ``(*shape, *context.shape[:-1], D)``."""
        loc, log_scale = self._params(context)
        eps = self._noise(_sample_shape(shape) + tuple(loc.shape), generator)
        return loc + eps * log_scale.exp()
