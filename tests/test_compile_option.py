"""``Trainer(compile=...)``, ``[train] compile = true`` and ``exactflow train --compile`` all
route the training objective through torch.compile (recorded here, not compiled: the real
compile is exercised in tests/test_compile.py)."""

from __future__ import annotations

import pytest
import torch

from exactflow.cli import main
from exactflow.models import RealNVP
from exactflow.train import TrainConfig, Trainer

TINY = """
model = "realnvp"
[model_args]
transforms = 2
hidden = [8]
[data_args]
n_train = 128
n_val = 32
n_test = 64
[train]
steps = 3
batch_size = 32
eval_every = 3
progress = false
"""


@pytest.fixture
def compiled(monkeypatch):
    """Replace torch.compile by a recorder that returns the function unchanged."""
    calls: list = []

    def fake(fn=None, **kwargs):
        calls.append((fn, kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", fake)
    return calls


def _names(calls) -> list[str]:
    return [getattr(fn, "__name__", "") for fn, _ in calls]


def test_trainer_takes_compile_from_the_config_or_the_argument(compiled):
    x = torch.randn(64, 2)
    Trainer(RealNVP(2, transforms=1, hidden=(4,)), x, config=TrainConfig(progress=False))
    assert compiled == []
    Trainer(RealNVP(2, transforms=1, hidden=(4,)), x, config=TrainConfig(compile=True))
    assert _names(compiled) == ["_model_loss"] and compiled[0][1] == {"dynamic": False}
    # the argument wins over the config
    Trainer(
        RealNVP(2, transforms=1, hidden=(4,)), x, config=TrainConfig(compile=True), compile=False
    )
    assert len(compiled) == 1


@pytest.mark.parametrize("how", ["flag", "toml"])
def test_cli_compile_reaches_the_trainer(tmp_path, capsys, compiled, how):
    cfg = tmp_path / "run.toml"
    cfg.write_text(TINY + ("compile = true\n" if how == "toml" else ""))
    args = ["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--quiet", "--no-plots"]
    assert main(args + (["--compile"] if how == "flag" else [])) == 0
    assert "_model_loss" in _names(compiled)
    assert "compile = true" in (tmp_path / "r" / "config.toml").read_text()


def test_a_non_bool_compile_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(TINY + 'compile = "yes"\n')
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training option compile must be bool" in err[0]
    assert not (tmp_path / "r").exists()
