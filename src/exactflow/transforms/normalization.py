"""Normalisation layers as flows: ActNorm (Glow) and batch normalisation (RealNVP/MAF).

Both are per-feature (per-channel for image events) affine maps, so the log-det is a sum
of log-scales in O(D).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DTypeError, ShapeError
from .base import Transform

__all__ = ["ActNorm", "BatchNormFlow", "BatchNormTrainModeWarning"]


class BatchNormTrainModeWarning(UserWarning):
    """A :class:`BatchNormFlow` was inverted (sampled) in train mode, where its inverse is not
    the inverse of the map ``log_prob`` uses."""


def _event_shape(shape) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else tuple(shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ShapeError(f"shape must be a positive int or a tuple of positive ints, got {shape!r}")
    return shape


class _PerChannel(Transform):
    """Shared shape logic: parameters of shape ``(C, 1, ..., 1)`` over an event ``(C, ...)``."""

    def __init__(self, shape):
        super().__init__()
        self.shape = _event_shape(shape)
        self.event_dim = len(self.shape)
        self.param_shape = (self.shape[0],) + (1,) * (self.event_dim - 1)
        # every per-channel log-scale counts once per spatial position
        self.positions = 1
        for s in self.shape[1:]:
            self.positions *= s

    def _check(self, x: Tensor) -> tuple[int, ...]:
        k = self.event_dim
        if x.dim() < k or tuple(x.shape[x.dim() - k :]) != self.shape:
            raise ShapeError(
                f"expected input of shape (*batch, {self.shape}), got {tuple(x.shape)}"
            )
        return tuple(x.shape[: x.dim() - k])

    def _flat_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel mean and (biased) variance over batch and spatial positions."""
        flat = x.reshape(-1, *self.shape)
        dims = (0, *range(2, flat.dim()))
        mean = flat.mean(dim=dims).reshape(self.param_shape)
        var = flat.var(dim=dims, unbiased=False).reshape(self.param_shape)
        return mean, var

    def _ladj(self, log_scale: Tensor, batch: tuple[int, ...]) -> Tensor:
        return (log_scale.sum() * self.positions).expand(batch)


