"""Error types raised by exactflow.

Every error derives from :class:`ExactflowError` *and* from the builtin a caller would
expect (``ValueError`` for bad values or shapes, ``TypeError`` for bad types), so both
``except ef.errors.ExactflowError`` and ``except ValueError`` work.
"""

from __future__ import annotations


class ExactflowError(Exception):
    """Base class of every error exactflow raises on purpose."""


class ShapeError(ExactflowError, ValueError):
    """A tensor has the wrong shape (message names expected vs. received)."""


class DTypeError(ExactflowError, TypeError):
    """A tensor has the wrong type or dtype."""


class DomainError(ExactflowError, ValueError):
    """A value is outside the domain of a transform (NaN, inf, out of range)."""


class ContextError(ExactflowError, ValueError):
    """A context was given to an unconditional model, missing, or of the wrong size."""


class ConfigError(ExactflowError, ValueError):
    """An unknown name, option or configuration key."""


class ArgumentError(ExactflowError, TypeError):
    """A call passed arguments in a form the function does not take, e.g. a builder's
    keyword-only options positionally, or an old keyword together with its new name."""


class DataError(ExactflowError, ValueError):
    """A data file is missing, unreadable, ragged or contains non-finite values."""


class CheckFailed(ExactflowError, AssertionError):
    """A certification check (round trip, log-det, gradients) did not hold."""
