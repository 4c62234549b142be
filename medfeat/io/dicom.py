"""DICOM: a series of 2D slices -> one 3D :class:`Volume` in NIfTI world (RAS+ mm); 2D images.

Geometry from the standard tags: ImageOrientationPatient (row and column direction
cosines), PixelSpacing (between rows, between columns), ImagePositionPatient (centre of
the first pixel) of every slice. Slices are sorted along the slice normal, and the
voxel -> world affine maps array index ``[k, r, c]`` (slice, row, column) to::

    LPS = IPP_0 + k * (IPP_1 - IPP_0) + r * dr * col_cosines + c * dc * row_cosines

then to RAS by negating x and y (DICOM is LPS, NIfTI RAS). Rescale slope and intercept
are applied. Enhanced multi-frame objects (one file, per-frame position and orientation)
read as one volume (:func:`read_multiframe`). Compressed transfer syntaxes decode through
pydicom's pixel-data plugins (``pylibjpeg`` + ``pylibjpeg-libjpeg`` for JPEG and JPEG-LS,
``pylibjpeg-openjpeg`` for JPEG 2000); when the plugin is missing the error names the
package to install. Files are DICOM by their ``.dcm`` suffix or by the ``DICM`` preamble
(PACS exports often have no suffix). Errors are one-line :class:`~medfeat.errors.InputError`.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medfeat.errors import InputError, one_line
from medfeat.io.nifti import Volume, affine_spacing, check_affine

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# transfer syntax name (pydicom's UID.name, as it starts) -> the plugin packages that decode it
PLUGINS = (("JPEG-LS", "pylibjpeg pylibjpeg-libjpeg (or pyjpegls)"),
           ("JPEG 2000", "pylibjpeg pylibjpeg-openjpeg"),
           ("JPEG", "pylibjpeg pylibjpeg-libjpeg"),
           ("High-Throughput JPEG 2000", "pylibjpeg pylibjpeg-openjpeg"))


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or any file with the DICOM preamble (``DICM`` at byte 128)."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_dataset(path: Path, headers_only: bool = False) -> Dataset:
    """A DICOM file's dataset (``headers_only``: without the pixel data)."""
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=headers_only)
    except Exception as exc:  # pydicom raises InvalidDicomError, OSError, ...
        raise InputError(f"{path}: unreadable DICOM ({one_line(exc, 160)})") from exc


def _series_uid(path: Path) -> str | None:
    try:
        return str(getattr(read_dataset(path, headers_only=True), "SeriesInstanceUID", ""))
    except InputError:
        return None


def pixel_data(ds: Dataset, path: Path) -> np.ndarray:
    """The stored pixel values (no rescale), decoded; a missing codec plugin is named."""
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing pixel data, unsupported transfer syntax
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_compressed:
            name = str(syntax.name)
            package = next((pkg for prefix, pkg in PLUGINS if name.startswith(prefix)), None)
            if package is not None and ("plugin" in str(exc).lower() or "missing" in str(exc).lower()):
                raise InputError(f"{path}: pixel data in {name} needs a decoder plugin: pip install {package}") from exc
            raise InputError(f"{path}: cannot decode {name} pixel data ({one_line(exc, 160)})") from exc
        raise InputError(f"{path}: no readable pixel data ({one_line(exc, 160)})") from exc


def _pixels(ds: Dataset, path: Path) -> np.ndarray:
    arr = pixel_data(ds, path).astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return arr * np.float32(slope) + np.float32(intercept)


