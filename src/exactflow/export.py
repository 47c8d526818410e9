"""Export flows to ONNX: density scoring (``log_prob``), sampling and the raw transform.

Sampling exports take the base noise as an input, so the graph is deterministic; conditional
flows take the context as an input. Parameter-only linear algebra that ONNX lacks (``slogdet``,
triangular solves) is precomputed first: every module offering ``export_form()`` is replaced by
that equivalent frozen module in a copy of the flow. Continuous flows (FFJORD, flow matching)
export as a fixed-step solve unrolled into the graph (:class:`FixedStepCNF`), with the exact
trace computed analytically from the dynamics' weights.

    from exactflow.export import to_onnx
    to_onnx(flow, "model.onnx", what="log_prob")
    to_onnx(cnf_flow, "cnf.onnx", what="sample", solver="rk4", steps=16)
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .continuous.fixed_step import FixedStepCNF
from .errors import ConfigError, DTypeError
from .flow import Flow
from .validation import as_tensor, check_count

__all__ = ["FixedStepCNF", "export_form", "load_onnx", "to_onnx"]

WHATS = ("log_prob", "sample", "transform")


def export_form(module: nn.Module, **options) -> nn.Module:
    """A copy of ``module`` (in eval mode) where every submodule with an ``export_form()``
    method is replaced by what it returns.

    ``options`` (e.g. ``solver="rk4", steps=16`` for CNFs) are passed to the ``export_form``
    methods that take them by name; ``None`` values are dropped.
    """
    options = {k: v for k, v in options.items() if v is not None}
    return _replace(copy.deepcopy(module).eval(), options)


def _replace(module: nn.Module, options: dict) -> nn.Module:
    method = getattr(module, "export_form", None)
    if callable(method):
        accepted = inspect.signature(method).parameters
        return method(**{k: v for k, v in options.items() if k in accepted})
    for name, child in list(module.named_children()):
        setattr(module, name, _replace(child, options))
    return module


class _LogProb(nn.Module):
    def __init__(self, flow: Flow):
        super().__init__()
        self.transform, self.base = flow.transform, flow.base
        self.base_ctx = flow.base.context_features > 0
        self.context_encoder = flow.context_encoder  # the graph takes raw contexts, as Flow does

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.context_encoder is not None:
            context = self.context_encoder(context)
        z, ladj = self.transform(x, context)
        return self.base.log_prob(z, context if self.base_ctx else None) + ladj


class _Sample(nn.Module):
    def __init__(self, flow: Flow):
        super().__init__()
        self.transform = flow.transform
        self.context_encoder = flow.context_encoder

    def forward(self, noise: Tensor, temperature: Tensor, context: Tensor | None = None) -> Tensor:
        if self.context_encoder is not None:
            context = self.context_encoder(context)
        x, _ = self.transform.inverse(noise * temperature, context)
        return x


class _Transform(nn.Module):
    def __init__(self, flow: Flow):
        super().__init__()
        self.transform = flow.transform

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform(x, context)


def to_onnx(
    flow: Flow,
    path: str | os.PathLike,
    what: str = "log_prob",
    example_input: Tensor | None = None,
    example_context: Tensor | None = None,
    dynamic_batch: bool = True,
    opset: int | None = None,
    *,
    solver: str | None = None,
    steps: int | None = None,
) -> Path:
    """Export one direction of ``flow`` to an ONNX file and return its path.

    Args:
        flow: an unconditional or conditional :class:`~exactflow.Flow` (float32 is exported
            as is; cast the flow first for another dtype).
        what: ``"log_prob"`` (inputs ``x[, context]`` -> ``log_prob (B,)``), ``"sample"``
            (inputs ``noise (B, *event), temperature ()[, context]`` -> ``x``; draw the noise
            from the base distribution, e.g. N(0, I) for ``StandardNormal``) or
            ``"transform"`` (``x[, context]`` -> ``z, ladj``).
        example_input: a ``(B, *event)`` batch used for tracing (default: 2 base samples).
        example_context: ``(B, C)`` for conditional flows (default: zeros).
        dynamic_batch: export with a symbolic batch size.
        opset: ONNX opset version (exporter default if None).
        solver, steps: fixed-step solve of continuous flows (see :class:`FixedStepCNF`;
            default: each CNF's own fixed-step solver and steps, else ``rk4``).
    """
    if what not in WHATS:
        raise ConfigError(f"unknown export target {what!r}; valid: {', '.join(WHATS)}")
    if not isinstance(flow, Flow):
        raise DTypeError(f"to_onnx needs an exactflow Flow, got {type(flow).__name__}")
    if opset is not None:
        opset = check_count(opset, "opset", minimum=1)
    path = Path(path)
    # checked here: the exporter's own FileNotFoundError would read as an unsupported op
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a directory; give a .onnx file name")
    frozen = export_form(flow, solver=solver, steps=steps)
    if example_input is None:
        gen = torch.Generator().manual_seed(0)
        example_input = torch.randn(2, *flow.event_shape, generator=gen)
    example_input = as_tensor(example_input, "example_input", flow.dtype)
    if example_context is not None:
        example_context = as_tensor(example_context, "example_context", flow.dtype)
    batch = example_input.shape[0]
    args: list[Tensor] = [example_input.to(flow.dtype)]
    names = ["noise" if what == "sample" else "x"]
    wrapper: nn.Module = {"log_prob": _LogProb, "sample": _Sample, "transform": _Transform}[what](
        frozen
    )
    if what == "sample":
        args.append(torch.tensor(1.0, dtype=flow.dtype))
        names.append("temperature")
    if flow.context_features > 0:
        if example_context is None:
            example_context = torch.zeros(batch, flow.context_features, dtype=flow.dtype)
        args.append(example_context)
        names.append("context")
    outputs = {"log_prob": ["log_prob"], "sample": ["x"], "transform": ["z", "ladj"]}[what]
    dynamic = None
    if dynamic_batch:
        b = torch.export.Dim("batch", min=1)
        dynamic = tuple({0: b} if n in ("x", "noise", "context") else None for n in names)
    # the exporter prints progress lines and logs a warning per missing optional package
    quiet_log = logging.getLogger("torch.onnx")
    level = quiet_log.level
    quiet_log.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            _export(wrapper, args, path, names, outputs, dynamic, opset)
        except Exception as err:  # the exporter's own error types carry pages of context
            summary = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
            raise ConfigError(
                f"ONNX export of {what} failed ({type(err).__name__}: {summary}); a module "
                "in the flow uses an op ONNX lacks: give it an export_form()"
            ) from err
        finally:
            quiet_log.setLevel(level)
    return path


def _export(wrapper, args, path, names, outputs, dynamic, opset) -> None:
    torch.onnx.export(
        wrapper,
        tuple(args),
        str(path),
        input_names=names,
        output_names=outputs,
        dynamic_shapes=dynamic,
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def load_onnx(path: str | os.PathLike):
    """An ``onnxruntime.InferenceSession`` for an exported file (CPU provider)."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("onnxruntime is not installed: pip install 'exactflow[onnx]'") from e
    if not Path(path).is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
