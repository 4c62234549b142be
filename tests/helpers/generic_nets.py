"""Small plain modules for the generic backbone kinds (``module:generic_nets:...``).

Importable by bare name (``tests/helpers`` is on sys.path), as a user's own package is.
"""
from __future__ import annotations

import torch
from torch import nn


class Encoder(nn.Module):
    """Not sequential: a forward with a skip, so the cut is an early exit."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv3d(1, width, 3, stride=2, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv3d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv3d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.layer1(x)
        b = self.layer2(a)
        return self.layer3(b) + b.mean() * 0


class PlainUNetEncoder(nn.Module):
    """A plain 3D conv net: an encoder, a bottleneck and a head, like a released segmentation net."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.encoder = Encoder(width)
        self.bottleneck = nn.Sequential(nn.Conv3d(4 * width, 4 * width, 1), nn.ReLU())
        self.head = nn.Conv3d(4 * width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bottleneck(self.encoder(x)))


def plain_convnet(width: int = 4, classes: int = 3) -> nn.Module:
    """Factory for ``module:generic_nets:plain_convnet``."""
    return PlainUNetEncoder(width, classes)


def sequential_net(width: int = 4) -> nn.Module:
    """A sequential 2D net (cut by truncation)."""
    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 5))


class NamedOutputs(nn.Module):
    """A net returning a dict of named outputs (for ``torch.jit.script`` and ONNX export)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv3d(1, width, 3, stride=2, padding=1)
        self.b = nn.Conv3d(width, 2 * width, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = torch.relu(self.a(x))
        b = torch.relu(self.b(a))
        return {"enc/a": a, "enc/b": b, "vec": b.mean(dim=(2, 3, 4))}


class TupleOutputs(NamedOutputs):
    """The same, returning a tuple (ONNX export names its outputs)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        out = super().forward(x)
        return out["enc/a"], out["enc/b"], out["vec"]
