"""Reading and writing 3D volumes in NIfTI (``.nii`` / ``.nii.gz``) with their affines.

A :class:`Volume` holds the voxel array in the file's own voxel order (no
reorientation: index ``[i, j, k]`` is NIfTI voxel ``(i, j, k)``) and the 4x4
affine that maps a voxel index ``(i, j, k, 1)`` to world coordinates in mm
(NIfTI RAS+: +x right, +y anterior, +z superior). Geometry downstream is done
in world space through this affine, so it is checked here once: finite and
non-singular.

Every failure a user can cause raises :class:`medfeat.errors.InputError` with a
one-line message ``"<path>: <reason>"``. Zarr / OME-Zarr and DICOM readers live
in their own modules.
"""
from __future__ import annotations

import errno
import gzip
import os
import stat
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from medfeat.errors import InputError, one_line

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

NIFTI_SUFFIXES = (".nii", ".nii.gz")

_GZIP_ERRORS: tuple[type[Exception], ...] = (EOFError, zlib.error, gzip.BadGzipFile)
try:  # optional: a faster inflate for .nii.gz (setup installs it)
    from isal import igzip, isal_zlib
except ImportError:  # pragma: no cover - without it nibabel inflates with zlib
    _inflate: Callable[[bytes], bytes] | None = None
else:
    _inflate = igzip.decompress
    # isal_zlib.error is an exception class (isal's stub declares it an instance)
    _GZIP_ERRORS += (cast("type[Exception]", isal_zlib.error),)

# |det| of the 3x3 part below this (mm^3 per voxel) is treated as singular:
# no real scanner voxel is smaller than a nanolitre's millionth.
_MIN_VOXEL_VOLUME_MM3 = 1e-9


@dataclass(frozen=True)
class Volume:
    """One 3D volume.

    Attributes
    ----------
    data : float32 ndarray, shape (D, H, W), in the file's voxel order, scaling applied.
    affine : float64 ndarray, shape (4, 4): voxel index -> world mm (RAS+).
    spacing : float64 ndarray, shape (3,): voxel size in mm along each array axis
        (the norms of the affine's first three columns).
    path : the file it was read from (``None`` for in-memory volumes).
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: np.ndarray
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)


def is_nifti(path: str | Path) -> bool:
    """True when ``path`` names a NIfTI file by its suffix."""
    name = str(path).lower()
    return any(name.endswith(s) for s in NIFTI_SUFFIXES)


def check_affine(affine: np.ndarray, where: str | Path) -> np.ndarray:
    """Return ``affine`` as float64 (4, 4) or raise InputError if it is not a usable voxel->world map."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise InputError(f"{where}: affine has shape {a.shape}, expected (4, 4)")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{where}: affine has non-finite entries")
    det = float(np.linalg.det(a[:3, :3]))
    if not np.isfinite(det) or abs(det) < _MIN_VOXEL_VOLUME_MM3:
        raise InputError(f"{where}: affine is singular (voxel volume {det:.3g} mm^3)")
    return a


def affine_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis: the norms of the affine's first three columns, shape (3,)."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def _load(p: Path) -> SpatialImage:
    """The NIfTI image at ``p``. A ``.nii.gz`` is inflated by ISA-L's igzip when python-isal
    is installed (1.4x zlib's speed on a 160^3 scan here: gzip decoding is the largest CPU
    cost of reading a cohort), then parsed from memory; same bytes, same image."""
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    if p.suffix == ".gz" and _inflate is not None:
        return nib.Nifti1Image.from_bytes(_inflate(p.read_bytes()))
    img = nib.load(str(p))
    if not isinstance(img, SpatialImage):
        raise InputError(f"{p}: not a NIfTI image ({type(img).__name__})")
    return img


def check_readable_file(p: Path) -> None:
    """Raise InputError naming ``p`` when it is missing, a symlink loop, or not a regular file."""
    try:
        st = p.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{p}: symlink loop (the link points back to itself)") from exc
        if exc.errno == errno.ENOENT:
            raise InputError(f"{p}: file not found" + (" (dangling symlink)" if p.is_symlink() else "")) from exc
        raise InputError(f"{p}: cannot read ({os.strerror(exc.errno or 0)})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{p}: not a regular file")


