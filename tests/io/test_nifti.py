"""NIfTI volume reading and writing, and the one-line errors for bad files."""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfeat.errors import InputError
from medfeat.io.nifti import Volume, read_volume, write_volume

AFFINE = np.array([[0.0, 0.0, 0.36, -30.0],
                   [0.0, -0.36, 0.0, 40.0],
                   [0.7, 0.0, 0.0, -50.0],
                   [0.0, 0.0, 0.0, 1.0]])


def _data(shape=(5, 6, 7), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 20.0, shape).astype(np.float32)


def _raw_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write with nibabel directly, bypassing write_volume's checks (to make bad files)."""
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _expect_error(path: Path, match: str) -> InputError:
    with pytest.raises(InputError, match=match) as info:
        read_volume(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return info.value


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_round_trip_keeps_voxel_order_affine_and_values(tmp_path, suffix):
    data = _data()
    path = write_volume(tmp_path / f"v{suffix}", data, AFFINE)
    vol = read_volume(path)
    assert isinstance(vol, Volume) and vol.path == path
    assert vol.data.dtype == np.float32 and vol.shape == data.shape
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-6)
    np.testing.assert_allclose(vol.spacing, [0.7, 0.36, 0.36], rtol=1e-6)
    img = nib.load(str(path))
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-5)


def test_int16_with_scaling_round_trips_within_one_step(tmp_path):
    data = _data() * 10.0
    path = write_volume(tmp_path / "s.nii.gz", data, AFFINE, dtype=np.int16)
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.int16
    slope = float(img.dataobj.slope)
    assert 0 < slope < 1  # scaled to use the int16 range
    np.testing.assert_allclose(read_volume(path).data, data, atol=slope * 0.51 + 1e-3)


def test_trailing_singleton_dimensions_are_squeezed(tmp_path):
    data = _data()
    path = _raw_nifti(tmp_path / "t.nii.gz", data[..., None])
    assert read_volume(path).shape == data.shape


def test_missing_and_non_nifti_files(tmp_path):
    _expect_error(tmp_path / "nope.nii.gz", "not found")
    other = tmp_path / "scan.png"
    other.write_bytes(b"\x89PNG")
    _expect_error(other, "not a NIfTI")
    _expect_error(tmp_path, "not a regular file")


def test_truncated_gzip_names_the_file(tmp_path):
    path = write_volume(tmp_path / "cut.nii.gz", _data((20, 20, 20)), AFFINE)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    _expect_error(path, "truncated|corrupt|unreadable")


def test_truncated_uncompressed_data(tmp_path):
    path = write_volume(tmp_path / "cut.nii", _data((20, 20, 20)), AFFINE)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 1000])
    _expect_error(path, "unreadable|truncated")


def test_garbage_gzip_and_garbage_header(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"this is not gzip at all" * 20)
    _expect_error(bad, "truncated|corrupt|unreadable")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"\x00" * 400))
    _expect_error(junk, "unreadable")


def test_nan_and_inf_voxels(tmp_path):
    data = _data()
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    err = _expect_error(_raw_nifti(tmp_path / "nan.nii.gz", data), "2 voxel")
    assert "NaN" in str(err)


@pytest.mark.parametrize("shape", [(4, 5, 6, 3), (4, 5)])
def test_not_3d(tmp_path, shape):
    path = _raw_nifti(tmp_path / "nd.nii.gz", np.zeros(shape, np.float32))
    _expect_error(path, "expected a 3D volume")


def _with_sform(path: Path, affine: np.ndarray) -> Path:
    """A file whose sform is ``affine`` (set in the header fields, which nibabel otherwise refuses)."""
    img = nib.Nifti1Image(_data(), np.eye(4))
    hdr = img.header
    hdr.set_qform(None, code=0)
    hdr["sform_code"] = 1
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[0], affine[1], affine[2]
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, hdr), str(path))
    return path


def test_singular_affine(tmp_path):
    singular = np.diag([1.0, 0.0, 1.0, 1.0])
    path = _with_sform(tmp_path / "sing.nii.gz", singular)
    np.testing.assert_array_equal(nib.load(str(path)).affine, singular)  # the bad file really is bad
    _expect_error(path, "singular")


def test_non_finite_affine(tmp_path):
    aff = np.eye(4)
    aff[0, 3] = np.nan
    _expect_error(_with_sform(tmp_path / "naff.nii.gz", aff), "non-finite")


def test_write_refuses_bad_input(tmp_path):
    with pytest.raises(InputError, match="3D"):
        write_volume(tmp_path / "a.nii.gz", np.zeros((2, 2)), np.eye(4))
    with pytest.raises(InputError, match="NaN"):
        write_volume(tmp_path / "b.nii.gz", np.full((2, 2, 2), np.nan), np.eye(4))
    with pytest.raises(InputError, match="singular"):
        write_volume(tmp_path / "c.nii.gz", np.zeros((2, 2, 2)), np.zeros((4, 4)))


def test_zero_voxel_spacing_is_refused_with_the_file_named(tmp_path, recwarn):
    import struct

    path = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None), str(path))  # no sform: pixdim is the grid
    raw = bytearray(path.read_bytes())
    raw[76 + 4 * 2: 76 + 4 * 3] = struct.pack("<f", 0.0)  # NIfTI-1 header: pixdim[2] (nibabel would fix it)
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=f"{path}: zero or non-finite voxel spacing"):
        read_volume(path)
    assert not [w for w in recwarn if "pixdim" in str(w.message)]  # no anonymous nibabel warning


def test_a_symlink_loop_says_so(tmp_path):
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(loop)
    with pytest.raises(InputError, match="symlink loop"):
        read_volume(loop)
    dangling = tmp_path / "gone.nii.gz"
    dangling.symlink_to(tmp_path / "nowhere.nii.gz")
    with pytest.raises(InputError, match="file not found \\(dangling symlink\\)"):
        read_volume(dangling)


def test_float64_beyond_float32_range_is_an_overflow_not_nan(tmp_path):
    data = np.ones((4, 4, 4), np.float64)
    data[1, 2, 3] = 1e300
    path = _raw_nifti(tmp_path / "big.nii", data)
    with pytest.raises(InputError, match="overflow when cast to float32"):
        read_volume(path)
