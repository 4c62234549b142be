"""The Python face of medfeat: extract into a feature store, open it, probe what it holds.

Re-exported by ``import medfeat`` (lazily, so the CLI starts fast)::

    import medfeat

    record = medfeat.extract("cohort/manifest.csv", "feats.zarr", model="unet3d",
                             taps=["bottom"], weights="unet3d.safetensors", align="rigid")
    store = medfeat.open_store("feats.zarr")
    items, X = store.features("unet3d:bottom:rigid-whole")     # items table, (n, dim) float32
    result = medfeat.probe("feats.zarr", "unet3d:bottom:rigid-whole", target="label",
                           pair_mode="diff")                   # labels: the items table
    print(result.metrics["auc"])                               # value and 95% CI

Every function takes the options of the matching command by their Python names and refuses
unknown ones; errors are the CLI's (:class:`~medfeat.errors.MedfeatError` subclasses).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medfeat.engine.pipeline.config import ExtractConfig, RunRecord
from medfeat.engine.store.feature_store import ArrayKey, FeatureStore

if TYPE_CHECKING:
    import pandas as pd
    import xarray as xr

    from medfeat.probes.evaluate import ProbeResult

__all__ = ["Store", "open_store", "extract", "probe"]


class Store:
    """A feature store opened for reading (see :func:`open_store`).

    Arrays are named ``MODEL:TAP:VARIANT`` (``unet3d:bottom:rigid-crop``); the items table
    has one row per item (``item_id``, ``subject``, ``timepoint``, ``kind``, ``source``, and
    the columns the cohort manifest carried: age, sex, site, ...).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._store = FeatureStore.open(self.path)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, {len(self.arrays())} arrays)"

    def arrays(self) -> list[str]:
        """Names of the feature arrays, ``MODEL:TAP:VARIANT``, sorted."""
        return [str(k) for k in self._store.arrays()]

    def info(self) -> dict[str, Any]:
        """Items, arrays (dim, done, pooling, ...), failures and runs, as ``medfeat store info``."""
        return self._store.info()

    def provenance(self, name: str) -> dict[str, Any]:
        """How array ``name`` was made: model, weights sha256, tap, pooling, preprocessing, ..."""
        return self._store.provenance(ArrayKey.parse(name))

    def items(self) -> pd.DataFrame:
        """The items table, one row per item in store order (text columns)."""
        return self._store.items()

    def failures(self) -> list[dict[str, Any]]:
        """Failed items: ``{array, item_id, reason, time}``."""
        return self._store.failures()

    def runs(self) -> list[RunRecord]:
        """The run record of every extraction into this store, oldest first."""
        return [RunRecord.from_dict(doc) for doc in self._store.runs()]

    def features(self, name: str) -> tuple[pd.DataFrame, np.ndarray]:
        """The done items of array ``name`` (their rows of the items table) and their
        features: an ``(n_items, dim)`` float32 array, rows in the same order."""
        ids, X = self._store.read(name)
        table = self._store.items().set_index("item_id").loc[ids].reset_index()
        return table, X

    def to_pandas(self, name: str) -> pd.DataFrame:
        """Array ``name`` as a DataFrame: the items table's columns, then ``f0 .. f{dim-1}``."""
        import pandas as pd

        table, X = self.features(name)
        feats = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
        return pd.concat([table, feats], axis=1)

    def to_xarray(self, name: str) -> xr.DataArray:
        """Array ``name`` as an ``xarray.DataArray`` of dims ``(item, feature)``: the items
        table as coordinates along ``item``, the provenance in ``attrs``. Needs xarray."""
        try:
            import xarray as xr
        except ImportError as exc:  # optional dependency
            raise ImportError("Store.to_xarray needs xarray: pip install xarray") from exc
        table, X = self.features(name)
        coords = {"item": table["item_id"].to_numpy(),
                  **{c: ("item", table[c].to_numpy()) for c in table.columns if c != "item_id"}}
        return xr.DataArray(X, dims=("item", "feature"), coords=coords, name=name,
                            attrs={"provenance": self.provenance(name)})


def open_store(path: str | Path) -> Store:
    """Open the feature store at ``path`` for reading."""
    return Store(path)


def extract(manifest: str | Path, store: str | Path, *, model: str, taps: Sequence[str | int],
            **options: Any) -> RunRecord:
    """Extract ``model``'s ``taps`` for every item of ``manifest`` into ``store``.

    ``model`` is a registered backbone or a generic one (``timm:NAME``, ``hf:DIR``,
    ``onnx:FILE``, ``torchscript:FILE``, ``module:PKG.MOD:FACTORY``). ``options`` are the
    settings of ``medfeat extract`` by their Python names: ``weights``, ``align``, ``roi``,
    ``roi_labels``, ``runtime``, ``device``, ``precision``, ``pooling``, ``batch_size``,
    ``scheduler_kind``, ``workers``, ``plugins``, ``input_kind``, ``input_size``,
    ``intensity``, ``model_args`` (a dict), ``baseline_visit``, ``followup_visit``,
    ``pairs``, ... (:meth:`ExtractConfig.settings` lists them); an unknown name is refused.
    No progress line unless ``progress=True``. Returns the run record; failed items are in
    ``record.failures`` (and the store), not raised.
    """
    from medfeat.engine.pipeline.extract import extract as run_extract

    options.setdefault("progress", False)
    cfg = ExtractConfig.from_settings(str(manifest), str(store), model, tuple(str(t) for t in taps), **options)
    return run_extract(cfg)


def probe(store: str | Path, feature: str, labels: str | Path | pd.DataFrame | None = None,
          target: str = "label", *, pair_mode: str | None = None, covariates: Sequence[str] = (),
          split_column: str | None = None, **options: Any) -> ProbeResult:
    """Cross-validate a probe on array ``feature`` (``MODEL:TAP[:VARIANT]``) of ``store``
    against column ``target``, grouped by subject; every metric comes with a 95% CI.

    ``labels``: a CSV (or frame) joined on item_id / subject [+ timepoint]; None takes the
    store's items table (the cohort manifest's columns). ``covariates``: label columns
    appended to the features (text one-hot). ``options`` as
    :func:`medfeat.probes.evaluate.cross_validate_probe` (``task``, ``n_splits``, ``seeds``,
    ``probe``, ``n_boot``, ``ci_method``, ...).
    """
    from medfeat.probes.features import load_features, store_labels
    from medfeat.probes.sweep import evaluate_features

    table = store_labels(store) if labels is None else labels
    fs = load_features(store, feature, table, target, pair_mode, covariates)
    return evaluate_features(fs, labels=table, split_column=split_column, **options)
