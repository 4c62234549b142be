"""SwinUNETR (MONAI's ``monai.networks.nets.SwinUNETR``) with taps at its Swin stages and encoder blocks.

Two registry entries share the taps ``swinViT.0`` .. ``swinViT.4``:

``swin_unetr``
    The full network (Swin transformer + the convolutional encoder/decoder), loading full
    SwinUNETR state dicts (MONAI's key layout, e.g. the BTCV fine-tuned ``model.pt``; a DDP
    ``module.`` prefix is accepted). Extra taps at the encoder blocks ``encoder1`` (input
    resolution), ``encoder2``, ``encoder3``, ``encoder4`` and ``encoder10`` (the bottleneck).
``swin_unetr_encoder``
    The Swin transformer (``swinViT``) alone, loading MONAI's self-supervised
    ``model_swinvit.pt`` (keys ``module.patch_embed.*``, ``module.layers1.0.*``,
    ``mlp.fc1``/``fc2``) strictly into ``swinViT``, or the ``swinViT.*`` part of a full
    SwinUNETR checkpoint. That checkpoint holds no encoder/decoder weights, so the encoder-block
    taps are not offered here: with random encoders their features would be meaningless, and a
    strict load into the full network would (rightly) fail on the missing keys.

For a 96^3 input and feature size 48 the Swin states are 48@48^3, 96@24^3, 192@12^3, 384@6^3
and 768@3^3, layer-normalised over channels (``normalize=True``), as the decoder sees them.
The network is written in plain torch (:mod:`.swin_net` for the Swin encoder,
:mod:`.monai_blocks` for the convolutional blocks; no MONAI import, see there why) under
MONAI's attribute names and in MONAI's construction order, so state dicts are interchangeable
with ``SwinUNETR``'s, a seed gives MONAI's random weights, and every tap equals MONAI's
exactly (``tests/parity``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medfeat.errors import InputError, UnknownNameError, WeightsError
from medfeat.export.backbones.models.monai_blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from medfeat.export.backbones.models.swin_net import SwinEncoder
from medfeat.export.backbones.registry import converter_for, register_backbone
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TappedModel, TapSpec

DEFAULT_CONFIG: dict[str, Any] = dict(
    input_size=(96, 96, 96), in_channels=1, out_channels=14, feature_size=48,
    depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7,
)
# Smallest feature size (divisible by 12) and input (divisible by 2**5). Its 1^3 bottleneck
# cannot be instance-normalised, so the tiny variant's conv blocks use batch norm.
TINY_CONFIG: dict[str, Any] = dict(input_size=(32, 32, 32), feature_size=12, depths=(2, 1, 1, 1), window_size=4,
                                    out_channels=3, norm_name="batch")

# Which Swin state each encoder block consumes (None: the input itself), and channel multiple.
_ENCODERS: dict[str, tuple[int | None, int, int]] = {
    # name: (swin state index, channels / feature_size, reduction)
    "encoder1": (None, 1, 1),
    "encoder2": (0, 1, 2),
    "encoder3": (1, 2, 4),
    "encoder4": (2, 4, 8),
    "encoder10": (4, 16, 32),
}
# Forward order: a tap comes after every tap whose computation it needs or shares.
_FULL_ORDER = ("encoder1", "swinViT.0", "encoder2", "swinViT.1", "encoder3", "swinViT.2", "encoder4",
               "swinViT.3", "swinViT.4", "encoder10")
_STAGES = ("layers1", "layers2", "layers3", "layers4")


def _stage_index(tap: str) -> int:
    """Index of the Swin state a tap needs (-1: none, only the input)."""
    if tap.startswith("swinViT."):
        return int(tap.split(".")[1])
    index = _ENCODERS[tap][0]
    return -1 if index is None else index


class SwinUNETRTaps(TappedModel):
    """MONAI SwinUNETR with taps; ``forward``: (B, C, D, H, W) -> (B, out_channels, D, H, W) logits.

    With ``encoder_only`` it holds only ``swinViT`` and its plain forward returns the last Swin
    state (B, 16 * feature_size, D/32, H/32, W/32).
    """

    def __init__(self, input_size: Sequence[int] | int = 96, in_channels: int = 1, out_channels: int = 14,
                 feature_size: int = 48, depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: Sequence[int] | int = 7,
                 norm_name: str = "instance", encoder_only: bool = False) -> None:
        super().__init__()
        if feature_size % 12:
            raise InputError(f"swin_unetr: feature_size {feature_size} is not divisible by 12")
        size = (input_size,) * 3 if isinstance(input_size, int) else tuple(input_size)
        self.input_size = size
        self.encoder_only = encoder_only
        self._name = "swin_unetr_encoder" if encoder_only else "swin_unetr"
        self.normalize = True
        ws = (window_size,) * 3 if isinstance(window_size, int) else tuple(window_size)
        window = (int(ws[0]), int(ws[1]), int(ws[2]))
        fs = feature_size
        # MONAI's SwinUNETR creates these in this order; keeping it keeps its random init.
        self.swinViT: SwinEncoder | None = SwinEncoder(in_channels, fs, window, depths, num_heads)
        if not encoder_only:
            for name, cin, cout in (("encoder1", in_channels, fs), ("encoder2", fs, fs), ("encoder3", 2 * fs, 2 * fs),
                                    ("encoder4", 4 * fs, 4 * fs), ("encoder10", 16 * fs, 16 * fs)):
                self.add_module(name, UnetrBasicBlock(cin, cout, norm_name))
            for name, cin, cout in (("decoder5", 16 * fs, 8 * fs), ("decoder4", 8 * fs, 4 * fs),
                                    ("decoder3", 4 * fs, 2 * fs), ("decoder2", 2 * fs, fs), ("decoder1", fs, fs)):
                self.add_module(name, UnetrUpBlock(cin, cout, norm_name))
            self.add_module("out", UnetOutBlock(fs, out_channels))
        self._order = [f"swinViT.{i}" for i in range(5)] if encoder_only else list(_FULL_ORDER)

    def tap_names(self) -> list[str]:
        return list(self._order)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or any(s % 32 for s in x.shape[2:]):
            raise InputError(f"{self._name}: input of shape {tuple(x.shape)} is not (B, C, D, H, W) "
                             "with D, H, W divisible by 32")

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        """Raw taps as (B, C, D', H', W') maps; runs the Swin stages only as deep as needed."""
        self._check(x)
        unknown = [t for t in taps if t not in self._order]
        if unknown:
            raise UnknownNameError(f"{self._name}: unknown or pruned tap {unknown[0]!r}; "
                                   f"taps are: {', '.join(self._order)}")
        upto = max(_stage_index(t) for t in taps)
        states = self.swinViT.states(x, upto, self.normalize) if upto >= 0 and self.swinViT is not None else []
        out: dict[str, torch.Tensor] = {}
        for tap in taps:
            if tap.startswith("swinViT."):
                out[tap] = states[int(tap.split(".")[1])]
            else:
                index = _ENCODERS[tap][0]
                out[tap] = getattr(self, tap)(x if index is None else states[index])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder_only:
            return self.forward_taps(x, ["swinViT.4"])["swinViT.4"]
        if "encoder10" not in self._order or getattr(self, "out", None) is None:
            raise UnknownNameError("swin_unetr: the decoder was pruned; use forward_taps")
        taps = ["encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "swinViT.3"]
        t = self.forward_taps(x, taps)
        dec = self.get_submodule("decoder5")(t["encoder10"], t["swinViT.3"])
        for block, skip in (("decoder4", "encoder4"), ("decoder3", "encoder3"), ("decoder2", "encoder2"),
                            ("decoder1", "encoder1")):
            dec = self.get_submodule(block)(dec, t[skip])
        return self.get_submodule("out")(dec)

    def prune_after(self, tap: str) -> None:
        if tap not in self._order:
            raise UnknownNameError(f"{self._name}: unknown tap {tap!r}; taps are: {', '.join(self._order)}")
        keep = self._order[: self._order.index(tap) + 1]
        upto = max(_stage_index(t) for t in keep)
        if upto < 0:  # only encoder1, which reads the input: no Swin stage is needed
            self.swinViT = None
        for i in range(max(upto, 0), 4 if self.swinViT is not None else 0):  # stage i produces state i + 1
            setattr(self.swinViT, _STAGES[i], nn.ModuleList())
        for name, _ in list(self.named_children()):
            if name != "swinViT" and name not in keep:
                setattr(self, name, None)
        self._order = keep


def _full_taps(**config: Any) -> tuple[TapSpec, ...]:
    fs = {**DEFAULT_CONFIG, **config}["feature_size"]
    table = []
    for name in _FULL_ORDER:
        if name.startswith("swinViT."):
            i = int(name.split(".")[1])
            table.append(TapSpec(name, fs * 2 ** i, 2 ** (i + 1)))
        else:
            _, mult, reduction = _ENCODERS[name]
            table.append(TapSpec(name, fs * mult, reduction))
    return tuple(table)


def _encoder_taps(**config: Any) -> tuple[TapSpec, ...]:
    return tuple(t for t in _full_taps(**config) if t.name.startswith("swinViT."))


def _strip_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _from_monai_full(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """A full MONAI SwinUNETR state dict (``swinViT.*``, ``encoder1.*``, ..., ``out.*``)."""
    state = _strip_module(state)
    if any(k.startswith("encoder1.") for k in state) and any(k.startswith("swinViT.") for k in state):
        return state
    return None


def _ssl_key(key: str) -> str:
    key = key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
    return "swinViT." + key


# Heads of the self-supervised pretraining task (rotation, contrastive, reconstruction): not
# part of the encoder, dropped when a pretraining checkpoint still carries them.
_SSL_HEADS = ("rotation_pre.", "rotation_head.", "contrastive_pre.", "contrastive_head.", "conv.")


def _from_ssl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """MONAI's self-supervised ``model_swinvit.pt``: the Swin encoder under ``module.``."""
    state = _strip_module(state)
    if any(k.startswith("encoder1.") for k in state):  # a full SwinUNETR, not this format
        return None
    for prefix in ("swinViT.", "swin_vit."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    if "patch_embed.proj.weight" not in state or not any(k.startswith("layers1.") for k in state):
        return None
    return {_ssl_key(k): v for k, v in state.items() if not k.startswith(_SSL_HEADS)}


def _from_full_to_encoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The ``swinViT.*`` part of a full SwinUNETR checkpoint (the rest is not this model's)."""
    full = _from_monai_full(state)
    if full is None:
        return None
    return {k: v for k, v in full.items() if k.startswith("swinViT.")}


def _refuse_ssl_for_full(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    if _from_ssl(state) is not None:
        raise WeightsError("swin_unetr: this is a self-supervised Swin encoder checkpoint (model_swinvit.pt) "
                           "without encoder/decoder weights; load it into swin_unetr_encoder")
    return None


def _build_full(**config: Any) -> SwinUNETRTaps:
    return SwinUNETRTaps(**{**DEFAULT_CONFIG, **config})


def _build_encoder(**config: Any) -> SwinUNETRTaps:
    return SwinUNETRTaps(**{**DEFAULT_CONFIG, **config}, encoder_only=True)


_LICENCE = "Apache-2.0 (MONAI SwinUNETR; self-supervised and BTCV weights from Project-MONAI/research-contributions)"
# SwinUNETR was trained on intensities scaled to [0, 1]; for MRI that is the percentile clamp.
_PREPROCESS = Preprocess("percentile_clamp", {"upper": 99.0})

SPEC = register_backbone(BackboneSpec(
    name="swin_unetr",
    input_kind="volume3d",
    input_size=DEFAULT_CONFIG["input_size"],
    in_channels=1,
    preprocess=_PREPROCESS,
    taps=_full_taps(),
    taps_for=_full_taps,
    build=_build_full,
    weight_formats=("monai_swinunetr",),
    convert_checkpoint=converter_for(
        {"monai_swinunetr": _from_monai_full, "model_swinvit": _refuse_ssl_for_full}, "swin_unetr"),
    tiny_config=TINY_CONFIG,
    licence=_LICENCE,
    description="MONAI SwinUNETR (feature 48): Swin stages and conv encoder blocks",
))

ENCODER_SPEC = register_backbone(BackboneSpec(
    name="swin_unetr_encoder",
    input_kind="volume3d",
    input_size=DEFAULT_CONFIG["input_size"],
    in_channels=1,
    preprocess=_PREPROCESS,
    taps=_encoder_taps(),
    taps_for=_encoder_taps,
    build=_build_encoder,
    weight_formats=("model_swinvit", "monai_swinunetr"),
    convert_checkpoint=converter_for(
        {"model_swinvit": _from_ssl, "monai_swinunetr": _from_full_to_encoder}, "swin_unetr_encoder"),
    tiny_config=TINY_CONFIG,
    licence=_LICENCE,
    description="SwinUNETR's Swin transformer alone (self-supervised model_swinvit.pt)",
))
