"""DICOM: a series of 2D slices -> one 3D :class:`Volume` in NIfTI world (RAS+ mm); 2D images.

Geometry from the standard tags: ImageOrientationPatient (row and column direction
cosines), PixelSpacing (between rows, between columns), ImagePositionPatient (centre of
the first pixel) of every slice. Slices are sorted along the slice normal, and the
voxel -> world affine maps array index ``[k, r, c]`` (slice, row, column) to::

    LPS = IPP_0 + k * (IPP_1 - IPP_0) + r * dr * col_cosines + c * dc * row_cosines

then to RAS by negating x and y (DICOM is LPS, NIfTI RAS). Rescale slope and intercept
are applied. Errors are one-line :class:`~medfeat.errors.InputError`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from medfeat.errors import InputError, one_line
from medfeat.io.nifti import Volume, affine_spacing, check_affine

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _read(path: Path):  # noqa: ANN202 - pydicom Dataset
    import pydicom

    try:
        return pydicom.dcmread(str(path))
    except Exception as exc:  # pydicom raises InvalidDicomError, OSError, ...
        raise InputError(f"{path}: unreadable DICOM ({one_line(exc, 160)})") from exc


def _pixels(ds, path: Path) -> np.ndarray:  # noqa: ANN001
    try:
        arr = ds.pixel_array.astype(np.float32)
    except Exception as exc:  # noqa: BLE001 - missing pixel data, unsupported transfer syntax
        raise InputError(f"{path}: no readable pixel data ({one_line(exc, 160)})") from exc
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return arr * np.float32(slope) + np.float32(intercept)


def read_dicom_series(path: str | Path) -> Volume:
    """Read a folder of one series' ``.dcm`` slices (or the folder of the given file)."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() == ".dcm")
    if not files:
        raise InputError(f"{folder}: no .dcm files")
    slices = [_read(f) for f in files]
    series = {str(getattr(s, "SeriesInstanceUID", "")) for s in slices}
    if len(series) > 1:
        raise InputError(f"{folder}: holds {len(series)} series; give one series per folder")
    try:
        iop = np.array(slices[0].ImageOrientationPatient, dtype=np.float64)
        dr, dc = (float(v) for v in slices[0].PixelSpacing)
        ipps = np.array([s.ImagePositionPatient for s in slices], dtype=np.float64)
    except AttributeError as exc:
        raise InputError(f"{folder}: missing geometry tag ({exc})") from exc
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    order = np.argsort(ipps @ normal)
    ipps = ipps[order]
    if len(slices) > 1 and np.min(np.diff(ipps @ normal)) <= 1e-6:
        raise InputError(f"{folder}: slices with duplicate positions")
    data = np.stack([_pixels(slices[i], files[i]) for i in order])
    if data.ndim != 3:
        raise InputError(f"{folder}: expected 2D slices, got slice shape {data.shape[1:]}")
    step = ipps[1] - ipps[0] if len(slices) > 1 else normal * float(getattr(slices[0], "SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = step, dr * col_cos, dc * row_cos, ipps[0]
    affine = check_affine(_LPS_TO_RAS @ lps, folder)
    if not np.all(np.isfinite(data)):
        raise InputError(f"{folder}: NaN or Inf voxels")
    return Volume(data=data, affine=affine, spacing=affine_spacing(affine), path=folder)


def read_dicom_image(path: str | Path) -> np.ndarray:
    """One 2D DICOM image as (H, W) float32 (grey; MONOCHROME1 inverted) or (H, W, 3)."""
    p = Path(path)
    ds = _read(p)
    img = _pixels(ds, p)
    if img.ndim == 3 and img.shape[-1] != 3:
        raise InputError(f"{p}: multi-frame DICOM ({img.shape[0]} frames) is not a 2D image")
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        img = img.max() + img.min() - img
    return img


def write_dicom_series(folder: str | Path, data: np.ndarray, affine: np.ndarray) -> list[Path]:
    """Write a (D, H, W) volume as one MR series of 16-bit slices with the geometry of
    ``affine`` (voxel [k, r, c] -> RAS mm; columns 1 and 2 must be orthogonal). For tests
    and for converting synthetic cohorts."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.linalg.inv(_LPS_TO_RAS) @ np.asarray(affine, np.float64)
    dr, dc = np.linalg.norm(lps[:3, 1]), np.linalg.norm(lps[:3, 2])
    col_cos, row_cos = lps[:3, 1] / dr, lps[:3, 2] / dc
    lo, hi = float(data.min()), float(data.max())
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in range(data.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.InstanceNumber = "MR", k + 1
        ds.ImageOrientationPatient = [float(v) for v in (*row_cos, *col_cos)]
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * lps[:3, 0]]
        ds.PixelSpacing = [float(dr), float(dc)]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 0]))
        ds.Rows, ds.Columns = data.shape[1], data.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{lo:.10g}"
        raw = np.round((data[k] - lo) / float(ds.RescaleSlope)).clip(0, 65535).astype(np.uint16)
        ds.PixelData = raw.tobytes()
        path = folder / f"slice_{k:04d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths
