"""The uniGradICON registration network, written for medfeat (no ITK, no ``icon_registration``).

The published network (``unigradicon.make_network(..., include_last_step=True).regis_net``) is
a cascade of four ``tallUNet2`` displacement networks, A to D::

    TwoStep(TwoStep(Down(TwoStep(Down(FFVF(U_A)), FFVF(U_B))), FFVF(U_C)), FFVF(U_D))

Stage A runs on the pair average-pooled twice (44³ for a 175³ input), B once (88³), C and D
at full size. Each later stage sees the moving image warped by the transform of the stages
before it, plus the fixed image; the final transform is the composition
``phi_A ∘ psi_B ∘ psi_C ∘ psi_D``.

Coordinates follow ``icon_registration`` (mermaid): a map is a (B, 3, D, H, W) tensor of
positions in [0, 1]³, channel ``d`` indexing spatial axis ``d`` (axis 0 = D), voxel ``i``
at ``i / (n - 1)``. A UNet's output is a displacement in those units. Images are sampled
trilinearly with ``align_corners=True`` and border padding (upstream's
``compute_warped_image_multiNC(..., zero_boundary=False)``), through ``grid_sample``, so the
graph exports to ONNX (GridSample, opset >= 20 for 5-D).

Parameter names inside each UNet are upstream's (``downConvs``, ``upConvs``, ``batchNorms``,
``lastConv``); :mod:`medfeat.export.backbones.models.unigradicon` maps the cascade's nested prefixes.

Besides the network's own outputs, each stage offers two features of its map (tensor-based
morphometry, :mod:`medfeat.export.backbones.deformation`): ``S.phi.disp``, the displacement in
input voxels, and ``S.phi.logjac``, the log-Jacobian determinant.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from medfeat.errors import InputError, UnknownNameError
from medfeat.export.backbones.deformation import displacement_voxels, log_jacobian
from medfeat.export.backbones.spec import TappedModel

STAGES = ("A", "B", "C", "D")
# Times each stage's input is average-pooled by 2 (DownsampleRegistration wrappers around it).
STAGE_POOLINGS = {"A": 2, "B": 1, "C": 0, "D": 0}
DOWN_CHANNELS = (16, 32, 64, 256, 512)
UP_CHANNELS = (16, 32, 64, 128, 256)
ORDERS = ("moving_fixed", "fixed_moving")
# Features computed from a stage's map ``S.phi`` (after it in the tap order).
MAP_FEATURES = ("phi.disp", "phi.logjac")


def stage_tap_names(stage: str, depth: int) -> list[str]:
    """Taps of one stage in forward order: ``enc.0..depth-1``, ``dec.depth-1..0``, ``phi``."""
    enc = [f"{stage}.enc.{k}" for k in range(depth)]
    dec = [f"{stage}.dec.{d}" for d in reversed(range(depth))]
    return enc + dec + [f"{stage}.phi"]


def stage_feature_names(stage: str) -> list[str]:
    """Features of one stage's map, computed after ``S.phi``: ``S.phi.disp``, ``S.phi.logjac``."""
    return [f"{stage}.{f}" for f in MAP_FEATURES]


def is_map_level(level: str) -> bool:
    """True for a stage's map and its features (``phi``, ``phi.disp``, ``phi.logjac``)."""
    return level == "phi" or level.startswith("phi.")


