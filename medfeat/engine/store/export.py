"""Export a feature store's arrays to Parquet or to HDF5 bags for MIL tools.

Parquet: one file per array, ``<model>__<tap>__<variant>.parquet``, one row per done item:
``item_id, subject, timepoint, kind, f0000 ... f<D-1>`` (float32).

HDF5 (the layout CLAM-style MIL tools read): one bag per subject,
``<model>__<tap>__<variant>/<subject>.h5`` with datasets ``features`` (N, D) float32 and
``coords`` (N, 2) int64 (here: the instance's item index in the store, and its position in
the bag), the item ids in the attribute ``item_ids``; plus ``bags.csv`` listing
``slide_id`` (the subject) and the instance count.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medfeat.engine.store.feature_store import ArrayKey, FeatureStore
from medfeat.errors import InputError, UnknownNameError

FORMATS = ("parquet", "hdf5")


def _file_stem(key: ArrayKey) -> str:
    return f"{key.model}__{key.tap}__{key.variant}".replace("/", "_")


def export_store(store: FeatureStore, out: str | Path, fmt: str,
                 arrays: Sequence[ArrayKey] | None = None) -> list[Path]:
    """Write every (or the given) array of ``store`` under directory ``out``; return the files."""
    if fmt not in FORMATS:
        raise UnknownNameError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = store.items().set_index("item_id")
    written: list[Path] = []
    for key in arrays or store.arrays():
        if not store.layout(key).is_pooled:
            raise InputError(f"{key} holds {store.layout(key).item_shape} values per item (tokens); "
                             f"{fmt} export takes pooled arrays, one vector per item")
        ids, x = store.read(key)
        meta = items.loc[ids].reset_index() if ids else items.iloc[:0].reset_index()
        if fmt == "parquet":
            written.append(_parquet(out / f"{_file_stem(key)}.parquet", meta, x))
        else:
            written += _hdf5_bags(out / _file_stem(key), meta, x, store, key)
    return written


def _parquet(path: Path, meta: pd.DataFrame, x: np.ndarray) -> Path:
    width = max(4, len(str(max(x.shape[1] - 1, 0))))
    feats = pd.DataFrame(x, columns=[f"f{i:0{width}d}" for i in range(x.shape[1])])
    table = pd.concat([meta[["item_id", "subject", "timepoint", "kind"]].astype(str), feats], axis=1)
    table.to_parquet(path, index=False)
    return path


def _hdf5_bags(folder: Path, meta: pd.DataFrame, x: np.ndarray, store: FeatureStore, key: ArrayKey) -> list[Path]:
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    index = {iid: i for i, iid in enumerate(store.items()["item_id"])}
    files, rows = [], []
    for subject, group in meta.groupby("subject", sort=False):
        pos = group.index.to_numpy()
        path = folder / f"{subject}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=x[pos].astype(np.float32))
            coords = np.stack([[index[i] for i in group["item_id"]], np.arange(len(pos))], axis=1)
            f.create_dataset("coords", data=coords.astype(np.int64))
            f.attrs["item_ids"] = [str(i) for i in group["item_id"]]
            f.attrs["array"] = str(key)
        files.append(path)
        rows.append({"slide_id": subject, "instances": len(pos)})
    pd.DataFrame(rows, columns=["slide_id", "instances"]).to_csv(folder / "bags.csv", index=False)
    return files + [folder / "bags.csv"]
