"""Population random-walk Metropolis, the exact-likelihood sampler behind MCMC reference
posteriors (:meth:`exactflow.sbi.Simulator.likelihood_mcmc`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def _proposal_cholesky(states: Tensor, log_scale: float) -> Tensor:
    d = states.shape[1]
    cov = torch.cov(states.T).reshape(d, d) if states.shape[0] > 1 else torch.eye(d).to(states)
    # a tiny ridge keeps the factor defined when the chains have collapsed in some direction
    ridge = 1e-10 * torch.eye(d, dtype=states.dtype) * (1.0 + cov.diagonal().mean())
    return torch.linalg.cholesky(cov * (2.38**2 / d) * math.exp(2 * log_scale) + ridge)


def random_walk_metropolis(
    log_target: Callable[[Tensor], Tensor],
    init: Tensor,
    samples_per_chain: int,
    *,
    burn_in: int,
    thin: int,
    generator: torch.Generator | None = None,
    adapt_every: int = 50,
) -> tuple[Tensor, float]:
    """Run ``C`` Metropolis chains from ``init`` ``(C, d)``; return ``(C * k, d)`` states and
    the acceptance rate after burn-in (``k = samples_per_chain``).

    Proposals are ``theta' = theta + L eps`` with ``L L^T = (2.38^2 / d) s^2 Cov`` (Roberts &
    Rosenthal's scaling). During burn-in only, every ``adapt_every`` steps ``Cov`` is re-estimated
    from the current states of all chains and ``s`` is nudged towards 23% acceptance; afterwards
    the kernel is fixed, so each chain is a plain Metropolis chain that leaves ``log_target``
    invariant. Every ``thin``-th state after burn-in is kept.
    """
    x = init.clone()
    lp = log_target(x)
    log_scale, accepted, window = 0.0, 0, 0
    chol = _proposal_cholesky(x, log_scale)
    kept, accepted_after = [], 0
    total = burn_in + samples_per_chain * thin
    for step in range(total):
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        # broadcast product instead of a (C, d) @ (d, d) matmul: for tiny d the BLAS call's
        # threading costs milliseconds on a busy machine
        proposal = x + (noise[:, None, :] * chol).sum(-1)
        lp_proposal = log_target(proposal)
        u = torch.rand(x.shape[0], generator=generator, dtype=x.dtype)
        # NaN targets compare False, so such proposals are rejected
        accept = torch.log(u) < lp_proposal - lp
        x = torch.where(accept[:, None], proposal, x)
        lp = torch.where(accept, lp_proposal, lp)
        n_acc = int(accept.sum())
        if step < burn_in:
            accepted, window = accepted + n_acc, window + x.shape[0]
            if (step + 1) % adapt_every == 0:
                rate = accepted / window
                log_scale += 0.5 * (rate - 0.234)
                chol = _proposal_cholesky(x, log_scale)
                accepted, window = 0, 0
        else:
            accepted_after += n_acc
            if (step - burn_in + 1) % thin == 0:
                kept.append(x.clone())
    rate = accepted_after / max(1, (total - burn_in) * x.shape[0])
    return torch.stack(kept, dim=1).reshape(-1, x.shape[1]), rate
