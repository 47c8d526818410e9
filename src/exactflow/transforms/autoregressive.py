"""Autoregressive layers driven by a MADE conditioner (MAF, IAF, autoregressive splines).

``Autoregressive`` maps data to noise elementwise with parameters from the preceding
variables in a fixed ordering,

    z_i = tau(x_i; theta_i(x_{<i}, context)),    log|det dz/dx| = sum_i log tau'(x_i),

so ``forward`` (density, the MAF direction) is ONE MADE pass, while ``inverse`` (sampling)
needs D sequential passes: pass k fixes the k-th variable in the ordering. The loop runs a
fixed D times (D is known at construction), so both directions trace and export.

IAF is ``Inverse(Autoregressive(...))``: one pass to sample, D passes to evaluate a density.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._compat import renamed_kwargs
from ..errors import ShapeError
from ..nets import MADE
from .base import Transform
from .elementwise import ElementwiseMap, resolve_map

__all__ = ["Autoregressive"]


class Autoregressive(Transform):
    """Masked autoregressive layer ``z_i = tau(x_i; MADE(x)_i)``.

    Args:
        map: an :class:`~exactflow.transforms.ElementwiseMap` or a registered name
            (``"affine"`` gives MAF, ``"rq-spline"`` the autoregressive neural spline flow).
        features: D.
        hidden: MADE hidden widths.
        context: context size (0 = unconditional).
        order: autoregressive ordering, a permutation of ``range(D)`` (default identity).
        activation: MADE activation.
        map_kwargs: keyword arguments for the map when it is given by name.

    Shapes: ``x`` ``(*batch, D)``, ``context`` ``(*batch, context_features)``; ``ladj``
    ``batch``. ``forward`` costs one MADE pass, ``inverse`` D passes.
    """

    @renamed_kwargs(context_features="context")
    def __init__(
        self,
        map: str | ElementwiseMap,
        features: int,
        hidden: Sequence[int] | int = (128, 128),
        context: int = 0,
        order: Sequence[int] | Tensor | None = None,
        activation: str | Callable[[], nn.Module] = "relu",
        map_kwargs: dict | None = None,
    ):
        super().__init__()
        self.map = resolve_map(map, **(map_kwargs or {}))
        self.made = MADE(
            features,
            hidden,
            out_per_feature=self.map.num_params,
            context=context,
            order=order,
            activation=activation,
        )
        self.features = self.made.features
        self.context_features = self.made.context_features
        self.event_dim = 1

    def _check(self, x: Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.features:
            raise ShapeError(
                f"expected input of shape (*batch, {self.features}), got {tuple(x.shape)}"
            )

    def _params(self, x: Tensor, context: Tensor | None) -> Tensor:
        return self.made(x, context if self.context_features else None)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        z, logd = self.map.forward(x, self._params(x, context))
        return z, logd.sum(-1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z)
        context = context if self.context_features else None
        if self.context_features:
            self.made(z, context)  # validates the context once (a cheap full pass)
        d, p = self.features, self.map.num_params
        w, b = self.made.output_layer()
        w, b = w.unflatten(0, (d, p)), b.unflatten(0, (d, p))
        # pass k solves only the feature at position k of the ordering: its parameters depend
        # on x_{<k}, all exact by then, so only its P output rows of MADE are computed and
        # the map runs on one column (the hidden layers still see the whole x)
        positions = torch.argsort(self.made.order)
        columns = torch.arange(d, device=z.device)
        x = torch.zeros_like(z)
        logd = torch.zeros_like(z[..., 0])
        for k in range(d):
            i = positions[k : k + 1]
            h = self.made.hidden(x, context)
            params = F.linear(h, w.index_select(0, i)[0], b.index_select(0, i)[0])
            x_i, logd_i = self.map.inverse(z.index_select(-1, i)[..., 0], params)
            x = torch.where(columns == i, x_i.unsqueeze(-1), x)
            logd = logd + logd_i
        return x, logd

    def extra_repr(self) -> str:
        return (
            f"map={self.map!r}, features={self.features}, context_features={self.context_features}"
        )
