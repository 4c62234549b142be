"""Cohort scans are read from Zarr through Dask, one task per stored chunk."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from medfeat.errors import InputError
from medfeat.io.nifti import Volume
from medfeat.io.readers import read_scan
from medfeat.io.zarr_scans import read_zarr_volume, write_zarr_volume, zarr_dask_array


def _scan(tmp_path, shape=(10, 12, 9), chunk=4, dtype="float32"):
    rng = np.random.default_rng(0)
    data = rng.normal(size=shape).astype(np.float32) * 100
    affine = np.diag([1.5, 0.8, 2.0, 1.0])
    affine[:3, 3] = [-3.0, 4.0, 5.0]
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="w", zarr_format=3)
    write_zarr_volume(root, "scans/s1/baseline", Volume(data=data, affine=affine, spacing=np.ones(3)),
                      chunk=chunk, dtype=dtype)
    return tmp_path / "c.zarr" / "scans" / "s1" / "baseline", data, affine


@pytest.mark.parametrize("shape", [(10, 12, 9), (5, 6, 7)])  # sharded (27 chunks) and not (8 chunks)
def test_dask_chunks_are_the_stored_chunks(tmp_path, shape):
    path, data, affine = _scan(tmp_path, shape)
    stored = zarr.open_array(str(path / "0"), mode="r")
    darr, aff, _ = zarr_dask_array(path)
    assert type(darr).__module__.startswith("dask")
    # Dask's chunk grid: per axis, the stored chunk edge repeated, the last one ragged.
    expected = tuple(tuple(min(c, n - i) for i in range(0, n, c)) for n, c in zip(shape, stored.chunks))
    assert darr.chunks == expected and darr.dtype == np.float32
    assert darr.npartitions == int(np.prod([len(c) for c in expected]))
    np.testing.assert_array_equal(aff, affine)
    vol = read_zarr_volume(path)
    np.testing.assert_array_equal(vol.data, data)  # exact: float32 in, float32 out
    assert vol.data.dtype == np.float32 and vol.data.flags.c_contiguous
    np.testing.assert_array_equal(read_scan(path).data, data)


def test_uint8_mask_comes_back_as_float32(tmp_path):
    path, data, _ = _scan(tmp_path, dtype="uint8")
    vol = read_zarr_volume(path)
    np.testing.assert_array_equal(vol.data, data.astype(np.uint8).astype(np.float32))


def test_corrupt_chunk_is_an_input_error(tmp_path):
    path, _, _ = _scan(tmp_path, shape=(5, 6, 7))  # 8 chunks: one file per chunk, unsharded
    chunk = next(p for p in (path / "0" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"\x00garbage")
    with pytest.raises(InputError, match="corrupt chunk"):
        read_zarr_volume(path)
