"""Feature store: items, writes and done marks, provenance checks, lock, verify, export."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medfeat.engine.store.export import export_store
from medfeat.engine.store.feature_store import ArrayKey, FeatureStore
from medfeat.engine.store.lock import StoreLock
from medfeat.engine.store.verify import verify_store
from medfeat.errors import StoreError, UnknownNameError

KEY = ArrayKey("m", "t", "none-whole")


def _prov(dim: int = 3, **kw) -> dict:
    return {"model": "m", "tap": "t", "dim": dim, "preprocessing": {"variant": "none-whole"}, **kw}


def _store(tmp_path, n: int = 5) -> FeatureStore:
    s = FeatureStore.create(tmp_path / "s.zarr", chunk_items=2)
    s.add_items({"item_id": f"S{i}/baseline", "subject": f"S{i}", "timepoint": "baseline", "kind": "scan"}
                for i in range(n))
    s.ensure_array(KEY, 3, _prov())
    return s


def test_write_read_done_and_resume_order(tmp_path):
    s = _store(tmp_path)
    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    s.write_rows(KEY, [1, 3], rows)
    assert not s.done_mask(KEY).any()  # rows written, not yet marked
    s.mark_done(KEY, [1, 3])
    ids, x = FeatureStore.open(tmp_path / "s.zarr").read("m:t:none-whole")
    assert ids == ["S1/baseline", "S3/baseline"]
    np.testing.assert_array_equal(x, rows)


def test_add_items_keeps_indices_and_grows_arrays(tmp_path):
    s = _store(tmp_path, 3)
    idx = s.add_items([{"item_id": "S1/baseline"}, {"item_id": "new"}])
    assert idx.tolist() == [1, 3]
    assert s.done_mask(KEY).shape == (4,)
    assert not s.items()["item_id"].duplicated().any()


def test_provenance_mismatch_refused(tmp_path):
    s = _store(tmp_path)
    s.ensure_array(KEY, 3, _prov(runtime="onnx"))  # how it ran is not what it is: accepted
    with pytest.raises(StoreError, match="provenance differs"):
        s.ensure_array(KEY, 3, _prov(weights_sha256="abc"))
    with pytest.raises(StoreError, match="dim"):
        s.ensure_array(KEY, 4, _prov(4))


def test_several_models_taps_variants_side_by_side(tmp_path):
    s = _store(tmp_path)
    other = [ArrayKey("m", "t2", "none-whole"), ArrayKey("m", "t", "rigid-crop"), ArrayKey("n", "t", "none-whole")]
    for k in other:
        s.ensure_array(k, 2, {"model": k.model, "tap": k.tap, "dim": 2, "preprocessing": {"variant": k.variant}})
    assert set(s.arrays()) == {KEY, *other}
    with pytest.raises(UnknownNameError, match="no feature array"):
        s.read("m:nope:none-whole")


def test_failures_replace_and_clear(tmp_path):
    s = _store(tmp_path)
    s.record_failures([{"array": str(KEY), "item_id": "S1/baseline", "reason": "a"}])
    s.record_failures([{"array": str(KEY), "item_id": "S1/baseline", "reason": "b"}])
    assert [f["reason"] for f in s.failures()] == ["b"]
    s.clear_failures([str(KEY)], ["S1/baseline"])
    assert s.failures() == []


def test_lock_excludes_second_writer(tmp_path):
    s = _store(tmp_path)
    with StoreLock(s.path):
        with pytest.raises(StoreError, match="in use by another run"):
            StoreLock(s.path).acquire()
    with StoreLock(s.path):  # released on exit
        pass
    assert s.arrays() == [KEY]  # the lock file is no group member


def test_verify_finds_nan_and_bad_provenance(tmp_path):
    s = _store(tmp_path)
    s.write(KEY, [0, 1], np.ones((2, 3), np.float32))
    assert verify_store(s).problems == []
    s.write(KEY, [2], np.full((1, 3), np.nan, np.float32))
    s.group[KEY.path].attrs["provenance"] = _prov(tap="other")
    problems = verify_store(s).problems
    assert any("non-finite" in p and "S2/baseline" in p for p in problems)
    assert any("provenance tap" in p for p in problems)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore.open(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("hi")
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore.create(tmp_path / "x")


def test_export_parquet_and_hdf5(tmp_path):
    import h5py

    s = _store(tmp_path)
    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    s.write(KEY, [0, 1, 4], x)
    files = export_store(s, tmp_path / "pq", "parquet")
    table = pd.read_parquet(files[0])
    assert table["item_id"].tolist() == ["S0/baseline", "S1/baseline", "S4/baseline"]
    np.testing.assert_array_equal(table[[c for c in table.columns if c.startswith("f")]].to_numpy(), x)
    files = export_store(s, tmp_path / "h5", "hdf5")
    with h5py.File(tmp_path / "h5" / "m__t__none-whole" / "S4.h5") as f:
        np.testing.assert_array_equal(f["features"][:], x[2:])
        assert f["coords"].shape == (1, 2) and f["coords"][0, 0] == 4
    assert pd.read_csv(tmp_path / "h5" / "m__t__none-whole" / "bags.csv").shape == (3, 2)


def test_provenance_with_tuples_reopens(tmp_path):
    s = _store(tmp_path)
    key = ArrayKey("m", "t", "tuple")
    prov = {"model": "m", "tap": "t", "dim": 3, "config": {"channels": (4, 8)}, "preprocessing": {"variant": "tuple"}}
    s.ensure_array(key, 3, prov)
    FeatureStore.open(s.path, mode="a").ensure_array(key, 3, prov)  # same features: accepted
