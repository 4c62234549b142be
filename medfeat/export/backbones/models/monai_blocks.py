"""MONAI's convolutional building blocks in plain torch, with MONAI's module and parameter names.

The task UNet (:mod:`.unet3d`) and SwinUNETR (:mod:`.swin_unetr`, :mod:`.swin_net`) are built
from these, not from ``monai.networks``: importing any MONAI network module runs
``monai/__init__.py``, which imports every MONAI subpackage (``monai.apps``, torchvision,
``torch._dynamo``, ...), several seconds of start-up for a network of a few plain layers.

Why written here rather than loaded from MONAI without its ``__init__``: we considered
registering stand-in parent packages in ``sys.modules`` so that only ``monai.networks.nets.unet``
and its imports load. That is not robust: in MONAI 1.6 the UNet's own imports reach
``monai.networks.layers.factories`` -> ``monai.networks.utils`` -> ``monai.apps.utils``, so
the stand-ins must cover ``monai.apps`` too and the set moves with every MONAI release;
other threads would see the stand-ins while they are registered; and once they are removed,
the modules loaded under them are not attributes of the real packages a later ``import
monai`` creates. The layers below are a few dozen lines of torch, they import nothing of
MONAI, and MONAI stays the reference: ``tests/parity/test_parity_3d.py`` builds MONAI's own
classes and requires every tap equal (relative error 0), state dicts load strictly both ways,
and the same seed gives the same random weights (modules are created in MONAI's order with
the same initialisers), so stores written with ``--random-init`` before this change stay
reproducible.

Names follow MONAI's state-dict layout: a ``Convolution`` is a Sequential of ``conv`` and
``adn`` (norm ``N``, dropout ``D``, activation ``A``); a ``ResidualUnit`` has ``conv.unit<i>``
and ``residual``; a ``SkipConnection`` holds ``submodule``; ``UnetResBlock`` has
``conv1..conv3`` and ``norm1..norm3``; ``UnetrBasicBlock`` wraps it as ``layer``;
``UnetrUpBlock`` has ``transp_conv`` and ``conv_block``; ``UnetOutBlock`` has ``conv``.
All blocks are 3D; tensors are (B, C, D, H, W).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medfeat.errors import InputError, UnknownNameError

NormName = str | tuple[str, dict[str, Any]]


def norm_layer(name: NormName, channels: int) -> nn.Module:
    """MONAI's 3D norm of that name: ``instance`` (InstanceNorm3d, no affine, no running
    stats: MONAI's defaults) or ``batch`` (BatchNorm3d); ``(name, kwargs)`` passes options."""
    kind, kwargs = (name, {}) if isinstance(name, str) else (name[0], dict(name[1]))
    kind = kind.lower()
    if kind == "instance":
        return nn.InstanceNorm3d(channels, **kwargs)
    if kind == "batch":
        return nn.BatchNorm3d(channels, **kwargs)
    raise UnknownNameError(f"norm {name!r} is not supported here; norms: instance, batch")


