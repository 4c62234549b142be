"""Content-keyed cache of exported ONNX files and TensorRT engines.

An entry is a directory named by the sha256 of a canonical JSON of everything its content
depends on: model name and build config, weights sha256 (or the random-init seed), taps
and poolings, input size, opset, precision, the exporter's torch version, and the sources of
the model's module and of the pooling / export code; for engines also the GPU, compute
capability and TensorRT version. A second run with the same inputs reuses the entry; any
change gives another key, so the artefact is rebuilt.

Entries are written into a temporary directory next to the cache and renamed into place,
so a crash leaves no half entry and two processes building the same key do not corrupt
it (the loser of the rename discards its copy).

Cache root: ``cache_dir=`` argument, else ``$MEDFEAT_CACHE``, else
``~/.cache/medfeat/artefacts``.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medfeat.export.backbones.registry import Backbone
from medfeat.export.runtimes.onnx_export import DEFAULT_OPSET, export_onnx, resolve_input_size

META = "meta.json"
KEY_FILE = "key.json"
ONNX_FILE = "model.onnx"
PARITY_FILE = "parity.json"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache root: argument, ``$MEDFEAT_CACHE``, or ``~/.cache/medfeat/artefacts``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MEDFEAT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "medfeat" / "artefacts"


def artefact_key(fields: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``fields`` (sorted keys, no whitespace)."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    """A cache entry: its directory, key, and whether this call found it already built."""

    path: Path
    key: str
    hit: bool

    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / META).read_text())


class ArtefactCache:
    """Directory of content-keyed entries (see the module docstring)."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.root = cache_root(cache_dir)

    def entry_dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def lookup(self, key: str) -> Path | None:
        """The entry for ``key`` if it is complete (its key file is written last)."""
        path = self.entry_dir(key)
        return path if (path / KEY_FILE).is_file() else None

    def get_or_build(self, fields: dict[str, Any], build: Callable[[Path], None]) -> Entry:
        """The entry for ``fields``, building it with ``build(tmp_dir)`` on a miss.

        ``build`` writes the artefact files into ``tmp_dir``; the key file is added and the
        directory renamed into place atomically.
        """
        key = artefact_key(fields)
        found = self.lookup(key)
        if found is not None:
            return Entry(found, key, True)
        final = self.entry_dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-", dir=final.parent))
        try:
            build(tmp)
            (tmp / KEY_FILE).write_text(json.dumps(fields, sort_keys=True, indent=2, default=str) + "\n")
            try:
                os.rename(tmp, final)
            except OSError:
                if self.lookup(key) is None:  # not a lost race: a real failure
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
                return Entry(final, key, True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Entry(final, key, False)

    def clear(self, key: str) -> None:
        shutil.rmtree(self.entry_dir(key), ignore_errors=True)


def _exporter_source_sha() -> str:
    """sha256 over the sources that shape every graph (pooling, export wrapper): editing them
    rebuilds the cache."""
    from medfeat.export.backbones import pooling
    from medfeat.export.runtimes import onnx_export

    digest = hashlib.sha256()
    for module in (pooling, onnx_export):
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()


def _model_source_sha(backbone: Backbone) -> str | None:
    """sha256 of the source file defining the model's build: an architecture edit rebuilds."""
    try:
        source = inspect.getsourcefile(backbone.spec.build)
    except TypeError:
        return None
    if not source or not Path(source).is_file():
        return None
    return hashlib.sha256(Path(source).read_bytes()).hexdigest()


def onnx_key_fields(backbone: Backbone, *, input_size: Sequence[int] | int | None = None,
                    opset: int = DEFAULT_OPSET, precision: str = "fp32") -> dict[str, Any]:
    """What an exported ONNX file's content depends on."""
    prov = backbone.provenance
    weights = prov.get("weights_sha256")
    return {
        "kind": "onnx",
        "model": backbone.spec.name,
        "config": prov.get("config", {}),
        "weights_sha256": weights,
        # random init only: the seed decides the weights
        "seed": None if weights else prov.get("seed"),
        "taps": list(backbone.tap_names),
        "poolings": dict(backbone.poolings),
        "input_size": list(resolve_input_size(backbone, input_size)),
        "opset": opset,
        "precision": precision,
        "torch": torch.__version__.split("+")[0],
        "model_source_sha256": _model_source_sha(backbone),
        "exporter_source_sha256": _exporter_source_sha(),
    }


def onnx_artefact(backbone: Backbone, *, input_size: Sequence[int] | int | None = None,
                  opset: int = DEFAULT_OPSET, precision: str = "fp32", cache_dir: str | Path | None = None,
                  check: bool = True, parity_ep: str = "cpu") -> Entry:
    """The cached ONNX export of ``backbone``, exporting and checking parity on a miss.

    The entry holds ``model.onnx``, ``meta.json`` (see :func:`export_onnx`) and
    ``parity.json`` (ONNX Runtime on ``parity_ep`` against eager fp32). With ``check``, an export whose
    parity is outside tolerance raises :class:`~medfeat.export.runtimes.parity.ParityError` and is
    not cached.
    """
    from medfeat.export.runtimes.ort_session import OrtRunner
    from medfeat.export.runtimes.parity import check_parity

    fields = onnx_key_fields(backbone, input_size=input_size, opset=opset, precision=precision)

    def build(tmp: Path) -> None:
        meta = export_onnx(backbone, tmp / ONNX_FILE, input_size=input_size, opset=opset, precision=precision)
        runner = OrtRunner(tmp / ONNX_FILE, meta["outputs"], ep=parity_ep, input_shape=meta["input"]["shape"][1:])
        device = "cpu" if parity_ep == "cpu" else "cuda"
        report = check_parity(backbone, runner, runtime=f"onnxruntime-{parity_ep}", precision=precision,
                              input_size=input_size, device=device)
        meta["parity"] = {"passed": report.passed, "runtime": report.runtime}
        report.write(tmp / PARITY_FILE)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        if check:
            report.raise_if_failed()

    entry = ArtefactCache(cache_dir).get_or_build(fields, build)
    if check and entry.hit and not entry.meta().get("parity", {}).get("passed", False):
        # cached by an unchecked (audit) build: still refuse it where parity is required
        from medfeat.export.runtimes.parity import ParityError

        raise ParityError(f"{backbone.spec.name}: cached ONNX export {entry.key[:12]} failed parity "
                          f"at {precision}; see {entry.path / PARITY_FILE}")
    return entry
