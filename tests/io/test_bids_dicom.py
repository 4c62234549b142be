"""Cohorts as they come: BIDS trees and DICOM exports to manifests; enhanced multi-frame and
compressed DICOM read as volumes."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from cohort_trees import make_bids, stamp, write_enhanced_mr
from pydicom.data import get_testdata_file

from medfeat.errors import InputError
from medfeat.io.bids import parse_name, scan_bids
from medfeat.io.dicom import read_dataset, write_dicom_series
from medfeat.io.dicom_scan import check_one_series_per_visit, scan_dicom
from medfeat.io.readers import read_scan

AFFINE = np.array([[0.0, 0.0, 1.2, -10.0], [0.9, 0.0, 0.0, 5.0], [0.0, -1.1, 0.0, 20.0], [0, 0, 0, 1]])


def test_bids_names_parse() -> None:
    assert parse_name("sub-01_ses-bl_acq-fast_run-2_T1w.nii.gz") == (
        {"sub": "01", "ses": "bl", "acq": "fast", "run": "2"}, "T1w")
    assert parse_name("README") is None and parse_name("x_T1w.nii.gz") is None


def test_bids_scan_joins_participants_and_sessions(tmp_path) -> None:
    root = make_bids(tmp_path / "bids")
    with pytest.raises(InputError, match="several T1w images"):
        scan_bids(root)
    df = scan_bids(root, suffix="T2w")
    assert list(df[["subject", "timepoint"]].itertuples(index=False, name=None)) == [
        ("01", "bl"), ("01", "m12"), ("02", "bl"), ("02", "m12"), ("03", "bl")]
    assert list(df["age"].fillna("")) == ["58", "58", "61", "61", ""] and list(df["sex"]) == ["F", "F", "M", "M", "F"]
    assert list(df["acquisition_date"]) == ["2019-03-01", "2020-03-02", "2019-03-01", "2020-03-02", "2019-03-01"]
    assert df["path"][0] == "sub-01/ses-bl/anat/sub-01_ses-bl_T2w.nii.gz" and "kl_grade" in df
    fast = scan_bids(root, acquisition="fast")
    assert len(fast) == 1 and fast["acq"][0] == "fast"
    with pytest.raises(InputError, match="no BIDS anat images"):
        scan_bids(root, suffix="FLAIR")


def test_dicom_tree_to_manifest_and_volumes(tmp_path) -> None:
    root = tmp_path / "pacs"
    data = np.random.default_rng(1).random((6, 12, 10)).astype(np.float32) * 1000
    t1 = write_dicom_series(root / "P1" / "study1" / "t1", data, AFFINE)
    stamp(t1, PatientID="P1", StudyDate="20200105", SeriesDescription="T1 SAG")
    mixed = write_dicom_series(root / "P1" / "study2", data, AFFINE) + write_dicom_series(root / "P1" / "study2x", data[:4], AFFINE)
    for f in mixed[6:]:  # the second series moves into the first's folder, files without suffix
        f.rename(root / "P1" / "study2" / f"IM{f.stem[-4:]}")
    stamp(mixed[:6], PatientID="P1", StudyDate="20210110", SeriesDescription="T1 SAG")
    stamp(sorted((root / "P1" / "study2").glob("IM*")), PatientID="P1", StudyDate="20210110", SeriesDescription="T2 AX")
    (root / "P2").mkdir()
    write_enhanced_mr(root / "P2" / "enh.dcm", data, AFFINE, patient="P2", date="20200301", description="T1 SAG enh")
    shutil.copy(get_testdata_file("test-SR.dcm"), root / "P2" / "report.dcm")  # DICOM without an image
    (root / "README.txt").write_text("export notes")
    found = scan_dicom(root)
    assert found.other_files == 2 and len(found.manifest) == 4
    with pytest.raises(InputError, match="2 series .*--series-description"):
        check_one_series_per_visit(found.manifest, root)
    df = scan_dicom(root, series_description="^t1").manifest
    check_one_series_per_visit(df, root)
    assert list(df[["subject", "timepoint"]].itertuples(index=False, name=None)) == [
        ("P1", "2020-01-05"), ("P1", "2021-01-10"), ("P2", "2020-03-01")]
    assert df["path"][0] == "P1/study1/t1"  # a folder of one series
    assert df["path"][1].startswith("P1/study2/slice_")  # one file: its folder holds two series
    ref = read_scan(root / df["path"][0])
    mixed_vol = read_scan(root / df["path"][1])
    assert mixed_vol.data.shape == (6, 12, 10)
    np.testing.assert_allclose(mixed_vol.affine, ref.affine, atol=1e-6)
    enh = read_scan(root / df["path"][2])
    np.testing.assert_allclose(enh.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(enh.data, data, atol=0.26)  # slope 0.5 quantisation
    np.testing.assert_allclose(ref.data, data, atol=1000 / 65535)


def test_jpeg_ls_reads_like_its_uncompressed_twin(tmp_path) -> None:
    for name in ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"):
        (tmp_path / name[:-4]).mkdir()
        shutil.copy(get_testdata_file(name), tmp_path / name[:-4] / name)
    jls = read_scan(tmp_path / "MR_small_jpeg_ls_lossless")
    raw = read_scan(tmp_path / "MR_small")
    assert jls.data.shape == (1, 64, 64)
    np.testing.assert_array_equal(jls.data, raw.data)
    np.testing.assert_array_equal(jls.affine, raw.affine)


def test_missing_codec_plugin_is_named(tmp_path, monkeypatch) -> None:
    from pydicom.pixels.decoders import JPEGLSLosslessDecoder

    monkeypatch.setattr(JPEGLSLosslessDecoder, "_available", {})
    path = tmp_path / "jls.dcm"
    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), path)
    with pytest.raises(InputError, match="pip install pylibjpeg pylibjpeg-libjpeg"):
        read_scan(path)
    assert read_dataset(path, headers_only=True).Rows == 64
