"""The feature store: one Zarr v3 group of pooled features, resumable.

Layout::

    store.zarr/                     group; attrs["medfeat"] = format, version, created
      items/<column>                1-D string arrays: item_id, subject, timepoint, kind, source,
                                    source_sig (JSON: each source file's path, size, mtime, hash)
                                    then the manifest's own columns (age, sex, site, ...; attrs
                                    ["item_extra"] lists them in order)
      features/<model>/<tap>/<variant>/
          data                      (items, dim) float32, chunked along items; NaN = not written
                                    (token arrays: (items, [views,] tokens, dim) float16/bfloat16;
                                    attrs["layout"], see :mod:`~medfeat.engine.store.layout`)
          done                      (items,) uint8, same item chunks; 1 once ``data`` rows are written
          attrs["provenance"]       model, weights sha256, tap, pooling, preprocessing, runtime, ...
      attrs["failures"]             [{array, item_id, reason, time}]
      attrs["runs"]                 JSON run records

An item is marked done only after its feature rows are written, so a run killed at any
point leaves every item either done with its features, or not done (and redone on resume).
Writers must write whole item chunks (see :meth:`FeatureStore.chunk_of`) so no two tasks
touch one chunk.

Creation is atomic. A new store is built aside in ``.staging-*`` inside its folder and
published by renaming ``items/`` and then the root ``zarr.json`` into place; a new feature
array is built aside as a whole group (data, done, provenance) and renamed into place. An
interruption at any point (SIGKILL, a full disk) leaves either nothing or a complete empty
store or array; leftovers of an unpublished store are recognised and cleared by the next
``create``. Every chunk is zstd-compressed with zstd's content checksum, so a flipped bit
fails the read (and ``verify``) instead of becoming a number.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt
import pandas as pd
import zarr
from zarr.codecs import ZstdCodec

from medfeat.engine.store.finite import non_finite_rows
from medfeat.engine.store.layout import ArrayLayout
from medfeat.engine.store.lock import LOCK_NAME
from medfeat.engine.store.nodes import JSONDict, array_at, attr_dict, attr_list, attr_records, group_at
from medfeat.errors import StoreError, UnknownNameError, one_line, os_error_reason
from medfeat.export.backbones.provenance import random_weights
from medfeat.timeutil import utc_now
from medfeat.version import __version__

ITEM_COLUMNS = ("item_id", "subject", "timepoint", "kind", "source", "source_sig")
FORMAT = 1
STAGING_PREFIX = ".staging-"
# What the folder of a store that was never published may hold: its leftovers are cleared.
_UNPUBLISHED = {LOCK_NAME, "items", "features"}
# zstd level 0 (its default) with the frame's content checksum: bit flips fail the read.
COMPRESSORS = (ZstdCodec(level=0, checksum=True),)

#: Called with the name of each step of store and array creation (tests inject faults here).
fault_hook: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if fault_hook is not None:
        fault_hook(name)


#: Store indices of items: a sequence or a 1-D integer array.
Indices = Sequence[int] | npt.NDArray[np.integer]

P = ParamSpec("P")
R = TypeVar("R")


def _writes(method: Callable[Concatenate[FeatureStore, P], R]) -> Callable[Concatenate[FeatureStore, P], R]:
    """Turn an OSError of a store write (full disk, read-only file system) into one line."""

    @functools.wraps(method)
    def wrapper(self: FeatureStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            raise _write_error(self.path, exc) from exc

    return wrapper


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
        """Create a store (atomically: see the module docstring), or open an existing one
        when ``exist_ok``."""
        path = Path(path)
        if (path / "zarr.json").is_file():
            if not exist_ok:
                raise StoreError(f"{path}: store already exists")
            return cls.open(path, mode="a")
        _clear_unpublished(path)
        staging = path / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        try:
            meta: dict[str, str | int] = {"format": FORMAT, "version": __version__, "created": utc_now(), "chunk_items": chunk_items}
            group = zarr.open_group(str(staging), mode="w", zarr_format=3,
                                    attributes={"medfeat": meta, "failures": [], "runs": []})
            _step("group")
            for column in ITEM_COLUMNS:
                _new_item_column(group, column, 0)
                _step(f"items/{column}")
            os.rename(staging / "items", path / "items")
            _step("publish items")
            os.rename(staging / "zarr.json", path / "zarr.json")  # the store exists from here on
            _step("publish")
        except OSError as exc:
            raise _write_error(path, exc) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return cls.open(path, mode="a")

    @classmethod
    def open(cls, path: str | Path, mode: Literal["r", "a"] = "r") -> FeatureStore:
        """Open an existing store (``mode`` ``"r"`` or ``"a"``)."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: not a feature store (no zarr.json)")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: unreadable store metadata ({one_line(exc, 160)})") from exc
        meta = group.attrs.get("medfeat")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise StoreError(f"{path}: not a medfeat feature store (format {meta!r})")
        return cls(group, path)

    @property
    def chunk_items(self) -> int:
        return int(attr_dict(self.group.attrs, "medfeat")["chunk_items"])

    # -- items -----------------------------------------------------------------------
    def items(self) -> pd.DataFrame:
        """The items table, one row per item, in store order: :data:`ITEM_COLUMNS`, then the
        extra columns carried from manifests (text; empty where an item had none).

        A run killed while registering items may leave columns of different lengths; the
        shortest is the table (the rest is rewritten by the next registration).
        """
        names = [*ITEM_COLUMNS, *self.extra_columns()]
        cols = {c: np.asarray(array_at(self.group, f"items/{c}")[:]).astype(object)
                for c in names if f"items/{c}" in self.group}
        n = min(len(cols[c]) for c in ITEM_COLUMNS if c in cols)
        table = pd.DataFrame({c: pd.Series(v[:n], dtype=object) for c, v in cols.items()}, index=range(n))
        for c in names:  # stores made before a column existed; extra columns shorter than the table
            table[c] = table[c].where(table[c].notna(), "") if c in table else ""
        return table[names]

    def extra_columns(self) -> list[str]:
        """Names of the items table's columns beyond :data:`ITEM_COLUMNS`, in order."""
        return [str(c) for c in attr_list(self.group.attrs, "item_extra")]

    def _write_extra(self, records: list[dict[str, Any]], index: dict[str, int]) -> None:
        """Write the records' extra columns (created on first use, ``""`` for other items)."""
        names = list(dict.fromkeys(k for r in records for k in r if k not in ITEM_COLUMNS))
        if not names:
            return
        n = array_at(self.group, "items/item_id").shape[0]
        extra = self.extra_columns()
        for name in names:
            if name not in extra:
                self.group.create_array(f"items/{name}", shape=(n,), dtype=str, chunks=(4096,), fill_value="")
                extra.append(name)
            arr = array_at(self.group, f"items/{name}")
            if arr.shape[0] < n:
                arr.resize((n,))
            values = np.asarray(arr[:]).astype(object)
            values[values == None] = ""  # noqa: E711 - zarr's str fill reads back as None
            for r in records:
                if name in r:
                    values[index[r["item_id"]]] = str(r[name] or "")
            arr[:] = np.array(values.tolist(), dtype=str)
        self.group.attrs["item_extra"] = extra

    @_writes
    def add_items(self, records: Iterable[dict[str, Any]]) -> npt.NDArray[np.int64]:
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
                arr = self._item_column(column, start)
                arr.resize((start + len(new),))
                arr[start:] = np.array([str(by_id[i].get(column, "") or "") for i in new], dtype=str)
            for column in self.extra_columns():  # new items have none of the older extra values
                array_at(self.group, f"items/{column}").resize((start + len(new),))
            existing.update({iid: start + k for k, iid in enumerate(new)})
            self._grow_arrays(len(existing))
        self._write_extra(records, existing)
        return np.array([existing[r["item_id"]] for r in records], dtype=np.int64)

    @_writes
    def set_item_fields(self, indices: Indices, column: str, values: Sequence[str]) -> None:
        """Rewrite ``column`` of the items at ``indices`` (e.g. a refreshed source)."""
        if column not in ITEM_COLUMNS or column == "item_id":
            raise UnknownNameError(f"items column {column!r} cannot be rewritten")
        n = len(self.items())
        arr = self._item_column(column, n)
        current = np.asarray(arr[:n]).astype(object)
        current[np.asarray(indices, dtype=np.int64)] = [str(v) for v in values]
        arr[:n] = np.asarray(current, dtype=str)

    def even_item_columns(self) -> list[str]:
        """Trim item columns that an interrupted registration left longer than the table;
        one line per column trimmed."""
        n = len(self.items())
        actions = []
        for column in ITEM_COLUMNS:
            arr = self._item_column(column, n)
            if arr.shape[0] != n:
                arr.resize((n,))
                actions.append(f"items/{column}: trimmed to {n} rows")
        return actions

    def _item_column(self, column: str, n: int) -> zarr.Array:
        """The items array of ``column``, created (n empty strings) in stores made before it."""
        if f"items/{column}" not in self.group:
            _new_item_column(self.group, column, n)
        return array_at(self.group, f"items/{column}")

    def _grow_arrays(self, n: int) -> None:
        for key in self.arrays():
            for name in ("data", "done"):
                arr = array_at(self.group, f"{key.path}/{name}")
                if arr.shape[0] < n:
                    arr.resize((n,) + arr.shape[1:])

    # -- feature arrays --------------------------------------------------------------
    def arrays(self) -> list[ArrayKey]:
        """Every feature array in the store."""
        if "features" not in self.group:
            return []
        keys = []
        for model, mgroup in group_at(self.group, "features").groups():
            for tap, tgroup in mgroup.groups():
                for variant, _ in tgroup.groups():
                    keys.append(ArrayKey(model, tap, variant))
        return sorted(keys, key=str)

    def check_array(self, key: ArrayKey, dim: int, provenance: dict[str, Any],
                    layout: ArrayLayout | None = None) -> None:
        """Raise StoreError when an existing array ``key`` holds other features (another dim,
        item layout, weights, pooling, preprocessing); nothing when it matches or does not
        exist yet.

        Runs call this for every array before registering items, so a refused run changes
        nothing."""
        if not self._complete(key):
            return
        layout = layout or ArrayLayout.pooled(dim)
        stored = self.layout(key)
        if stored.dim != dim:
            raise StoreError(f"{key}: store holds dim {stored.dim}, this run makes {dim}")
        if stored != layout:
            raise StoreError(f"{key}: store holds items of shape {stored.item_shape} {stored.dtype}, "
                             f"this run makes {layout.item_shape} {layout.dtype}")
        diff = _provenance_diff(attr_dict(group_at(self.group, key.path).attrs, "provenance"), _json(provenance))
        if diff:
            raise StoreError(f"{key}: provenance differs from the stored array ({diff})")

    def ensure_array(self, key: ArrayKey, dim: int, provenance: dict[str, Any],
                     layout: ArrayLayout | None = None) -> None:
        """Create the array for ``key`` with rows of length ``dim``, or check it matches.

        ``layout`` gives items another shape and type (token arrays); by default each item
        is one float32 vector of ``dim`` values. An existing array with another dim, layout
        or provenance (other weights, pooling, preprocessing) is refused: its rows would mix
        two different features. The array is built aside and renamed into place, so it
        appears whole or not at all.
        """
        self.check_array(key, dim, provenance, layout)
        if self._complete(key):
            return
        self._drop_half_made(key)
        layout = layout or ArrayLayout.pooled(dim)
        n = array_at(self.group, "items/item_id").shape[0]
        attrs: JSONDict = {"provenance": _json(provenance)}
        if not (layout.is_pooled and layout.dtype == "float32"):  # pooled arrays keep their old attrs
            attrs["layout"] = layout.to_attrs()
        staging = self.path / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        try:
            group = zarr.open_group(str(staging), mode="w", zarr_format=3, attributes=attrs)
            _step("array group")
            group.create_array("data", shape=(n, *layout.item_shape), chunks=layout.chunks(self.chunk_items),
                               dtype=layout.storage_dtype, fill_value=layout.fill_value, compressors=COMPRESSORS)
            _step("array data")
            group.create_array("done", shape=(n,), chunks=(self.chunk_items,), dtype="uint8", fill_value=0,
                               compressors=COMPRESSORS)
            _step("array done")
            self.group.require_group(str(Path(key.path).parent))
            os.rename(staging, self.path / key.path)
            _step("publish array")
        except OSError as exc:
            raise _write_error(self.path, exc) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _complete(self, key: ArrayKey) -> bool:
        """Whether array ``key`` exists whole: data, done and provenance."""
        if key.path not in self.group:
            return False
        group = group_at(self.group, key.path)
        return "data" in group and "done" in group and "provenance" in group.attrs

    def _drop_half_made(self, key: ArrayKey) -> None:
        """Remove an array left half-made by an older medfeat (no done item can be lost: an
        array without its ``done`` marks or provenance never served a read)."""
        folder = self.path / key.path
        if folder.exists():
            shutil.rmtree(folder)

    def layout(self, key: ArrayKey) -> ArrayLayout:
        """Per-item shape and value type of the array ``key``."""
        group = self._array_group(key)
        return ArrayLayout.from_attrs(group.attrs, tuple(self.data_array(key).shape))

    def data_array(self, key: ArrayKey) -> zarr.Array:
        """The raw Zarr array of ``key`` (stored values; decode with :meth:`layout`)."""
        return array_at(self._array_group(key), "data")

    def provenance(self, key: ArrayKey) -> dict[str, Any]:
        return attr_dict(self._array_group(key).attrs, "provenance")

    def chunk_of(self, index: int) -> int:
        """Chunk number holding item ``index``."""
        return index // self.chunk_items

    def write(self, key: ArrayKey, indices: Indices, rows: np.ndarray) -> None:
        """Write feature rows for items at ``indices``, then mark them done.

        ``rows``: (len(indices), dim).
        """
        self.write_rows(key, indices, rows)
        self.mark_done(key, indices)

    @_writes
    def write_rows(self, key: ArrayKey, indices: Indices, rows: np.ndarray) -> None:
        """Write feature rows (len(indices), dim) without marking them done.

        Rows of token arrays are (len(indices), *item_shape), or flat (len(indices), values).
        Contiguous indices are written as one slice; chunk files are replaced atomically
        (write to a temporary file, then rename), so readers never see half a chunk.
        """
        data = self.data_array(key)
        idx = np.asarray(indices, dtype=np.int64)
        layout = self.layout(key)
        try:
            rows = layout.encode(rows, len(idx))
        except StoreError as exc:
            raise StoreError(f"{key}: {exc}") from None
        if len(idx) == 0:
            return
        if np.all(np.diff(idx) == 1):
            data[int(idx[0]): int(idx[-1]) + 1] = rows
        else:
            data.set_orthogonal_selection((idx, *(slice(None),) * len(layout.item_shape)), rows)

    @_writes
    def mark_done(self, key: ArrayKey, indices: Indices) -> None:
        """Mark items done; call only after their rows are written in every array of the run."""
        done = self._done_array(key)
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            return
        if np.all(np.diff(idx) == 1):
            done[int(idx[0]): int(idx[-1]) + 1] = 1
        else:
            done.set_coordinate_selection(idx, np.ones(len(idx), np.uint8))

    @_writes
    def unmark_done(self, key: ArrayKey, indices: Indices) -> None:
        """Mark items not done (their features are redone by the next run)."""
        done = self._done_array(key)
        idx = np.asarray(indices, dtype=np.int64)
        idx = np.unique(idx[idx < done.shape[0]])
        if len(idx):
            done.set_coordinate_selection(idx, np.zeros(len(idx), np.uint8))

    def done_mask(self, key: ArrayKey) -> np.ndarray:
        """(items,) bool: which items have features in ``key``."""
        done = np.asarray(self._done_array(key)[:])
        n = array_at(self.group, "items/item_id").shape[0]
        out = np.zeros(n, dtype=bool)
        out[: len(done)] = done.astype(bool)
        return out

    def read(self, key: ArrayKey | str) -> tuple[list[str], np.ndarray]:
        """Item ids and (n_done, dim) float32 features of the done items of ``key``.

        Token arrays come back as (n_done, *item_shape), float16 for float16 arrays (not
        widened: they are large) and float32 for bfloat16 ones. A corrupt or truncated chunk,
        or done items without features (a missing chunk), raise one-line StoreErrors that
        point to ``medfeat store verify``.
        """
        key = ArrayKey.parse(key) if isinstance(key, str) else key
        data = self.data_array(key)
        layout = self.layout(key)
        mask = self.done_mask(key)
        ids = self.items()["item_id"].to_numpy()
        if data.shape[0] < len(mask):
            raise StoreError(f"{self.path}: {key}: data has {data.shape[0]} rows for {len(mask)} items; "
                             "run `medfeat store verify`")
        rows = np.flatnonzero(mask)
        out = np.empty((len(rows), *layout.item_shape), dtype=layout.read_dtype)
        step = max(1, self.chunk_items)
        try:
            for start in range(0, data.shape[0], step):  # chunk by chunk: no second full copy
                lo, hi = np.searchsorted(rows, [start, start + step])  # rows is sorted
                if hi > lo:
                    block = np.asarray(data[start: start + step])
                    pick = rows[lo:hi] - start
                    out[lo:hi] = layout.decode(block if len(pick) == len(block) else block[pick])
        except (RuntimeError, ValueError, OSError) as exc:
            raise StoreError(f"{self.path}: {key}: unreadable chunk ({one_line(exc, 120)}); "
                             "run `medfeat store verify`") from exc
        bad = len(non_finite_rows(out.reshape(len(out), -1))) if out.size else 0
        if bad:
            raise StoreError(f"{self.path}: {key}: {bad} done item(s) have no finite features (a missing or "
                             "damaged chunk?); run `medfeat store verify`")
        return [str(i) for i in ids[mask]], out

    def _array_group(self, key: ArrayKey) -> zarr.Group:
        if key.path not in self.group:
            known = ", ".join(str(k) for k in self.arrays()) or "none"
            raise UnknownNameError(f"{self.path}: no feature array {key}; arrays: {known}")
        return group_at(self.group, key.path)

    def _done_array(self, key: ArrayKey) -> zarr.Array:
        return array_at(self._array_group(key), "done")

    # -- failures and run records ----------------------------------------------------
    def failures(self) -> list[JSONDict]:
        return attr_records(self.group.attrs, "failures")

    @_writes
    def record_failures(self, failures: Iterable[dict[str, Any]]) -> None:
        """Append failure records (``array``, ``item_id``, ``reason``), replacing older ones
        of the same (array, item). Driver process only."""
        new = [{**f, "time": f.get("time", utc_now())} for f in failures]
        if not new:
            return
        replaced = {(f["array"], f["item_id"]) for f in new}
        kept = [f for f in self.failures() if (f["array"], f["item_id"]) not in replaced]
        self.group.attrs["failures"] = kept + new

    @_writes
    def clear_failures(self, array: str | Sequence[str], item_ids: Iterable[str]) -> None:
        """Forget failures of ``item_ids`` in ``array`` (one name or several): they succeeded."""
        arrays = {array} if isinstance(array, str) else set(array)
        drop = set(item_ids)
        old = self.failures()
        kept = [f for f in old if not (f["array"] in arrays and f["item_id"] in drop)]
        if len(kept) != len(old):  # skip the attribute rewrite when nothing changes
            self.group.attrs["failures"] = kept

    @_writes
    def add_run_record(self, record: dict[str, Any]) -> None:
        self.group.attrs["runs"] = [*self.runs(), record]

    def runs(self) -> list[JSONDict]:
        return attr_records(self.group.attrs, "runs")

    # -- summaries ---------------------------------------------------------------------
    def failed_items(self, arrays: Iterable[str] | None = None) -> set[str]:
        """Item ids with a failure record (in any of ``arrays``, or in any array)."""
        wanted = None if arrays is None else set(arrays)
        return {f["item_id"] for f in self.failures() if wanted is None or f["array"] in wanted}

    def info(self) -> dict[str, Any]:
        """Summary: items, arrays (dim, done count, model/tap/pooling/variant, size on disk,
        random weights or not), failed items, runs."""
        n = len(self.items())
        arrays = []
        for key in self.arrays():
            prov = attr_dict(group_at(self.group, key.path).attrs, "provenance")
            layout = self.layout(key)
            arrays.append({"array": str(key), "dim": layout.dim, "item_shape": list(layout.item_shape),
                           "dtype": layout.dtype, "bytes": _disk_bytes(self.path / key.path),
                           "done": int(self.done_mask(key).sum()), "pooling": prov.get("pooling"),
                           "weights_sha256": prov.get("weights_sha256"), "runtime": prov.get("runtime"),
                           "random_weights": random_weights(prov)})
        runs = self.runs()
        return {"path": str(self.path), "format": FORMAT, "items": n, "chunk_items": self.chunk_items,
                "arrays": arrays, "failed_items": len(self.failed_items()), "runs": len(runs),
                "last_run": runs[-1].get("finished") if runs else None}


