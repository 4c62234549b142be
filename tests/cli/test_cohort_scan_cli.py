"""Cohorts as they come, from the command line: a BIDS tree and a DICOM export made here go
through ``cohort scan``, ``extract`` (per scan, and as visit pairs) and ``probe train`` with
targets and covariates from the store's items table."""
from __future__ import annotations

import _tiny_backbone  # noqa: F401
import numpy as np
import pandas as pd
from cli_run import run_medfeat
from cohort_trees import make_bids, stamp, write_enhanced_mr

from medfeat.engine.store.feature_store import FeatureStore
from medfeat.io.dicom import write_dicom_series


def test_bids_tree_end_to_end(tmp_path, capsys) -> None:
    root = make_bids(tmp_path / "bids", subjects=8)
    manifest = tmp_path / "work" / "manifest.csv"
    code, out, err = run_medfeat(capsys, "cohort", "scan", str(root), "--layout", "bids", "--out", str(manifest))
    assert code == 2 and "--acq" in err  # 01/bl has two T1w images: the user must choose
    code, out, err = run_medfeat(capsys, "cohort", "scan", str(root), "--layout", "bids", "--suffix", "T2w",
                              "--out", str(manifest))
    assert code == 0 and "15 scans of 8 subjects, 2 visit label(s)" in out, err
    df = pd.read_csv(manifest)
    assert {"subject", "timepoint", "path", "age", "sex", "site", "acquisition_date", "kl_grade"} <= set(df.columns)
    store = tmp_path / "work" / "f.zarr"
    code, out, err = run_medfeat(capsys, "extract", "--random-init", "--manifest", str(manifest), "--store", str(store), "--model",
                              "tiny3d_test", "--taps", "conv2", "--scheduler-kind", "sync", "--quiet")
    assert code == 0 and "15 done now" in out, err
    items = FeatureStore.open(store).items()
    assert items.set_index("item_id").loc["02/m12", "site"] == "A" and "kl_grade" in items
    code, out, err = run_medfeat(capsys, "probe", "train", "--store", str(store), "--features",
                              "tiny3d_test:conv2:none-whole", "--target", "site", "--covariates", "age,sex",
                              "--folds", "2", "--seeds", "1", "--n-boot", "20")
    assert code == 0 and "auc" in out and "14 items" in out, err  # the subject without an age is left out
    code, out, err = run_medfeat(capsys, "extract", "--random-init", "--manifest", str(manifest), "--store", str(tmp_path / "p.zarr"),
                              "--model", "tinypair_test", "--taps", "conv2", "--scheduler-kind", "sync",
                              "--pairs", "consecutive", "--quiet")
    assert code == 3 and "7 done now" in out and "one visit" in out, err  # subject 08 has one visit
    assert "01/bl->m12" in set(FeatureStore.open(tmp_path / "p.zarr").items()["item_id"])


AFFINE = np.array([[0.0, 0.0, 1.5, 0.0], [1.5, 0.0, 0.0, 0.0], [0.0, -1.5, 0.0, 0.0], [0, 0, 0, 1]])


def test_dicom_export_end_to_end(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "export"
    for p, date in (("P1", "20200101"), ("P1", "20210101"), ("P2", "20200202")):
        files = write_dicom_series(root / p / date / "sag", rng.random((16, 16, 16), dtype=np.float32) * 500, AFFINE)
        stamp(files, PatientID=p, StudyDate=date, SeriesDescription="T1 sag")
        loc = write_dicom_series(root / p / date / "loc", rng.random((3, 16, 16), dtype=np.float32), AFFINE)
        stamp(loc, PatientID=p, StudyDate=date, SeriesDescription="localizer")
    (root / "P3").mkdir()
    write_enhanced_mr(root / "P3" / "IM0001", rng.random((16, 16, 16), dtype=np.float32) * 500, AFFINE,
                      patient="P3", date="20200303", description="T1 sag enhanced")
    manifest = tmp_path / "m.csv"
    code, out, err = run_medfeat(capsys, "cohort", "scan", str(root), "--layout", "dicom", "--out", str(manifest),
                              "--series-description", "t1 sag")
    assert code == 0 and "4 scans of 3 subjects" in out, err
    code, out, err = run_medfeat(capsys, "extract", "--random-init", "--manifest", str(manifest), "--store", str(tmp_path / "d.zarr"),
                              "--model", "tiny3d_test", "--taps", "conv2", "--scheduler-kind", "sync", "--quiet")
    assert code == 0 and "4 done now" in out, err + out
    items = FeatureStore.open(tmp_path / "d.zarr").items()
    assert set(items["timepoint"]) == {"2020-01-01", "2021-01-01", "2020-02-02", "2020-03-03"}
    assert set(items["series_description"]) == {"T1 sag", "T1 sag enhanced"}
