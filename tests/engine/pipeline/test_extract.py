"""Extraction: preprocessing geometry, items, resume, failures, retry, run record."""
from __future__ import annotations

import shutil
from dataclasses import asdict

import _tiny_backbone  # noqa: F401 - registers the tiny test backbones
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from _cohort import tiny_cohort  # noqa: E402
from scipy import ndimage

from medfeat.engine.pipeline import preprocess as pp
from medfeat.engine.pipeline.config import ExtractConfig, Variant
from medfeat.engine.pipeline.extract import extract
from medfeat.engine.pipeline.items import Atlas, plan_items
from medfeat.engine.pipeline.worker import clear_models, model_builds
from medfeat.engine.store.feature_store import FeatureStore
from medfeat.engine.store.verify import verify_store
from medfeat.errors import InputError
from medfeat.export.backbones.spec import Preprocess
from medfeat.io.manifest import read_manifest
from medfeat.io.nifti import read_volume
from medfeat.kernels import edge_box_grid, fov_grid


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return tiny_cohort(tmp_path_factory)


def _cfg(manifest, store, **kw) -> ExtractConfig:
    base = dict(model="tiny3d_test", taps=("conv1", "conv2"), scheduler_kind="sync", batch_size=2,
                chunk_items=4, progress=False, random_init=True)
    return ExtractConfig.from_settings(str(manifest), str(store), **{**base, **kw})


# -- geometry against an independent reference --------------------------------------------
def test_resample_matches_explicit_world_coordinates():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(10, 12, 9)).astype(np.float32)
    a = np.array([[0.0, 1.2, 0.1, -5], [1.5, 0.0, 0.0, 3], [0.0, 0.1, 2.0, 1], [0, 0, 0, 1]])
    t = np.eye(4)
    t[:3, 3] = [0.7, -0.4, 1.1]
    grid = fov_grid(data.shape, a, (7, 8, 6))
    out = pp.resample(data, a, grid, t)
    # reference: each target voxel centre -> world -> through t -> source voxel, by hand
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in (7, 8, 6)], indexing="ij"), -1).reshape(-1, 3)
    steps = np.array(data.shape) / np.array((7, 8, 6))
    src_idx = -0.5 + (idx + 0.5) * steps  # voxel-centre resize convention
    world = src_idx @ a[:3, :3].T + a[:3, 3]
    moved = world @ t[:3, :3].T + t[:3, 3]
    back = (moved - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T
    ref = ndimage.map_coordinates(data, back.T, order=1, mode="constant", cval=0.0).reshape(7, 8, 6)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_intensity_percentile_clamp():
    x = np.linspace(0, 100, 1001, dtype=np.float32)
    params = pp.intensity_params(x, Preprocess("percentile_clamp", {"upper": 99.0}))
    y = pp.apply_intensity(x.copy(), params)
    assert y.min() == 0.0 and y.max() == pytest.approx(1.0)
    assert y[500] == pytest.approx(50 / 99, rel=1e-5)


def test_oracle_alignment_brings_followup_onto_baseline(manifest):
    df = read_manifest(manifest)
    items, bad = plan_items(df, "volume3d", Variant("oracle", "whole"), Atlas.beside(manifest))
    assert not bad and len(items) == 6
    dice = lambda a, b: 2 * (a & b).sum() / (a.sum() + b.sum())  # noqa: E731
    for k in range(3):
        ch = items[2 * k + 1].channels[0]  # the follow-up, sampled on its baseline's grid
        assert ch.ref == df["path"][2 * k] and ch.path == df["path"][2 * k + 1]
        base = read_volume(df["mask_path"][2 * k])
        follow = read_volume(df["mask_path"][2 * k + 1])
        grid = fov_grid(base.shape, base.affine, (24, 24, 24))
        tibia = pp.resample(base.data == 2, base.affine, grid) > 0.5
        aligned = pp.resample(follow.data == 2, follow.affine, grid, np.reshape(ch.transform, (4, 4))) > 0.5
        unaligned = pp.resample(follow.data == 2, follow.affine, grid) > 0.5
        assert dice(tibia, aligned) > dice(tibia, unaligned) + 0.03


def test_crop_box_holds_the_mask(manifest):
    m = read_volume(read_manifest(manifest)["mask_path"][0])
    lo, hi = pp.mask_box(m.data, m.affine, m.affine, margin_mm=0.0)
    idx = np.argwhere(m.data > 0)
    assert np.all(lo <= idx.min(0)) and np.all(hi >= idx.max(0))
    assert np.all(hi - lo < np.array(m.shape) + 1)


def test_prepare_image_2d():
    img = (np.arange(40 * 60) % 256).astype(np.uint8).reshape(40, 60)
    x = pp.prepare_image(img, (32, 32), Preprocess("mean_std", {"mean": (0.5,) * 3, "std": (0.25,) * 3}), 3)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], x[2])  # grey copied to 3 channels
    assert -2.0 - 1e-6 <= x.min() and x.max() <= 2.0 + 1e-6


