"""Test support: the registry of contract-test cases (imports everything; nothing in the
library imports it)."""

from .registry import CASES, Case, register

__all__ = ["CASES", "Case", "register"]