# Keys that describe how a run was executed, not what the features are. The weights file is
# compared by its sha256 (``weights_sha256``), not by the path it was given as.
_EXECUTION_KEYS = {"runtime", "precision_runtime", "created", "versions", "batch_size", "device", "weights"}


def _provenance_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = (set(old) | set(new)) - _EXECUTION_KEYS
    diffs = [k for k in sorted(keys) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} != {new.get(k)!r}" for k in diffs[:3])


def _json(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` as it reads back from attrs (tuples become lists)."""
    return json.loads(json.dumps(doc, default=str))


def _new_item_column(group: zarr.Group, column: str, n: int) -> None:
    arr = group.create_array(f"items/{column}", shape=(n,), dtype=str, chunks=(4096,), compressors=COMPRESSORS)
    if n:
        arr[:] = np.full(n, "", dtype=str)


def check_store_location(path: str | Path) -> None:
    """Raise StoreError, before anything is written, when ``path`` cannot hold a store: it
    lies inside another feature store, or it exists and holds something else."""
    path = Path(path)
    for parent in path.resolve().parents:
        if (parent / "zarr.json").is_file() and (parent / "items").is_dir():
            raise StoreError(f"{path}: lies inside the feature store {parent}; give a path outside it")
    if path.exists() and not (path / "zarr.json").is_file():
        if not path.is_dir():
            raise StoreError(f"{path}: exists and is not a feature store")
        foreign = [e.name for e in path.iterdir() if e.name not in _UNPUBLISHED and not e.name.startswith(STAGING_PREFIX)]
        if foreign:
            raise StoreError(f"{path}: exists and is not a feature store (holds {', '.join(sorted(foreign)[:3])})")


def _clear_unpublished(path: Path) -> None:
    """Make ``path`` ready for a new store: absent or empty, or holding only what an
    unpublished (interrupted) creation leaves, which is removed. Anything else is refused."""
    if not path.exists():
        path.mkdir(parents=True)
        return
    if not path.is_dir():
        raise StoreError(f"{path}: exists and is not a feature store")
    entries = list(path.iterdir())
    foreign = [e.name for e in entries if e.name not in _UNPUBLISHED and not e.name.startswith(STAGING_PREFIX)]
    if foreign:
        raise StoreError(f"{path}: exists and is not a feature store (holds {', '.join(sorted(foreign)[:3])})")
    for e in entries:
        if e.name != LOCK_NAME:
            shutil.rmtree(e) if e.is_dir() else e.unlink()


def _write_error(path: Path, exc: OSError) -> StoreError:
    """One line for a failed store write: a full disk and a read-only file system by name."""
    return StoreError(f"{path}: cannot write the store ({os_error_reason(exc)})")


def _disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
