"""The synthetic longitudinal knee cohort: files, geometry, the recorded transform, the effect."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from medfeat.cohorts import synth
from medfeat.cohorts import synth_anatomy as anat
from medfeat.errors import InputError
from medfeat.io.manifest import pairs, parse_transform, read_manifest
from medfeat.io.nifti import read_volume

# Small grid whose field of view (112 x 96 x 96 mm) still holds the knee.
SHAPE = (40, 48, 48)
SPACING = (2.8, 2.0, 2.0)
N = 6


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("knee")
    return synth.synth_cohort(out, subjects=N, seed=3, shape=SHAPE, spacing=SPACING)


@pytest.fixture(scope="module")
def manifest(cohort):
    return read_manifest(cohort, check_files=True)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_manifest_has_every_scan_and_both_labels(cohort, manifest):
    assert list(manifest.columns[:6]) == ["subject", "timepoint", "path", "mask_path", "label",
                                          "transform"]
    assert len(manifest) == 2 * N
    assert set(manifest["timepoint"]) == {"baseline", "followup"}
    assert set(manifest["label"]) == {0, 1}
    for row in manifest.itertuples():
        if row.timepoint == "baseline":
            np.testing.assert_array_equal(row.transform, np.eye(4))
        else:
            assert not np.allclose(row.transform, np.eye(4))
    meta = json.loads((cohort.parent / "cohort.json").read_text())
    assert meta["shape"] == list(SHAPE) and "transform" in meta["columns"]
    assert (cohort.parent / "atlas.nii.gz").is_file() and (cohort.parent / "atlas_mask.nii.gz").is_file()


def test_same_seed_same_bytes_other_seed_differs(cohort, tmp_path):
    # One thread here, the default pool in the fixture: scheduling must not matter.
    again = synth.synth_cohort(tmp_path / "a", subjects=N, seed=3, shape=SHAPE, spacing=SPACING,
                               workers=1)
    files = sorted(p.relative_to(cohort.parent) for p in cohort.parent.rglob("*") if p.is_file())
    assert len(files) == 4 * N + 4  # scans, masks, atlas pair, manifest, cohort.json
    for rel in files:
        assert (again.parent / rel).read_bytes() == (cohort.parent / rel).read_bytes(), rel
    other = synth.synth_cohort(tmp_path / "b", subjects=2, seed=4, shape=SHAPE, spacing=SPACING)
    for name in ("images/S0000_baseline.nii.gz", "images/S0001_followup.nii.gz"):
        a, b = read_volume(cohort.parent / name).data, read_volume(other.parent / name).data
        assert not np.allclose(a, b)


def test_affines_valid_anisotropic_and_sform_equals_qform(manifest):
    obliques = []
    for row in manifest.itertuples():
        img, mask = nib.load(row.path), nib.load(row.mask_path)
        assert img.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
        hdr = img.header
        assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
        sform, qform = img.get_sform(), img.get_qform()
        np.testing.assert_allclose(qform, sform, atol=1e-4)
        np.testing.assert_array_equal(mask.affine, img.affine)
        assert np.all(np.isfinite(sform)) and abs(np.linalg.det(sform[:3, :3])) > 1.0
        np.testing.assert_allclose(np.linalg.norm(sform[:3, :3], axis=0), SPACING, rtol=1e-6)
        direction = sform[:3, :3] / np.asarray(SPACING)
        obliques.append(np.degrees(np.arccos(np.clip(np.diag(direction), -1, 1))).max())
    assert max(obliques) > 0.5  # headers are oblique, not axis-aligned


def test_every_structure_present_and_cartilage_clear_of_the_border(manifest):
    for row in manifest.itertuples():
        m = read_volume(row.mask_path).data.astype(np.uint8)
        counts = np.bincount(m.ravel(), minlength=6)
        assert np.all(counts[:6] > 0), (row.path, counts)
        assert counts.size == 6
        faces = [m[0], m[-1], m[:, 0], m[:, -1], m[:, :, 0], m[:, :, -1]]
        for face in faces:
            assert not np.isin(face, (3, 4)).any(), f"cartilage on the border of {row.mask_path}"
        for face in faces[:2]:  # the bones leave the field of view only superiorly/inferiorly
            assert not np.isin(face, (1, 2)).any(), f"bone on a medio-lateral face of {row.mask_path}"


def _warp_baseline_mask(pair) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(baseline mask pulled through T, pulled through identity, follow-up mask), all on the follow-up grid."""
    base, follow = read_volume(pair.baseline_mask_path), read_volume(pair.followup_mask_path)
    warped = []
    for t in (pair.transform, np.eye(4)):
        # follow-up voxel u -> baseline voxel inv(A_b) inv(T) A_f u
        m = np.linalg.inv(base.affine) @ np.linalg.inv(t) @ follow.affine
        warped.append(ndimage.affine_transform(base.data, m[:3, :3], m[:3, 3],
                                               output_shape=follow.shape, order=0))
    return warped[0], warped[1], follow.data


def test_recorded_transform_maps_baseline_anatomy_onto_followup(manifest):
    for pair in pairs(manifest).itertuples():
        with_t, without, follow = _warp_baseline_mask(pair)
        # The tibia moves exactly by T; the femur also sinks by the narrowing (up to ~2.5 mm).
        for label, min_dice, max_ratio in ((2, 0.9, 0.5), (1, 0.85, 0.7)):
            d_t = _dice(with_t == label, follow == label)
            d_0 = _dice(without == label, follow == label)
            assert d_t > min_dice, (pair.subject, label, d_t)
            # T must remove most of the mismatch that no alignment leaves
            assert 1.0 - d_t < max_ratio * (1.0 - d_0), (pair.subject, label, d_t, d_0)


