"""Image flow builders: Glow (Kingma & Dhariwal, 2018) and multi-scale RealNVP (Dinh et al.,
2017) on ``(C, H, W)`` events.

Both are multi-scale: at every level but the last, half of the channels leave the flow
through a :class:`~exactflow.transforms.image.FactorOut` (which keeps the event shape, see
:mod:`exactflow.transforms.image`), so the base is a
:class:`~exactflow.distributions.StandardNormal` over the full ``(C, H, W)`` and
``flow.sample(n, temperature=T)`` samples every level at temperature ``T``.

The models work in logit space; :func:`exactflow.models.image.pixel_flow` prepends
dequantisation and the logit pre-processing so that ``log_prob`` and bits/dim are in pixel
space. Built with ``dequantization="variational"`` they are :class:`ImageFlow` objects whose
``with_preprocessing`` hook (used by ``exactflow train``) puts a variational dequantiser in
front of the data set's logit pre-processing, so the CLI selects it through ``model_args``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._compat import builder
from ..distributions import BaseDistribution, StandardNormal
from ..errors import ConfigError, DTypeError
from ..flow import Flow
from ..transforms import Compose, Transform
from ..transforms.dequantization import DEQUANTIZATIONS, dequantizer
from ..transforms.elementwise import ElementwiseMap
from ..transforms.image import (
    ConvCoupling,
    FactorOut,
    InvConv1x1,
    LearnedPrior,
    Squeeze,
    Unsqueeze,
    image_shape,
)
from ..transforms.preprocessing import LogitPreprocess
from .coupling import check_norm, norm_layer

__all__ = ["Glow", "ImageFlow", "RealNVPImage", "pixel_flow"]


class ImageFlow(Flow):
    """A :class:`~exactflow.Flow` on images that remembers its dequantisation choice.

    :meth:`with_preprocessing` (called by the training runner with the data set's
    pre-processing) returns ``Flow([dequantiser, pre-processing, model])``; the dequantiser
    is the identity for ``"uniform"`` and a
    :class:`~exactflow.transforms.dequantization.VariationalDequantization` for ``"variational"``,
    which needs the pre-processing's ``levels`` (discrete pixel data).
    """

    def __init__(
        self,
        transform: Transform,
        base: BaseDistribution,
        dequantization: str = "uniform",
        dequantization_args: dict | None = None,
        validate: bool = True,
    ):
        super().__init__(transform, base, validate)
        if dequantization not in DEQUANTIZATIONS:
            raise ConfigError(
                f"unknown dequantization {dequantization!r}; valid: {', '.join(DEQUANTIZATIONS)}"
            )
        if dequantization_args is not None and not isinstance(dequantization_args, dict):
            raise DTypeError(
                f"dequantization_args must be a dict, got {type(dequantization_args).__name__}"
            )
        self.dequantization = dequantization
        self.dequantization_args = dict(dequantization_args or {})

    def with_preprocessing(self, transform: Transform) -> Flow:
        """``Flow(Compose([dequantiser, transform, self.transform]), self.base)``."""
        if self.dequantization == "uniform":
            return Flow(Compose([transform, self.transform]), self.base, self.validate)
        levels = getattr(transform, "levels", None)
        if not isinstance(levels, int):
            raise ConfigError(
                "variational dequantization needs discrete pixel data (a pre-processing with "
                f"`levels`), got {type(transform).__name__}"
            )
        deq = dequantizer(self.dequantization, self.event_shape, levels, **self.dequantization_args)
        return Flow(Compose([deq, transform, self.transform]), self.base, self.validate)


def _count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_shape(shape, squeezes: int, model: str) -> tuple[int, int, int]:
    c, h, w = image_shape(shape)
    f = 2**squeezes
    if h % f or w % f:
        raise ConfigError(
            f"{model} with these levels squeezes the image {squeezes} time(s): height and "
            f"width must be divisible by {f}, got shape {(c, h, w)}; use fewer levels"
        )
    return c, h, w


def _keep_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Shape of the part of ``shape`` that stays in the flow after a :class:`FactorOut`."""
    c, h, w = shape
    return (c - c // 2, h, w)


def _map_kwargs(map: str | ElementwiseMap, map_kwargs: dict | None, log_scale_bound: float) -> dict:
    """Constructor arguments of the couplings' map: ``map_kwargs``, plus the builder's
    ``log_scale_bound`` for the affine map unless ``map_kwargs`` sets it."""
    if map_kwargs is None:
        map_kwargs = {}
    if not isinstance(map_kwargs, dict):
        raise DTypeError(f"map_kwargs must be a dict, got {type(map_kwargs).__name__}")
    if map_kwargs and not isinstance(map, str):
        raise ConfigError(
            f"map_kwargs apply only when map is given by name, got a {type(map).__name__}"
        )
    if map == "affine":
        return {"log_scale_bound": log_scale_bound, **map_kwargs}
    return dict(map_kwargs)


# the image builders' old names: the vector builders' vocabulary is the one kept
_IMAGE_RENAMES = {
    "hidden_channels": "hidden",
    "coupling": "map",
    "coupling_args": "map_kwargs",
}


@builder(depth="transforms", **_IMAGE_RENAMES)
def Glow(
    shape: Sequence[int] = (1, 28, 28),
    *,
    levels: int = 2,
    transforms: int = 8,
    hidden: int = 64,
    context: int = 0,
    map: str | ElementwiseMap = "affine",
    map_kwargs: dict | None = None,
    lu: bool = True,
    log_scale_bound: float = 3.0,
    norm: str | None = "actnorm",
    split_prior: str = "gaussian",
    learn_top: bool = True,
    dequantization: str = "uniform",
    dequantization_args: dict | None = None,
) -> ImageFlow:
    """Glow: ``levels`` x (squeeze, ``transforms`` x [ActNorm, 1x1 conv, coupling], split).

    Each step is per-channel :class:`~exactflow.transforms.ActNorm`, an invertible 1x1
    convolution (LU-parameterised by default) and an affine coupling over a channel split
    with a zero-initialised conv net. Every level but the last factors out half of the
    channels with a learned Gaussian prior conditioned on the other half; the last level
    ends with a learned (class-conditional with ``context``) top prior.

    Args:
        shape: image shape ``(C, H, W)``; ``H`` and ``W`` divisible by ``2**levels``.
        levels: number of levels L (one squeeze each).
        transforms: steps per level K (was ``depth=``, deprecated).
        hidden: channels of every coupling net (was ``hidden_channels=``, deprecated).
        context: context size, e.g. the number of classes for one-hot class conditioning
            (0 = unconditional). It feeds every coupling net and every prior.
        map: the coupling's elementwise map (name or instance; ``"affine"``,
            ``"additive"``, spline names ...); was ``coupling=`` (deprecated).
        map_kwargs: keyword arguments of a map given by name, e.g. ``{"bins": 4}`` for
            ``map="rq-spline"`` (a TOML ``[model_args]`` table can set both); was
            ``coupling_args=`` (deprecated).
        lu: LU-parameterised 1x1 convolutions (else dense with ``slogdet``).
        log_scale_bound: soft bound of the affine couplings' log-scale.
        norm: the normalisation opening each step: ``"actnorm"`` (Glow), ``"batchnorm"``
            or ``None`` (see :func:`~exactflow.models.coupling.norm_layer`).
        split_prior: ``"gaussian"`` (learned, Glow) or ``"standard"`` (N(0, I)).
        learn_top: learn the top-level prior (always on with a context).
        dequantization: ``"uniform"`` or ``"variational"``, applied when the model is put
            behind pixel pre-processing (:meth:`ImageFlow.with_preprocessing`).
        dequantization_args: options of the variational dequantiser (``depth``,
            ``hidden_channels``, ``bins``).

    Returns an :class:`ImageFlow` with a ``StandardNormal(shape)`` base.
    """
    levels = _count(levels, "levels")
    transforms = _count(transforms, "transforms")
    hidden = _count(hidden, "hidden")
    context = _count(context, "context", 0)
    check_norm(norm)
    shape = _check_shape(shape, levels, "Glow")
    kwargs = _map_kwargs(map, map_kwargs, log_scale_bound)

    def level(s_in: tuple[int, int, int], i: int) -> Transform:
        sq = Squeeze(s_in)
        s = sq.out_shape
        layers: list[Transform] = [sq]
        for _ in range(transforms):
            if (n := norm_layer(norm, s)) is not None:
                layers.append(n)
            layers += [
                InvConv1x1(s[0], lu=lu),
                ConvCoupling(s, "channel", False, hidden, context, map, kwargs),
            ]
        if i == levels - 1:
            if learn_top or context:
                layers.append(LearnedPrior(s, context))
        else:
            inner = level(_keep_shape(s), i + 1)
            layers.append(FactorOut(s, inner, split_prior, context))
        layers.append(Unsqueeze(s))
        return Compose(layers)

    return ImageFlow(level(shape, 0), StandardNormal(shape), dequantization, dequantization_args)


def _norm_from_actnorm(on: bool) -> str | None:
    return "actnorm" if on else None


@builder(
    couplings="transforms",
    prior="split_prior",
    actnorm=("norm", _norm_from_actnorm),
    **_IMAGE_RENAMES,
)
def RealNVPImage(
    shape: Sequence[int] = (1, 28, 28),
    *,
    levels: int = 2,
    transforms: int = 3,
    hidden: int = 64,
    context: int = 0,
    map: str | ElementwiseMap = "affine",
    map_kwargs: dict | None = None,
    log_scale_bound: float = 3.0,
    norm: str | None = "actnorm",
    split_prior: str = "standard",
    dequantization: str = "uniform",
    dequantization_args: dict | None = None,
) -> ImageFlow:
    """Multi-scale RealNVP: per level, checkerboard couplings, squeeze, channel couplings,
    factor out half; the last level is ``transforms + 1`` checkerboard couplings.

    Masks alternate (``flip``) from one coupling to the next. The paper's batch norm is
    replaced by default by per-channel :class:`~exactflow.transforms.ActNorm` before each
    coupling (``norm="actnorm"``), which needs no running statistics and samples in train
    mode too.

    Args:
        shape: image shape ``(C, H, W)``; ``H`` and ``W`` divisible by ``2**(levels - 1)``.
        levels: number of scales (``levels - 1`` squeezes and factor-outs).
        transforms: couplings per mask type and level (was ``couplings=``, deprecated).
        hidden: channels of every coupling net (was ``hidden_channels=``, deprecated).
        context: context size (class conditioning; 0 = unconditional).
        map, map_kwargs: the couplings' elementwise map and its arguments, as in
            :func:`Glow`.
        log_scale_bound: soft bound of the affine log-scale.
        norm: the normalisation before every coupling: ``"actnorm"``, ``"batchnorm"`` (the
            paper's) or ``None``; replaces ``actnorm=True/False`` (deprecated).
        split_prior: factored-out prior, ``"standard"`` (the paper's N(0, I)) or
            ``"gaussian"`` (learned, conditional, as in Glow); was ``prior=`` (deprecated).
        dequantization, dequantization_args: as in :func:`Glow`.

    Returns an :class:`ImageFlow` with a ``StandardNormal(shape)`` base.
    """
    levels = _count(levels, "levels")
    transforms = _count(transforms, "transforms")
    hidden = _count(hidden, "hidden")
    context = _count(context, "context", 0)
    check_norm(norm)
    shape = _check_shape(shape, levels - 1, "RealNVPImage")
    kwargs = _map_kwargs(map, map_kwargs, log_scale_bound)

    def stack(s: tuple[int, int, int], mask: str, n: int) -> list[Transform]:
        out: list[Transform] = []
        for j in range(n):
            if (layer := norm_layer(norm, s)) is not None:
                out.append(layer)
            out.append(ConvCoupling(s, mask, j % 2 == 1, hidden, context, map, kwargs))
        return out

    def level(s: tuple[int, int, int], i: int) -> Transform:
        if i == levels - 1:
            return Compose(stack(s, "checkerboard", transforms + 1))
        sq = Squeeze(s)
        t = sq.out_shape
        inner = level(_keep_shape(t), i + 1)
        return Compose(
            [
                *stack(s, "checkerboard", transforms),
                sq,
                *stack(t, "channel", transforms),
                FactorOut(t, inner, split_prior, context if split_prior == "gaussian" else 0),
                Unsqueeze(t),
            ]
        )

    return ImageFlow(level(shape, 0), StandardNormal(shape), dequantization, dequantization_args)


def pixel_flow(
    model: Flow, levels: int, dequantization: str = "uniform", alpha: float = 0.05, **kwargs
) -> Flow:
    """An image model in logit space as a flow on dequantised pixels ``y = x + v`` in [0, K).

    ``transform = [dequantizer, logit pre-processing, model.transform]``, same base, so
    ``log_prob(x + v)`` is the (variational) lower bound on ``log P(x)`` in pixel space and
    ``bits/dim = -log_prob / (D ln 2)``; feed it uniformly dequantised pixels
    (:func:`exactflow.data.dequantize`). ``kwargs`` configure the variational dequantiser.

    Args:
        model: a flow on ``(C, H, W)`` events (e.g. :func:`exactflow.models.Glow`).
        levels: number of pixel levels K (256 for 8-bit images, 17 for sklearn digits).
        dequantization: ``"uniform"`` or ``"variational"``.
        alpha: logit boundary margin.
    """
    if not isinstance(model, Flow):
        raise DTypeError(f"model must be an exactflow Flow, got {type(model).__name__}")
    shape = image_shape(model.event_shape)
    deq = dequantizer(dequantization, shape, levels, **kwargs)
    logit = LogitPreprocess(levels, alpha, event_dim=3)
    return Flow(Compose([deq, logit, model.transform]), model.base, validate=model.validate)
