"""Registry of transform test cases: register a transform here (one line) and the contract
test (tests/test_contract.py) certifies it and its inverse: shapes, round trip, log-det vs.
autograd Jacobian, gradients, dtypes, context and save/load.

A case's ``build(shape, context_features)`` returns a fresh transform for event ``shape``;
``context=True`` means it accepts a context (it is then also built and tested with one);
``unconditional=False`` means it needs one (it is then tested only with one).

tests/test_completeness.py fails for any shipped Transform subclass that no case here builds
(it lists the exempt ones, e.g. abstract bases, with their reasons).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..continuous import CNF, TimeMLP
from ..errors import ConfigError
from ..export import FixedStepCNF
from ..transforms import (
    Affine,
    AffineMap,
    Compose,
    CubicSpline,
    ElementwiseTransform,
    Inverse,
    Linear,
    Logit,
    LULinear,
    Planar,
    Radial,
    RandomPermutation,
    RationalQuadraticSpline,
    Reverse,
    Sigmoid,
    Tanh,
)
from ..transforms.autoregressive import Autoregressive
from ..transforms.base import Transform
from ..transforms.coupling import Coupling, alternating_mask, checkerboard_mask
from ..transforms.dequantization import VariationalDequantization
from ..transforms.image import (
    ConvCoupling,
    FactorOut,
    FrozenConv1x1,
    InvConv1x1,
    LearnedPrior,
    Squeeze,
    Unsqueeze,
)
from ..transforms.linear import FrozenLinear, Permutation
from ..transforms.normalization import ActNorm, BatchNormFlow
from ..transforms.preprocessing import LogitPreprocess, Whiten
from ..vae import AmortisedPlanar

VECTOR_SHAPES: tuple[tuple[int, ...], ...] = ((1,), (2,), (5,), (16,))


@dataclass(frozen=True)
class Case:
    """One registered transform.

    Attributes:
        name: readable test id.
        build: ``(event_shape, context_features) -> Transform``.
        domain: input domain for test data: ``real``, ``unit`` (0, 1) or ``ball`` (-1, 1).
        context: whether the transform takes a context.
        unconditional: whether it also works without one (tested with ``context = 0``).
        shapes: event shapes to test.
        roundtrip_tol: round-trip tolerance (float64).
        ladj_tol: log-det tolerance (float64).
        perturb: std of the noise added to every parameter before testing, so that
            identity-initialised layers are tested away from the identity.
    """

    name: str
    build: Callable[[tuple[int, ...], int], Transform]
    domain: str = "real"
    context: bool = False
    unconditional: bool = True
    shapes: tuple[tuple[int, ...], ...] = VECTOR_SHAPES
    roundtrip_tol: float = 1e-10
    ladj_tol: float = 1e-8
    perturb: float = 0.3


CASES: list[Case] = [
    Case("affine-fixed", lambda s, c: Affine(0.5, -2.0, event_dim=1)),
    Case(
        "affine-learnable",
        lambda s, c: Affine(0.3 + 0.0 * _z(s), 1.5 + 0.0 * _z(s), learnable=True),
    ),
    Case(
        "elementwise-affine-map", lambda s, c: ElementwiseTransform(AffineMap(), s, init_scale=0.5)
    ),
    Case("sigmoid", lambda s, c: Sigmoid()),
    Case("logit", lambda s, c: Logit(), domain="unit"),
    Case("tanh", lambda s, c: Tanh()),
    Case("linear-dense", lambda s, c: Linear(s[0])),
    Case("lu-linear", lambda s, c: LULinear(s[0])),
    Case("reverse", lambda s, c: Reverse(s[0])),
    Case("random-permutation", lambda s, c: RandomPermutation(s[0], seed=1)),
    Case("permutation", lambda s, c: Permutation(torch.randperm(s[0]))),
    Case("planar", lambda s, c: Planar(s[0]), roundtrip_tol=1e-6),
    Case("planar-inverse", lambda s, c: Inverse(Planar(s[0])), roundtrip_tol=1e-6),
    # the VAE's amortised posterior layer, Inverse(Planar(d, c)) starting at the identity
    Case(
        "amortised-planar",
        lambda s, c: AmortisedPlanar(s[0], c),
        context=True,
        unconditional=False,
        roundtrip_tol=1e-6,
    ),
    # fixed maps: the export forms (W^-1 precomputed once in the dtype they are built in, so the
    # cases build them in float64) and the data pre-processing bijections
    Case("frozen-linear", lambda s, c: FrozenLinear(_matrix(s[0]), torch.randn(s[0]).double())),
    Case("whiten", lambda s, c: Whiten(torch.randn(s[0]), _tril(s[0]))),
    Case(
        "frozen-whiten", lambda s, c: Whiten(torch.randn(s[0]).double(), _tril(s[0])).export_form()
    ),
    Case(
        "logit-preprocess",
        lambda s, c: LogitPreprocess(2, alpha=0.05, event_dim=len(s)),  # on (0, 1) of [0, 2)
        domain="unit",
        shapes=(*VECTOR_SHAPES, (2, 3, 3)),
    ),
    Case("radial", lambda s, c: Radial(s[0]), roundtrip_tol=1e-10),
    Case(
        "compose-lu-affine", lambda s, c: Compose([LULinear(s[0]), Affine(_z(s), 1 + _z(s), True)])
    ),
    Case(
        "rq-spline",
        lambda s, c: ElementwiseTransform(RationalQuadraticSpline(bound=2.0), s, init_scale=0.5),
    ),
    Case(
        "cubic-spline", lambda s, c: ElementwiseTransform(CubicSpline(bound=2.0), s, init_scale=0.5)
    ),
    # coupling / autoregressive / normalisation layers (issue 3); small nets keep this fast
    Case(
        "coupling-additive",
        lambda s, c: Coupling("additive", alternating_mask(s[0]), (16,), c),
        context=True,
        shapes=((2,), (5,), (16,)),
    ),
    Case(
        "coupling-affine",
        lambda s, c: Coupling("affine", alternating_mask(s[0], True), (16,), c),
        context=True,
        shapes=((2,), (5,), (16,)),
    ),
    Case(
        "coupling-affine-checkerboard",
        lambda s, c: Coupling("affine", checkerboard_mask(s), (16,), c),
        context=True,
        shapes=((2, 2), (3, 4)),
    ),
    Case(
        "autoregressive-affine", lambda s, c: Autoregressive("affine", s[0], (16,), c), context=True
    ),
    Case(
        "autoregressive-affine-order",
        lambda s, c: Autoregressive(
            "affine",
            s[0],
            (16, 16),
            c,
            order=torch.randperm(s[0], generator=torch.Generator().manual_seed(3)),
        ),
        context=True,
    ),
    Case("iaf", lambda s, c: Inverse(Autoregressive("affine", s[0], (16,), c)), context=True),
    Case("actnorm", lambda s, c: ActNorm(s), shapes=(*VECTOR_SHAPES, (2, 3, 3))),
    Case("batchnorm", lambda s, c: BatchNormFlow(s), shapes=(*VECTOR_SHAPES, (2, 3, 3))),
    Case(
        "coupling-rq-spline",
        lambda s, c: Coupling(
            "rq-spline", alternating_mask(s[0]), (16,), c, map_kwargs={"bins": 4, "bound": 2.0}
        ),
        context=True,
        shapes=((2,), (5,), (16,)),
    ),
    Case(
        "coupling-cubic-spline",
        lambda s, c: Coupling(
            "cubic-spline", alternating_mask(s[0]), (16,), c, map_kwargs={"bins": 4, "bound": 2.0}
        ),
        context=True,
        shapes=((2,), (5,), (16,)),
    ),
    Case(
        "autoregressive-rq-spline",
        lambda s, c: Autoregressive(
            "rq-spline", s[0], (16,), c, map_kwargs={"bins": 4, "bound": 2.0}
        ),
        context=True,
        shapes=((1,), (2,), (5,)),  # D=16 is covered by the affine case; 16 passes are slow
    ),
    # CNF (issue 5): round trip and log-det are limited by the ODE discretisation, not by
    # float64. Adaptive dopri5 at 1e-9 keeps both <= 1e-7 (measured) for every parameter scale
    # up to 1 (the property sweep's); fixed rk4 would need ~50 steps there. t1=0.5 halves the cost
    Case(
        "cnf",
        lambda s, c: CNF(
            TimeMLP(s[0], (8,), c), trace="exact", solver="dopri5", atol=1e-9, rtol=1e-9, t1=0.5
        ),
        context=True,
        shapes=((3,),),
        roundtrip_tol=1e-6,
        ladj_tol=1e-6,
    ),
    # A fixed-step solver run backwards undoes itself only up to its discretisation error,
    # which falls ~32x per halving of the step (measured, 800 float64 draws at parameter scale
    # 1, worst round trip / ladj: 10 steps 8.1e-5 / 9.3e-5, 20 steps 2.8e-6 / 4.2e-6, 40 steps
    # 8.8e-8 / 1.4e-7). 20 steps with a 1e-5 tolerance is the documented figure for this case.
    Case(
        "cnf-fixed-step",
        lambda s, c: FixedStepCNF(TimeMLP(s[0], (8,), c), t1=0.5, steps=20, context=c),
        context=True,
        shapes=((3,),),
        roundtrip_tol=1e-5,
        ladj_tol=1e-5,
    ),
]


def _z(shape):
    return torch.zeros(shape)


def _matrix(d: int) -> torch.Tensor:
    """A random float64 ``(d, d)`` matrix with singular values in ``[0.5, 2]``: invertible,
    well conditioned, and with a log-det far from 0 (``Q diag(s) R^T``, Q and R orthogonal)."""
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    r, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(0.5, 2.0, d, dtype=torch.float64)) @ r.T


def _tril(d: int) -> torch.Tensor:
    """The float64 Cholesky factor of a random covariance ``A A^T / d + I / 2``."""
    a = torch.randn(d, d, dtype=torch.float64)
    return torch.linalg.cholesky(a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64))


def register(case: Case) -> Case:
    """Add a case (for transforms defined outside this package, e.g. in plugins or tests)."""
    if any(c.name == case.name for c in CASES):
        raise ConfigError(f"a registry case named {case.name!r} already exists")
    CASES.append(case)
    return case


def _squeezed(shape: tuple[int, ...], make) -> Transform:
    """``make(shape)`` for ``C >= 2``, else wrapped in squeeze/unsqueeze (for 1-channel cases)."""
    if shape[0] >= 2:
        return make(shape)
    sq = Squeeze(shape)
    return Compose([sq, make(sq.out_shape), Unsqueeze(sq.out_shape)])


def _image_cases(case_cls) -> list:
    """Contract-test cases of this module : net-free layers on
    ``1x4x4`` and ``3x8x8`` events, layers with conv nets on ``1x4x4`` and ``3x4x4`` (the
    contract test takes 7 brute-force Jacobians per direction; tests/test_image.py and
    tests/test_glow.py certify the net layers and whole models on ``3x8x8``)."""
    shapes = ((1, 4, 4), (3, 8, 8))
    net_shapes = ((1, 4, 4), (3, 4, 4))

    def sq_conv(s, c):
        sq = Squeeze(s)
        return Compose([sq, InvConv1x1(sq.out_shape[0]), Unsqueeze(sq.out_shape)])

    def factor_out(s, c):
        def make(s2):
            keep = (s2[0] - s2[0] // 2, *s2[1:])
            inner = ConvCoupling(keep, "checkerboard", hidden_channels=4, context=c)
            return FactorOut(s2, inner, context=c)

        return _squeezed(s, make)

    return [
        case_cls("image-squeeze-conv1x1", sq_conv, shapes=shapes),
        case_cls(
            "frozen-conv1x1",
            lambda s, c: FrozenConv1x1(_matrix(s[0])),
            shapes=((1, 2, 2), (3, 4, 4)),
        ),
        case_cls("invconv1x1-dense", lambda s, c: InvConv1x1(s[0], lu=False), shapes=shapes),
        case_cls("invconv1x1-lu", lambda s, c: InvConv1x1(s[0], lu=True), shapes=shapes),
        case_cls("actnorm-image", lambda s, c: ActNorm(s), shapes=shapes),
        case_cls(
            "conv-coupling-checkerboard",
            lambda s, c: ConvCoupling(s, "checkerboard", True, 4, c),
            context=True,
            shapes=net_shapes,
        ),
        case_cls(
            "conv-coupling-channel",
            lambda s, c: _squeezed(s, lambda s2: ConvCoupling(s2, "channel", False, 4, c)),
            context=True,
            shapes=net_shapes,
        ),
        case_cls(
            "conv-coupling-channel-flip",
            lambda s, c: _squeezed(s, lambda s2: ConvCoupling(s2, "channel", True, 4, c)),
            shapes=net_shapes,
        ),
        case_cls("factor-out", factor_out, context=True, shapes=net_shapes),
        case_cls("learned-prior", lambda s, c: LearnedPrior(s, c), context=True, shapes=shapes),
        case_cls("variational-dequantization", _dequantizer_case, shapes=net_shapes),
    ]


def _dequantizer_case(s, c) -> Transform:
    return VariationalDequantization(s, levels=4, depth=1, hidden_channels=2, bins=2)


CASES += _image_cases(Case)
