"""Every public name of exactflow is documented (the API reference is generated from these).

Public means: listed in the module's ``__all__`` or, without one, not starting with ``_``;
for classes, also the public methods and properties they define. A method that overrides a
documented exactflow method (``forward``/``inverse`` of a Transform, ``log_prob`` of a base
distribution, ...) inherits that contract's docstring, so it counts as documented;
``nn.Module``'s generic ``forward`` text does not.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

import exactflow

# not API: nn.Module's printing hook
NOT_API = {"extra_repr"}


def _modules() -> list[str]:
    names = ["exactflow"]
    for info in pkgutil.walk_packages(exactflow.__path__, "exactflow."):
        if not info.name.endswith("__main__"):  # importing it runs the CLI
            names.append(info.name)
    return names


def _public(module) -> list[tuple[str, object]]:
    """``(qualified name, object)`` for the module's public classes and functions."""
    names = getattr(module, "__all__", None)
    own = names is None
    if own:
        names = [n for n in vars(module) if not n.startswith("_")]
    out = []
    for n in names:
        obj = getattr(module, n)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        home = getattr(obj, "__module__", "") or ""
        if not home.startswith("exactflow"):
            continue  # re-exported from torch, numpy, ...
        if own and home != module.__name__:
            continue  # imported here, checked where it is defined
        out.append((f"{home}.{obj.__qualname__}", obj))
    return out


def _function_doc(value) -> tuple[bool, str | None]:
    """``(is a function-like member, its own docstring)``."""
    if isinstance(value, property):
        value = value.fget
    value = getattr(value, "__func__", value)  # classmethod / staticmethod
    if not inspect.isfunction(value):
        return False, None
    return True, value.__doc__


def _documented_member(cls: type, name: str) -> bool:
    for klass in cls.__mro__:
        if name not in vars(klass):
            continue
        _, doc = _function_doc(vars(klass)[name])
        if doc and doc.strip():
            return klass is not torch.nn.Module
    return False


def _missing() -> list[str]:
    missing: set[str] = set()
    for modname in _modules():
        module = importlib.import_module(modname)
        for qualname, obj in _public(module):
            if not (obj.__doc__ or "").strip() or (
                inspect.isclass(obj) and "__doc__" not in vars(obj)
            ):
                missing.add(qualname)
            if not inspect.isclass(obj):
                continue
            for name, value in vars(obj).items():
                if name.startswith("_") or name in NOT_API:
                    continue
                is_function, _ = _function_doc(value)
                if is_function and not _documented_member(obj, name):
                    missing.add(f"{qualname}.{name}")
    return sorted(missing)


def test_every_public_name_has_a_docstring():
    missing = _missing()
    assert not missing, f"{len(missing)} public names without a docstring:\n" + "\n".join(missing)


def test_the_checker_flags_an_undocumented_function(monkeypatch):
    # the walk must see a public, undocumented function and an undocumented method
    import exactflow.check as target

    def undocumented(x):
        return x

    class Documented:
        """A class with one undocumented method."""

        def method(self):
            return 1

    undocumented.__module__ = Documented.__module__ = target.__name__
    undocumented.__qualname__, Documented.__qualname__ = "undocumented", "Documented"
    all_names = [*getattr(target, "__all__", []), "undocumented", "Documented"]
    monkeypatch.setattr(target, "undocumented", undocumented, raising=False)
    monkeypatch.setattr(target, "Documented", Documented, raising=False)
    monkeypatch.setattr(target, "__all__", all_names, raising=False)
    missing = _missing()
    assert "exactflow.check.undocumented" in missing
    assert "exactflow.check.Documented.method" in missing
    assert "exactflow.check.Documented" not in missing


@pytest.mark.parametrize("name", ["Flow", "Transform"])
def test_contract_methods_are_documented_where_they_are_declared(name):
    # subclasses inherit these docstrings, so the declarations must carry the contract
    from exactflow.transforms import Transform

    cls = exactflow.Flow if name == "Flow" else Transform
    method = cls.log_prob if name == "Flow" else cls.forward
    assert "shape" in (method.__doc__ or "").lower() or "batch" in (method.__doc__ or "")
