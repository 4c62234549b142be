"""Checking a feature store end to end, and repairing what an interruption or damage left.

:func:`verify_store` reads every chunk of every array (each chunk's zstd checksum is checked
on read), checks done items have finite features of the array's dim, provenance that names
the array, the weights file's sha256 and every item's source files against the signatures
recorded at extraction. Problems are one line each; notes say what could not be checked.

:func:`repair_store` removes what an interrupted creation left (staging folders, arrays
without their done marks or provenance), evens out an interrupted item registration, and
un-marks items whose chunks are unreadable so the next run extracts them again.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfeat.engine.store.feature_store import ITEM_COLUMNS, STAGING_PREFIX, ArrayKey, FeatureStore
from medfeat.engine.store.nodes import array_at, attr_dict, group_at
from medfeat.errors import one_line
from medfeat.export.backbones.weights import sha256_file
from medfeat.io.signatures import change_of, decode


@dataclass
class Verification:
    """``problems`` (the store is unsound when any) and ``notes`` (what was not checked)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(store: FeatureStore, *, check_weights: bool = True, check_sources: bool = True) -> Verification:
    """Check ``store`` (see the module docstring); never raises for damage, reports it."""
    out = Verification()
    for stage in sorted(store.path.glob(f"{STAGING_PREFIX}*")):
        out.notes.append(f"leftover of an interrupted creation: {stage.name} (`medfeat store repair` removes it)")
    lengths = {c: array_at(store.group, f"items/{c}").shape[0] for c in ITEM_COLUMNS if f"items/{c}" in store.group}
    if len(set(lengths.values())) > 1:
        out.notes.append(f"items table: columns of different lengths {sorted(set(lengths.values()))} "
                         "(an interrupted registration; the next run or `medfeat store repair` evens them)")
    ids = store.items()["item_id"]
    if ids.duplicated().any():
        out.problems.append(f"items table: duplicated item ids {sorted(set(ids[ids.duplicated()]))[:5]}")
    for key in store.arrays():
        _verify_array(store, key, check_weights, out)
    if check_sources:
        _verify_sources(store, out)
    return out


def _verify_array(store: FeatureStore, key: ArrayKey, check_weights: bool, out: Verification) -> None:
    group = group_at(store.group, key.path)
    if "data" not in group or "done" not in group or "provenance" not in group.attrs:
        out.problems.append(f"{key}: half-made array (no data, done marks or provenance); "
                            "`medfeat store repair` removes it")
        return
    prov = attr_dict(group.attrs, "provenance")
    dim = store.layout(key).dim
    # a token or newer-pooling array is named TAP@POOLING; its provenance names the model's tap
    for name, want in {"model": key.model, "tap": key.tap.split("@")[0], "dim": dim}.items():
        if prov.get(name) != want:
            out.problems.append(f"{key}: provenance {name} is {prov.get(name)!r}, expected {want!r}")
    variant = (prov.get("preprocessing") or {}).get("variant")
    if variant != key.variant:
        out.problems.append(f"{key}: provenance variant is {variant!r}, expected {key.variant!r}")
    if not _has_checksums(group["data"]):
        out.notes.append(f"{key}: chunks carry no checksum (written by an older medfeat): bit flips "
                         "cannot be detected")
    out.problems += [f"{key}: {p}" for p in damaged_chunks(store, key).lines]
    weights = prov.get("weights")
    if check_weights and weights and Path(weights).is_file() and sha256_file(weights) != prov.get("weights_sha256"):
        out.problems.append(f"{key}: weights file {weights} no longer matches the recorded sha256")


