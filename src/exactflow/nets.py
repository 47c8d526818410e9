"""Conditioner networks: plain MLP, residual MLP and MADE (masked autoregressive MLP).

Every network here zero-initialises its output layer, so the parameters it hands to an
:class:`~exactflow.transforms.ElementwiseMap` start at zero and every flow starts at the
identity. All take an optional ``context`` of shape ``(*batch, context)`` next to the input
``(*batch, in_features)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, ContextError, DTypeError, ShapeError

__all__ = ["MADE", "MLP", "ResidualMLP", "made_degrees"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}


def _activation(spec: str | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A zero-argument factory of activation modules from a name or a module class."""
    if isinstance(spec, str):
        if spec not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {spec!r}; valid names: {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[spec]
    if callable(spec):
        return spec
    raise DTypeError(f"activation must be a name or a module factory, got {type(spec).__name__}")


def _count(value, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _widths(hidden) -> tuple[int, ...]:
    if isinstance(hidden, int):
        hidden = (hidden,)
    if not isinstance(hidden, Sequence):
        raise DTypeError(
            f"hidden must be an int or a sequence of ints, got {type(hidden).__name__}"
        )
    return tuple(_count(h, "each hidden width", 1) for h in hidden)


def _dense(n_in: int, n_out: int, zero: bool = False) -> nn.Linear:
    # nn.Linear warns when initialising a (n_out, 0) weight; an empty conditioning
    # set is legitimate (1-D coupling driven by context alone), so silence that case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        layer = nn.Linear(n_in, n_out)
    if zero:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return layer


def _join(x: Tensor, context: Tensor | None, context_features: int) -> Tensor:
    if context_features == 0:
        if context is not None:
            raise ContextError("this network is unconditional but a context was given")
        return x
    if context is None:
        raise ContextError(f"this network needs a context of size {context_features}, got None")
    if context.shape[-1] != context_features:
        raise ShapeError(
            f"context must have shape (*batch, {context_features}), got {tuple(context.shape)}"
        )
    return torch.cat([x, context], dim=-1)


class MLP(nn.Module):
    """Fully connected network ``[x, context] -> out`` with a zero-initialised output layer.

    Args:
        in_features: input size (may be 0 when only the context drives the output).
        out_features: output size.
        hidden: hidden widths, e.g. ``(128, 128)``.
        context: context size concatenated to the input (0 = none).
        activation: a name (``"relu"``, ``"elu"``, ``"gelu"``, ``"silu"``, ``"tanh"``,
            ``"leaky_relu"``) or a module factory.
        zero_init: zero the output layer (so conditioners start at the identity map).

    Shapes: ``x`` ``(*batch, in_features)``, ``context`` ``(*batch, context)`` ->
    ``(*batch, out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] | int = (128, 128),
        context: int = 0,
        activation: str | Callable[[], nn.Module] = "relu",
        zero_init: bool = True,
    ):
        super().__init__()
        self.in_features = _count(in_features, "in_features")
        self.out_features = _count(out_features, "out_features", 1)
        self.context_features = _count(context, "context")
        act = _activation(activation)
        layers: list[nn.Module] = []
        width = self.in_features + self.context_features
        for h in _widths(hidden):
            layers += [_dense(width, h), act()]
            width = h
        layers.append(_dense(width, self.out_features, zero=zero_init))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``(*batch, in_features)`` (+ context ``(*batch, context)``) -> ``(*batch, out_features)``."""
        return self.net(_join(x, context, self.context_features))


class _ResidualBlock(nn.Module):
    """``h + W2 act(W1 act(h))``; ``W2`` starts at zero so the block starts as the identity."""

    def __init__(self, width: int, act: Callable[[], nn.Module], dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            act(),
            nn.Linear(width, width),
            act(),
            nn.Dropout(dropout),
            _dense(width, width, zero=True),
        )

    def forward(self, h: Tensor) -> Tensor:
        return h + self.body(h)


class ResidualMLP(nn.Module):
    """MLP with pre-activation residual blocks of constant width and a zero output layer.

    Args:
        in_features, out_features: input and output sizes.
        hidden: width of every block.
        blocks: number of residual blocks.
        context: context size concatenated to the input (0 = none).
        activation: as in :class:`MLP`.
        dropout: dropout probability inside each block.

    Shapes as in :class:`MLP`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 128,
        blocks: int = 2,
        context: int = 0,
        activation: str | Callable[[], nn.Module] = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.in_features = _count(in_features, "in_features")
        self.out_features = _count(out_features, "out_features", 1)
        self.context_features = _count(context, "context")
        hidden = _count(hidden, "hidden", 1)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        act = _activation(activation)
        self.inp = _dense(self.in_features + self.context_features, hidden)
        self.blocks = nn.Sequential(
            *[_ResidualBlock(hidden, act, dropout) for _ in range(_count(blocks, "blocks"))]
        )
        self.out = nn.Sequential(act(), _dense(hidden, self.out_features, zero=True))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``(*batch, in_features)`` (+ context ``(*batch, context)``) -> ``(*batch, out_features)``."""
        h = self.inp(_join(x, context, self.context_features))
        return self.out(self.blocks(h))


def made_degrees(
    order: Tensor, hidden: Sequence[int], with_context: bool
) -> tuple[Tensor, list[Tensor]]:
    """Degrees of MADE's input and hidden units (Germain et al., 2015).

    Input ``i`` has degree ``order[i] + 1`` (1..D). Hidden units get degrees cyclically in
    ``[m, D - 1]`` with ``m = 0`` when a context is present (degree-0 units see only the
    context, so the first variable in the ordering is still context-dependent) and ``m = 1``
    otherwise. A hidden unit of degree ``k`` sees inputs of degree ``<= k``; output ``i``
    sees hidden units of degree ``< order[i] + 1``.

    Returns:
        ``(input_degrees (D,), [hidden_degrees (H_l,) for each layer])``.
    """
    d = order.numel()
    low = 0 if with_context else 1
    high = max(d - 1, low)
    span = high - low + 1
    degrees_in = order.long() + 1
    degrees_hidden = [low + torch.arange(h) % span for h in hidden]
    return degrees_in, degrees_hidden


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation: an autoregressive MLP.

    Output block ``i`` (``num_params`` values for feature ``i``) depends only on the inputs
    ``j`` with ``order[j] < order[i]`` and on the context, which enters every hidden layer
    unmasked. The output layer is ONE masked matmul producing all ``D * out_per_feature``
    values at once, returned as ``(*batch, D, out_per_feature)``: from D = 8 on a view whose
    memory is parameter-major (each parameter of all D features contiguous); it is
    zero-initialised.
    The weights stay feature-major (row ``i * P + p``), so checkpoints keep their meaning.

    Args:
        features: D.
        hidden: hidden widths (each should be >= D - 1 so that no dependency is lost).
        out_per_feature: P, the number of outputs per feature.
        context: context size (0 = none).
        order: a permutation of ``range(D)``: ``order[i]`` is feature ``i``'s position in
            the autoregressive ordering (default ``0..D-1``).
        activation: as in :class:`MLP`.

    Shapes: ``x`` ``(*batch, D)``, ``context`` ``(*batch, context)`` -> ``(*batch, D, P)``.
    """

    def __init__(
        self,
        features: int,
        hidden: Sequence[int] | int = (128, 128),
        out_per_feature: int = 2,
        context: int = 0,
        order: Sequence[int] | Tensor | None = None,
        activation: str | Callable[[], nn.Module] = "relu",
    ):
        super().__init__()
        self.features = d = _count(features, "features", 1)
        self.out_per_feature = p = _count(out_per_feature, "out_per_feature", 1)
        self.context_features = _count(context, "context")
        hidden = _widths(hidden)
        if not hidden:
            raise ConfigError("MADE needs at least one hidden layer")
        order = torch.arange(d) if order is None else torch.as_tensor(order).long()
        if order.dim() != 1 or sorted(order.tolist()) != list(range(d)):
            raise ConfigError(f"order must be a permutation of range({d}), got {order.tolist()}")
        self.register_buffer("order", order)
        deg_in, deg_hidden = made_degrees(order, hidden, self.context_features > 0)

        self.act = _activation(activation)()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        masks = []
        prev_deg, prev_width = deg_in, d
        for deg, h in zip(deg_hidden, hidden, strict=True):
            layer = _dense(prev_width, h)
            self.weights.append(layer.weight)
            self.biases.append(layer.bias)
            masks.append(deg[:, None] >= prev_deg[None, :])
            prev_deg, prev_width = deg, h
        # rows ordered feature-major (i * P + p) so the output views as (..., D, P)
        out_deg = deg_in.repeat_interleave(p)
        masks.append(out_deg[:, None] > prev_deg[None, :])
        self.weights.append(nn.Parameter(torch.zeros(d * p, prev_width)))
        self.biases.append(nn.Parameter(torch.zeros(d * p)))
        for i, m in enumerate(masks):
            self.register_buffer(f"mask{i}", m.to(torch.get_default_dtype()))
        # From 8 features on, forward computes the output rows parameter-major (p * D + i):
        # the maps then read each parameter (a spline's bin logits, an affine shift) as a
        # contiguous slab of D values. Narrower slabs do not vectorise: below 8 the
        # feature-major rows are faster, eagerly and (by far) under torch.compile.
        self.param_major = d >= 8
        rows = torch.arange(d * p).reshape(d, p).t().reshape(-1)
        self.register_buffer("row_order", rows, persistent=False)
        self.n_layers = len(masks)
        if self.context_features:
            bound = 1.0 / math.sqrt(self.context_features)
            self.context_in = nn.Parameter(
                torch.empty(hidden[0], self.context_features).uniform_(-bound, bound)
            )
            # later hidden layers also read the context so that it reaches every hidden unit
            self.context_hidden = nn.ParameterList(
                nn.Parameter(torch.empty(h, self.context_features).uniform_(-bound, bound))
                for h in hidden[1:]
            )

    def _mask(self, i: int) -> Tensor:
        return getattr(self, f"mask{i}")

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``(*batch, D)`` (+ context ``(*batch, context)``) -> ``(*batch, D, P)``; output ``i``
        depends only on the inputs before ``i`` in :attr:`order`."""
        if x.shape[-1] != self.features:
            raise ShapeError(
                f"MADE expects x of shape (*batch, {self.features}), got {tuple(x.shape)}"
            )
        if self.context_features:
            _join(x, context, self.context_features)  # validates presence and size
        elif context is not None:
            raise ContextError("this MADE is unconditional but a context was given")
        w, b = self.output_layer()
        if not self.param_major:
            h = F.linear(self.hidden(x, context), w, b)
            return h.unflatten(-1, (self.features, self.out_per_feature))
        w, b = w.index_select(0, self.row_order), b.index_select(0, self.row_order)
        h = F.linear(self.hidden(x, context), w, b)
        return h.unflatten(-1, (self.out_per_feature, self.features)).transpose(-1, -2)

    def _masked(self, i: int) -> Tensor:
        # where, not a product: a masked position's gradient can overflow to inf when the
        # inputs are huge, and inf * 0 would put NaN into the weights' gradient
        return torch.where(self._mask(i) != 0, self.weights[i], 0.0)

    def hidden(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Last hidden layer's activations ``(*batch, H)`` (inputs not re-validated)."""
        h = x
        for i in range(self.n_layers - 1):
            h = F.linear(h, self._masked(i), self.biases[i])
            if self.context_features:
                cw = self.context_in if i == 0 else self.context_hidden[i - 1]
                h = h + F.linear(context, cw)
            h = self.act(h)
        return h

    def output_layer(self) -> tuple[Tensor, Tensor]:
        """Masked output weight ``(D * P, H)`` and bias ``(D * P,)``, rows feature-major, so
        rows ``i * P ... i * P + P - 1`` give feature ``i``'s parameters from :meth:`hidden`."""
        last = self.n_layers - 1
        return self._masked(last), self.biases[last]