class ActNorm(_PerChannel):
    """Per-channel affine ``z = (x - shift) * exp(-log_scale)`` with data-dependent init.

    On the first forward call in training mode the parameters are set from that batch so
    that it comes out with zero mean and unit variance per channel (Kingma & Dhariwal, 2018).
    Whether this happened is the ``initialized`` buffer, so it is saved in the state dict and
    a loaded model is not re-initialised. The initialisation path reads the flag with a
    Python branch, once: after a training-mode forward has seen the flag set, a plain Python
    attribute remembers it, so later calls are straight-line code with no read of a tensor
    value (what tracing, export and ``torch.compile`` see; a compiled training step breaks
    its graph only on the first call of a fresh layer). Loading a state dict forgets what
    was seen, so the loaded flag is read again; to re-initialise a layer, load a state with
    ``initialized`` false or call :meth:`initialize`.

    ``log|det dz/dx| = -(H W ...) sum_c log_scale_c``.

    Args:
        shape: the event shape, e.g. ``D`` or ``(D,)`` for vectors, ``(C, H, W)`` for images
            (then statistics are per channel, over batch and spatial positions).
        eps: floor on the initial standard deviation.
    """

    def __init__(self, shape, eps: float = 1e-6):
        super().__init__(shape)
        self.eps = float(eps)
        self.shift = nn.Parameter(torch.zeros(self.param_shape))
        self.log_scale = nn.Parameter(torch.zeros(self.param_shape))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # True once ``initialized`` was seen set: no tensor read (graph break) on later calls
        self._seen_initialized = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._seen_initialized = False  # the loaded flag may be either value: read it again

    @torch.no_grad()
    def initialize(self, x: Tensor, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Set ``shift``/``log_scale`` so that ``x`` maps to zero mean, unit variance.

        Args:
            x: ``(*batch, *shape)`` the initialisation batch.
            reduce: ``None`` (statistics of ``x`` alone), or a function returning the sum of
                a tensor over the processes of a data-parallel run (an all-reduce, e.g.
                :meth:`~exactflow.train.distributed.DistributedContext.all_reduce`): then the
                statistics are those of the union of every process's ``x``, in float64 and
                two passes (sums -> mean, squared deviations -> variance), so every process
                gets the parameters one process would from the whole batch.
        """
        if reduce is None:
            mean, var = self._flat_stats(x)
        else:
            if not callable(reduce):
                raise DTypeError(
                    f"reduce must be a callable Tensor -> Tensor (an all-reduce sum) or None, "
                    f"got {type(reduce).__name__}"
                )
            self._check(x)
            flat = x.reshape(-1, *self.shape).double()
            dims = (0, *range(2, flat.dim()))
            count = flat.new_tensor([flat.numel() / self.shape[0]])
            sums = reduce(torch.cat([flat.sum(dim=dims), count]))
            mean = (sums[:-1] / sums[-1]).reshape(self.param_shape)
            # two passes, like a one-process variance, rather than E[x^2] - E[x]^2
            dev = flat - mean.unsqueeze(0)
            var = (reduce((dev * dev).sum(dim=dims)) / sums[-1]).reshape(self.param_shape)
        self.shift.copy_(mean)
        self.log_scale.copy_(var.sqrt().clamp_min(self.eps).log())
        self.initialized.fill_(True)
        self._seen_initialized = True

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = self._check(x)
        # getattr: a layer pickled whole before this attribute existed lacks it
        if self.training and not getattr(self, "_seen_initialized", False):  # see class doc
            if bool(self.initialized):
                self._seen_initialized = True
            else:
                self.initialize(x)
        z = (x - self.shift) * torch.exp(-self.log_scale)
        return z, -self._ladj(self.log_scale, batch)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = self._check(z)
        x = z * torch.exp(self.log_scale) + self.shift
        return x, self._ladj(self.log_scale, batch)


class BatchNormFlow(_PerChannel):
    """Batch normalisation as a flow: ``z = (x - mu) / sqrt(var + eps) * exp(log_gamma) + beta``.

    Training mode normalises with the batch statistics (and updates running averages);
    eval mode uses the running statistics. In both modes the log-det is exact for the map
    actually applied, with the statistics held fixed (Dinh et al., 2017; Papamakarios et
    al., 2017): ``log|det| = (H W ...) sum_c [log_gamma_c - log(var_c + eps) / 2]``.

    ``inverse`` always uses the running statistics (a batch of noise carries no data
    statistics), so sample from a model in eval mode. In train mode the two directions are
    different maps: ``log_prob(x)`` normalises ``x`` with its own batch statistics while
    ``sample_and_log_prob`` inverts the running-statistics map (a fresh ``RealNVP(2,
    norm="batchnorm")`` disagrees by 0.1 nats on average, more after training). Neither
    can be made to match the other (noise has no data statistics, and the running averages are
    not the map being trained), so a train-mode ``inverse`` warns with
    :class:`BatchNormTrainModeWarning` instead of silently returning the other map's densities.

    Args:
        shape: event shape (``D`` for vectors, ``(C, H, W)`` for per-channel statistics).
        momentum: running-average update ``r <- (1 - momentum) r + momentum * batch``.
        eps: added to the variance.
        affine: learn ``log_gamma`` and ``beta``.
    """

    def __init__(self, shape, momentum: float = 0.1, eps: float = 1e-5, affine: bool = True):
        super().__init__(shape)
        if not 0.0 < momentum <= 1.0:
            raise ConfigError(f"momentum must be in (0, 1], got {momentum}")
        if eps <= 0:
            raise ConfigError(f"eps must be > 0, got {eps}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.affine = affine
        if affine:
            self.log_gamma = nn.Parameter(torch.zeros(self.param_shape))
            self.beta = nn.Parameter(torch.zeros(self.param_shape))
        else:
            self.register_buffer("log_gamma", torch.zeros(self.param_shape))
            self.register_buffer("beta", torch.zeros(self.param_shape))
        self.register_buffer("running_mean", torch.zeros(self.param_shape))
        self.register_buffer("running_var", torch.ones(self.param_shape))

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.training:
            return self.running_mean, self.running_var
        mean, var = self._flat_stats(x)
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1.0 - m).add_(m * mean.detach())
            self.running_var.mul_(1.0 - m).add_(m * var.detach())
        return mean, var

    def _log_scale(self, var: Tensor) -> Tensor:
        return self.log_gamma - 0.5 * torch.log(var + self.eps)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = self._check(x)
        mean, var = self._stats(x)
        log_scale = self._log_scale(var)
        z = (x - mean) * torch.exp(log_scale) + self.beta
        return z, self._ladj(log_scale, batch)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch = self._check(z)
        if self.training:  # a module flag, not a tensor value: compile-safe
            warnings.warn(
                "BatchNormFlow.inverse in train mode uses the running statistics, but forward "
                "(log_prob) normalises with each batch's own, so samples and their log-probs "
                "do not match log_prob of the same points; call flow.eval() before sampling",
                BatchNormTrainModeWarning,
                stacklevel=2,
            )
        log_scale = self._log_scale(self.running_var)
        x = (z - self.beta) * torch.exp(-log_scale) + self.running_mean
        return x, -self._ladj(log_scale, batch)
