"""Planar and radial flows (Rezende & Mohamed, 2015).

Both are closed-form in ``forward`` and invertible by construction of their parameters.
``Planar.inverse`` solves a 1-D monotone equation by bisection (fixed iteration count, so it
exports) and finishes with one Newton step that carries the gradient (implicit function
theorem). ``Radial.inverse`` is the positive root of a quadratic, in closed form.

For variational inference, where sampling is the hot direction, use ``Inverse(Planar(d))``
so that the closed form is the generative direction; ``Inverse(Planar(d, c))`` is the
amortised layer of a flow posterior ``q(z | x)`` whose parameters depend on a context.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._compat import renamed_kwargs
from ..errors import ConfigError, ContextError, DTypeError
from .base import Transform

__all__ = ["Planar", "Radial"]

_SHIFT = math.log(math.e - 1.0)  # softplus(_SHIFT) = 1


class Planar(Transform):
    """``y = x + u_hat * tanh(w.x + b)``; ``ladj = log|1 + u_hat . w * tanh'(w.x + b)|``.

    ``u_hat = u + (m(w.u) - w.u) w / |w|^2`` with ``m(a) = -1 + softplus(a + log(e - 1))``
    keeps ``w . u_hat > -1``, which makes the map invertible. The shift (absent from
    Rezende & Mohamed's ``m``) gives ``m(0) = 0``, so a layer with small ``u, w`` starts near
    the identity.

    With ``context_features = C > 0`` the layer is amortised: ``(u, w, b)`` are the learned
    ``(u, w, b)`` plus a linear function of the context, ``(u, w, b)(c) = theta + A c``, with
    ``A`` zero-initialised so that every context starts from the same layer.

    Args:
        features: D.
        context: C (0 = unconditional; a context passed to it is then ignored,
            as a conditional base may need one).
        bisection_steps: iterations of the inverse's bracketing search (each halves the
            bracket of width ``2|w.u_hat|``).

    Shapes: ``x`` ``(*batch, D)``, ``context`` ``(*batch, C)``, ``ladj`` ``batch``.
    """

    @renamed_kwargs(context_features="context")
    def __init__(self, features: int, context: int = 0, bisection_steps: int = 60):
        super().__init__()
        for name, value, least in (
            ("features", features, 1),
            ("context", context, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise DTypeError(f"{name} must be an int, got {value!r}")
            if value < least:
                raise ConfigError(f"{name} must be >= {least}, got {value}")
        self.features = features
        self.context_features = context
        self.u = nn.Parameter(torch.randn(features) * 0.1)
        self.w = nn.Parameter(torch.randn(features) * 0.1)
        self.b = nn.Parameter(torch.zeros(()))
        if context:
            self.amortise = nn.Linear(context, 2 * features + 1)
            nn.init.zeros_(self.amortise.weight)
            nn.init.zeros_(self.amortise.bias)
        else:
            self.amortise = None
        self.bisection_steps = int(bisection_steps)

    def _params(self, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``(u_hat, w, b)``: shapes ``(D,), (D,), ()`` or, amortised, ``(*batch, D)`` twice
        and ``batch``."""
        u, w, b = self.u, self.w, self.b
        if self.amortise is not None:
            if context is None:
                raise ContextError(
                    f"this planar layer needs a context of shape (*batch, "
                    f"{self.context_features}), got None"
                )
            if context.shape[-1:] != (self.context_features,):
                raise ContextError(
                    f"context must have shape (*batch, {self.context_features}), "
                    f"got {tuple(context.shape)}"
                )
            d = self.features
            out = self.amortise(context)
            u, w, b = u + out[..., :d], w + out[..., d : 2 * d], b + out[..., 2 * d]
        wu = (w * u).sum(-1, keepdim=True)
        ww = (w * w).sum(-1, keepdim=True).clamp_min(1e-12)
        # with the paper's unshifted m, m(0) = -0.31: each fresh layer contracts along w by
        # 0.69, a 32-layer stack starts at det ~ 1e-5, and reverse-KL VI then collapses onto
        # one mode of a bimodal target (measured on U1, docs/guide/vi.md)
        u_hat = u + (F.softplus(wu + _SHIFT) - 1.0 - wu) * w / ww
        return u_hat, w, b

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u, w, b = self._params(context)
        h = torch.tanh((x * w).sum(-1) + b)
        y = x + u * h.unsqueeze(-1)
        ladj = torch.log1p((1.0 - h.square()) * (w * u).sum(-1))
        return y, ladj

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        u, w, b = self._params(context)
        wu = (w * u).sum(-1)
        wy = (z * w).sum(-1)

        # alpha = w.x solves g(alpha) = alpha + wu * tanh(alpha + b) - w.y = 0, g increasing;
        # |tanh| <= 1 brackets the root in [w.y - |wu|, w.y + |wu|].
        def g(alpha: Tensor) -> Tensor:
            return alpha + wu * torch.tanh(alpha + b) - wy

        with torch.no_grad():
            lo = wy - wu.abs() - 1e-12
            hi = wy + wu.abs() + 1e-12
            for _ in range(self.bisection_steps):
                mid = 0.5 * (lo + hi)
                above = g(mid) > 0
                hi = torch.where(above, mid, hi)
                lo = torch.where(above, lo, mid)
            alpha0 = 0.5 * (lo + hi)
        # one Newton step from the (detached) root: exact value to first order, and its
        # derivative gives the implicit-function gradient w.r.t. z and the parameters
        dg = 1.0 + wu * (1.0 - torch.tanh(alpha0 + b).square())
        alpha = alpha0 - g(alpha0) / dg
        h = torch.tanh(alpha + b)
        x = z - u * h.unsqueeze(-1)
        ladj = -torch.log1p((1.0 - h.square()) * wu)
        return x, ladj


