"""Simulators and the four benchmark tasks of Lueckmann et al. (2021), with reference posteriors.

A :class:`Simulator` pairs a prior with a stochastic simulator ``x ~ p(x | theta)``:

    task = get_task("two_moons")
    g = torch.Generator().manual_seed(0)
    theta = task.prior.sample(1000, g)             # (1000, 2), inside task.bounds
    x = task.simulate(theta, g)                    # (1000, 2)
    theta_o, x_o = observations(task, 5, seed=0)   # fixed benchmark observations
    ref = task.reference_posterior(x_o[0], 10_000, g)

The tasks follow the published definitions (Lueckmann, Boelts, Greenberg, Goncalves & Macke,
"Benchmarking simulation-based inference", AISTATS 2021, appendix T; SLCP from Papamakarios,
Sterratt & Murray, "Sequential neural likelihood", AISTATS 2019). Each has a tractable
likelihood (:meth:`Simulator.log_likelihood`), which is what the reference posteriors use:
the likelihood is never seen by an inference method, only by its judge.

Reference posteriors (float64 inside, returned in ``x_o``'s dtype):

* ``gaussian_linear``: the conjugate Gaussian posterior, exact.
* ``two_moons`` and ``gaussian_mixture``: exact rejection sampling through the simulator's own
  noise. In both, ``x = g(theta) + noise`` where the noise density does not depend on
  ``theta``, so drawing the noise and solving for ``theta`` proposes from the likelihood as a
  density in ``theta``; the uniform prior then only truncates, and accepting proposals inside
  the box gives i.i.d. samples of the posterior (no tuning, no approximation).
* ``slcp``: likelihood MCMC (:meth:`Simulator.likelihood_mcmc`): sampling-importance-resampling
  from 100 000 prior draws gives the starting points of up to 1000 random-walk Metropolis
  chains, which run 1000 adaptive burn-in steps and then keep every 10th state; the exact sign
  symmetry of the likelihood in ``theta_3`` and ``theta_4`` is used to mix the four modes
  exactly. Asymptotically exact; accurate to Monte Carlo error (checked against the analytic
  posterior of gaussian_linear in the tests, and against importance sampling).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..errors import ConfigError, DomainError, ShapeError
from ._mcmc import random_walk_metropolis
from ._validate import as_rows, positive_int
from .priors import BoxUniform, NormalPrior, Prior

__all__ = [
    "SLCP",
    "TASKS",
    "GaussianLinear",
    "GaussianMixture",
    "Simulator",
    "TwoMoons",
    "get_task",
    "observations",
]

_LOG_2PI = math.log(2.0 * math.pi)


class Simulator:
    """A prior and a stochastic simulator ``x ~ p(x | theta)``: the object NPE learns from.

    Subclass it and implement :meth:`_simulate` (and :meth:`_log_likelihood` if the likelihood
    is tractable, which gives :meth:`likelihood_mcmc` reference posteriors for free). The public
    methods check their inputs and accept one ``(dim,)`` vector or ``(n, dim)`` rows.

    Attributes:
        name: the registry name (``get_task(name)``).
        theta_dim: number of parameters ``D_theta``.
        x_dim: size of one simulated data vector ``D_x``.
        prior: a :class:`~exactflow.sbi.priors.Prior` with ``sample(n, generator)`` and
            ``log_prob(theta)``.
    """

    name: str = "simulator"
    theta_dim: int = 0
    x_dim: int = 0
    prior: Prior

    def __repr__(self) -> str:
        return f"{type(self).__name__}(theta_dim={self.theta_dim}, x_dim={self.x_dim})"

    @property
    def bounds(self) -> tuple[Tensor, Tensor] | None:
        """The prior's support as ``(low, high)`` ``(D_theta,)`` tensors, ``None`` if unbounded."""
        return self.prior.bounds

    # -- simulation -------------------------------------------------------------------------
    def simulate(self, theta: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One simulation per parameter row: ``(n, D_theta) -> (n, D_x)`` (``(D_theta,) ->
        (D_x,)``), in ``theta``'s dtype, with noise from ``generator``."""
        rows, single = as_rows(theta, self.theta_dim, "theta")
        x = self._simulate(rows, generator)
        return x[0] if single else x

    def _simulate(self, theta: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def sample_joint(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """``n`` pairs ``theta ~ p(theta)``, ``x ~ p(x | theta)``: ``((n, D_theta), (n, D_x))``."""
        theta = self.prior.sample(n, generator, dtype)
        return theta, self.simulate(theta, generator)

    def sample_finite_joint(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`sample_joint` less the pairs holding a NaN or infinity, which a
        :class:`RuntimeWarning` counts (what NPE trains on)."""
        theta, x = self.sample_joint(n, generator, dtype)
        ok = torch.isfinite(x).all(dim=-1) & torch.isfinite(theta).all(dim=-1)
        if not bool(ok.all()):
            warnings.warn(
                f"{self.name}: {int((~ok).sum())} of {n} simulations are non-finite and were "
                "dropped",
                RuntimeWarning,
                stacklevel=3,
            )
            theta, x = theta[ok], x[ok]
        return theta, x

    # -- likelihood -------------------------------------------------------------------------
    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        """``log p(x | theta)`` of shape ``(n,)``: ``theta`` ``(n, D_theta)`` with ``x``
        ``(n, D_x)`` or one ``(D_x,)`` observation for every row (``()`` for single inputs)."""
        rows, single = as_rows(theta, self.theta_dim, "theta")
        xs, x_single = as_rows(x, self.x_dim, "x")
        if not x_single and xs.shape[0] != rows.shape[0]:
            raise ShapeError(
                f"x has {xs.shape[0]} rows but theta has {rows.shape[0]}; give one x per theta "
                f"or a single ({self.x_dim},) observation"
            )
        out = self._log_likelihood(rows, xs.to(rows.dtype).expand(rows.shape[0], -1))
        return out[0] if single else out

    def _log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError(
            f"{self.name} has no tractable likelihood: implement _log_likelihood, or override "
            "reference_posterior"
        )

    def log_posterior_unnormalised(self, theta: Tensor, x_o: Tensor) -> Tensor:
        """``log p(x_o | theta) + log p(theta)`` of shape ``(n,)`` (``-inf`` off the support)."""
        return self.log_likelihood(theta, x_o) + self.prior.log_prob(theta)

    # -- reference posteriors ---------------------------------------------------------------
    def reference_posterior(
        self, x_o: Tensor, n: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """``n`` samples ``(n, D_theta)`` of the true posterior ``p(theta | x_o)`` for one
        observation ``x_o`` ``(D_x,)``; how they are made is the task's docstring. Defaults to
        :meth:`likelihood_mcmc`."""
        x = self._observation(x_o)
        n = positive_int(n, "n")
        return self._reference(x, n, generator).to(x_o.dtype)

    def _reference(self, x_o: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        return self.likelihood_mcmc(x_o, n, generator)

    def _observation(self, x_o: Tensor) -> Tensor:
        rows, _ = as_rows(x_o, self.x_dim, "x_o")
        if rows.shape[0] != 1:
            raise ShapeError(
                f"x_o must be one observation of shape ({self.x_dim},), got {tuple(x_o.shape)}"
            )
        return rows[0].double()

    def likelihood_mcmc(
        self,
        x_o: Tensor,
        n: int,
        generator: torch.Generator | None = None,
        *,
        chains: int | None = None,
        burn_in: int = 1000,
        thin: int = 10,
        pool: int = 100_000,
    ) -> Tensor:
        """Posterior samples ``(n, D_theta)`` at ``x_o`` by exact-likelihood MCMC (float64).

        ``pool`` prior draws are weighted by the likelihood and ``chains`` (default
        ``min(n, 1000)``) starting points resampled from them (SIR); each chain then runs
        ``burn_in`` adaptive random-walk Metropolis steps on ``log p(x_o | theta) + log
        p(theta)`` and keeps every ``thin``-th state until the chains hold ``n`` samples, which
        are returned in random order. A task whose likelihood has an exact symmetry (slcp) runs
        the chains on one copy of the symmetric region and maps the samples back at random.
        """
        x = self._observation(x_o)
        n = positive_int(n, "n")
        chains = min(n, 1000) if chains is None else positive_int(chains, "chains")
        candidates = self._fold(self.prior.sample(pool, generator, torch.float64))
        log_w = self._log_likelihood(candidates, x.expand(pool, -1))
        log_w = torch.nan_to_num(log_w, nan=-math.inf)
        if not bool(torch.isfinite(log_w).any()):
            raise DomainError(
                f"x_o has zero likelihood under all {pool} prior draws of {self.name}; "
                "it cannot come from this simulator"
            )
        weights = torch.softmax(log_w, dim=0)
        init = candidates[torch.multinomial(weights, chains, replacement=True, generator=generator)]

        def log_target(theta: Tensor) -> Tensor:
            ll = self._log_likelihood(theta, x.expand(theta.shape[0], -1))
            lp = self.prior._log_prob(theta)
            inside = self._in_fold(theta)
            out = torch.where(inside, ll + lp, torch.full_like(ll, -math.inf))
            return torch.nan_to_num(out, nan=-math.inf)

        per_chain = -(-n // chains)
        states, _ = random_walk_metropolis(
            log_target, init, per_chain, burn_in=burn_in, thin=thin, generator=generator
        )
        states = states[torch.randperm(states.shape[0], generator=generator)[:n]]
        return self._unfold(states, generator)

    # exact symmetries of the likelihood and prior, used by likelihood_mcmc: identity here
    def _fold(self, theta: Tensor) -> Tensor:
        return theta

    def _in_fold(self, theta: Tensor) -> Tensor:
        return torch.ones(theta.shape[0], dtype=torch.bool)

    def _unfold(self, theta: Tensor, generator: torch.Generator | None) -> Tensor:
        return theta


def _accept_in_box(
    propose, prior: BoxUniform, n: int, generator, name: str, max_proposals: int = 50_000_000
) -> Tensor:
    """Draw batches ``propose(m)`` until ``n`` proposals fall in the prior box."""
    low, high = prior.bounds
    got, drawn, batch = [], 0, max(1024, 2 * n)
    count = 0
    while count < n:
        # none in the first million means an acceptance rate below ~1e-6: give up early
        if drawn >= max_proposals or (count == 0 and drawn >= 1_000_000):
            raise DomainError(
                f"{name}: only {count} of {drawn} exact proposals fell inside the prior box; "
                "x_o is (almost) impossible under this prior"
            )
        theta = propose(batch)
        theta = theta[((theta >= low) & (theta <= high)).all(dim=-1)]
        got.append(theta)
        count += theta.shape[0]
        drawn += batch
        # grow the batch to what the acceptance rate so far says is still needed
        rate = max(count / drawn, 1e-4)
        batch = min(max(1024, int(1.2 * (n - count) / rate)), 4_000_000)
    return torch.cat(got)[:n]


class GaussianLinear(Simulator):
    """``theta ~ N(0, 0.1 I_10)``, ``x | theta ~ N(theta, 0.1 I_10)`` (10-D, unbounded prior).

    The posterior is conjugate: ``N(mu, s^2 I)`` with ``s^2 = (1/0.1 + 1/0.1)^-1 = 0.05`` and
    ``mu = s^2 x_o / 0.1 = x_o / 2`` (:meth:`posterior_mean_cov`); reference samples are exact
    draws from it.
    """

    name = "gaussian_linear"

    def __init__(self, dim: int = 10, prior_var: float = 0.1, noise_var: float = 0.1):
        self.theta_dim = self.x_dim = positive_int(dim, "dim")
        self.prior_var, self.noise_var = float(prior_var), float(noise_var)
        self.prior = NormalPrior(0.0, math.sqrt(self.prior_var), self.theta_dim)

    def _simulate(self, theta, generator):
        eps = torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
        return theta + math.sqrt(self.noise_var) * eps

    def _log_likelihood(self, theta, x):
        u = (x - theta) / math.sqrt(self.noise_var)
        return (-0.5 * u.square() - 0.5 * math.log(self.noise_var) - 0.5 * _LOG_2PI).sum(-1)

    def posterior_mean_cov(self, x_o: Tensor) -> tuple[Tensor, Tensor]:
        """The exact posterior ``N(mean, cov)`` at ``x_o`` ``(D,)``: ``(D,)`` and ``(D, D)``."""
        x = self._observation(x_o)
        var = 1.0 / (1.0 / self.prior_var + 1.0 / self.noise_var)
        mean = var * (x / self.noise_var + self.prior.loc / self.prior_var)
        cov = var * torch.eye(self.theta_dim, dtype=torch.float64)
        return mean.to(x_o.dtype), cov.to(x_o.dtype)

    def _reference(self, x_o, n, generator):
        mean, cov = self.posterior_mean_cov(x_o)
        eps = torch.randn((n, self.theta_dim), generator=generator, dtype=torch.float64)
        return mean + eps * cov.diagonal().sqrt()


class TwoMoons(Simulator):
    """Two moons: ``theta ~ U([-1, 1]^2)``; ``a ~ U(-pi/2, pi/2)``, ``r ~ N(0.1, 0.01^2)``,
    ``p = (r cos a + 0.25, r sin a)``, ``x = p + (-|theta_1 + theta_2| / sqrt 2,
    (-theta_1 + theta_2) / sqrt 2)``.

    The posterior is a pair of crescents (the ``|.|`` makes it bimodal). Likelihood: with
    ``q = x - offset(theta) - (0.25, 0)``, ``p(x | theta) = N(|q|; 0.1, 0.01^2) / (pi |q|)``
    for ``q_1 > 0`` (the polar-coordinate Jacobian; the ``1e-23`` chance of ``r < 0`` is
    ignored). Reference: draw ``p``, solve ``|v_1| = p_1 - x_1``, ``v_2 = x_2 - p_2`` for the
    rotated coordinates ``v = ((theta_1 + theta_2), (theta_2 - theta_1)) / sqrt 2``, give
    ``v_1`` a random sign, rotate back and keep what lies in the box: exact i.i.d. samples,
    thousands per millisecond.
    """

    name = "two_moons"
    theta_dim = 2
    x_dim = 2

    def __init__(self):
        self.prior = BoxUniform(-1.0, 1.0, 2)

    @staticmethod
    def _moon(m: int, generator, dtype) -> Tensor:
        a = (torch.rand(m, generator=generator, dtype=dtype) - 0.5) * math.pi
        r = 0.1 + 0.01 * torch.randn(m, generator=generator, dtype=dtype)
        return torch.stack([r * torch.cos(a) + 0.25, r * torch.sin(a)], dim=-1)

    @staticmethod
    def _offset(theta: Tensor) -> Tensor:
        s = math.sqrt(2.0)
        t1, t2 = theta[..., 0], theta[..., 1]
        return torch.stack([-(t1 + t2).abs() / s, (t2 - t1) / s], dim=-1)

    def _simulate(self, theta, generator):
        return self._moon(theta.shape[0], generator, theta.dtype) + self._offset(theta)

    def _log_likelihood(self, theta, x):
        q = x - self._offset(theta)
        q = torch.stack([q[..., 0] - 0.25, q[..., 1]], dim=-1)
        r = q.norm(dim=-1)
        log_r = -0.5 * ((r - 0.1) / 0.01).square() - math.log(0.01) - 0.5 * _LOG_2PI
        ll = log_r - torch.log(r) - math.log(math.pi)
        return torch.where(q[..., 0] > 0, ll, torch.full_like(ll, -math.inf))

    def _reference(self, x_o, n, generator):
        s = math.sqrt(2.0)

        def propose(m: int) -> Tensor:
            p = self._moon(m, generator, torch.float64)
            v1 = p[:, 0] - x_o[0]  # |v_1|; negative values have no preimage
            v2 = x_o[1] - p[:, 1]
            sign = torch.where(torch.rand(m, generator=generator, dtype=torch.float64) < 0.5, -1, 1)
            v1 = torch.where(v1 >= 0, sign * v1, torch.full_like(v1, math.inf))
            return torch.stack([(v1 - v2) / s, (v1 + v2) / s], dim=-1)

        return _accept_in_box(propose, self.prior, n, generator, self.name)


class GaussianMixture(Simulator):
    """``theta ~ U([-10, 10]^2)``, ``x | theta ~ 0.5 N(theta, I) + 0.5 N(theta, 0.01 I)``.

    The posterior is the same mixture centred at ``x_o``, truncated to the box: the reference
    draws ``theta = x_o - eps`` with ``eps`` from the noise mixture and keeps the draws inside
    the box (exact rejection sampling).
    """

    name = "gaussian_mixture"
    theta_dim = 2
    x_dim = 2
    scales = (1.0, 0.1)

    def __init__(self):
        self.prior = BoxUniform(-10.0, 10.0, 2)

    def _noise(self, m: int, generator, dtype) -> Tensor:
        wide = torch.rand(m, generator=generator, dtype=dtype) < 0.5
        scale = torch.where(wide, self.scales[0], self.scales[1]).to(dtype)
        return scale[:, None] * torch.randn((m, 2), generator=generator, dtype=dtype)

    def _simulate(self, theta, generator):
        return theta + self._noise(theta.shape[0], generator, theta.dtype)

    def _log_likelihood(self, theta, x):
        d2 = (x - theta).square().sum(-1)
        comps = [math.log(0.5) - 0.5 * d2 / s**2 - 2 * math.log(s) - _LOG_2PI for s in self.scales]
        return torch.logsumexp(torch.stack(comps, dim=-1), dim=-1)

    def _reference(self, x_o, n, generator):
        return _accept_in_box(
            lambda m: x_o - self._noise(m, generator, torch.float64),
            self.prior,
            n,
            generator,
            self.name,
        )


class SLCP(Simulator):
    """Simple likelihood, complex posterior: ``theta ~ U([-3, 3]^5)``; ``x`` is four i.i.d.
    draws of ``N(m, S)`` flattened to 8-D, with ``m = (theta_1, theta_2)``,
    ``s_1 = theta_3^2``, ``s_2 = theta_4^2``, ``rho = tanh(theta_5)``,
    ``S = [[s_1^2, rho s_1 s_2], [rho s_1 s_2, s_2^2]]``.

    The likelihood depends on ``theta_3, theta_4`` only through their squares, so the posterior
    has (at least) four symmetric modes. Reference: :meth:`Simulator.likelihood_mcmc` on the
    orthant ``theta_3, theta_4 >= 0`` (the posterior restricted to it, times 4, by the exact
    symmetry), then independent random signs for ``theta_3`` and ``theta_4``. With the
    defaults, 10 000 samples take a few seconds on a CPU.
    """

    name = "slcp"
    theta_dim = 5
    x_dim = 8

    def __init__(self):
        self.prior = BoxUniform(-3.0, 3.0, 5)

    def _simulate(self, theta, generator):
        n = theta.shape[0]
        s1, s2, rho = theta[:, 2].square(), theta[:, 3].square(), torch.tanh(theta[:, 4])
        e = torch.randn((n, 4, 2), generator=generator, dtype=theta.dtype)
        x1 = theta[:, None, 0] + s1[:, None] * e[..., 0]
        x2 = theta[:, None, 1] + s2[:, None] * (
            rho[:, None] * e[..., 0] + torch.sqrt(1 - rho.square())[:, None] * e[..., 1]
        )
        return torch.stack([x1, x2], dim=-1).reshape(n, 8)

    def _log_likelihood(self, theta, x):
        u = x.reshape(-1, 4, 2) - theta[:, None, :2]
        s1, s2, t5 = theta[:, None, 2].square(), theta[:, None, 3].square(), theta[:, None, 4]
        rho = torch.tanh(t5)
        # 1 - tanh^2 = cosh^-2, and log cosh computed without overflow
        log_cosh = t5.abs() + torch.log1p(torch.exp(-2 * t5.abs())) - math.log(2.0)
        z1 = u[..., 0] / s1
        z2 = (u[..., 1] / s2 - rho * z1) * torch.exp(log_cosh)
        ll = -0.5 * (z1.square() + z2.square()) - torch.log(s1 * s2) + log_cosh - _LOG_2PI
        return torch.nan_to_num(ll.sum(-1), nan=-math.inf)

    def _fold(self, theta):
        return torch.cat([theta[:, :2], theta[:, 2:4].abs(), theta[:, 4:]], dim=-1)

    def _in_fold(self, theta):
        return (theta[:, 2:4] >= 0).all(dim=-1)

    def _unfold(self, theta, generator):
        flip = torch.rand((theta.shape[0], 2), generator=generator, dtype=theta.dtype) < 0.5
        signs = torch.where(flip, -1.0, 1.0).to(theta.dtype)
        return torch.cat([theta[:, :2], theta[:, 2:4] * signs, theta[:, 4:]], dim=-1)


TASKS: dict[str, type[Simulator]] = {
    "gaussian_linear": GaussianLinear,
    "gaussian_mixture": GaussianMixture,
    "slcp": SLCP,
    "two_moons": TwoMoons,
}


def get_task(name: str) -> Simulator:
    """A new instance of the benchmark task called ``name`` (ConfigError names the valid ones)."""
    if isinstance(name, Simulator):
        return name
    cls = TASKS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown SBI task {name!r}; expected one of: {', '.join(sorted(TASKS))}")
    return cls()


def observations(
    task: Simulator | str, n: int = 10, seed: int = 0, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Fixed benchmark observations: ``theta_o ~ p(theta)`` and ``x_o ~ p(x | theta_o)``
    drawn from a generator seeded with ``seed``; ``((n, D_theta), (n, D_x))``.

    The same ``(task, n, seed)`` always gives the same observations (computed in float64, then
    cast to ``dtype``, default torch's); a different ``n`` is a different set, so a benchmark
    fixes ``n`` and slices.
    """
    task = get_task(task)
    n = positive_int(n, "n")
    g = torch.Generator().manual_seed(int(seed))
    theta = task.prior.sample(n, g, torch.float64)
    x = task.simulate(theta, g)
    dtype = dtype or torch.get_default_dtype()
    return theta.to(dtype), x.to(dtype)
