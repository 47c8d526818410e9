"""Export flows to ONNX: density scoring (``log_prob``), sampling and the raw transform.

Sampling exports take the base noise as an input, so the graph is deterministic; conditional
flows take the context as an input. Parameter-only linear algebra that ONNX lacks (``slogdet``,
triangular solves) is precomputed first: every module offering ``export_form()`` is replaced by
that equivalent frozen module in a copy of the flow.

    from exactflow.export import to_onnx
    to_onnx(flow, "model.onnx", what="log_prob")
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .flow import Flow

__all__ = ["export_form", "load_onnx", "to_onnx"]

WHATS = ("log_prob", "sample", "transform")


def export_form(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (in eval mode) where every submodule with an ``export_form()``
    method is replaced by what it returns."""
    module = copy.deepcopy(module).eval()
    if hasattr(module, "export_form"):
        return module.export_form()
    for name, child in list(module.named_children()):
        setattr(module, name, export_form(child))
    return module


class _LogProb(nn.Module):
    def __init__(self, flow: Flow):
        super().__init__()
        self.transform, self.base = flow.transform, flow.base
        self.base_ctx = flow.base.context_features > 0

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        z, ladj = self.transform(x, context)
        return self.base.log_prob(z, context if self.base_ctx else None) + ladj


class _Sample(nn.Module):
    def __init__(self, flow: Flow):
        super().__init__()
        self.transform = flow.transform

    def forward(self, noise: Tensor, temperature: Tensor, context: Tensor | None = None) -> Tensor:
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
    """
    if what not in WHATS:
        raise ConfigError(f"unknown export target {what!r}; valid: {', '.join(WHATS)}")
    if not isinstance(flow, Flow):
        raise TypeError(f"to_onnx needs an exactflow Flow, got {type(flow).__name__}")
    frozen = export_form(flow)
    if example_input is None:
        gen = torch.Generator().manual_seed(0)
        example_input = torch.randn(2, *flow.event_shape, generator=gen)
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
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
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
    return path


def load_onnx(path: str | os.PathLike):
    """An ``onnxruntime.InferenceSession`` for an exported file (CPU provider)."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("onnxruntime is not installed: pip install 'exactflow[onnx]'") from e
    if not Path(path).is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
