"""Zarr cohort ingest (NGFF metadata, round trip) and DICOM series reading."""
from __future__ import annotations

import json
from pathlib import Path

import _tiny_backbone  # noqa: E402,F401
import numpy as np
import pytest
import zarr
from _cohort import tiny_cohort  # noqa: E402

from medfeat.cohorts.ingest import ingest_cohort  # noqa: E402
from medfeat.engine.pipeline.config import ExtractConfig  # noqa: E402
from medfeat.engine.pipeline.extract import extract  # noqa: E402
from medfeat.engine.store.feature_store import FeatureStore  # noqa: E402
from medfeat.errors import InputError  # noqa: E402
from medfeat.io.dicom import read_dicom_series, write_dicom_series  # noqa: E402
from medfeat.io.manifest import read_manifest  # noqa: E402
from medfeat.io.nifti import read_volume  # noqa: E402
from medfeat.io.readers import read_scan  # noqa: E402


def _rotation(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def test_ingest_round_trip_and_extract_equal(tmp_path_factory, tmp_path):
    manifest = tiny_cohort(tmp_path_factory)
    new, failures = ingest_cohort(manifest, tmp_path / "cohort.zarr", chunk=4, codec="zstd")
    assert failures == []
    old, df = read_manifest(manifest), read_manifest(new)
    for a, b in zip(old["path"], df["path"]):
        va, vb = read_volume(a), read_scan(b)
        np.testing.assert_array_equal(va.data, vb.data)
        np.testing.assert_array_equal(va.affine, vb.affine)
    meta = json.loads((Path(df["path"][0]) / "zarr.json").read_text())["attributes"]
    ms = meta["ome"]["multiscales"][0]
    assert meta["ome"]["version"] == "0.5" and [a["unit"] for a in ms["axes"]] == ["millimeter"] * 3
    np.testing.assert_allclose(ms["datasets"][0]["coordinateTransformations"][0]["scale"],
                               read_volume(old["path"][0]).spacing)
    arr = zarr.open_array(str(Path(df["path"][0]) / "0"), mode="r")
    assert arr.chunks == (4, 4, 4) and arr.shards == (16, 16, 16)  # 64 chunks: one shard per scan
    # features from the Zarr cohort equal those from the NIfTI files
    cfg = dict(model="tiny3d_test", taps=("conv2",), scheduler_kind="sync", progress=False, align="oracle", roi="crop",
               random_init=True)
    extract(ExtractConfig.from_settings(str(manifest), str(tmp_path / "a"), **cfg))
    extract(ExtractConfig.from_settings(str(new), str(tmp_path / "b"), **cfg))
    _, xa = FeatureStore.open(tmp_path / "a").read("tiny3d_test:conv2:oracle-crop")
    _, xb = FeatureStore.open(tmp_path / "b").read("tiny3d_test:conv2:oracle-crop")
    np.testing.assert_array_equal(xa, xb)


def test_dicom_series_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 1000, size=(5, 6, 7)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = _rotation(20) @ np.diag([2.5, 0.8, 0.9])
    affine[:3, 3] = [-40.0, 12.0, 7.5]
    files = write_dicom_series(tmp_path / "series", data, affine)
    files[0].rename(tmp_path / "series" / "zzz_first.dcm")  # file order must not matter
    vol = read_dicom_series(tmp_path / "series")
    # Slices come back sorted along the DICOM normal, which here runs against the original
    # slice axis: the same image, slice axis reversed. Undo that and compare exactly.
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, data.shape[0] - 1
    expected = affine if np.allclose(vol.affine[:3, 0], affine[:3, 0]) else affine @ flip
    expected_data = data if expected is affine else data[::-1]
    np.testing.assert_allclose(vol.affine, expected, atol=1e-6)
    step = (data.max() - data.min()) / 65535
    np.testing.assert_allclose(vol.data, expected_data, atol=step)
    assert read_scan(tmp_path / "series").shape == (5, 6, 7)


def test_dicom_errors(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.dcm").write_bytes(b"not dicom")
    with pytest.raises(InputError, match="unreadable DICOM"):
        read_dicom_series(tmp_path / "bad")
