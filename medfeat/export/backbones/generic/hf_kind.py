"""``hf:<local dir>``: a Hugging Face vision encoder saved with ``save_pretrained``.

The directory holds ``config.json`` and the weights (safetensors); it is read with
``local_files_only=True``, so the hub is never asked. A checkpoint that leaves any of the
model's weights missing or of another shape is refused (``from_pretrained`` would fill
them randomly). Models with a ``vision_model`` (SigLIP, CLIP) use that tower.

Taps: ``hidden_states.K`` (K = 0: the embeddings, K: the output of encoder layer K, as
``output_hidden_states`` numbers them), ``last_hidden_state`` (after the final norm) and,
where the model has one, ``pooler_output``. Input size and mean/std come from
``preprocessor_config.json`` when present, else the config's ``image_size`` and
``--intensity``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from medfeat.errors import InputError, WeightsError
from medfeat.export.backbones.generic import ModelInputs, array_name, parse_intensity
from medfeat.export.backbones.generic.hooks import HookedModel, trace_calls
from medfeat.export.backbones.spec import BackboneSpec, Preprocess, TapSpec
from medfeat.export.backbones.weights import sha256_file

if TYPE_CHECKING:
    from transformers import PretrainedConfig

INPUT = "pixel_values"


def load(folder: Path, meta: bool) -> tuple[nn.Module, PretrainedConfig]:
    """The vision model of ``folder`` and its config; on the meta device (no weights read)
    when ``meta``, else with the folder's weights, strictly."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not (folder / "config.json").is_file():
        raise InputError(f"hf:{folder}: no config.json (save the model with save_pretrained)")
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        if meta:
            with torch.device("meta"):
                model = AutoModel.from_config(config)
        else:
            model, info = AutoModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"hf:{folder}: cannot load ({' '.join(str(exc).split())[:200]})") from exc
    if not meta:
        bad = sorted(info.get("missing_keys", ())) + [str(k) for k in info.get("mismatched_keys", ())]
        if bad:
            raise WeightsError(f"hf:{folder}: the saved weights do not fit the model; missing or mismatched: "
                               f"{', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")
    if hasattr(model, "vision_model") and hasattr(config, "vision_config"):
        model, config = model.vision_model, config.vision_config
    return model.eval(), config


def _points(model: nn.Module, config: PretrainedConfig, folder: Path) -> dict[str, str]:
    depth = int(getattr(config, "num_hidden_layers", 0))
    layers = next((p for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == depth), None)
    embed = next((p for p, _ in model.named_modules() if p.rpartition(".")[2] == "embeddings"), None)
    if layers is None or embed is None:
        raise InputError(f"hf:{folder}: found no embeddings and {depth}-layer encoder to tap")
    return {"hidden_states.0": embed, **{f"hidden_states.{k}": f"{layers}.{k - 1}" for k in range(1, depth + 1)}}


def _data(folder: Path, config: PretrainedConfig, inputs: ModelInputs) -> tuple[tuple[int, int], Preprocess]:
    proc_file = folder / "preprocessor_config.json"
    proc = json.loads(proc_file.read_text()) if proc_file.is_file() else {}
    crop = proc.get("crop_size") or proc.get("size")
    if isinstance(crop, dict):
        crop = (crop.get("height"), crop.get("width")) if "height" in crop else crop.get("shortest_edge")
    given = inputs.size or crop or getattr(config, "image_size", None)
    if given is None:
        raise InputError(f"hf:{folder}: no image size in its config: give --input-size H,W")
    sides = [given, given] if isinstance(given, (int, float)) else list(given)
    if len(sides) != 2:
        raise InputError(f"hf:{folder}: input size {tuple(sides)} is not (H, W)")
    size = (int(sides[0]), int(sides[1]))
    if inputs.intensity is not None:
        rule = parse_intensity(inputs.intensity)
    elif "image_mean" in proc and "image_std" in proc:
        rule = Preprocess("mean_std", {"mean": tuple(proc["image_mean"]), "std": tuple(proc["image_std"])})
    else:
        raise InputError(f"hf:{folder}: no preprocessor_config.json with image_mean/std: give --intensity")
    if inputs.kind not in (None, "image2d"):
        raise InputError(f"hf:{folder}: Hugging Face vision encoders take 2D images, not {inputs.kind}")
    return size, rule


def make_spec(name: str, target: str, inputs: ModelInputs, config: dict[str, Any]) -> BackboneSpec:
    import transformers

    folder = Path(target).expanduser().resolve()
    if not folder.is_dir():
        raise InputError(f"{name}: no such directory")
    meta_model, hf_config = load(folder, meta=True)
    size, rule = _data(folder, hf_config, inputs)
    channels = int(getattr(hf_config, "num_channels", 3))
    shape = (1, channels, *size)
    points = _points(meta_model, hf_config, folder)
    trace = trace_calls(meta_model, shape, INPUT)
    patch = int(getattr(hf_config, "patch_size", 1) or 1)
    patches = math.prod(s // patch for s in size)
    taps = []
    for tap, path in points.items():
        n, width = trace.shapes[path][1], trace.shapes[path][-1]
        taps.append(TapSpec(tap, int(width), patch, "tokens", "cls+mean" if n > patches else "mean",
                            max(0, int(n) - patches)))
    last = taps[-1]
    outputs = {"last_hidden_state": lambda out: out.last_hidden_state}
    taps.append(TapSpec("last_hidden_state", last.channels, patch, "tokens", last.pooling, last.prefix_tokens))
    if trace.output is not None and getattr(trace.output, "pooler_output", None) is not None:
        outputs["pooler_output"] = lambda out: out.pooler_output
        taps.append(TapSpec("pooler_output", int(trace.output.pooler_output.shape[-1]), 1, "vector", "none"))
    order = [t.name for t in taps]

    def build(**cfg: Any) -> HookedModel:
        model, _ = load(folder, meta=False)
        return HookedModel(model, points, shape, input_name=INPUT, outputs=outputs, order=order)

    def refuse(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise WeightsError(f"{name}: the weights are the directory's own files; --weights is not taken")

    files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    return BackboneSpec(
        name=name, input_kind="image2d", input_size=size, in_channels=channels, preprocess=rule,
        taps=tuple(taps), build=build, convert_checkpoint=refuse,
        description=f"Hugging Face {type(meta_model).__name__} from {folder}",
        array_name=array_name("hf", str(folder)),
        identity={"dir": str(folder), "transformers": transformers.__version__,
                  "files": {p.name: sha256_file(p) for p in files}})
