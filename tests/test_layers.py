"""The import-linter contracts in pyproject.toml hold on src, and they can fail.

The second test copies the package, plants one upward import and expects lint-imports to name
it, so a contract that silently stopped checking anything would be caught here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("importlinter")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    cmd = [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"]
    return subprocess.run(
        [*cmd, str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_layer_and_cycle_contracts_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout
    assert result.stdout.count("KEPT") >= 2


@pytest.mark.parametrize(
    ("module", "planted", "expect"),
    [
        (
            "nets.py",
            "from .flow import Flow",
            "exactflow.nets is not allowed to import exactflow.flow",
        ),
        (
            "transforms/base.py",
            "from ..train import engine",
            "exactflow.transforms is not allowed to import exactflow.train",
        ),
    ],
)
def test_a_planted_upward_import_breaks_the_contract(tmp_path, module, planted, expect):
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "src" / "exactflow" / module
    target.write_text(target.read_text() + f"\n{planted}  # planted by the test\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert expect in result.stdout, result.stdout