def read_dicom_series(path: str | Path) -> Volume:
    """Read one series: a folder of its slices, one of its files (the folder's files of the
    same SeriesInstanceUID are read with it), or one enhanced multi-frame file."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    files = sorted(f for f in folder.iterdir() if is_dicom_file(f))
    if not files:
        raise InputError(f"{folder}: no DICOM files")
    if p.is_file():  # one file names its series among the folder's others (unreadable ones aside)
        uid = str(getattr(read_dataset(p, headers_only=True), "SeriesInstanceUID", ""))
        files = [f for f in files if f.samefile(p) or _series_uid(f) == uid]
    slices = [read_dataset(f) for f in files]
    series = {str(getattr(s, "SeriesInstanceUID", "")) for s in slices}
    if len(series) > 1:
        raise InputError(f"{folder}: holds {len(series)} series; give one series per folder, or one file of it")
    if len(slices) == 1 and int(getattr(slices[0], "NumberOfFrames", 1) or 1) > 1:
        return read_multiframe(slices[0], files[0])
    try:
        iop = np.array(slices[0].ImageOrientationPatient, dtype=np.float64)
        spacing = tuple(float(v) for v in slices[0].PixelSpacing)
        ipps = np.array([s.ImagePositionPatient for s in slices], dtype=np.float64)
    except AttributeError as exc:
        raise InputError(f"{folder}: missing geometry tag ({exc})") from exc
    thickness = float(getattr(slices[0], "SliceThickness", 1.0) or 1.0)
    return stack_slices(lambda i: _pixels(slices[i], files[i]), ipps, iop, spacing, thickness, folder)


def stack_slices(frame: Callable[[int], np.ndarray], ipps: np.ndarray, iop: np.ndarray,
                 spacing: tuple[float, ...], thickness: float, where: Path) -> Volume:
    """Slices (``frame(i)``: rescaled (rows, columns) of slice i) at positions ``ipps`` (n, 3)
    with orientation ``iop`` (6 cosines) and ``spacing`` (between rows, between columns, mm)
    -> one :class:`Volume`, slices sorted along the normal (the module docstring's affine)."""
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    order = np.argsort(ipps @ normal)
    ipps = ipps[order]
    if len(ipps) > 1 and np.min(np.diff(ipps @ normal)) <= 1e-6:
        raise InputError(f"{where}: slices with duplicate positions")
    data = np.stack([frame(int(i)) for i in order])
    if data.ndim != 3:
        raise InputError(f"{where}: expected 2D slices, got slice shape {data.shape[1:]}")
    step = ipps[1] - ipps[0] if len(ipps) > 1 else normal * thickness
    dr, dc = spacing[0], spacing[1]
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = step, dr * col_cos, dc * row_cos, ipps[0]
    affine = check_affine(LPS_TO_RAS @ lps, where)
    if not np.all(np.isfinite(data)):
        raise InputError(f"{where}: NaN or Inf voxels")
    return Volume(data=data, affine=affine, spacing=affine_spacing(affine), path=where)


# -- enhanced multi-frame objects ---------------------------------------------------------
# Enhanced MR / CT / PET Image Storage keep one volume in one file; geometry lives in
# functional groups, per frame (PerFrameFunctionalGroupsSequence) or shared by all frames
# (SharedFunctionalGroupsSequence): PlanePositionSequence (ImagePositionPatient),
# PlaneOrientationSequence (ImageOrientationPatient), PixelMeasuresSequence (PixelSpacing,
# SliceThickness), PixelValueTransformationSequence (RescaleSlope, RescaleIntercept). Files
# holding several stacks (echoes, time points at the same positions) are refused: their
# frames share positions.


def _group(ds: Dataset, frame: int, name: str) -> Dataset | None:
    """Item 0 of functional group ``name`` for ``frame`` (per-frame first, then shared)."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and name in per[frame]:
        return per[frame][name][0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared is not None and name in shared[0]:
        return shared[0][name][0]
    return None


def _geometry(ds: Dataset, frame: int, name: str, path: Path) -> Dataset:
    """Functional group ``name`` of ``frame``, which the volume's geometry needs."""
    item = _group(ds, frame, name)
    if item is None:
        raise InputError(f"{path}: missing frame geometry (no {name} for frame {frame})")
    return item


def read_multiframe(ds: Dataset, path: Path) -> Volume:
    """An enhanced multi-frame dataset -> one :class:`Volume` (float32, rescaled)."""
    n = int(ds.NumberOfFrames)
    if "PerFrameFunctionalGroupsSequence" not in ds or len(ds.PerFrameFunctionalGroupsSequence) != n:
        raise InputError(f"{path}: multi-frame without per-frame functional groups: not an enhanced image")
    try:
        ipps = np.array([_geometry(ds, i, "PlanePositionSequence", path).ImagePositionPatient for i in range(n)],
                        dtype=np.float64)
        iops = np.array([_geometry(ds, i, "PlaneOrientationSequence", path).ImageOrientationPatient
                         for i in range(n)], dtype=np.float64)
        measures = _geometry(ds, 0, "PixelMeasuresSequence", path)
        spacing = tuple(float(v) for v in measures.PixelSpacing)
    except AttributeError as exc:  # a tag missing from its group
        raise InputError(f"{path}: missing frame geometry ({exc})") from exc
    if not np.allclose(iops, iops[0], atol=1e-4):
        raise InputError(f"{path}: frames of different orientations are not one volume")
    thickness = float(getattr(measures, "SliceThickness", 1.0) or 1.0)
    stored = pixel_data(ds, path)
    stored = stored[None] if stored.ndim == 2 else stored
    scale = np.ones(n, np.float32)
    shift = np.zeros(n, np.float32)
    for i in range(n):
        tr = _group(ds, i, "PixelValueTransformationSequence")
        if tr is not None:
            scale[i] = float(getattr(tr, "RescaleSlope", 1.0) or 1.0)
            shift[i] = float(getattr(tr, "RescaleIntercept", 0.0) or 0.0)

    def frame(i: int) -> np.ndarray:
        return stored[i].astype(np.float32) * scale[i] + shift[i]

    return stack_slices(frame, ipps, iops[0], spacing, thickness, path)


def read_dicom_image(path: str | Path) -> np.ndarray:
    """One 2D DICOM image as (H, W) float32 (grey; MONOCHROME1 inverted) or (H, W, 3)."""
    p = Path(path)
    ds = read_dataset(p)
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
    lps = np.linalg.inv(LPS_TO_RAS) @ np.asarray(affine, np.float64)
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
