"""Continuous normalizing flows (FFJORD): the :class:`CNF` transform, trace estimators,
time-conditioned MLP dynamics and RNODE regularisation."""

from .cnf import (
    ADAPTIVE_SOLVERS,
    CNF,
    FIXED_SOLVERS,
    TimeMLP,
    exact_divergence,
    hutchinson_divergence,
    sample_probe,
)
from .fixed_step import FixedStepCNF
from .regularization import RNODE, regularization_loss, regularization_terms, time_derivative

__all__ = [
    "ADAPTIVE_SOLVERS",
    "CNF",
    "FIXED_SOLVERS",
    "RNODE",
    "FixedStepCNF",
    "TimeMLP",
    "exact_divergence",
    "hutchinson_divergence",
    "regularization_loss",
    "regularization_terms",
    "sample_probe",
    "time_derivative",
]
