"""One entry point per input kind: ``read_scan`` (3D) and ``read_image`` (2D), by file type.

3D: NIfTI (``.nii``, ``.nii.gz``), a scan in a Zarr cohort store (a directory holding
``zarr.json``, written by ``medfeat cohort ingest``), or a DICOM series (a directory of
DICOM files, or one file of the series, or an enhanced multi-frame file). 2D: PNG, JPEG, TIFF, BMP through Pillow, and
single-frame DICOM. Every failure is an :class:`~medfeat.errors.InputError` naming the path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from medfeat.errors import InputError, one_line
from medfeat.io.nifti import Volume, is_nifti, read_volume

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _is_zarr(p: Path) -> bool:
    return p.is_dir() and (p / "zarr.json").is_file()


def _is_dicom(p: Path) -> bool:
    from medfeat.io.dicom import is_dicom_file

    if p.is_dir():
        return any(is_dicom_file(f) for f in p.iterdir())
    return is_dicom_file(p)


def read_scan(path: str | Path) -> Volume:
    """A 3D :class:`Volume` from NIfTI, a Zarr cohort scan, or a DICOM series."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: file not found")
    if is_nifti(p):
        return read_volume(p)
    if _is_zarr(p):
        from medfeat.io.zarr_scans import read_zarr_volume

        return read_zarr_volume(p)
    if _is_dicom(p):
        from medfeat.io.dicom import read_dicom_series

        return read_dicom_series(p)
    raise InputError(f"{p}: not a NIfTI file, Zarr scan or DICOM series")


def read_image(path: str | Path) -> np.ndarray:
    """A 2D image as (H, W) or (H, W, C), its own dtype (uint8, uint16 or float)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: file not found")
    suffix = p.suffix.lower()
    if suffix == ".dcm":
        from medfeat.io.dicom import read_dicom_image

        img = read_dicom_image(p)
    elif suffix in IMAGE_SUFFIXES:
        img = _read_pillow(p)
    else:
        raise InputError(f"{p}: not a 2D image ({', '.join(IMAGE_SUFFIXES)}, .dcm)")
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
        raise InputError(f"{p}: expected a 2D image, got shape {img.shape}")
    if img.dtype.kind == "f" and not np.all(np.isfinite(img)):
        raise InputError(f"{p}: image has NaN or Inf pixels")
    return img


def _read_pillow(p: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            im.load()
            if im.mode in ("P", "LA", "CMYK", "YCbCr"):
                im = im.convert("RGBA" if im.mode in ("P", "LA") and "transparency" in im.info else "RGB")
            if im.mode == "I;16":
                return np.asarray(im, dtype=np.uint16)
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{p}: unreadable image ({one_line(exc, 160)})") from exc
