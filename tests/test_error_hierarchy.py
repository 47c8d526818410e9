"""Every error exactflow raises on purpose is an ExactflowError (errors.py's promise).

An AST walk over src finds ``raise ValueError(...)``/``raise TypeError(...)`` (and the other
builtins a user cannot catch as ExactflowError) and ``assert`` statements, which vanish under
``python -O`` and so cannot validate input.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "exactflow"
BUILTINS = {"ValueError", "TypeError", "RuntimeError", "KeyError", "IndexError", "Exception"}


def _offences(path: Path, root: Path = SRC) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id in BUILTINS:
                found.append(f"{path.relative_to(root)}:{node.lineno} raise {exc.id}")
        elif isinstance(node, ast.Assert):
            found.append(f"{path.relative_to(root)}:{node.lineno} assert")
    return found


def test_no_bare_builtin_raises_or_asserts_in_src():
    offences = [o for path in sorted(SRC.rglob("*.py")) for o in _offences(path)]
    assert not offences, "raise an exactflow.errors subclass instead:\n" + "\n".join(offences)


def test_the_walk_finds_a_planted_offence(tmp_path):
    planted = tmp_path / "m.py"
    planted.write_text(
        "from exactflow.errors import ShapeError\n"
        "def f(x):\n    assert x\n    raise ValueError('bad')\n"
        "def g():\n    raise ShapeError('fine')\n"
    )
    assert _offences(planted, tmp_path) == ["m.py:4 raise ValueError", "m.py:3 assert"] or sorted(
        _offences(planted, tmp_path)
    ) == ["m.py:3 assert", "m.py:4 raise ValueError"]
