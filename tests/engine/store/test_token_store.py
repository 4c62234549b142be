"""Token arrays in the feature store: per-item shapes, float16/bfloat16, old stores, sizes."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import zarr

from medfeat.engine.store.feature_store import ArrayKey, FeatureStore
from medfeat.engine.store.layout import ArrayLayout
from medfeat.engine.store.verify import verify_store
from medfeat.errors import StoreError

KEY = ArrayKey("m", "t@tokens", "none-whole")


def _store(tmp_path, layout: ArrayLayout, n: int = 5) -> FeatureStore:
    s = FeatureStore.create(tmp_path / "s.zarr", chunk_items=2)
    s.add_items({"item_id": f"I{i}", "subject": f"S{i}"} for i in range(n))
    prov = {"model": "m", "tap": "t", "dim": layout.dim, "preprocessing": {"variant": "none-whole"}}
    s.ensure_array(KEY, layout.dim, prov, layout=layout)
    return s


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_token_rows_round_trip_in_half_precision(tmp_path, dtype):
    layout = ArrayLayout((6, 4), dtype)
    s = _store(tmp_path, layout)
    rows = np.random.default_rng(0).normal(size=(3, 6, 4)).astype(np.float32)
    s.write(KEY, [0, 2, 3], rows.reshape(3, -1))  # flat rows, as worker tasks send them
    ids, x = FeatureStore.open(s.path).read(KEY)
    assert ids == ["I0", "I2", "I3"] and x.shape == (3, 6, 4)
    ref = rows.astype(np.float16) if dtype == "float16" else rows.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(x, ref.astype(x.dtype))  # exactly the rounded values
    assert x.dtype == (np.float16 if dtype == "float16" else np.float32)
    raw = zarr.open_group(str(s.path), mode="r")[f"{KEY.path}/data"]
    assert raw.dtype == (np.float16 if dtype == "float16" else np.uint16)
    assert raw.chunks == (2, 6, 4)  # whole items per chunk
    assert np.isnan(layout.decode(raw[1])).all()  # unwritten items hold NaN
    assert verify_store(s).problems == []


def test_views_are_chunked_one_view_per_chunk(tmp_path):
    s = _store(tmp_path, ArrayLayout((3, 5, 2), "float16"))
    assert s.data_array(KEY).chunks == (2, 1, 5, 2)
    s.write(KEY, [4], np.ones((1, 3, 5, 2)))
    assert s.read(KEY)[1].shape == (1, 3, 5, 2)


def test_wrong_row_shape_and_other_layout_refused(tmp_path):
    layout = ArrayLayout((6, 4), "float16")
    s = _store(tmp_path, layout)
    with pytest.raises(StoreError, match="rows of shape"):
        s.write_rows(KEY, [0], np.ones((1, 5, 4)))
    prov = s.provenance(KEY)
    with pytest.raises(StoreError, match="shape"):
        s.ensure_array(KEY, 4, prov, layout=ArrayLayout((7, 4), "float16"))
    with pytest.raises(StoreError, match="bfloat16"):
        s.ensure_array(KEY, 4, prov, layout=ArrayLayout((6, 4), "bfloat16"))
    s.ensure_array(KEY, 4, prov, layout=layout)  # the same: accepted


def test_arrays_without_layout_read_as_pooled_float32(tmp_path):
    """A store written before layouts existed: no attrs['layout'], (items, dim) float32."""
    s = FeatureStore.create(tmp_path / "old.zarr", chunk_items=2)
    s.add_items({"item_id": f"I{i}"} for i in range(3))
    key = ArrayKey("m", "t", "none-whole")
    group = s.group.require_group(key.path)  # exactly what the first store format wrote
    group.create_array("data", shape=(3, 4), chunks=(2, 4), dtype="float32", fill_value=np.nan)
    group.create_array("done", shape=(3,), chunks=(2,), dtype="uint8", fill_value=0)
    group.attrs["provenance"] = {"model": "m", "tap": "t", "dim": 4, "preprocessing": {"variant": "none-whole"}}
    s.write(key, [1], np.arange(4.0)[None])
    assert s.layout(key) == ArrayLayout.pooled(4)
    ids, x = s.read(key)
    assert ids == ["I1"] and x.dtype == np.float32 and x.tolist() == [[0, 1, 2, 3]]
    assert verify_store(s).problems == []


def test_info_gives_shape_dtype_and_bytes_on_disk(tmp_path):
    s = _store(tmp_path, ArrayLayout((6, 4), "float16"))
    s.write(KEY, [0, 1], np.ones((2, 6, 4)))
    info = s.info()["arrays"][0]
    assert info["item_shape"] == [6, 4] and info["dtype"] == "float16" and info["dim"] == 4
    files = sum(f.stat().st_size for f in (s.path / KEY.path).rglob("*") if f.is_file())
    assert info["bytes"] == files > 0


def test_verify_finds_non_finite_tokens(tmp_path):
    s = _store(tmp_path, ArrayLayout((6, 4), "float16"))
    rows = np.ones((2, 6, 4))
    rows[1, 5, 3] = np.inf
    s.write(KEY, [2, 3], rows)
    problems = verify_store(s).problems
    assert len(problems) == 1 and "non-finite" in problems[0] and "I3" in problems[0]


def test_export_refuses_token_arrays(tmp_path):
    from medfeat.engine.store.export import export_store
    from medfeat.errors import InputError

    s = _store(tmp_path, ArrayLayout((6, 4), "float16"))
    s.write(KEY, [0], np.ones((1, 6, 4)))
    with pytest.raises(InputError, match="pooled arrays"):
        export_store(s, tmp_path / "out", "parquet")
