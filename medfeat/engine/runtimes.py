"""Runtimes: one interface over eager PyTorch, compiled PyTorch, ONNX Runtime and TensorRT.

``make_runtime(backbone, name)`` returns a callable ``runtime(x) -> {tap: (B, D) float32
ndarray}`` for an input batch ``x`` (torch tensor laid out as the spec's input).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from medfeat.errors import UnknownNameError
from medfeat.export.registry import Backbone

RUNTIMES = ("eager",)


class Runtime(Protocol):
    name: str

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]: ...


class EagerRuntime:
    """Eager PyTorch under inference mode."""

    name = "eager"

    def __init__(self, backbone: Backbone, device: str = "cpu") -> None:
        self.backbone = backbone.to(device).eval()
        self.device = device

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = self.backbone(x.to(self.device))
        return {k: v.float().cpu().numpy() for k, v in out.items()}


def make_runtime(backbone: Backbone, name: str = "eager", *, device: str = "cpu",
                 precision: str = "fp32") -> Runtime:
    """A runtime named ``name`` for ``backbone``."""
    if name == "eager":
        return EagerRuntime(backbone, device)
    raise UnknownNameError(f"unknown runtime {name!r}; runtimes: {', '.join(RUNTIMES)}")
