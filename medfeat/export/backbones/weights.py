"""Local checkpoint loading: safetensors or ``torch.load(weights_only=True)``, strict.

Nothing is ever downloaded. The sha256 of the file goes into the store's provenance.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from medfeat.errors import WeightsError

_NESTING_KEYS = ("state_dict", "model", "module", "net", "model_state_dict")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict on the CPU.

    ``.safetensors`` files go through safetensors; anything else through
    ``torch.load(weights_only=True)``, which runs no pickled code. A checkpoint nested
    under one of the usual keys (``state_dict``, ``model``, ...) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, pickle with code, truncated file, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path}: cannot read checkpoint ({reason})") from None
    return _flatten(obj, path)


CONFIG_METADATA_KEY = "medfeat_config"
MODEL_METADATA_KEY = "medfeat_model"  # the registry name a medfeat-made checkpoint was built for


def _safetensors_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable files are reported by read_checkpoint
        return {}


def checkpoint_model(path: str | Path) -> str | None:
    """The registry name a medfeat-made safetensors checkpoint was built for (its metadata), or None."""
    return _safetensors_metadata(Path(path)).get(MODEL_METADATA_KEY) or None


def checkpoint_config(path: str | Path) -> dict:
    """Build config stored in a safetensors file's metadata by medfeat (e.g. a trained task
    UNet's channels), so a checkpoint of a non-default architecture loads without flags.
    Empty for other files."""
    path = Path(path)
    raw = _safetensors_metadata(path).get(CONFIG_METADATA_KEY)
    if not raw:
        return {}
    import json

    try:
        config = json.loads(raw)
    except ValueError:
        raise WeightsError(f"{path}: metadata {CONFIG_METADATA_KEY!r} is not JSON") from None
    return config if isinstance(config, dict) else {}


def _flatten(obj: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        inner = next((obj[k] for k in _NESTING_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep the keys under ``prefix`` (e.g. ``"image_encoder."``), without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], model: str, source: str = "") -> None:
    """Load ``state`` into ``module`` strictly, or raise one error listing what does not fit.

    Shape mismatches are reported like missing keys, with both shapes.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mismatched:
        where = f"{source}: " if source else ""
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise WeightsError(f"{where}checkpoint does not fit {model}; " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