def _pad_or_crop_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` channels, or zero-pad in front up to ``channels`` (upstream)."""
    y = x[:, :channels]
    if y.shape[1] < channels:
        y = F.pad(y, (0, 0, 0, 0, 0, 0, channels - y.shape[1], 0))
    return y


class UNet2(nn.Module):
    """``icon_registration.networks.UNet2`` in 3-D: (moving, fixed) -> displacement / 10.

    Parameters
    ----------
    down_channels : encoder widths after the input, e.g. (16, 32, 64, 256, 512).
    up_channels : decoder widths per depth, e.g. (16, 32, 64, 128, 256).
    in_channels : channels of the concatenated pair (2).

    Encoder level ``k`` halves the size (ceil): a stride-2 3x3x3 conv of the leaky-ReLU'd input
    plus the average-pooled input, zero-padded in channels. Decoder depth ``d`` (run from the
    deepest up) doubles it with a k4 s2 transposed conv plus the trilinearly upsampled input,
    applies batch norm, crops to the skip's size and concatenates the skip.
    """

    def __init__(self, down_channels: Sequence[int] = DOWN_CHANNELS,
                 up_channels: Sequence[int] = UP_CHANNELS, in_channels: int = 2) -> None:
        super().__init__()
        down = [in_channels, *down_channels]
        up = list(up_channels)
        self.depth = len(up)
        if len(down) != self.depth + 1:
            raise InputError(f"unigradicon: {len(down_channels)} encoder widths but {len(up)} decoder widths")
        up_in = [down[d + 1] + (up[d + 1] if d + 1 < self.depth else 0) for d in range(self.depth)]
        self.down_widths = tuple(down)
        self.up_widths = tuple(up)
        self.downConvs = nn.ModuleList(
            nn.Conv3d(down[d], down[d + 1], kernel_size=3, padding=1, stride=2) for d in range(self.depth))
        # The decoder's layers become None where pruning deletes them (see prune_after).
        self.upConvs: nn.ModuleList | None = nn.ModuleList(
            nn.ConvTranspose3d(up_in[d], up[d], kernel_size=4, padding=1, stride=2) for d in range(self.depth))
        self.batchNorms: nn.ModuleList | None = nn.ModuleList(nn.BatchNorm3d(up[d]) for d in range(self.depth))
        last = nn.Conv3d(down[0] + up[0], 3, kernel_size=3, padding=1)
        # Upstream starts every stage as the identity transform.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(cast(torch.Tensor, last.bias))  # made with a bias
        self.lastConv: nn.Conv3d | None = last

    def run(self, moving: torch.Tensor, fixed: torch.Tensor, want: set[str],
            stop: str | None, out: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Run up to level ``stop`` (``"enc.k"``, ``"dec.d"``) or to the end when None.

        Outputs of the levels named in ``want`` go into ``out``; returns the displacement
        (B, 3, *size) in [0, 1] units, or None when stopped early.
        """
        x = torch.cat([moving, fixed], 1)
        decode = stop is None or stop.startswith("dec.")
        skips = []
        for k in range(self.depth):
            if decode:  # an encoder-only run frees each level as it goes
                skips.append(x)
            y = self.downConvs[k](F.leaky_relu(x))
            x = y + _pad_or_crop_channels(F.avg_pool3d(x, 2, ceil_mode=True), y.shape[1])
            if self._emit(f"enc.{k}", x, want, stop, out):
                return None
        for d in reversed(range(self.depth)):
            y = _kept(self.upConvs, d)(F.leaky_relu(x))
            x = y + F.interpolate(_pad_or_crop_channels(x, y.shape[1]), scale_factor=2,
                                  mode="trilinear", align_corners=False)
            x = _kept(self.batchNorms, d)(x)
            size = skips[d].shape[2:]
            x = x[:, :, : size[0], : size[1], : size[2]]
            if self._emit(f"dec.{d}", x, want, stop, out):
                return None
            x = torch.cat([x, skips[d]], 1)
        if self.lastConv is None:
            raise TypeError("unigradicon: the last convolution was pruned")
        return self.lastConv(x) / 10

    @staticmethod
    def _emit(level: str, x: torch.Tensor, want: set[str], stop: str | None,
              out: dict[str, torch.Tensor]) -> bool:
        if level in want:
            out[level] = x
        return level == stop

    def prune_after(self, level: str | None) -> None:
        """Delete every layer after ``level`` (``"enc.k"``, ``"dec.d"``; None keeps all)."""
        if level is None:
            return
        kind, index = level.split(".")
        k = int(index)
        self.lastConv = None
        if kind == "enc":
            del self.downConvs[k + 1:]
            self.upConvs = None
            self.batchNorms = None
            return
        # Decoder depths below ``k`` run after it; None entries keep upstream's indices
        # (ModuleList types its entries as modules; nn.Module allows None children).
        for d in range(k):
            for layers in (self.upConvs, self.batchNorms):
                if layers is not None:
                    layers._modules[str(d)] = None  # type: ignore[assignment]


def _kept(layers: nn.ModuleList | None, index: int) -> nn.Module:
    """Layer ``index`` of ``layers``; a run never reaches the layers pruning deleted."""
    layer = None if layers is None else layers[index]
    if layer is None:
        raise TypeError(f"unigradicon: decoder layer {index} was pruned")
    return layer


def identity_grid(size: Sequence[int], device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The identity map (1, 3, *size) in ``dtype``: voxel ``i`` of axis ``d`` at ``i / (size[d] - 1)``.

    Computed in float64 and rounded once to ``dtype``, as ``mermaidlite.identity_map_multiN``
    does for float32. The network passes its input's dtype, so at fp16 / bf16 the coordinates
    and ``grid_sample``'s grid match the image (grid_sample refuses mixed dtypes).
    """
    axes = [torch.arange(n, dtype=torch.float64, device=device) * (1.0 / (n - 1)) for n in size]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grids).unsqueeze(0).to(dtype)


def warp(image: torch.Tensor, coords: torch.Tensor, padding_mode: str = "border") -> torch.Tensor:
    """Sample ``image`` (B, C, D, H, W) at ``coords`` (B or 1, 3, *out) in [0, 1] units.

    Trilinear, ``align_corners=True``, border padding (``"zeros"``: upstream's
    ``zero_boundary=True``, which its training loss uses); returns (B, C, *out). The scale of
    each axis is computed as upstream's ``scale_map`` does, so results agree to the bit.
    """
    size = image.shape[2:]
    # scale_map: map * (2 / (n - 1) / spacing) - 1 with spacing = 1 / (n - 1); grid is (x, y, z).
    channels = [coords[:, d] * (2.0 / (size[d] - 1.0) / (1.0 / (size[d] - 1))) - 1.0 for d in (2, 1, 0)]
    grid = torch.stack(channels, dim=-1)
    if grid.shape[0] == 1 and image.shape[0] != 1:
        grid = grid.expand(image.shape[0], -1, -1, -1, -1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)


def compose(displacements: list[torch.Tensor], grid: torch.Tensor) -> torch.Tensor:
    """Evaluate ``phi_1 ∘ ... ∘ phi_n`` at ``grid``, where ``phi_i(X) = X + u_i(X)``.

    ``displacements`` is [u_1, ..., u_n] (stage order); the last is applied first. Upstream's
    ``FunctionFromVectorField`` skips the interpolation when the coordinates are its
    identity map of the displacement's exact shape (batch included); so do we, for parity.
    """
    coords = grid
    for i, disp in enumerate(reversed(displacements)):
        if i == 0 and disp.shape == grid.shape:
            coords = grid + disp
        else:
            coords = coords + warp(disp, coords)
    return coords


def _pyramid(moving: torch.Tensor, fixed: torch.Tensor, levels: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The pair at full size, then average-pooled by 2 (ceil mode) ``levels`` times."""
    pyramid = [(moving, fixed)]
    for _ in range(levels):
        m, f = pyramid[-1]
        pyramid.append((F.avg_pool3d(m, 2, ceil_mode=True), F.avg_pool3d(f, 2, ceil_mode=True)))
    return pyramid


class UniGradICONNet(TappedModel):
    """uniGradICON's ``regis_net`` as a :class:`TappedModel` on pair tensors.

    Parameters
    ----------
    order : ``"moving_fixed"`` (channel 0 moving, 1 fixed) or ``"fixed_moving"``.
    down_channels, up_channels : UNet widths (the published model: the module defaults).

    ``forward(x)`` takes (B, 2, D, H, W) and returns the final map (B, 3, D, H, W): the
    registered transform evaluated on the identity grid, in [0, 1] units (upstream's
    ``regis_net(moving, fixed)(identity_map)``). Taps per stage S (:meth:`tap_names`, the
    network's own outputs): ``S.enc.k`` and ``S.dec.d`` (UNet levels, ``dec`` before the skip
    concatenation) and ``S.phi`` (the transform of stages A..S evaluated on the full-size
    identity grid, (B, 3, D, H, W)). :meth:`forward_taps` also computes the features of each
    map (:meth:`feature_names`): ``S.phi.disp`` (B, 3, D, H, W), the displacement in input
    voxels, and ``S.phi.logjac`` (B, 1, D, H, W), the log-Jacobian determinant; in the
    forward order they follow ``S.phi``.
    """

    def __init__(self, order: str = "moving_fixed", down_channels: Sequence[int] = DOWN_CHANNELS,
                 up_channels: Sequence[int] = UP_CHANNELS) -> None:
        super().__init__()
        if order not in ORDERS:
            raise InputError(f"unigradicon: order {order!r} is not one of {', '.join(ORDERS)}")
        self.order = order
        self.stages = nn.ModuleDict({s: UNet2(down_channels, up_channels) for s in STAGES})
        self.depth = len(up_channels)
        # Network taps and map features in forward order (each map's features after it).
        self._taps = [t for s in STAGES for t in stage_tap_names(s, self.depth) + stage_feature_names(s)]
        self._index = {t: i for i, t in enumerate(self._taps)}
        self._last_kept = len(self._taps) - 1

    def tap_names(self) -> list[str]:
        """The network's own outputs (upstream's modules compute each of them)."""
        features = set(self.feature_names())
        return [t for t in self._taps if t not in features]

    def feature_names(self) -> list[str]:
        """The features of the stage maps (computed here from ``S.phi``)."""
        return [t for s in STAGES for t in stage_feature_names(s)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = f"{STAGES[-1]}.phi"  # the network's output; the map features come after it
        return self.forward_taps(x, [last])[last]

    def displacements(self, moving: torch.Tensor, fixed: torch.Tensor, stages: str = "ABCD") -> list[torch.Tensor]:
        """Each stage's displacement, A to the last of ``stages``: [(B, 3, *stage size)] in [0, 1] units.

        The transform is ``x -> phi_A(psi_B(...(x)))`` with ``psi_S(x) = x + u_S(x)`` (see
        :func:`compose`); training evaluates it at points other than the identity grid.
        """
        kept = "".join(self.stages)
        if not stages or not kept.startswith(stages):
            raise InputError(f"unigradicon: stages {stages!r} are not a prefix of {kept}")
        last = stages[-1]
        pyramid = _pyramid(moving, fixed, max(STAGE_POOLINGS.values()))
        disps: list[torch.Tensor] = []
        for stage in STAGES[: STAGES.index(last) + 1]:
            m, f = pyramid[STAGE_POOLINGS[stage]]
            if disps:
                m = warp(m, compose(disps, identity_grid(m.shape[2:], m.device, m.dtype)))
            unet = cast(UNet2, self.stages[stage])
            disp = unet.run(m, f, set(), None, {})
            if disp is None:  # a run without a stop level always returns the displacement
                raise RuntimeError(f"unigradicon: stage {stage} returned no displacement")
            disps.append(disp)
        return disps

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        """Raw outputs ``{tap: tensor}``; stages after the last tap's stage do not run."""
        want = self._check_taps(taps)
        moving, fixed = self._split(x)
        pyramid = _pyramid(moving, fixed, max(STAGE_POOLINGS.values()))
        last = self._taps[max(self._index[t] for t in want)]
        last_stage = last.split(".")[0]
        out: dict[str, torch.Tensor] = {}
        disps: list[torch.Tensor] = []
        grids: dict[tuple[int, ...], torch.Tensor] = {}  # identity maps by size, made when needed

        def grid(size: torch.Size) -> torch.Tensor:
            if tuple(size) not in grids:
                grids[tuple(size)] = identity_grid(size, moving.device, moving.dtype)
            return grids[tuple(size)]

        for stage in STAGES[: STAGES.index(last_stage) + 1]:
            m, f = pyramid[STAGE_POOLINGS[stage]]
            if disps:
                # TwoStepRegistration: warp the moving image by the stages so far at this size.
                m = warp(m, compose(disps, grid(m.shape[2:])))
            levels = {t.split(".", 1)[1] for t in want if t.startswith(stage + ".")}
            last_level = last.split(".", 1)[1]
            stop = last_level if stage == last_stage and not is_map_level(last_level) else None
            found: dict[str, torch.Tensor] = {}
            disp = self._stage(stage).run(m, f, levels, stop, found)
            out.update({f"{stage}.{k}": v for k, v in found.items()})
            if disp is None:
                break
            disps.append(disp)
            if any(is_map_level(level) for level in levels):
                out.update(self._map_taps(stage, compose(disps, grid(moving.shape[2:])), levels))
        return out

    @staticmethod
    def _map_taps(stage: str, phi: torch.Tensor, levels: set[str]) -> dict[str, torch.Tensor]:
        """The wanted ones of ``S.phi`` and its features, from the stage's map on the full grid."""
        out = {f"{stage}.phi": phi} if "phi" in levels else {}
        if "phi.disp" in levels:
            out[f"{stage}.phi.disp"] = displacement_voxels(phi)
        if "phi.logjac" in levels:
            out[f"{stage}.phi.logjac"] = log_jacobian(phi)
        return out

    def prune_after(self, tap: str) -> None:
        """Delete later stages and the layers of ``tap``'s stage after it."""
        index = self._tap_index(tap)
        stage, level = tap.split(".", 1)
        for later in STAGES[STAGES.index(stage) + 1:]:
            if later in self.stages:
                del self.stages[later]
        self._stage(stage).prune_after(None if is_map_level(level) else level)
        self._last_kept = min(self._last_kept, index)

    def _stage(self, name: str) -> UNet2:
        return cast(UNet2, self.stages[name])  # stages holds UNet2s only

    def _tap_index(self, tap: str) -> int:
        if tap not in self._index:
            raise UnknownNameError(f"unigradicon: unknown tap {tap!r}; taps are: {', '.join(self._taps)}")
        if self._index[tap] > self._last_kept:
            raise UnknownNameError(
                f"unigradicon: tap {tap!r} was pruned (model truncated after {self._taps[self._last_kept]!r})")
        return self._index[tap]

    def _check_taps(self, taps: list[str]) -> set[str]:
        if not taps:
            raise UnknownNameError("unigradicon: no taps requested")
        for tap in taps:
            self._tap_index(tap)
        return set(taps)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 5 or x.shape[1] != 2:
            raise InputError(f"unigradicon: input must be a (B, 2, D, H, W) pair, got {tuple(x.shape)}")
        # Stage A's last encoder level average-pools a map 2**(depth - 1) times smaller than
        # stage A's input, which must keep >= 2 voxels per axis.
        smallest = 2 ** (max(STAGE_POOLINGS.values()) + self.depth - 1) + 1
        if min(x.shape[2:]) < smallest:
            raise InputError(f"unigradicon: every spatial size must be >= {smallest}, got {tuple(x.shape[2:])}")
        first, second = x[:, 0:1], x[:, 1:2]
        return (first, second) if self.order == "moving_fixed" else (second, first)