def to_float32(raw: np.ndarray, where: str | Path) -> np.ndarray:
    """``raw`` voxels as float32; NaN/Inf voxels, or finite values beyond float32's range, are
    one InputError naming ``where``."""
    values = np.asarray(raw)
    if values.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise InputError(f"{where}: {bad} voxel(s) are NaN or Inf")
    with np.errstate(over="ignore"):
        data = values.astype(np.float32)
    if values.dtype.itemsize > 4 and not np.isfinite(data).all():
        top = float(np.max(np.abs(values)))
        raise InputError(f"{where}: values up to {top:.3g} overflow when cast to float32 "
                         f"(largest {float(np.finfo(np.float32).max):.3g})")
    return data


def _check_spacing(p: Path, header_class: type) -> None:
    """Refuse zero or non-finite voxel spacing in the header, read as written: nibabel's
    loader would quietly set it to 1 mm."""
    from nibabel.openers import ImageOpener
    from nibabel.wrapstruct import WrapStruct

    if not issubclass(header_class, WrapStruct):
        raise InputError(f"{p}: unsupported NIfTI header type {header_class.__name__}")

    with ImageOpener(str(p)) as fh:
        header = header_class.from_fileobj(fh, check=False)
    pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim == 0):
        raise InputError(f"{p}: zero or non-finite voxel spacing in the header (pixdim {pixdim.tolist()})")


def _squeeze_to_3d(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """Drop trailing singleton dimensions (a (D, H, W, 1) file is 3D); anything else not 3D is an error."""
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 3:
        raise InputError(f"{path}: expected a 3D volume, got shape {tuple(shape)}")
    if min(dims) < 1:
        raise InputError(f"{path}: empty volume of shape {tuple(shape)}")
    return dims[0], dims[1], dims[2]


def read_volume(path: str | Path) -> Volume:
    """Read a 3D NIfTI volume.

    Returns a :class:`Volume` whose ``data`` is float32 (D, H, W) with the
    header's scl_slope / scl_inter applied, and whose ``affine`` is the
    header's best affine (sform if set, else qform).

    Raises
    ------
    InputError
        Missing or unreadable file, not NIfTI, truncated or corrupt gzip or
        data, NaN or Inf voxels, not 3D, or a singular / non-finite affine.
    """
    p = Path(path)
    check_readable_file(p)
    if not is_nifti(p):
        raise InputError(f"{p}: not a NIfTI file (expected .nii or .nii.gz)")
    try:
        with warnings.catch_warnings():  # nibabel warns about odd headers without naming the file
            warnings.simplefilter("ignore")
            img = _load(p)
        shape = _squeeze_to_3d(tuple(img.shape), p)
        _check_spacing(p, type(img.header))
        raw = np.asanyarray(img.dataobj)
    except InputError:
        raise
    except _GZIP_ERRORS as exc:
        raise InputError(f"{p}: truncated or corrupt gzip stream ({one_line(exc, 200)})") from exc
    except Exception as exc:  # nibabel raises ImageFileError, ValueError, OSError for bad files
        raise InputError(f"{p}: unreadable NIfTI ({one_line(exc, 200)})") from exc
    if np.iscomplexobj(raw) or raw.dtype.fields is not None:
        raise InputError(f"{p}: unsupported voxel type {raw.dtype} (expected real scalars)")
    data = to_float32(raw, p).reshape(shape)
    affine = check_affine(img.affine, p)
    return Volume(data=data, affine=affine, spacing=affine_spacing(affine), path=p)


def write_volume(
    path: str | Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    dtype: np.dtype | type | str | None = None,
) -> Path:
    """Write a 3D array as NIfTI-1 with ``affine`` in both sform and qform (code 1, scanner).

    Parameters
    ----------
    data : ndarray, shape (D, H, W).
    affine : (4, 4) voxel -> world mm; must be finite, non-singular and without
        shear (the qform cannot hold shear).
    dtype : on-disk type. ``None`` keeps ``data.dtype``. An integer type for
        float data stores it with scl_slope / scl_inter chosen by nibabel
        (MR-style int16 with scaling); label maps pass integer data.

    Writing ``.nii.gz`` is byte-for-byte reproducible (nibabel sets the gzip
    mtime to 0).
    """
    import nibabel as nib

    p = Path(path)
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise InputError(f"{p}: expected a 3D array to write, got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise InputError(f"{p}: refusing to write NaN or Inf voxels")
    aff = check_affine(affine, p)
    img = nib.Nifti1Image(arr, aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    if dtype is not None:
        img.set_data_dtype(np.dtype(dtype))
    img.header.set_xyzt_units(xyz="mm")
    p.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(p))
    return p