@dataclass
class Damage:
    """What is wrong with one array's chunks: done items whose features cannot be trusted,
    data chunks that cannot be read at all, and one line per damaged chunk."""

    items: list[int] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def damaged_chunks(store: FeatureStore, key: ArrayKey) -> Damage:
    """Read every chunk of array ``key`` that holds done items (see :class:`Damage`)."""
    data, done = store.data_array(key), array_at(group_at(store.group, key.path), "done")
    layout = store.layout(key)
    n_items = len(store.items())
    chunk = store.chunk_items
    dmg = Damage()
    for c in range((max(n_items, 1) + chunk - 1) // chunk):
        lo, hi = c * chunk, min((c + 1) * chunk, n_items)
        if hi <= lo:
            break
        what = f"chunk {c} (items {lo}..{hi - 1})"
        try:
            marks = np.zeros(hi - lo, dtype=bool)
            got = np.asarray(done[lo:min(hi, done.shape[0])]).astype(bool)
            marks[: len(got)] = got
        except (RuntimeError, ValueError, OSError) as exc:
            dmg.lines.append(f"{what}: done marks unreadable ({one_line(exc, 100)})")
            continue
        if not marks.any():
            continue
        if hi > data.shape[0]:
            dmg.lines.append(f"{what}: data has {data.shape[0]} rows for {n_items} items")
            dmg.items += (lo + np.flatnonzero(marks)).tolist()
            continue
        try:
            rows = layout.decode(np.asarray(data[lo:hi])).reshape(hi - lo, -1)
        except (RuntimeError, ValueError, OSError) as exc:
            dmg.lines.append(f"{what}: unreadable ({one_line(exc, 100)})")
            dmg.items += (lo + np.flatnonzero(marks)).tolist()
            dmg.unreadable.append(c)
            continue
        nonfinite = marks & ~np.isfinite(rows).all(axis=1)
        if nonfinite.any():
            names = [str(store.items()["item_id"].iloc[lo + i]) for i in np.flatnonzero(nonfinite)[:3]]
            cause = "chunk file missing" if not _chunk_file(store, key, c).exists() else "NaN or Inf stored"
            dmg.lines.append(f"{what}: {int(nonfinite.sum())} done item(s) with non-finite features ({cause}), "
                             f"e.g. {names}")
            dmg.items += (lo + np.flatnonzero(nonfinite)).tolist()
    return dmg


def _chunk_file(store: FeatureStore, key: ArrayKey, c: int) -> Path:
    """The file of data chunk ``c`` (items are chunked; every other axis is one chunk)."""
    return store.path / key.path / "data" / "c" / str(c) / "/".join("0" * (store.data_array(key).ndim - 1))


def _has_checksums(array: object) -> bool:
    codecs = getattr(getattr(array, "metadata", None), "codecs", ())
    return any(getattr(codec, "checksum", False) for codec in codecs)


def _verify_sources(store: FeatureStore, out: Verification) -> None:
    items = store.items()
    missing = unsigned = 0
    for iid, sig_text in zip(items["item_id"], items["source_sig"]):
        sigs = decode(sig_text)
        if not sigs:
            unsigned += 1
            continue
        for sig in sigs:
            why = change_of(sig, sig.path)
            if why == "missing":
                missing += 1
            elif why:
                out.problems.append(f"item {iid}: source {sig.path} changed since extraction ({why}); "
                                    "rerun extract with --refresh-changed")
    if missing:
        out.notes.append(f"{missing} source file(s) not found here: not checked")
    if unsigned:
        out.notes.append(f"{unsigned} item(s) without source signatures (extracted by an older medfeat)")


def repair_store(store: FeatureStore) -> list[str]:
    """Repair what interruptions and damage left; return one line per action taken."""
    actions: list[str] = []
    for stage in sorted(store.path.glob(f"{STAGING_PREFIX}*")):
        shutil.rmtree(stage, ignore_errors=True)
        actions.append(f"removed {stage.name}")
    actions += store.even_item_columns()
    for key in store.arrays():
        group = group_at(store.group, key.path)
        if "data" not in group or "done" not in group or "provenance" not in group.attrs:
            shutil.rmtree(store.path / key.path)
            actions.append(f"{key}: removed a half-made array")
            continue
        dmg = damaged_chunks(store, key)
        for c in dmg.unreadable:  # its bytes are lost: the chunk reads as missing (NaN) from now on
            _chunk_file(store, key, c).unlink(missing_ok=True)
        if dmg.items:
            store.unmark_done(key, dmg.items)
            actions.append(f"{key}: {len(dmg.items)} item(s) with damaged features un-marked "
                           "(the next run redoes them)")
    return actions
