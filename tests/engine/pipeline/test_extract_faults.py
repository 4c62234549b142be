"""Extraction refuses what it cannot do, keeps stores honest about changed sources, and
never lets a duplicate row or a refused run change the store."""
from __future__ import annotations

import os
import shutil
import time

import _tiny_backbone  # noqa: F401 - registers the tiny test backbones
import numpy as np
import pandas as pd
import pytest
from _cohort import tiny_cohort

from medfeat.engine.pipeline.config import ExtractConfig
from medfeat.engine.pipeline.extract import extract
from medfeat.engine.store.feature_store import FeatureStore
from medfeat.engine.store.verify import verify_store
from medfeat.errors import InputError, ManifestError, MedfeatError, StoreError


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return tiny_cohort(tmp_path_factory)


@pytest.fixture()
def cohort(manifest, tmp_path):
    """A private copy of the tiny cohort (tests change its files)."""
    root = tmp_path / "cohort"
    shutil.copytree(manifest.parent, root)
    return root


def _cfg(manifest, store, **kw) -> ExtractConfig:
    base = dict(model="tiny3d_test", taps=("conv1", "conv2"), scheduler_kind="sync", batch_size=2,
                chunk_items=4, progress=False, random_init=True)
    return ExtractConfig.from_settings(str(manifest), str(store), **{**base, **kw})


def _rows(root) -> pd.DataFrame:
    return pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)


# -- ROI crop without a mask -----------------------------------------------------------
def test_crop_without_any_mask_fails_before_any_work(cohort, tmp_path):
    _rows(cohort).drop(columns=["mask_path"]).to_csv(cohort / "manifest.csv", index=False)
    (cohort / "atlas_mask.nii.gz").unlink()
    with pytest.raises(InputError, match="--roi crop: no item can be cropped"):
        extract(_cfg(cohort / "manifest.csv", tmp_path / "s", roi="crop"))
    assert not (tmp_path / "s").exists()


def test_crop_with_masks_on_some_rows_fails_those_items_only(cohort, tmp_path):
    df = _rows(cohort)
    df.loc[df["subject"] == "S0001", "mask_path"] = ""
    df.to_csv(cohort / "manifest.csv", index=False)
    (cohort / "atlas_mask.nii.gz").unlink()
    r = extract(_cfg(cohort / "manifest.csv", tmp_path / "s", roi="crop"))
    failed = {f["item_id"]: f["reason"] for f in r.failures}
    assert set(failed) == {"S0001/baseline", "S0001/followup"} and "no mask" in failed["S0001/baseline"]
    ids, _ = FeatureStore.open(tmp_path / "s").read("tiny3d_test:conv1:none-crop")
    assert "S0001/baseline" not in ids and len(ids) == 4