# -- the run ----------------------------------------------------------------------------
def test_extract_resume_and_threads_equal_sync(manifest, tmp_path):
    clear_models()  # an earlier test may have built the same model in this process
    builds = model_builds()
    r = extract(_cfg(manifest, tmp_path / "a"))
    assert asdict(r.items) == {"total": 6, "skipped": 0, "done": 6, "failed": 0, "remain_failed": 0}
    assert set(r.timings) >= {"read", "preprocess", "infer", "write"}
    again = extract(_cfg(manifest, tmp_path / "a"))
    assert again.items.done == 0 and again.items.skipped == 6
    extract(_cfg(manifest, tmp_path / "b", scheduler_kind="threads", workers=1, threads_per_worker=3))
    assert model_builds() == builds + 1  # one model for all runs and threads of this process
    a, b = FeatureStore.open(tmp_path / "a"), FeatureStore.open(tmp_path / "b")
    for key in a.arrays():
        ia, xa = a.read(key)
        ib, xb = b.read(key)
        assert ia == ib and np.array_equal(xa, xb)
    assert len(a.runs()) == 2 and a.runs()[0]["versions"]["torch"]
    prov = a.provenance(a.arrays()[0])
    assert prov["preprocessing"]["variant"] == "none-whole" and prov["dim"] == 8
    assert verify_store(a).problems == []


def test_pair_items(manifest, tmp_path):
    r = extract(_cfg(manifest, tmp_path / "p", model="tinypair_test", taps=("conv2",)))
    assert r.items.done == 3
    ids, x = FeatureStore.open(tmp_path / "p").read("tinypair_test:conv2:none-whole")
    assert ids == ["S0000", "S0001", "S0002"] and x.shape == (3, 16)


def _broken_cohort(manifest, tmp_path):
    root = tmp_path / "cohort"
    shutil.copytree(manifest.parent, root)
    df = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    good = root / df["path"][0]
    (root / "trunc.nii.gz").write_bytes(good.read_bytes()[:200])
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), np.nan, np.float32), np.eye(4)), root / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), root / "flat.nii.gz")
    extra = [("B1", "baseline", "trunc.nii.gz"), ("B2", "baseline", "nan.nii.gz"),
             ("B3", "baseline", "flat.nii.gz"), ("B4", "baseline", "missing.nii.gz"),
             ("B5", "some/time", df["path"][0])]  # a visit label with a / cannot make an item id
    rows = [{**{c: "" for c in df.columns}, "subject": s, "timepoint": tp, "path": p} for s, tp, p in extra]
    pd.concat([df, pd.DataFrame(rows)]).to_csv(root / "manifest.csv", index=False)
    return root


def test_failures_recorded_run_goes_on_and_retry(manifest, tmp_path):
    root = _broken_cohort(manifest, tmp_path)
    store = tmp_path / "f"
    r = extract(_cfg(root / "manifest.csv", store))
    reasons = {f["item_id"]: f["reason"] for f in r.failures}
    assert r.items.done == 6 and r.items.failed == 5
    assert "truncated" in reasons["B1/baseline"] or "unreadable" in reasons["B1/baseline"]
    assert "NaN" in reasons["B2/baseline"]
    assert "3D" in reasons["B3/baseline"]
    assert "not found" in reasons["B4/baseline"]
    assert "some/time" in reasons["row 11"]
    s = FeatureStore.open(store)
    assert len(s.failures()) == 10  # 5 items x 2 taps
    assert extract(_cfg(root / "manifest.csv", store)).items.done == 0  # failed ones skipped
    shutil.copy(root / s.items()["source"][0], root / "missing.nii.gz")  # fix one
    r = extract(_cfg(root / "manifest.csv", store, retry_failed=True))
    assert r.items.done == 1 and r.items.failed == 4
    assert not any(f["item_id"] == "B4/baseline" for f in FeatureStore.open(store).failures())