class Convolution(nn.Sequential):
    """A 3D convolution (or transposed convolution) and, unless ``conv_only``, instance norm,
    dropout and PReLU in that order (MONAI's ``Convolution`` with ``adn_ordering="NDA"``).

    ``padding`` defaults to "same" for odd kernels, ``(kernel - 1) // 2``; a transposed
    convolution adds ``output_padding = stride - 1`` (unless given), so stride s multiplies
    the size by s. (B, in, D, H, W) -> (B, out, D', H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, kernel_size: int = 3,
                 transposed: bool = False, conv_only: bool = False, bias: bool = True,
                 padding: int | None = None, output_padding: int | None = None,
                 norm: NormName = "instance", dropout: float = 0.0) -> None:
        super().__init__()
        pad = (kernel_size - 1) // 2 if padding is None else padding
        conv: nn.Module
        if transposed:
            extra = stride - 1 if output_padding is None else output_padding
            conv = nn.ConvTranspose3d(in_channels, out_channels, kernel_size, stride=stride, padding=pad,
                                      output_padding=extra, bias=bias)
        else:
            conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=pad, bias=bias)
        self.add_module("conv", conv)
        if not conv_only:
            adn = nn.Sequential()
            adn.add_module("N", norm_layer(norm, out_channels))
            adn.add_module("D", nn.Dropout(dropout))
            adn.add_module("A", nn.PReLU())
            self.add_module("adn", adn)


def plain_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *,
               transposed: bool = False, bias: bool = False) -> Convolution:
    """A bare convolution in a ``Convolution`` container (key ``<name>.conv.weight``), padded
    as MONAI's DynUNet blocks pad: ``(kernel - stride + 1) // 2``, and for a transposed one
    ``output_padding = 2 * padding + stride - kernel``."""
    pad = (kernel_size - stride + 1) // 2
    extra = 2 * pad + stride - kernel_size
    if pad < 0 or extra < 0:
        raise InputError(f"kernel {kernel_size} with stride {stride} needs negative padding")
    return Convolution(in_channels, out_channels, stride=stride, kernel_size=kernel_size, transposed=transposed,
                       conv_only=True, bias=bias, padding=pad, output_padding=extra if transposed else None)


class ResidualUnit(nn.Module):
    """``subunits`` Convolutions (the first strided) plus a residual path: the input itself,
    or a convolution when the stride or the channels change (kernel 1 when only the channels
    do). ``last_conv_only`` leaves the last subunit without norm and activation.
    (B, in, D, H, W) -> (B, out, D/stride, H/stride, W/stride)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, subunits: int = 2,
                 kernel_size: int = 3, last_conv_only: bool = False, norm: NormName = "instance",
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        self.residual: nn.Module = nn.Identity()
        count = max(1, subunits)
        channels, step = in_channels, stride
        for i in range(count):
            self.conv.add_module(f"unit{i}", Convolution(
                channels, out_channels, stride=step, kernel_size=kernel_size, norm=norm, dropout=dropout,
                conv_only=last_conv_only and i == count - 1))
            channels, step = out_channels, 1
        if stride != 1 or in_channels != out_channels:
            kernel, pad = (kernel_size, (kernel_size - 1) // 2) if stride != 1 else (1, 0)
            self.residual = nn.Conv3d(in_channels, out_channels, kernel, stride, pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.residual(x)
        return self.conv(x) + res


class SkipConnection(nn.Module):
    """``cat([x, submodule(x)], dim=1)``: the UNet's skip at one level."""

    def __init__(self, submodule: nn.Module) -> None:
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.submodule(x)], dim=1)


class UnetResBlock(nn.Module):
    """Two convolutions (no bias) with norm, LeakyReLU(0.01) between, and a residual (a 1x1x1
    convolution + norm when the channels or the stride change), then LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3, stride: int = 1,
                 norm: NormName = "instance") -> None:
        super().__init__()
        self.conv1 = plain_conv(in_channels, out_channels, kernel_size, stride)
        self.conv2 = plain_conv(out_channels, out_channels, kernel_size, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.01, inplace=True)
        self.norm1 = norm_layer(norm, out_channels)
        self.norm2 = norm_layer(norm, out_channels)
        self.downsample = in_channels != out_channels or stride != 1
        if self.downsample:
            self.conv3 = plain_conv(in_channels, out_channels, 1, stride)
            self.norm3 = norm_layer(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.lrelu(self.norm1(self.conv1(x)))))
        residual = self.norm3(self.conv3(x)) if self.downsample else x
        out += residual
        return self.lrelu(out)


class UnetrBasicBlock(nn.Module):
    """SwinUNETR's encoder block: a :class:`UnetResBlock` under the name ``layer``."""

    def __init__(self, in_channels: int, out_channels: int, norm: NormName = "instance") -> None:
        super().__init__()
        self.layer = UnetResBlock(in_channels, out_channels, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class UnetrUpBlock(nn.Module):
    """SwinUNETR's decoder block: a 2x transposed convolution (no bias), concatenation with
    the skip (upsampled first), then a :class:`UnetResBlock` from 2*out to out channels."""

    def __init__(self, in_channels: int, out_channels: int, norm: NormName = "instance") -> None:
        super().__init__()
        self.transp_conv = plain_conv(in_channels, out_channels, 2, 2, transposed=True)
        self.conv_block = UnetResBlock(2 * out_channels, out_channels, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat((self.transp_conv(x), skip), dim=1))


class UnetOutBlock(nn.Module):
    """A 1x1x1 convolution with bias: features to class logits."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = plain_conv(in_channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