class Radial(Transform):
    """``y = x + beta * (x - x0) / (alpha + r)``, ``r = |x - x0|``, ``alpha > 0``, ``beta > -alpha``.

    ``ladj = (D - 1) log(1 + beta h) + log(1 + beta h - beta r h^2)``, ``h = 1 / (alpha + r)``.
    """

    def __init__(self, features: int):
        super().__init__()
        self.features = int(features)
        self.x0 = nn.Parameter(torch.randn(features) * 0.1)
        self.raw_alpha = nn.Parameter(torch.zeros(()))
        self.raw_beta = nn.Parameter(torch.zeros(()))

    def _alpha_beta(self) -> tuple[Tensor, Tensor]:
        alpha = F.softplus(self.raw_alpha)
        beta = -alpha + F.softplus(self.raw_beta)
        return alpha, beta

    def _ladj(self, r: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
        h = 1.0 / (alpha + r)
        return (self.features - 1) * torch.log1p(beta * h) + torch.log1p(
            beta * h - beta * r * h * h
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        alpha, beta = self._alpha_beta()
        diff = x - self.x0
        r = diff.norm(dim=-1)
        y = x + (beta / (alpha + r)).unsqueeze(-1) * diff
        return y, self._ladj(r, alpha, beta)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        alpha, beta = self._alpha_beta()
        diff = z - self.x0
        ry = diff.norm(dim=-1)
        # r solves r^2 + (alpha + beta - ry) r - alpha ry = 0; take the positive root in the
        # form that avoids cancellation for either sign of c = alpha + beta - ry
        c = alpha + beta - ry
        disc = torch.sqrt(c.square() + 4.0 * alpha * ry)
        r = torch.where(c > 0, 2.0 * alpha * ry / (c + disc), 0.5 * (disc - c))
        x = self.x0 + diff / (1.0 + beta / (alpha + r)).unsqueeze(-1)
        return x, -self._ladj(r, alpha, beta)