# -- changed sources -------------------------------------------------------------------
def _rewrite(path) -> None:
    """Rewrite a scan with other content (mirrored along its first axis)."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.ascontiguousarray(np.asarray(img.dataobj, np.float32)[::-1])
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))


def test_a_changed_scan_is_refused_then_refreshed_everywhere(cohort, tmp_path):
    store = tmp_path / "s"
    extract(_cfg(cohort / "manifest.csv", store))
    extract(_cfg(cohort / "manifest.csv", store, taps=("conv2",), align="oracle"))  # a second variant
    changed = cohort / _rows(cohort)["path"][0]
    before = FeatureStore.open(store).read("tiny3d_test:conv2:none-whole")[1][0].copy()
    _rewrite(changed)
    # the follow-up's aligned variant was resampled onto this baseline: its features are stale too
    with pytest.raises(StoreError, match="2 item\\(s\\) changed.*S0000/baseline.*content changed.*--refresh-changed"):
        extract(_cfg(cohort / "manifest.csv", store))
    assert any("S0000/baseline" in p and "changed since extraction" in p for p in verify_store(FeatureStore.open(store)).problems)
    r = extract(_cfg(cohort / "manifest.csv", store, refresh_changed=True))
    assert r.refreshed == ["S0000/baseline", "S0000/followup"] and r.items.done == 2
    s = FeatureStore.open(store)
    after = s.read("tiny3d_test:conv2:none-whole")[1][0]
    assert not np.allclose(before, after)  # the new file's features, not the old ones
    assert int(s.done_mask(next(k for k in s.arrays() if k.variant == "oracle-whole")).sum()) == 4  # stale elsewhere
    fresh = tmp_path / "fresh"
    extract(_cfg(cohort / "manifest.csv", fresh))
    # equal to a clean extraction of the new files (to float rounding: batches of another size)
    np.testing.assert_allclose(FeatureStore.open(fresh).read("tiny3d_test:conv2:none-whole")[1],
                               s.read("tiny3d_test:conv2:none-whole")[1], rtol=1e-5, atol=1e-7)
    assert verify_store(s).ok


def test_a_touched_but_unchanged_file_is_not_a_change(cohort, tmp_path):
    store = tmp_path / "s"
    extract(_cfg(cohort / "manifest.csv", store))
    path = cohort / _rows(cohort)["path"][0]
    os.utime(path, (time.time() + 100, time.time() + 100))
    assert extract(_cfg(cohort / "manifest.csv", store)).items.done == 0


def test_a_manifest_row_pointing_elsewhere_is_refused(cohort, tmp_path):
    store = tmp_path / "s"
    extract(_cfg(cohort / "manifest.csv", store))
    df = _rows(cohort)
    shutil.copy(cohort / df["path"][1], cohort / "other.nii.gz")
    df.loc[0, "path"] = "other.nii.gz"
    df.to_csv(cohort / "manifest.csv", index=False)
    with pytest.raises(StoreError, match="S0000/baseline .its manifest row now reads .*other.nii.gz"):
        extract(_cfg(cohort / "manifest.csv", store))
    r = extract(_cfg(cohort / "manifest.csv", store, refresh_changed=True))
    assert r.refreshed == ["S0000/baseline"]
    assert FeatureStore.open(store).items()["source"][0].endswith("other.nii.gz")


def test_overwrite_redoes_named_items_or_all(cohort, tmp_path):
    store = tmp_path / "s"
    extract(_cfg(cohort / "manifest.csv", store))
    assert extract(_cfg(cohort / "manifest.csv", store, overwrite=["S0002/followup"])).items.done == 1
    assert extract(_cfg(cohort / "manifest.csv", store, overwrite=["all"])).items.done == 6
    with pytest.raises(InputError, match="no item 'nope'"):
        extract(_cfg(cohort / "manifest.csv", store, overwrite=["nope"]))


# -- duplicate rows --------------------------------------------------------------------
def test_an_exact_duplicate_row_is_dropped_and_the_original_extracted(cohort, tmp_path):
    df = _rows(cohort)
    pd.concat([df, df.iloc[[2]]]).to_csv(cohort / "manifest.csv", index=False)
    r = extract(_cfg(cohort / "manifest.csv", tmp_path / "s"))
    assert r.items.done == 6 and r.items.failed == 0 and "repeats line 4 exactly" in r.notes[0]


def test_a_conflicting_row_is_refused_with_both_lines_and_no_store(cohort, tmp_path):
    df = _rows(cohort)
    dup = df.iloc[[2]].assign(path="elsewhere.nii.gz")
    pd.concat([df, dup]).to_csv(cohort / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match="lines 4 and 8 are different rows for one scan"):
        extract(_cfg(cohort / "manifest.csv", tmp_path / "s"))
    assert not (tmp_path / "s").exists()


# -- weights, refusals that must leave the store unchanged -----------------------------
def test_no_weights_needs_random_init(manifest, tmp_path):
    with pytest.raises(InputError, match="no weights given.*--random-init"):
        extract(_cfg(manifest, tmp_path / "s", random_init=False))
    extract(_cfg(manifest, tmp_path / "s"))
    info = FeatureStore.open(tmp_path / "s").info()
    assert all(a["random_weights"] for a in info["arrays"])


def test_a_run_refused_for_provenance_adds_no_items(manifest, cohort, tmp_path):
    store = tmp_path / "s"
    extract(_cfg(manifest, store, taps=("conv1",)))
    df = _rows(cohort)
    df["subject"] = df["subject"] + "x"
    df.to_csv(cohort / "manifest.csv", index=False)
    with pytest.raises(StoreError, match="provenance differs"):
        extract(_cfg(cohort / "manifest.csv", store, taps=("conv1",), pooling="max"))
    assert len(FeatureStore.open(store).items()) == 6


def test_an_unreachable_scheduler_leaves_no_store(manifest, tmp_path):
    with pytest.raises(MedfeatError, match="cannot reach the Dask scheduler"):
        extract(_cfg(manifest, tmp_path / "s", scheduler="tcp://127.0.0.1:9"))
    assert not (tmp_path / "s").exists()


def test_a_store_inside_a_store_is_refused_without_a_lock_file(manifest, tmp_path):
    extract(_cfg(manifest, tmp_path / "s"))
    with pytest.raises(StoreError, match="inside the feature store"):
        extract(_cfg(manifest, tmp_path / "s" / "inner"))
    assert not (tmp_path / "s" / "inner").exists()


def test_weights_are_compared_by_content_not_path(manifest, tmp_path):
    import torch

    from medfeat.export.backbones.registry import create_backbone

    w = tmp_path / "w.pt"
    torch.save(create_backbone("tiny3d_test", ["conv2"], seed=3).trunk.state_dict(), w)
    store = tmp_path / "s"
    extract(_cfg(manifest, store, weights=str(w), random_init=False))
    os.symlink(w, tmp_path / "alias.pt")
    again = extract(_cfg(manifest, store, weights=str(tmp_path / "alias.pt"), random_init=False))
    assert again.items.done == 0 and again.items.skipped == 6  # the same file by another path resumes
    torch.save(create_backbone("tiny3d_test", ["conv2"], seed=4).trunk.state_dict(), w)
    with pytest.raises(StoreError, match="provenance differs.*weights_sha256"):
        extract(_cfg(manifest, store, weights=str(w), random_init=False))


def test_rerun_counts_items_that_remain_failed(cohort, tmp_path):
    df = _rows(cohort)
    df.loc[0, "path"] = "missing.nii.gz"
    df.to_csv(cohort / "manifest.csv", index=False)
    store = tmp_path / "s"
    first = extract(_cfg(cohort / "manifest.csv", store))
    assert first.items.failed == 1 and first.items.remain_failed == 1
    again = extract(_cfg(cohort / "manifest.csv", store))
    assert again.items.failed == 0 and again.items.remain_failed == 1  # still failed, from before


def test_model_output_nan_names_the_item(manifest, tmp_path, monkeypatch):
    from medfeat.export.backbones.registry import _REGISTRY

    monkeypatch.setitem(_REGISTRY, "tinynan_test", _tiny_backbone.NAN_SPEC)
    r = extract(_cfg(manifest, tmp_path / "s", model="tinynan_test", taps=("conv2",)))
    assert r.items.done == 0 and r.failures[0]["reason"] == f"model output for item {r.failures[0]['item_id']} is NaN or Inf"
