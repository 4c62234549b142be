"""The feature store: one Zarr v3 group of pooled features, resumable.

Layout::

    store.zarr/                     group; attrs["medfeat"] = format, version, created
      items/<column>                1-D string arrays: item_id, subject, timepoint, kind, source,
                                    then the manifest's own columns (age, sex, site, ...; attrs
                                    ["item_extra"] lists them in order)
      features/<model>/<tap>/<variant>/
          data                      (items, dim) float32, chunked along items; NaN = not written
          done                      (items,) uint8, same item chunks; 1 once ``data`` rows are written
          attrs["provenance"]       model, weights sha256, tap, pooling, preprocessing, runtime, ...
      attrs["failures"]             [{array, item_id, reason, time}]
      attrs["runs"]                 JSON run records

An item is marked done only after its feature rows are written, so a run killed at any
point leaves every item either done with its features, or not done (and redone on resume).
Writers must write whole item chunks (see :meth:`FeatureStore.chunk_of`) so no two tasks
touch one chunk.
"""
from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from medfeat.engine.store.lock import LOCK_NAME
from medfeat.errors import StoreError, UnknownNameError
from medfeat.version import __version__

ITEM_COLUMNS = ("item_id", "subject", "timepoint", "kind", "source")
FORMAT = 1


@dataclass(frozen=True)
class ArrayKey:
    """Identifies one feature array: (model, tap, variant)."""

    model: str
    tap: str
    variant: str = "default"

    @property
    def path(self) -> str:
        return f"features/{self.model}/{self.tap}/{self.variant}"

    def __str__(self) -> str:
        return f"{self.model}:{self.tap}:{self.variant}"

    @classmethod
    def parse(cls, text: str) -> ArrayKey:
        """``MODEL:TAP[:VARIANT]`` -> key."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise UnknownNameError(f"feature spec {text!r} is not MODEL:TAP[:VARIANT]")
        return cls(*parts)


class FeatureStore:
    """A Zarr v3 feature store. Open with :meth:`create` or :meth:`open`."""

    def __init__(self, group: zarr.Group, path: Path) -> None:
        self.group = group
        self.path = path

    # -- opening ---------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, *, exist_ok: bool = True, chunk_items: int = 64) -> FeatureStore:
        """Create a store, or open an existing one when ``exist_ok``."""
        path = Path(path)
        if (path / "zarr.json").is_file():
            if not exist_ok:
                raise StoreError(f"{path}: store already exists")
            return cls.open(path, mode="a")
        if path.exists() and (not path.is_dir() or any(p.name != LOCK_NAME for p in path.iterdir())):
            raise StoreError(f"{path}: exists and is not a feature store")
        # mode "a", not "w": "w" would wipe the directory, lock file included.
        group = zarr.open_group(str(path), mode="a", zarr_format=3)
        group.attrs["medfeat"] = {
            "format": FORMAT,
            "version": __version__,
            "created": _now(),
            "chunk_items": chunk_items,
        }
        group.attrs["failures"] = []
        group.attrs["runs"] = []
        for column in ITEM_COLUMNS:
            group.create_array(f"items/{column}", shape=(0,), dtype=str, chunks=(4096,))
        return cls(group, path)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> FeatureStore:
        """Open an existing store (``mode`` ``"r"`` or ``"a"``)."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: not a feature store (no zarr.json)")
        group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        meta = group.attrs.get("medfeat")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise StoreError(f"{path}: not a medfeat feature store (format {meta!r})")
        return cls(group, path)

    @property
    def chunk_items(self) -> int:
        return int(self.group.attrs["medfeat"]["chunk_items"])

    # -- items -----------------------------------------------------------------------
    def items(self) -> pd.DataFrame:
        """The items table, one row per item, in store order: :data:`ITEM_COLUMNS`, then the
        extra columns carried from manifests (text; empty where an item had none)."""
        names = [*ITEM_COLUMNS, *self.extra_columns()]
        cols = {c: np.asarray(self.group[f"items/{c}"][:]).astype(object) for c in names}
        return pd.DataFrame(cols, columns=names)

    def extra_columns(self) -> list[str]:
        """Names of the items table's columns beyond :data:`ITEM_COLUMNS`, in order."""
        extra: Any = self.group.attrs.get("item_extra", [])
        return [str(c) for c in extra]

    def _write_extra(self, records: list[dict[str, Any]], index: dict[str, int]) -> None:
        """Write the records' extra columns (created on first use, ``""`` for other items)."""
        names = list(dict.fromkeys(k for r in records for k in r if k not in ITEM_COLUMNS))
        if not names:
            return
        group: Any = self.group
        n = group["items/item_id"].shape[0]
        extra = self.extra_columns()
        for name in names:
            if name not in extra:
                self.group.create_array(f"items/{name}", shape=(n,), dtype=str, chunks=(4096,), fill_value="")
                extra.append(name)
            arr = group[f"items/{name}"]
            if arr.shape[0] < n:
                arr.resize((n,))
            values = np.asarray(arr[:]).astype(object)
            values[values == None] = ""  # noqa: E711 - zarr's str fill reads back as None
            for r in records:
                if name in r:
                    values[index[r["item_id"]]] = str(r[name] or "")
            arr[:] = np.array(values.tolist(), dtype=str)
        self.group.attrs["item_extra"] = extra

    def add_items(self, records: Iterable[dict[str, Any]]) -> np.ndarray:
        """Register items (dicts with ``item_id`` and optional other columns).

        Items already present keep their index. Returns the store index of every record.
        Call from one process only (the run's driver), before tasks write.
        """
        records = list(records)
        existing = {iid: i for i, iid in enumerate(self.items()["item_id"])}
        new = [r for r in dict.fromkeys(r["item_id"] for r in records) if r not in existing]
        by_id = {r["item_id"]: r for r in records}
        if new:
            start = len(existing)
            for column in ITEM_COLUMNS:
                arr = self.group[f"items/{column}"]
                arr.resize((start + len(new),))
                arr[start:] = np.array([str(by_id[i].get(column, "") or "") for i in new], dtype=str)
            group: Any = self.group
            for column in self.extra_columns():  # new items have none of the older extra values
                group[f"items/{column}"].resize((start + len(new),))
            existing.update({iid: start + k for k, iid in enumerate(new)})
            self._grow_arrays(len(existing))
        self._write_extra(records, existing)
        return np.array([existing[r["item_id"]] for r in records], dtype=np.int64)

    def _grow_arrays(self, n: int) -> None:
        for key in self.arrays():
            group = self.group[key.path]
            for name in ("data", "done"):
                arr = group[name]
                if arr.shape[0] < n:
                    arr.resize((n,) + arr.shape[1:])

    # -- feature arrays --------------------------------------------------------------
    def arrays(self) -> list[ArrayKey]:
        """Every feature array in the store."""
        if "features" not in self.group:
            return []
        keys = []
        for model, mgroup in self.group["features"].groups():
            for tap, tgroup in mgroup.groups():
                for variant, _ in tgroup.groups():
                    keys.append(ArrayKey(model, tap, variant))
        return sorted(keys, key=str)

    def ensure_array(self, key: ArrayKey, dim: int, provenance: dict[str, Any]) -> None:
        """Create the array for ``key`` with rows of length ``dim``, or check it matches.

        An existing array with another dim or other provenance (other weights, pooling,
        preprocessing) is refused: its rows would mix two different features.
        """
        # Compare and store the JSON form: tuples come back from attrs as lists.
        provenance = json.loads(json.dumps(provenance, default=str))
        n = self.group["items/item_id"].shape[0]
        if key.path in self.group:
            group = self.group[key.path]
            old_dim = group["data"].shape[1]
            if old_dim != dim:
                raise StoreError(f"{key}: store holds dim {old_dim}, this run makes {dim}")
            old = group.attrs.get("provenance", {})
            diff = _provenance_diff(old, provenance)
            if diff:
                raise StoreError(f"{key}: provenance differs from the stored array ({diff})")
            return
        group = self.group.require_group(key.path)
        chunk = self.chunk_items
        group.create_array("data", shape=(n, dim), chunks=(chunk, dim), dtype="float32", fill_value=np.nan)
        group.create_array("done", shape=(n,), chunks=(chunk,), dtype="uint8", fill_value=0)
        group.attrs["provenance"] = provenance

    def provenance(self, key: ArrayKey) -> dict[str, Any]:
        return dict(self._array_group(key).attrs.get("provenance", {}))

    def chunk_of(self, index: int) -> int:
        """Chunk number holding item ``index``."""
        return index // self.chunk_items

    def write(self, key: ArrayKey, indices: Sequence[int], rows: np.ndarray) -> None:
        """Write feature rows for items at ``indices``, then mark them done.

        ``rows``: (len(indices), dim).
        """
        self.write_rows(key, indices, rows)
        self.mark_done(key, indices)

    def write_rows(self, key: ArrayKey, indices: Sequence[int], rows: np.ndarray) -> None:
        """Write feature rows (len(indices), dim) without marking them done.

        Contiguous indices are written as one slice; chunk files are replaced atomically
        (write to a temporary file, then rename), so readers never see half a chunk.
        """
        group = self._array_group(key)
        indices = np.asarray(indices, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.float32)
        if rows.shape != (len(indices), group["data"].shape[1]):
            raise StoreError(f"{key}: rows of shape {rows.shape} for {len(indices)} items of dim {group['data'].shape[1]}")
        if len(indices) == 0:
            return
        if np.all(np.diff(indices) == 1):
            group["data"][int(indices[0]): int(indices[-1]) + 1] = rows
        else:
            group["data"].set_orthogonal_selection((indices, slice(None)), rows)

    def mark_done(self, key: ArrayKey, indices: Sequence[int]) -> None:
        """Mark items done; call only after their rows are written in every array of the run."""
        done = self._array_group(key)["done"]
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:
            return
        if np.all(np.diff(indices) == 1):
            done[int(indices[0]): int(indices[-1]) + 1] = 1
        else:
            done.set_coordinate_selection(indices, np.ones(len(indices), np.uint8))

    def done_mask(self, key: ArrayKey) -> np.ndarray:
        """(items,) bool: which items have features in ``key``."""
        done = self._array_group(key)["done"][:]
        n = self.group["items/item_id"].shape[0]
        out = np.zeros(n, dtype=bool)
        out[: len(done)] = done.astype(bool)
        return out

    def read(self, key: ArrayKey | str) -> tuple[list[str], np.ndarray]:
        """Item ids and (n_done, dim) float32 features of the done items of ``key``."""
        key = ArrayKey.parse(key) if isinstance(key, str) else key
        group = self._array_group(key)
        mask = self.done_mask(key)
        ids = self.items()["item_id"].to_numpy()
        data = group["data"][:]
        return [str(i) for i in ids[mask]], np.asarray(data[mask], dtype=np.float32)

    def _array_group(self, key: ArrayKey) -> zarr.Group:
        if key.path not in self.group:
            known = ", ".join(str(k) for k in self.arrays()) or "none"
            raise UnknownNameError(f"{self.path}: no feature array {key}; arrays: {known}")
        return self.group[key.path]

    # -- failures and run records ----------------------------------------------------
    def failures(self) -> list[dict[str, Any]]:
        return list(self.group.attrs.get("failures", []))

    def record_failures(self, failures: Iterable[dict[str, Any]]) -> None:
        """Append failure records (``array``, ``item_id``, ``reason``), replacing older ones
        of the same (array, item). Driver process only."""
        new = [{**f, "time": f.get("time", _now())} for f in failures]
        if not new:
            return
        replaced = {(f["array"], f["item_id"]) for f in new}
        kept = [f for f in self.failures() if (f["array"], f["item_id"]) not in replaced]
        self.group.attrs["failures"] = kept + new

    def clear_failures(self, array: str | Sequence[str], item_ids: Iterable[str]) -> None:
        """Forget failures of ``item_ids`` in ``array`` (one name or several): they succeeded."""
        arrays = {array} if isinstance(array, str) else set(array)
        drop = set(item_ids)
        old = self.failures()
        kept = [f for f in old if not (f["array"] in arrays and f["item_id"] in drop)]
        if len(kept) != len(old):  # skip the attribute rewrite when nothing changes
            self.group.attrs["failures"] = kept

    def add_run_record(self, record: dict[str, Any]) -> None:
        self.group.attrs["runs"] = list(self.group.attrs.get("runs", [])) + [record]

    def runs(self) -> list[dict[str, Any]]:
        return list(self.group.attrs.get("runs", []))


    # -- summaries and checks --------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Summary: items, arrays (dim, done count, model/tap/pooling/variant), failures, runs."""
        n = int(self.group["items/item_id"].shape[0])
        arrays = []
        for key in self.arrays():
            group = self.group[key.path]
            prov = dict(group.attrs.get("provenance", {}))
            arrays.append({"array": str(key), "dim": int(group["data"].shape[1]),
                           "done": int(self.done_mask(key).sum()), "pooling": prov.get("pooling"),
                           "weights_sha256": prov.get("weights_sha256"), "runtime": prov.get("runtime")})
        runs = self.runs()
        return {"path": str(self.path), "format": FORMAT, "items": n, "chunk_items": self.chunk_items,
                "arrays": arrays, "failures": len(self.failures()), "runs": len(runs),
                "last_run": runs[-1].get("finished") if runs else None}

    def verify(self, *, check_weights: bool = True) -> list[str]:
        """Problems found, one line each (empty when the store is sound).

        Checks every done item has finite features of the array's dim, that the provenance
        names this array's model, tap, variant and dim, that the items table has no
        duplicate ids, and (``check_weights``) that a weights file still present has the
        recorded sha256.
        """
        problems: list[str] = []
        ids = self.items()["item_id"]
        if ids.duplicated().any():
            problems.append(f"items table: duplicated item ids {sorted(set(ids[ids.duplicated()]))[:5]}")
        for key in self.arrays():
            problems += self._verify_array(key, check_weights)
        return problems

    def _verify_array(self, key: ArrayKey, check_weights: bool) -> list[str]:
        group = self.group[key.path]
        prov = dict(group.attrs.get("provenance", {}))
        dim = int(group["data"].shape[1])
        out = []
        expected = {"model": key.model, "tap": key.tap, "dim": dim}
        for name, want in expected.items():
            if prov.get(name) != want:
                out.append(f"{key}: provenance {name} is {prov.get(name)!r}, expected {want!r}")
        variant = (prov.get("preprocessing") or {}).get("variant")
        if variant != key.variant:
            out.append(f"{key}: provenance variant is {variant!r}, expected {key.variant!r}")
        mask = self.done_mask(key)
        data = np.asarray(group["data"][:])
        if data.shape[0] < len(mask):
            out.append(f"{key}: data has {data.shape[0]} rows for {len(mask)} items")
            return out
        bad = np.flatnonzero(mask & ~np.isfinite(data[: len(mask)]).all(1))
        if len(bad):
            names = [str(self.group["items/item_id"][int(i)]) for i in bad[:5]]
            out.append(f"{key}: {len(bad)} done item(s) with non-finite features, e.g. {names}")
        weights = prov.get("weights")
        if check_weights and weights and Path(weights).is_file():
            from medfeat.export.backbones.weights import sha256_file

            if sha256_file(weights) != prov.get("weights_sha256"):
                out.append(f"{key}: weights file {weights} no longer matches the recorded sha256")
        return out


# Keys that describe how a run was executed, not what the features are.
_EXECUTION_KEYS = {"runtime", "precision_runtime", "created", "versions", "batch_size", "device"}


def _provenance_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = (set(old) | set(new)) - _EXECUTION_KEYS
    diffs = [k for k in sorted(keys) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} != {new.get(k)!r}" for k in diffs[:3])


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