def test_2d_cohort_through_the_same_pipeline(tmp_path):
    from medfeat.cohorts.synth2d import synth2d_cohort

    m = synth2d_cohort(tmp_path / "c2d", images=4, seed=0, size=48)
    r = extract(_cfg(m, tmp_path / "s2d", model="tiny2d_test", taps=("conv2",), scheduler_kind="threads"))
    assert r.items.done == 4
    ids, x = FeatureStore.open(tmp_path / "s2d").read("tiny2d_test:conv2:none-whole")
    assert ids == [f"fundus{i:05d}" for i in range(4)] and x.shape == (4, 16) and np.isfinite(x).all()


def test_fused_kernel_path_matches_unfused_reference(manifest):
    """The pipeline's fused resample+normalise equals the SciPy resample, clip and scale."""
    df = read_manifest(manifest)
    vol, base = read_volume(df["path"][1]), read_volume(df["path"][0])
    m = read_volume(df["mask_path"][0])
    lo, hi = pp.mask_box(m.data, m.affine, base.affine)
    grid = edge_box_grid(base.affine, lo, hi, (12, 14, 10))
    t = np.asarray(df["transform"][1])
    rule = Preprocess("percentile_clamp", {"upper": 99.0})
    out = np.zeros((1, 2, 12, 14, 10), np.float32)
    pp.prepare_volume_into(out, 1, vol.data, vol.affine, grid, rule, t)
    ref = pp.prepare_volume(vol.data, vol.affine, grid, rule, t)
    np.testing.assert_allclose(out[0, 1], ref, atol=2e-5)
    assert not out[0, 0].any()  # the other channel untouched


def test_crop_roi_labels_shrink_the_box_to_those_labels(manifest):
    """Label 5 (soft tissue) fills the synthetic field of view, so a box around every label
    is the whole scan; ``roi_labels`` makes the crop the box around the cartilage only."""
    df = read_manifest(manifest)
    spec = type("Spec", (), {"input_kind": "volume3d", "in_channels": 1,
                             "preprocess": Preprocess("percentile_clamp", {"upper": 99.0})})()
    items_all, _ = plan_items(df, "volume3d", Variant("oracle", "crop"), Atlas.beside(manifest))
    items_cart, _ = plan_items(df, "volume3d", Variant("oracle", "crop", (3, 4)), Atlas.beside(manifest))
    follow = items_cart[1].channels[0]
    assert follow.mask_labels == (3, 4) and items_all[1].channels[0].mask_labels is None
    assert follow.mask == df["mask_path"][0]  # the baseline's mask, on the baseline grid
    m = read_volume(follow.mask)
    lo_all, hi_all = pp.mask_box(m.data, m.affine, m.affine)
    lo, hi = pp.mask_box(np.isin(m.data, (3, 4)), m.affine, m.affine)
    assert np.all(hi - lo < hi_all - lo_all)  # strictly smaller on every axis
    # the loaded crop: the cartilage box sampled at the input size differs from the full box
    from medfeat.engine.pipeline.inputs import ScanCache, load_item

    x_all = load_item(items_all[1], spec, (12, 12, 12), ScanCache())
    x_cart = load_item(items_cart[1], spec, (12, 12, 12), ScanCache())
    assert x_all.shape == x_cart.shape == (1, 12, 12, 12) and not np.allclose(x_all, x_cart)
    bad = plan_items(df, "volume3d", Variant("none", "crop", (9,)), Atlas.beside(manifest))[0][0]
    with pytest.raises(InputError, match="no voxel has an ROI label"):
        load_item(bad, spec, (12, 12, 12), ScanCache())
