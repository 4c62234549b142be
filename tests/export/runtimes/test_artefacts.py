"""The content-keyed artefact cache: hits, invalidation, atomic writes, cache location."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from medfeat.export.backbones.registry import create_backbone
from medfeat.export.runtimes.artefacts import (
    KEY_FILE,
    META,
    ONNX_FILE,
    PARITY_FILE,
    ArtefactCache,
    artefact_key,
    cache_root,
    onnx_artefact,
    onnx_key_fields,
)
from medfeat.export.runtimes.parity import ParityError


def test_key_is_canonical_json_sha256():
    a = artefact_key({"b": [1, 2], "a": {"y": 1, "x": 2}})
    b = artefact_key({"a": {"x": 2, "y": 1}, "b": [1, 2]})
    assert a == b and len(a) == 64
    assert a != artefact_key({"a": {"x": 2, "y": 1}, "b": [2, 1]})


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDFEAT_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "medfeat" / "artefacts"
    monkeypatch.setenv("MEDFEAT_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_second_export_hits_and_changed_inputs_rebuild(tmp_path):
    backbone = create_backbone("rt_tiny_cnn", ["stem", "layer1"])
    first = onnx_artefact(backbone, cache_dir=tmp_path)
    assert not first.hit
    assert {p.name for p in first.path.iterdir()} >= {ONNX_FILE, META, PARITY_FILE, KEY_FILE}
    mtime = (first.path / ONNX_FILE).stat().st_mtime_ns
    again = onnx_artefact(backbone, cache_dir=tmp_path)
    assert again.hit and again.path == first.path
    assert (again.path / ONNX_FILE).stat().st_mtime_ns == mtime  # not rewritten

    keys = {first.key}
    changed = [
        onnx_artefact(backbone, cache_dir=tmp_path, input_size=(24, 24)),
        onnx_artefact(backbone, cache_dir=tmp_path, opset=18),
        onnx_artefact(backbone, cache_dir=tmp_path, precision="fp16"),
        onnx_artefact(create_backbone("rt_tiny_cnn", ["stem"]), cache_dir=tmp_path),
        onnx_artefact(create_backbone("rt_tiny_cnn", ["stem", "layer1"], seed=1), cache_dir=tmp_path),
        onnx_artefact(create_backbone("rt_tiny_cnn", ["stem", "layer1"], pooling="max"), cache_dir=tmp_path),
    ]
    for entry in changed:
        assert not entry.hit and entry.key not in keys
        keys.add(entry.key)
    assert json.loads((changed[0].path / KEY_FILE).read_text())["input_size"] == [24, 24]


def test_weights_sha_is_part_of_the_key(tmp_path):
    backbone = create_backbone("rt_tiny_cnn", ["stem"])
    fields = onnx_key_fields(backbone)
    assert fields["weights_sha256"] is None and fields["seed"] == 0
    backbone.provenance = {**backbone.provenance, "weights_sha256": "ab" * 32}
    with_weights = onnx_key_fields(backbone)
    assert with_weights["seed"] is None  # the weights, not the seed, decide the content
    assert artefact_key(with_weights) != artefact_key(fields)


def test_failed_build_leaves_no_entry(tmp_path):
    cache = ArtefactCache(tmp_path)

    def broken(tmp: Path) -> None:
        (tmp / "partial").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.get_or_build({"k": 1}, broken)
    assert cache.lookup(artefact_key({"k": 1})) is None
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.rglob("*"))


def test_concurrent_builder_losing_the_rename_reuses_winner(tmp_path):
    cache = ArtefactCache(tmp_path)
    fields = {"k": "race"}

    def slow_loser(tmp: Path) -> None:
        (tmp / "a").write_text("loser")
        # another process finishes the same key while we build
        cache.get_or_build(fields, lambda t: (t / "a").write_text("winner"))

    entry = cache.get_or_build(fields, slow_loser)
    assert entry.hit and (entry.path / "a").read_text() == "winner"
    assert [p.name for p in entry.path.parent.iterdir()] == [entry.key]


def test_parity_gate_applies_to_cached_unchecked_entries(tmp_path, monkeypatch):
    backbone = create_backbone("rt_tiny_cnn", ["stem"])
    import medfeat.export.runtimes.parity as parity

    monkeypatch.setitem(parity.TOLERANCES, "fp16", (1e-9, 1.0))  # impossible for fp16
    with pytest.raises(ParityError, match="stem"):
        onnx_artefact(backbone, precision="fp16", cache_dir=tmp_path)
    entry = onnx_artefact(backbone, precision="fp16", cache_dir=tmp_path, check=False)  # audit path
    assert not entry.meta()["parity"]["passed"]
    with pytest.raises(ParityError, match="failed parity"):
        onnx_artefact(backbone, precision="fp16", cache_dir=tmp_path)
    assert os.path.isfile(entry.path / PARITY_FILE)
