"""Flow matching: velocity fields trained by regression, evaluated as exact CNFs.

* :mod:`.paths` -- conditional paths ``x_t`` and target velocities ``u_t`` (time ``0`` = data,
  ``1`` = noise, the CNF's forward direction): :class:`LinearPath` (rectified flow, I-/OT-CFM
  with ``σ``) and :class:`CondOTPath` (Lipman et al.'s, with ``σ_min``).
* :mod:`.pairing` -- :class:`IndependentPairing` and minibatch optimal transport
  :class:`OTPairing` (exact assignment).
* :mod:`.flow` -- :class:`MatchingFlow` (a :class:`~exactflow.Flow` over a CNF with
  ``training_loss`` and solver overrides) and :class:`VelocityMLP`.
* :mod:`.loss` -- :func:`fit`, :func:`reflow_coupling`, :func:`reflow`.
* :mod:`.metrics` -- :func:`straightness`, :func:`sliced_wasserstein`.

Builders live in :mod:`exactflow.models.matching` (``CFM``, ``OTCFM``, ``RectifiedFlow``).
"""

from .flow import MatchingFlow, VelocityMLP, matching_loss
from .loss import FitResult, fit, reflow, reflow_coupling
from .metrics import sliced_wasserstein, straightness, trajectory
from .pairing import PAIRINGS, IndependentPairing, OTPairing, ot_permutation, resolve_pairing
from .paths import AffinePath, CondOTPath, LinearPath, sample_time

__all__ = [
    "PAIRINGS",
    "AffinePath",
    "CondOTPath",
    "FitResult",
    "IndependentPairing",
    "LinearPath",
    "MatchingFlow",
    "OTPairing",
    "VelocityMLP",
    "fit",
    "matching_loss",
    "ot_permutation",
    "reflow",
    "reflow_coupling",
    "resolve_pairing",
    "sample_time",
    "sliced_wasserstein",
    "straightness",
    "trajectory",
]
