"""Local checkpoint loading: safetensors or ``torch.load(weights_only=True)``, strict.

Nothing is ever downloaded. The sha256 of the file goes into the store's provenance.

Published training checkpoints often pickle small objects beside the tensors (SAM-Med3D's
hold an ``argparse.Namespace`` of the training arguments, numpy scalars, epoch counters).
``torch.load(weights_only=True)`` refuses every global it does not know; medfeat widens
that by an explicit allow-list of plain data types (:data:`SAFE_GLOBALS`), never by
``weights_only=False``, and a checkpoint holding any other class is refused with its name.
"""
from __future__ import annotations

import argparse
import hashlib
import pathlib
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medfeat.errors import WeightsError

_NESTING_KEYS = ("state_dict", "model", "module", "net", "model_state_dict")


def _numpy_globals() -> list[Callable[..., object]]:
    """numpy's pickle entry points for scalars, arrays and dtypes (``numpy._core`` since 2.0)."""
    core = getattr(np, "_core", None) or np.core
    found: list[Callable[..., object]] = [np.dtype, np.ndarray, core.multiarray.scalar, core.multiarray._reconstruct]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # numpy >= 1.25 pickles some dtypes by their class
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return found


# Plain data a training script pickles beside its weights: the argument namespace, numpy
# scalars / arrays / dtypes, paths. None of them runs code when unpickled.
SAFE_GLOBALS: tuple[Callable[..., object], ...] = (
    argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
    pathlib.PureWindowsPath, *_numpy_globals(),
)
_SAFE_NAMES = frozenset(f"{g.__module__}.{getattr(g, '__name__', '')}" for g in SAFE_GLOBALS)
_LOAD_LOCK = threading.Lock()  # safe_globals() swaps a process-wide list: one load at a time


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
            obj = load_pickled(path)
    except WeightsError:
        raise
    except Exception as exc:  # corrupt zip, truncated file, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path}: cannot read checkpoint ({reason})") from None
    return _flatten(obj, path)


def load_pickled(path: str | Path) -> object:
    """``torch.load(path, weights_only=True)`` with :data:`SAFE_GLOBALS` allowed.

    A checkpoint that pickles any other global (a class of the training code, a function)
    raises :class:`WeightsError` naming it; nothing of it is run.
    """
    try:
        with _LOAD_LOCK, torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        refused = _refused_globals(path)
        if not refused:
            raise
        raise WeightsError(
            f"{path}: cannot read checkpoint: it pickles {', '.join(refused)}, which is not on medfeat's "
            "allow-list of safe globals (argparse.Namespace, numpy scalars/arrays/dtypes, paths); "
            "medfeat never unpickles code: re-save the state dict alone (torch.save(model.state_dict()))"
        ) from exc


def _refused_globals(path: str | Path) -> list[str]:
    """Globals the pickle names that are neither torch's defaults nor :data:`SAFE_GLOBALS`
    (read from the pickle's opcodes, nothing unpickled)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip/pickle checkpoint: the load error says why
        return []
    return sorted(g for g in found if g not in _SAFE_NAMES)


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
    # A nested mapping under a usual key wins over the wrapper's own tensors: a wrapper such as
    # {"model": {...}, "step": tensor(5)} is half tensors, but its weights are the nested ones.
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
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


def fill_norm_counters(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Add the ``num_batches_tracked`` buffers that checkpoints of PyTorch < 0.4.1 lack.

    Only counters of batch-norm layers whose running statistics are in ``state`` are added
    (as 0: they only matter with ``momentum=None`` in training). Returns the keys filled, for
    the provenance; ``state`` is changed in place.
    """
    filled = []
    for key, _ in module.named_buffers():
        prefix = key[: -len("num_batches_tracked")]
        if key.endswith("num_batches_tracked") and key not in state and f"{prefix}running_mean" in state:
            state[key] = torch.tensor(0, dtype=torch.long)
            filled.append(key)
    return filled


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
