"""Cohort trees for the tests: a BIDS tree, DICOM tags stamped on a written series, an Enhanced MR object."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from medfeat.io.dicom import LPS_TO_RAS


def make_bids(root: Path, subjects: int = 3) -> Path:
    """``subjects`` subjects; the last has session bl only, the others bl and m12; T1w and T2w
    16^3 images (and a second T1w acquisition for 01/bl); participants.tsv (age, sex, site;
    the last subject's age n/a) and sessions.tsv (acq_time, kl_grade)."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    times = {"bl": "2019-03-01T10:00:00", "m12": "2020-03-02T09:30:00"}
    people = []
    for k in range(1, subjects + 1):
        sub = f"{k:02d}"
        sessions = ("bl", "m12") if k < subjects else ("bl",)
        for ses in sessions:
            anat = root / f"sub-{sub}" / f"ses-{ses}" / "anat"
            anat.mkdir(parents=True)
            for suffix in ("T1w", "T2w"):
                img = nib.Nifti1Image(rng.random((16, 16, 16), dtype=np.float32) * 100, np.diag([1.5, 1.5, 1.5, 1]))
                nib.save(img, anat / f"sub-{sub}_ses-{ses}_{suffix}.nii.gz")
            if (sub, ses) == ("01", "bl"):
                nib.save(img, anat / f"sub-{sub}_ses-{ses}_acq-fast_T1w.nii.gz")
        (root / f"sub-{sub}" / f"sub-{sub}_sessions.tsv").write_text(
            "session_id\tacq_time\tkl_grade\n" + "".join(f"ses-{s}\t{times[s]}\t{k % 3}\n" for s in sessions))
        age = "n/a" if k == subjects else str(55 + 3 * k)
        people.append(f"sub-{sub}\t{age}\t{'FM'[k % 2 == 0]}\t{'AB'[k % 2]}\n")
    (root / "participants.tsv").write_text("participant_id\tage\tsex\tsite\n" + "".join(people))
    (root / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.9.0"}')
    return root


def stamp(files: list[Path], **tags: str) -> None:
    """Set ``tags`` (PatientID, StudyDate, SeriesDescription, ...) on every file."""
    import pydicom

    for f in files:
        ds = pydicom.dcmread(str(f))
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.save_as(str(f), enforce_file_format=True)


def write_enhanced_mr(path: Path, data: np.ndarray, affine: np.ndarray, *, patient: str = "P",
                      date: str = "20200101", description: str = "enhanced", slope: float = 0.5,
                      shuffle: bool = True) -> Path:
    """Write (D, H, W) ``data`` as one Enhanced MR Image Storage file with per-frame positions,
    a shared orientation and pixel measures, and a shared rescale (frames stored shuffled, so
    the reader must sort them)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    enhanced_mr = "1.2.840.10008.5.1.4.1.1.4.1"
    lps = np.linalg.inv(LPS_TO_RAS) @ np.asarray(affine, np.float64)
    dr, dc = np.linalg.norm(lps[:3, 1]), np.linalg.norm(lps[:3, 2])
    col_cos, row_cos = lps[:3, 1] / dr, lps[:3, 2] / dc
    order = np.random.default_rng(0).permutation(len(data)) if shuffle else np.arange(len(data))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = enhanced_mr, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = enhanced_mr, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.StudyDate, ds.SeriesDescription = "MR", patient, date, description
    ds.NumberOfFrames = len(data)
    ds.Rows, ds.Columns = data.shape[1], data.shape[2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    orient, measures, rescale = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = [float(v) for v in (*row_cos, *col_cos)]
    measures.PixelSpacing = [float(dr), float(dc)]
    measures.SliceThickness = float(np.linalg.norm(lps[:3, 0]))
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = f"{slope}", "-10", "US"
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in order:
        pos, item = Dataset(), Dataset()
        pos.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * lps[:3, 0]]
        item.PlanePositionSequence = Sequence([pos])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    raw = np.round((data[order] + 10.0) / slope).clip(0, 65535).astype(np.uint16)
    ds.PixelData = raw.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path
