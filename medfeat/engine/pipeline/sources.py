"""Which items' source files changed since their features were extracted.

Every item records the signature (path, size, mtime, content hash) of each file it reads:
its scans, the reference it is resampled onto, its crop mask. A rerun compares them: an item
with features whose files changed (or whose manifest row now points at other files) holds
stale features, and the run refuses it unless asked to extract it again. Items without
features yet simply get their signatures (re)recorded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medfeat.engine.pipeline.items import Item
from medfeat.engine.store.feature_store import FeatureStore
from medfeat.io.signatures import FileSignature, change_of, decode, encode, signatures


def item_files(item: Item) -> list[str]:
    """The files ``item`` reads, in channel order: scan, reference, mask (each once)."""
    files: list[str] = []
    for ch in item.channels:
        files += [f for f in (ch.path, ch.ref, ch.mask) if f]
    return list(dict.fromkeys(files))


@dataclass
class SourceCheck:
    """``changed``: item id -> why its features are stale; ``record``: item id -> the
    signatures to record for it (new items, files it reads for the first time, changed files)."""

    changed: dict[str, str] = field(default_factory=dict)
    record: dict[str, str] = field(default_factory=dict)


def check_sources(store: FeatureStore, items: list[Item]) -> SourceCheck:
    """Compare ``items``' files with what ``store`` recorded (see the module docstring).

    An item's recorded signatures are the union over the variants it was extracted in (a
    crop adds the mask, an alignment the reference): a file it reads for the first time is
    signed and added, a recorded one is compared.
    """
    table = store.items()
    position = {iid: i for i, iid in enumerate(table["item_id"])}
    has_features = np.zeros(len(table), dtype=bool)
    for key in store.arrays():
        has_features |= store.done_mask(key)[: len(table)]
    out = SourceCheck()
    keep: dict[str, list[FileSignature]] = {}  # recorded signatures that stay
    unsigned: dict[str, list[str]] = {}  # files to sign per item
    for item in items:
        files = item_files(item)
        pos = position.get(item.item_id)
        old = {} if pos is None else {s.path: s for s in decode(str(table["source_sig"].iloc[pos]))}
        if pos is not None and has_features[pos]:
            why = _change(item, str(table["source"].iloc[pos]), old)
            if why is not None:
                out.changed[item.item_id] = why
                old = {}
        new = [f for f in files if _real(f) not in old]
        if new or pos is None:
            keep[item.item_id], unsigned[item.item_id] = list(old.values()), new
    sigs = signatures(f for files in unsigned.values() for f in files)
    out.record = {iid: encode([*keep[iid], *(sigs[f] for f in files)]) for iid, files in unsigned.items()}
    return out


def _real(path: str) -> str:
    return str(Path(path).resolve())


def _change(item: Item, source: str, old: dict[str, FileSignature]) -> str | None:
    """Why ``item``'s stored features no longer describe its files (None: they still do).

    Every recorded file counts, not only those this run reads: another variant's features
    of the item came from them (a follow-up aligned to its baseline read the baseline)."""
    if source and source != item.source:
        return f"its manifest row now reads {item.source} (was {source})"
    for path, sig in old.items():
        why = change_of(sig, path)
        if why and why != "missing":  # a missing file fails the read and says so
            return f"{path}: {why}"
    return None


def describe_changes(changed: dict[str, str], limit: int = 3) -> str:
    """One line listing changed items, e.g. for the refusal of a rerun."""
    shown = "; ".join(f"{iid} ({why})" for iid, why in list(changed.items())[:limit])
    more = f"; and {len(changed) - limit} more" if len(changed) > limit else ""
    return f"{len(changed)} item(s) changed since their features were extracted: {shown}{more}"
