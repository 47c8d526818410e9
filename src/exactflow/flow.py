"""``Flow``: a transform plus a base distribution, with exact log-likelihood.

``log p(x | c) = log q(z | c) + log|det dz/dx|`` with ``(z, ladj) = transform(x, c)``.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, constraints, register_kl

from .distributions import BaseDistribution, ConditionalGaussian, DiagGaussian, StandardNormal
from .errors import ConfigError, ContextError, DataError, DomainError, DTypeError, ShapeError
from .transforms.base import Transform
from .validation import (
    as_tensor,
    check_count,
    check_positive_finite,
    check_sample_shape,
    check_seed,
)

__all__ = ["ContextStandardizer", "DeclaresPenalty", "Flow", "FlowDistribution", "declared_penalty"]


def _temperature(value) -> float:
    return check_positive_finite(value, "temperature")


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


@runtime_checkable
class DeclaresPenalty(Protocol):
    """A submodule that adds a term to the training objective of any flow containing it.

    ``training_penalty()`` returns the differentiable 0-dim penalty of the module's last
    forward call (e.g. a CNF's weighted RNODE integrals), or ``None`` when that call computed
    none (eval mode, zero weights). :meth:`Flow.training_loss` calls it right after the
    forward pass, so the penalty belongs to the batch being trained on. A module opts in by
    defining the method; the flow layer never needs to know its class.
    """

    def training_penalty(self) -> Tensor | None:
        """The 0-dim penalty of the last forward call, or ``None`` when it computed none."""
        ...


def declared_penalty(module: nn.Module) -> Tensor | None:
    """``Σ m.training_penalty()`` over the submodules of ``module`` that declare one (see
    :class:`DeclaresPenalty`); ``None`` when none does or none computed a penalty."""
    total = None
    for m in module.modules():
        # looked up on the class: a method is a declaration, an attribute named alike is not
        hook = getattr(type(m), "training_penalty", None)
        if not callable(hook):
            continue
        penalty = m.training_penalty()
        if penalty is not None:
            total = penalty if total is None else total + penalty
    return total


class ContextStandardizer(nn.Module):
    """Per-column context standardisation ``c' = (c - loc) / scale``, part of a conditional flow.

    Every conditional :class:`Flow` holds one as ``flow.context_encoder``; it starts as the
    identity (``loc = 0``, ``scale = 1``) and :meth:`fit` sets it from training contexts
    (:class:`~exactflow.train.Trainer` does so for a conditional run). The flow applies it to
    every context it is given (``log_prob``, ``sample``, ``sample_and_log_prob``,
    ``training_loss``, ``distribution()``, the ONNX export), so callers always pass contexts
    in their raw units, and the statistics live in the flow's ``state_dict``: a trained model
    loads into a freshly built one. A state dict without them (a conditional model saved
    before the encoder existed) loads as the identity.

    Args:
        features: context size ``C``.
        dtype, device: of the ``loc`` and ``scale`` buffers (``(C,)``; ``.to()`` moves them).
    """

    def __init__(self, features: int, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.features = check_count(features, "features", minimum=1)
        self.register_buffer("loc", torch.zeros(self.features, dtype=dtype, device=device))
        self.register_buffer("scale", torch.ones(self.features, dtype=dtype, device=device))

    def forward(self, context: Tensor) -> Tensor:
        """``(context - loc) / scale`` for ``context`` of shape ``(*batch, C)``."""
        return (context - self.loc) / self.scale

    @torch.no_grad()
    def fit(self, context: Tensor) -> ContextStandardizer:
        """Set ``loc`` and ``scale`` to the column means and standard deviations of ``context``
        ``(N, C)`` (computed in float64); returns ``self``.

        Raises :class:`~exactflow.errors.DataError` for non-finite values and for a constant
        column (its standard deviation is zero; the error names the column index: drop it,
        it carries no information), :class:`~exactflow.errors.ContextError` for a wrong width.
        """
        if not isinstance(context, Tensor):
            raise DTypeError(f"context must be a tensor (N, C), got {type(context).__name__}")
        if context.dim() != 2 or context.shape[1] != self.features:
            raise ContextError(
                f"context must have shape (N, {self.features}), got "
                f"{_shape_str(tuple(context.shape))}"
            )
        c = context.detach().to("cpu", torch.float64)
        bad = ~torch.isfinite(c)
        if bool(bad.any()):
            row, col = (int(v) for v in bad.nonzero()[0])
            raise DataError(
                f"context contains {int(bad.sum())} non-finite value(s) (NaN or inf), the "
                f"first at row {row}, column {col}"
            )
        constant = (c.amax(0) == c.amin(0)).nonzero().flatten().tolist()
        if constant:
            shown = ", ".join(f"{i} (= {float(c[0, i]):g})" for i in constant[:8])
            raise DataError(
                f"context column(s) {shown} are constant over the {c.shape[0]} training "
                "row(s): standardisation would divide by a zero standard deviation; drop "
                "the column(s), or keep the current standardisation (Trainer: "
                "standardize_context=False)"
            )
        self.loc.copy_(c.mean(0))
        self.scale.copy_(c.std(0, correction=0))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # an older conditional model has no statistics: it was trained on raw contexts
        if prefix + "loc" not in state_dict and prefix + "scale" not in state_dict:
            return
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"features={self.features}"


class Flow(nn.Module):
    """A normalizing flow ``p(x | context)``.

    Args:
        transform: the data -> noise :class:`~exactflow.transforms.Transform`.
        base: the base distribution q(z) (see :mod:`exactflow.distributions`).
        validate: check inputs (shape, dtype, finiteness, context) on every call. Shape and
            dtype checks are cheap; the finiteness check reads the data, so switch it off
            (``flow.validate = False``) in tight loops once the pipeline is trusted.
            Under ``torch.compile`` (and ``torch.export``) the value checks (finiteness)
            are skipped, since branching on a tensor's value would break the graph; the
            shape, dtype and context checks still run: they read static metadata and
            become guards of the compiled graph. Validate data eagerly once (or trust it)
            before handing it to a compiled flow.

    Shapes: ``x`` is ``(*batch, *event_shape)``, ``context`` is ``(*batch, C)`` or broadcastable
    to it (a single ``(C,)`` context applies to the whole batch); log-probs are ``batch``-shaped.

    A conditional flow standardises every context it is given with ``context_encoder``, a
    :class:`ContextStandardizer` (the identity until fitted, e.g. by the Trainer), before its
    transform and base read it; ``context_encoder`` is ``None`` for an unconditional flow.
    """

    def __init__(self, transform: Transform, base: BaseDistribution, validate: bool = True):
        super().__init__()
        if not isinstance(transform, Transform):
            raise DTypeError(
                f"transform must be an exactflow Transform, got {type(transform).__name__}"
            )
        if not isinstance(base, BaseDistribution):
            raise DTypeError(
                f"base must be an exactflow BaseDistribution, got {type(base).__name__}"
            )
        self.transform = transform
        self.base = base
        self.validate = validate
        c = self.context_features
        anchor = base._anchor
        self.context_encoder = (
            ContextStandardizer(c, anchor.dtype, anchor.device) if c > 0 else None
        )

    # -- properties -----------------------------------------------------------------------
    @property
    def event_shape(self) -> tuple[int, ...]:
        """Shape of one event, the base's ``event_shape``."""
        return self.base.event_shape

    @property
    def context_features(self) -> int:
        """Context size the flow reads (0 = unconditional)."""
        return max(self.transform.context_features, self.base.context_features)

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the flow (follows ``.to()`` / ``.double()``)."""
        return self.base._anchor.dtype

    @property
    def device(self) -> torch.device:
        """Device of the flow (follows ``.to()``)."""
        return self.base._anchor.device

    # -- validation ---------------------------------------------------------------------------
    def _as_input(self, x, name: str = "x") -> Tensor:
        if not isinstance(x, Tensor):  # lists and NumPy arrays take the flow's dtype
            x = as_tensor(x, name, self.dtype).to(self.device)
        if not self.validate:
            return x
        if not x.is_floating_point():
            raise DTypeError(
                f"{name} must be a floating-point tensor ({self.dtype}), got {x.dtype}; "
                "integer data needs dequantisation first"
            )
        if x.dtype != self.dtype:
            raise DTypeError(
                f"{name} has dtype {x.dtype} but the flow's parameters are {self.dtype}; "
                f"convert with {name}.to({self.dtype}) or flow.to({x.dtype})"
            )
        ev = self.event_shape
        if x.dim() < len(ev) or tuple(x.shape[x.dim() - len(ev) :]) != ev:
            raise ShapeError(
                f"{name} must have shape (*batch, {', '.join(map(str, ev))}) for event shape "
                f"{_shape_str(ev)}, got {_shape_str(tuple(x.shape))}"
            )
        if x.numel() == 0:
            # shape-only check; several transforms cannot reshape a batch of zero samples
            raise ShapeError(
                f"{name} has an empty batch, shape {_shape_str(tuple(x.shape))}; "
                "pass at least one sample"
            )
        # one reduction on the common path: the sum of finite values is finite unless it
        # overflows, so only a non-finite sum pays for the elementwise count; skipped when
        # compiling, where a branch on a value would split the graph
        if not torch.compiler.is_compiling() and not torch.isfinite(x.sum()):
            bad = int((~torch.isfinite(x)).sum())
            if bad:
                raise DomainError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")
        return x

    def _context(self, context, batch_shape: tuple[int, ...]) -> Tensor | None:
        c = self.context_features
        if context is None:
            if c > 0:
                raise ContextError(
                    f"this flow is conditional (context_features={c}) but no context was given"
                )
            return None
        if c == 0:
            shape = tuple(getattr(context, "shape", ()))
            raise ContextError(
                "this flow is unconditional (context_features=0) but a context of shape "
                f"{_shape_str(shape)} was given"
            )
        context = self._as_context(context)
        try:
            target = torch.broadcast_shapes(tuple(context.shape[:-1]), batch_shape)
        except RuntimeError:
            target = None
        if target != batch_shape:
            raise ShapeError(
                f"context batch shape {_shape_str(tuple(context.shape[:-1]))} does not broadcast "
                f"to the input batch shape {_shape_str(batch_shape)}"
            )
        return self.encode_context(context).expand(*batch_shape, c)

    def encode_context(self, context: Tensor | None) -> Tensor | None:
        """A raw ``(*batch, C)`` context as the transform and base read it:
        ``context_encoder(context)`` (``None`` stays ``None``; no validation)."""
        if context is None or self.context_encoder is None:
            return context
        return self.context_encoder(context)

    def _as_context(self, context) -> Tensor:
        if not isinstance(context, Tensor):
            context = as_tensor(context, "context", self.dtype).to(self.device)
        c = self.context_features
        if context.dim() < 1 or context.shape[-1] != c:
            raise ShapeError(
                f"context must have shape (*batch, {c}), got {_shape_str(tuple(context.shape))}"
            )
        if self.validate:
            if not context.is_floating_point() or context.dtype != self.dtype:
                raise DTypeError(f"context must have dtype {self.dtype}, got {context.dtype}")
            # cheap sum check first, as for x in _as_input; eager only, as there
            if torch.compiler.is_compiling():
                return context
            if not torch.isfinite(context.sum()) and not torch.isfinite(context).all():
                raise DomainError("context contains non-finite value(s) (NaN or inf)")
        return context

    def _base_context(self, context: Tensor | None) -> Tensor | None:
        return context if self.base.context_features > 0 else None

    # -- densities and samples ------------------------------------------------------------------
    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(x, context)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Exact ``log p(x | context)``, shape ``batch``."""
        x = self._as_input(x)
        batch = tuple(x.shape[: x.dim() - len(self.event_shape)])
        context = self._context(context, batch)
        z, ladj = self.transform(x, context)
        if self.validate and tuple(ladj.shape) != batch:
            raise ShapeError(
                f"transform returned ladj of shape {_shape_str(tuple(ladj.shape))}, expected the "
                f"batch shape {_shape_str(batch)}; check each transform's event_dim"
            )
        return self.base.log_prob(z, self._base_context(context)) + ladj

    def training_loss(
        self,
        x: Tensor,
        context: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The training objective on a batch, a scalar: ``-mean log p(x | c) + Σ penalties``.

        The penalties are those the submodules declare for this forward pass
        (:func:`declared_penalty`, e.g. RNODE's on a CNF). A model trained by another
        objective overrides this (flow matching regresses its velocity field). Every trainer
        minimises this one function: :class:`~exactflow.train.Trainer`, its compiled step and
        the distributed trainer.

        Args:
            x: ``(*batch, *event_shape)`` training rows.
            context: ``(*batch, C)`` or ``None``, as for :meth:`log_prob`.
            generator: randomness of objectives that draw noise (flow matching); the NLL
                draws none and ignores it.
        """
        loss = -self.log_prob(x, context).mean()
        penalty = declared_penalty(self)
        return loss if penalty is None else loss + penalty

    def _sample_setup(self, n, context) -> tuple[tuple[int, ...], Tensor | None]:
        shape = check_sample_shape(n)
        if any(s < 1 for s in shape):
            raise ShapeError(f"number of samples must be >= 1, got {_shape_str(shape)}")
        if context is None:
            if self.context_features > 0:
                raise ContextError(
                    f"this flow is conditional (context_features={self.context_features}) "
                    "but no context was given"
                )
            return shape, None
        if self.context_features == 0:
            raise ContextError(
                "this flow is unconditional (context_features=0) but a context was given"
            )
        context = self._as_context(context)
        full = shape + tuple(context.shape[:-1])
        return full, self.encode_context(context).expand(*full, self.context_features)

    def _base_sample(self, shape, context, generator, temperature: float = 1.0) -> Tensor:
        if self.base.context_features > 0:
            # a conditional base expands over the context's batch itself
            z = self.base.sample((), context, generator)
        else:
            z = self.base.sample(shape, None, generator)
        if temperature == 1.0:
            return z
        return self._temper(z, context, temperature)

    def _temper(self, z: Tensor, context: Tensor | None, temperature: float) -> Tensor:
        """Scale a Gaussian base sample's deviation from its mean by ``temperature``."""
        if isinstance(self.base, StandardNormal):
            return z * temperature
        if isinstance(self.base, DiagGaussian):
            return self.base.loc + (z - self.base.loc) * temperature
        if isinstance(self.base, ConditionalGaussian):
            loc, _ = self.base._params(context)
            return loc + (z - loc) * temperature
        raise ConfigError(
            f"temperature != 1 needs a Gaussian base (StandardNormal, DiagGaussian, "
            f"ConditionalGaussian), got {type(self.base).__name__}"
        )

    def rsample(
        self, n=1, context: Tensor | None = None, generator=None, temperature: float = 1.0
    ) -> Tensor:
        """Differentiable samples, shape ``(n, *context_batch, *event_shape)``.

        ``temperature`` T scales the base noise around its mean (``z = mu + T (z0 - mu)``,
        Glow's reduced-temperature sampling); 1 is the model itself. Gaussian bases only.
        """
        temperature = _temperature(temperature)
        shape, context = self._sample_setup(n, context)
        z = self._base_sample(shape, context, generator, temperature)
        x, _ = self.transform.inverse(z, context)
        return x

    def sample(
        self, n=1, context: Tensor | None = None, generator=None, temperature: float = 1.0
    ) -> Tensor:
        """Samples without gradient, shape ``(n, *context_batch, *event_shape)``.

        ``n`` may be an int (a NumPy integer or a 0-dim integer tensor counts; bools, floats
        and strings are refused with a ``DTypeError``) or a shape tuple; ``context`` of shape
        ``(*cb, C)`` gives ``n`` samples per context row; ``temperature`` as in :meth:`rsample`.
        """
        with torch.no_grad():
            return self.rsample(n, context, generator, temperature)

    def sample_and_log_prob(
        self, n=1, context: Tensor | None = None, generator=None
    ) -> tuple[Tensor, Tensor]:
        """Reparameterised samples and their exact log-density in one inverse pass.

        ``log p(x) = log q(z) - log|det dx/dz|``; differentiable (for variational inference).
        """
        shape, context = self._sample_setup(n, context)
        z = self._base_sample(shape, context, generator)
        log_q = self.base.log_prob(z, self._base_context(context))
        x, ladj = self.transform.inverse(z, context)
        return x, log_q - ladj

    def distribution(
        self, context: Tensor | None = None, *, mc_samples: int = 4096, mc_seed: int = 0
    ) -> FlowDistribution:
        """A ``torch.distributions.Distribution`` view: exact ``log_prob``, ``sample``,
        ``rsample`` and ``expand``; Monte-Carlo ``mean``, ``variance``, ``entropy()`` and
        ``kl_divergence`` from ``mc_samples`` draws seeded by ``mc_seed`` (see
        :class:`FlowDistribution`)."""
        return FlowDistribution(self, context, mc_samples=mc_samples, mc_seed=mc_seed)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, context_features={self.context_features}"


class FlowDistribution(Distribution):
    """``torch.distributions`` view of a :class:`Flow` for Pyro/torch interop.

    Its batch shape is the context's batch shape (``()`` when unconditional), or any shape it
    broadcasts to via :meth:`expand` (what Pyro's plates call); every batch element is an
    independent copy of the flow's distribution (given its context row). It never touches
    global torch settings: argument validation is disabled for this instance only, since the
    flow validates its own inputs.

    A flow has no closed-form moments or entropy, so :attr:`mean`, :attr:`variance`,
    :meth:`entropy` and ``torch.distributions.kl_divergence`` with a flow on either side are
    Monte-Carlo estimates from ``mc_samples`` reparameterised draws (differentiable, so they
    can be trained through) made with a generator seeded by ``mc_seed``: repeated calls give
    the same number, and their standard error falls as ``1 / sqrt(mc_samples)`` (about
    ``std / 64`` at the default 4096). Set either attribute, or pass them to
    :meth:`Flow.distribution`, to trade cost for precision.

    Attributes:
        mc_samples: draws per Monte-Carlo estimate (default 4096).
        mc_seed: seed of those draws (default 0).
    """

    arg_constraints: dict = {}  # noqa: RUF012
    has_rsample = True

    def __init__(
        self,
        flow: Flow,
        context: Tensor | None = None,
        *,
        mc_samples: int = 4096,
        mc_seed: int = 0,
    ):
        self.flow = flow
        if context is not None:
            context = flow._as_context(context)
        elif flow.context_features > 0:
            raise ContextError("this flow is conditional: distribution() needs a context")
        self.context = context
        self.mc_samples = check_count(mc_samples, "mc_samples", minimum=1)
        self.mc_seed = check_seed(mc_seed, "mc_seed")
        batch_shape = torch.Size(context.shape[:-1]) if context is not None else torch.Size()
        super().__init__(batch_shape, torch.Size(flow.event_shape), validate_args=False)

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def expand(self, batch_shape, _instance=None) -> FlowDistribution:
        """The same distribution with batch shape ``batch_shape`` (the current one must
        broadcast to it): a conditional flow's context is broadcast, an unconditional flow
        draws independent samples per batch element."""
        batch_shape = torch.Size(check_sample_shape(batch_shape, "batch_shape"))
        try:
            ok = torch.broadcast_shapes(self.batch_shape, batch_shape) == batch_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ShapeError(
                f"cannot expand a FlowDistribution of batch shape {_shape_str(self.batch_shape)} "
                f"to {_shape_str(batch_shape)}"
            )
        new = type(self).__new__(type(self)) if _instance is None else _instance
        new.flow, new.mc_samples, new.mc_seed = self.flow, self.mc_samples, self.mc_seed
        new.context = (
            None
            if self.context is None
            else self.context.expand(*batch_shape, self.context.shape[-1])
        )
        Distribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        return new

    def log_prob(self, value: Tensor) -> Tensor:
        return self.flow.log_prob(value, self.context)

    def rsample(self, sample_shape=()) -> Tensor:
        return self._rsample(check_sample_shape(sample_shape, "sample_shape"))

    def _rsample(self, shape: tuple[int, ...], generator=None, with_log_prob: bool = False):
        n = math.prod(shape)
        if self.context is None:
            # an unconditional flow draws the batch dimensions as more samples
            draw = (n, *self.batch_shape)
        else:
            draw = n
        if with_log_prob:
            x, log_p = self.flow.sample_and_log_prob(draw, self.context, generator)
            return (
                x.reshape(*shape, *x.shape[1:]),
                log_p.reshape(*shape, *log_p.shape[1:]),
            )
        x = self.flow.rsample(draw, self.context, generator)
        return x.reshape(*shape, *x.shape[1:])

    def sample(self, sample_shape=()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    # -- Monte-Carlo estimates -----------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self.flow.device).manual_seed(self.mc_seed)

    def _draws(self, with_log_prob: bool = False):
        return self._rsample((self.mc_samples,), self._generator(), with_log_prob)

    @property
    def mean(self) -> Tensor:
        """Monte-Carlo mean ``(1/n) Σ x_i``, shape ``batch_shape + event_shape``."""
        return self._draws().mean(0)

    @property
    def variance(self) -> Tensor:
        """Monte-Carlo (unbiased) elementwise variance, shape ``batch_shape + event_shape``."""
        return self._draws().var(0)

    def entropy(self) -> Tensor:
        """Monte-Carlo entropy ``-(1/n) Σ log p(x_i)``, shape ``batch_shape`` (nats)."""
        _, log_p = self._draws(with_log_prob=True)
        return -log_p.mean(0)


# KL(p || q) ≈ (1/n) Σ [log p(x_i) - log q(x_i)], x_i ~ p, with the flow's mc_samples and
# mc_seed (p's when both are flows); registered for a flow on either side
@register_kl(FlowDistribution, FlowDistribution)
def _kl_flow_flow(p: FlowDistribution, q: FlowDistribution) -> Tensor:
    return _kl_flow_any(p, q)


@register_kl(FlowDistribution, Distribution)
def _kl_flow_any(p: FlowDistribution, q: Distribution) -> Tensor:
    x, log_p = p._draws(with_log_prob=True)
    return (log_p - q.log_prob(x)).mean(0)


@register_kl(Distribution, FlowDistribution)
def _kl_any_flow(p: Distribution, q: FlowDistribution) -> Tensor:
    # a torch distribution samples from the global generator: fork it, seeded by the flow's
    # mc_seed, so the estimate is reproducible and the caller's random stream is untouched
    devices = [q.flow.device] if q.flow.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(q.mc_seed)
        shape = torch.Size([q.mc_samples])
        x = p.rsample(shape) if p.has_rsample else p.sample(shape)
    return (p.log_prob(x) - q.log_prob(x)).mean(0)