def test_atlas_transform_maps_scans_into_the_atlas_frame(cohort, manifest):
    atlas = read_volume(cohort.parent / "atlas_mask.nii.gz")

    def tibia_dice(scan, m_world) -> float:
        # scan voxel u -> atlas voxel inv(A_atlas) M A_scan u
        m = np.linalg.inv(atlas.affine) @ m_world @ scan.affine
        pulled = ndimage.affine_transform(atlas.data, m[:3, :3], m[:3, 3],
                                          output_shape=scan.shape, order=0)
        return _dice(pulled == 2, scan.data == 2)

    for row in manifest.itertuples():
        scan = read_volume(row.mask_path)
        m_atlas = parse_transform(row.atlas_transform)
        with_m, without = tibia_dice(scan, m_atlas), tibia_dice(scan, np.eye(4))
        # Baselines sit near the atlas pose already; follow-ups are moved by T as well.
        margin = 0.0 if row.timepoint == "baseline" else 0.05
        assert with_m > 0.85 and with_m > without + margin, (row.path, with_m, without)


def test_affine_misalignment_is_recorded_too(tmp_path):
    path = synth.synth_cohort(tmp_path, subjects=2, seed=1, shape=SHAPE, spacing=SPACING,
                              misalign="affine")
    for pair in pairs(read_manifest(path)).itertuples():
        linear = pair.transform[:3, :3]
        assert not np.allclose(linear.T @ linear, np.eye(3), atol=1e-3)  # not a rotation
        with_t, _, follow = _warp_baseline_mask(pair)
        assert _dice(with_t == 2, follow == 2) > 0.9


def test_no_misalignment_keeps_the_grid(tmp_path):
    path = synth.synth_cohort(tmp_path, subjects=1, seed=1, shape=SHAPE, spacing=SPACING,
                              misalign="none")
    pair = next(pairs(read_manifest(path)).itertuples())
    np.testing.assert_array_equal(pair.transform, np.eye(4))
    base, follow = read_volume(pair.baseline_mask_path), read_volume(pair.followup_mask_path)
    np.testing.assert_array_equal(base.affine, follow.affine)
    assert _dice(base.data == 2, follow.data == 2) > 0.99


def test_progressors_lose_more_cartilage_than_stable_subjects(manifest):
    loss = {0: [], 1: []}
    for pair in pairs(manifest).itertuples():
        b = read_volume(pair.baseline_mask_path).data
        f = read_volume(pair.followup_mask_path).data
        vb, vf = np.isin(b, (3, 4)).sum(), np.isin(f, (3, 4)).sum()
        loss[int(pair.label)].append((vb - vf) / vb)
    assert loss[0] and loss[1]
    assert np.mean(loss[1]) > np.mean(loss[0]) + 0.03, loss
    jsn = manifest.groupby("label")["jsn_mm"].mean()
    assert jsn[1] > jsn[0] + 0.6


def test_atlas_is_clean_mean_anatomy(cohort):
    atlas = read_volume(cohort.parent / "atlas.nii.gz")
    mask = read_volume(cohort.parent / "atlas_mask.nii.gz")
    np.testing.assert_allclose(atlas.affine[:3, :3], np.diag(SPACING), atol=1e-6)
    assert set(np.unique(mask.data).astype(int)) == {0, 1, 2, 3, 4, 5}
    air = mask.data == 0
    eroded = ndimage.binary_erosion(air, iterations=3)  # past the point-spread kernel
    assert np.abs(atlas.data[eroded]).max() < 1e-3  # no noise, no bias


def test_grid_renderer_matches_point_reference():
    rng = np.random.default_rng(7)
    shape = anat.sample_shape(rng)
    grid = synth.make_layout((24, 20, 28), (5.0, 5.0, 4.0))
    affine = synth.header_affine(grid, rng)
    labels, _ = anat.render_grid(shape, affine, grid.shape, max_block_voxels=1500)
    ijk = np.indices(grid.shape).reshape(3, -1).astype(np.float64)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:4]).astype(np.float32)
    reference, _ = anat.render(shape, *xyz)
    mismatch = np.count_nonzero(labels.ravel() != reference)
    assert mismatch <= 2, mismatch  # float32 rounding right on a surface
    assert len(np.unique(labels)) == 6


def test_bad_arguments_raise_input_errors(tmp_path):
    with pytest.raises(InputError, match="field of view"):
        synth.synth_cohort(tmp_path, subjects=1, shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="misalign"):
        synth.synth_cohort(tmp_path, subjects=1, shape=SHAPE, misalign="wobbly")
    with pytest.raises(InputError, match="subject"):
        synth.synth_cohort(tmp_path, subjects=0)


def test_cli_synth_writes_a_cohort(tmp_path):
    from medfeat.cli import cli

    result = CliRunner().invoke(cli, ["cohort", "synth", str(tmp_path / "c"), "--subjects", "2",
                                      "--seed", "5", "--shape", *map(str, SHAPE),
                                      "--spacing", *map(str, SPACING)])
    assert result.exit_code == 0, result.output
    df = read_manifest(tmp_path / "c" / "manifest.csv", check_files=True)
    assert len(df) == 4 and "wrote 4 scans" in result.output
