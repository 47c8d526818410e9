"""Every shipped transform is certified: each :class:`~exactflow.transforms.Transform` subclass
defined in ``exactflow`` is built by some case of ``exactflow.testing.registry`` (so
tests/test_contract.py runs it and its inverse through ``exactflow.check`` in float64), or is
listed in :data:`EXEMPT` with the reason it cannot be.

A case "builds" a class when the class is the type of the case's transform or of any module
inside it (``Compose``, ``Inverse`` and the layers they hold count too)."""

from __future__ import annotations

import gc
import importlib
import pkgutil

import pytest
import torch

import exactflow
from exactflow.testing import CASES
from exactflow.transforms.base import Transform

CONTEXT = 3

# qualified name -> why no registry case builds it
EXEMPT: dict[str, str] = {
    "exactflow.transforms.elementwise._Elementwise": (
        "abstract base of Sigmoid, Logit and Tanh: its _fwd/_inv raise NotImplementedError"
    ),
    "exactflow.transforms.normalization._PerChannel": (
        "abstract base of ActNorm and BatchNormFlow (shape checks and statistics, no map)"
    ),
    "exactflow.transforms.preprocessing.UniformDequantization": (
        "stochastic and not a bijection (forward adds U[0, 1) noise with ladj 0, inverse floors "
        "to the level), so round trips and Jacobians do not apply; its documented behaviour is "
        "tested in tests/test_data.py::test_uniform_dequantisation"
    ),
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _import_everything() -> None:
    """Import every module of the package, so that every Transform subclass is defined."""
    for info in pkgutil.walk_packages(exactflow.__path__, "exactflow."):
        if info.name.endswith("__main__"):  # runs the CLI
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as err:  # an optional dependency, not a broken module
            if (err.name or "").startswith("exactflow"):
                raise


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_subclasses(sub)}
    return out


def shipped_transforms() -> dict[str, type]:
    """``{qualified name: class}`` of every Transform subclass defined in an exactflow module."""
    _import_everything()
    return {
        _qualname(c): c
        for c in _subclasses(Transform)
        if c.__module__.startswith("exactflow.")
        and not c.__module__.startswith("exactflow.testing")
    }


def built_by_cases() -> set[str]:
    """Qualified names of every module type the registry's cases build, over the same event
    shapes and with/without context as the contract test."""
    built = set()
    for case in CASES:
        contexts = ([0] if case.unconditional else []) + ([CONTEXT] if case.context else [])
        for shape in case.shapes:
            for ctx in contexts:
                torch.manual_seed(0)
                built |= {_qualname(type(m)) for m in case.build(shape, ctx).modules()}
    return built


@pytest.fixture(scope="module")
def shipped():
    return shipped_transforms()


@pytest.fixture(scope="module")
def built():
    return built_by_cases()


def test_the_walk_finds_the_shipped_families(shipped):
    # so that the completeness check below cannot pass by finding nothing
    for name in (
        "exactflow.transforms.coupling.Coupling",
        "exactflow.transforms.preprocessing.LogitPreprocess",
        "exactflow.transforms.linear.FrozenLinear",
        "exactflow.continuous.cnf.CNF",
        "exactflow.vae.AmortisedPlanar",
    ):
        assert name in shipped, name
    assert len(shipped) > 30


def test_every_shipped_transform_has_a_registry_case(shipped, built):
    missing = sorted(set(shipped) - built - set(EXEMPT))
    assert not missing, (
        f"{len(missing)} shipped Transform subclass(es) without a case in "
        f"exactflow/testing/registry.py: {', '.join(missing)}; add a Case line there (or, if it "
        "cannot be certified as a bijection, an entry with the reason to EXEMPT here)"
    )


def test_exemptions_are_current(shipped, built):
    for name, reason in EXEMPT.items():
        assert name in shipped, f"EXEMPT lists {name}, which is no longer a shipped Transform"
        assert name not in built, f"{name} has a registry case now; drop its exemption"
        assert len(reason) > 20, f"exemption of {name} needs its reason"


def test_a_transform_without_a_case_is_caught(shipped, built):
    """The check itself: a new shipped transform with no case line would be reported."""

    class Unregistered(Transform):
        def forward(self, x, context=None):
            return x, x.new_zeros(x.shape[:-1])

        inverse = forward

    Unregistered.__module__ = "exactflow.transforms.fake"
    try:
        found = shipped_transforms()
        assert "exactflow.transforms.fake." + Unregistered.__qualname__ in set(found) - built
    finally:
        del Unregistered
        gc.collect()  # __subclasses__ holds weak references: the class is gone after this
