"""``timm:<name>``: any timm model, built by timm with ``pretrained=False`` (never a download).

Taps are the model's ``feature_info`` entries (module names such as ``layer3`` or
``blocks.6``; indices count along them) plus ``pre_logits``, the pooled embedding before the
classifier. They are read with ``forward_intermediates`` and the model truncated with
``prune_intermediate_layers`` where the model has them, else with forward hooks on the
``feature_info`` modules (:mod:`~medfeat.export.backbones.generic.hooks`). Input size, mean
and std come from timm's pretrained config (metadata shipped with timm, nothing fetched);
``--input-size`` / ``img_size`` and ``--intensity`` override them. Weights: a local state
dict in timm's own key layout (safetensors or ``torch.load``), loaded strictly.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medfeat.errors import InputError, UnknownNameError
from medfeat.export.backbones.generic import ModelInputs, array_name, parse_intensity
from medfeat.export.backbones.generic.hooks import HookedModel
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TappedModel, TapSpec

PRE_LOGITS = "pre_logits"
# build argument that taps the feature_info modules with forward hooks even where the model
# has forward_intermediates (the path models without it take)
HOOKS_ARG = "tap_with_hooks"


def create(target: str, config: dict[str, Any], device: str | None = None) -> nn.Module:
    """``timm.create_model(target, pretrained=False, **config)`` (on ``device``)."""
    import timm

    if config.get("pretrained"):
        raise InputError(f"timm:{target}: the pretrained argument would download weights; give --weights FILE")
    try:
        if device is None:
            return timm.create_model(target, pretrained=False, **config)
        with torch.device(device):
            return timm.create_model(target, pretrained=False, **config)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise UnknownNameError(f"timm:{target}: timm has no model {target!r}") from None
        raise InputError(f"timm:{target}: {exc}") from exc
    except TypeError as exc:
        raise InputError(f"timm:{target}: the model refused its arguments {config} ({exc})") from exc


class TimmModel(TappedModel):
    """A timm model read with ``forward_intermediates`` (maps, NCHW) and ``pre_logits``."""

    def __init__(self, net: nn.Module, taps: list[TapSpec]) -> None:
        super().__init__()
        # a timm model: forward_intermediates and forward_head are on each model class, no typed base
        self.net: Any = net
        self.index = {t.name: i for i, t in enumerate(taps) if t.name != PRE_LOGITS}
        self.order = [t.name for t in taps]

    def tap_names(self) -> list[str]:
        return list(self.order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_taps(self, x: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        maps = sorted((self.index[t], t) for t in taps if t != PRE_LOGITS)
        out: dict[str, torch.Tensor] = {}
        indices = [i for i, _ in maps]
        if PRE_LOGITS in taps:
            if indices:
                final, inter = self.net.forward_intermediates(x, indices=indices)
            else:
                final, inter = self.net.forward_features(x), []
            out[PRE_LOGITS] = self.net.forward_head(final, pre_logits=True)
        else:
            inter = self.net.forward_intermediates(x, indices=indices, intermediates_only=True, stop_early=True)
        out.update({t: y for (_, t), y in zip(maps, inter)})
        return {t: out[t] for t in taps}

    def prune_after(self, tap: str) -> None:
        if tap != PRE_LOGITS:
            self.net.prune_intermediate_layers(indices=[self.index[tap]], prune_norm=True, prune_head=True)


def _taps(net: Any) -> list[TapSpec]:
    info = getattr(net, "feature_info", None)
    if not info:
        raise InputError(f"timm model {type(net).__name__} declares no feature_info; use module:timm:create_model")
    taps = [TapSpec(str(f["module"]), int(f["num_chs"]), int(f.get("reduction", 1)), "map", "avg") for f in info]
    if hasattr(net, "forward_intermediates") and hasattr(net, "forward_head"):
        width = int(getattr(net, "head_hidden_size", None) or net.num_features)
        taps.append(TapSpec(PRE_LOGITS, width, 1, "vector", "none"))
    return taps


def _data_config(net: nn.Module, target: str, inputs: ModelInputs, config: dict[str, Any]
                 ) -> tuple[tuple[int, int], int, Preprocess]:
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    given = inputs.size or config.get("img_size") or tuple(cfg.get("input_size", (3, 224, 224))[1:])
    sides = (int(given),) * 2 if isinstance(given, int) else tuple(int(v) for v in given)
    if len(sides) != 2:
        raise InputError(f"timm:{target}: input size {sides} is not (H, W)")
    size = (sides[0], sides[1])
    if inputs.kind not in (None, "image2d"):
        raise InputError(f"timm:{target}: timm models take 2D images, not {inputs.kind}")
    channels = int(config.get("in_chans", 3))
    if inputs.intensity is not None:
        rule = parse_intensity(inputs.intensity)
    else:
        rule = Preprocess("mean_std", {"mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                                       "std": tuple(cfg.get("std", (0.229, 0.224, 0.225)))})
    return size, channels, rule


def make_spec(name: str, target: str, inputs: ModelInputs, config: dict[str, Any]) -> BackboneSpec:
    import timm

    model_config = {k: v for k, v in config.items() if k != HOOKS_ARG}
    meta = create(target, model_config, "meta")
    taps = _taps(meta)
    size, channels, rule = _data_config(meta, target, inputs, model_config)
    hooks = not hasattr(meta, "forward_intermediates") or bool(config.get(HOOKS_ARG))
    if hooks:
        taps = [t for t in taps if t.name != PRE_LOGITS]

    def build(**cfg: Any) -> TappedModel:
        net = create(target, {k: v for k, v in cfg.items() if k != HOOKS_ARG})
        if hooks:
            return HookedModel(net, {t.name: t.name for t in taps}, (1, channels, *size),
                               order=[t.name for t in taps])
        return TimmModel(net, taps)

    return BackboneSpec(
        name=name, input_kind="image2d", input_size=size, in_channels=channels, preprocess=rule, taps=tuple(taps),
        build=build, weight_formats=("timm state dict",),
        convert_checkpoint=lambda state: {f"net.{k}": v for k, v in state.items()},
        description=f"timm {target} ({'forward hooks' if hooks else 'forward_intermediates'})",
        array_name=array_name("timm", target),
        identity={"timm": timm.__version__, "model": target, "args": model_config})
