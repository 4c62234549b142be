"""Manifests for local copies of public 2D datasets, with each study's label and split rules.

Every loader returns a DataFrame with ``item_id, subject, path, split`` and
either ``label`` (int) or one 0/1 column per label (multi-label), plus
``attrs`` ``{"dataset", "task", "metric", "classes"}``. Nothing is
downloaded: point ``root`` at the unpacked public release.

| dataset   | layout read                                             | task / metric                 | split |
|-----------|---------------------------------------------------------|-------------------------------|-------|
| APTOS2019 | ``train.csv`` (id_code, diagnosis), ``train_images/*.png`` | ordinal 5 grades / quadratic kappa | random 70/15/15 |
| ISIC2019  | ``ISIC_2019_Training_GroundTruth.csv`` (one-hot MEL..UNK), ``ISIC_2019_Training_Input/*.jpg`` | 8 classes / macro recall | random 80/10/10 by lesion |
| CBIS-DDSM | ``{mass,calc}_case_description_{train,test}_set.csv`` + DICOMs | normal 0 vs benign-or-cancer 1 / AUC | the given train/test lists |
| CheXpert  | ``train.csv`` / ``valid.csv`` (Path + 14 labels)         | 14-label / mean AUC           | train.csv (val by patient) / valid.csv as test |
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medfeat.errors import InputError, ManifestError

__all__ = ["CHEXPERT_LABELS", "ISIC_CLASSES", "DATASETS", "grouped_random_split", "load_aptos2019",
           "load_isic2019", "load_cbis_ddsm", "load_chexpert", "load_image_csv", "read_image"]

ISIC_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")  # UNK has no training images
CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices")


def _csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ManifestError(f"{path}: not found (is the dataset root right?)")
    return pd.read_csv(path)


def _finish(df: pd.DataFrame, dataset: str, task: str, metric: str, classes: Sequence[str]) -> pd.DataFrame:
    df = df.reset_index(drop=True)
    df.attrs.update({"dataset": dataset, "task": task, "metric": metric, "classes": list(classes)})
    return df


def grouped_random_split(subjects: Sequence[str], fractions: Sequence[float], seed: int,
                         names: Sequence[str] = ("train", "val", "test")) -> np.ndarray:
    """Split names per row; subjects are shuffled and cut by the cumulative fractions."""
    subjects = np.asarray(subjects, dtype=object)
    uniq = np.unique(subjects)
    order = np.random.default_rng(seed).permutation(len(uniq))
    bounds = np.round(np.cumsum(fractions) / np.sum(fractions) * len(uniq)).astype(int)
    part = np.searchsorted(bounds, np.arange(len(uniq)), side="right")
    split_of = dict(zip(uniq[order], np.asarray(names, dtype=object)[part]))
    return np.array([split_of[s] for s in subjects], dtype=object)


def load_aptos2019(root: str | Path, *, seed: int = 0, fractions: Sequence[float] = (0.70, 0.15, 0.15)) -> pd.DataFrame:
    """APTOS 2019 blindness detection: grades 0..4 from ``train.csv``; random 70/15/15 split."""
    root = Path(root)
    df = _csv(root / "train.csv")
    if not {"id_code", "diagnosis"} <= set(df.columns):
        raise ManifestError(f"{root / 'train.csv'}: needs id_code and diagnosis columns")
    bad = df.loc[~df["diagnosis"].isin(range(5)), "id_code"]
    if len(bad):
        raise ManifestError(f"{root / 'train.csv'}: image {bad.iloc[0]} has a diagnosis outside 0..4")
    out = pd.DataFrame({"item_id": df["id_code"].astype(str), "subject": df["id_code"].astype(str),
                        "path": [str(root / "train_images" / f"{i}.png") for i in df["id_code"]],
                        "label": df["diagnosis"].astype(int)})
    out["split"] = grouped_random_split(out["subject"], fractions, seed)
    return _finish(out, "aptos2019", "ordinal", "kappa", [str(g) for g in range(5)])


def load_isic2019(root: str | Path, *, seed: int = 0, fractions: Sequence[float] = (0.80, 0.10, 0.10)) -> pd.DataFrame:
    """ISIC 2019: 8 lesion classes from the one-hot ground truth; random 80/10/10 split.

    Images of one lesion (``lesion_id`` in the metadata CSV, when present) stay in one split.
    """
    root = Path(root)
    gt_path = root / "ISIC_2019_Training_GroundTruth.csv"
    gt = _csv(gt_path)
    missing = [c for c in ("image", *ISIC_CLASSES) if c not in gt.columns]
    if missing:
        raise ManifestError(f"{gt_path}: missing columns {', '.join(missing)}")
    onehot = gt[list(ISIC_CLASSES)].to_numpy()
    n_pos = (onehot > 0.5).sum(axis=1)
    if np.any(n_pos != 1):
        raise ManifestError(f"{gt_path}: image {gt['image'][np.flatnonzero(n_pos != 1)[0]]} "
                            f"does not have exactly one of {', '.join(ISIC_CLASSES)}")
    images = gt["image"].astype(str)
    subject = images.copy()
    meta_path = root / "ISIC_2019_Training_Metadata.csv"
    if meta_path.is_file():
        meta = pd.read_csv(meta_path).set_index("image")
        if "lesion_id" in meta:
            lesion = meta["lesion_id"].reindex(images).to_numpy()
            subject = pd.Series(np.where(pd.isna(lesion), images, lesion), dtype=str)
    out = pd.DataFrame({"item_id": images, "subject": subject.to_numpy(),
                        "path": [str(root / "ISIC_2019_Training_Input" / f"{i}.jpg") for i in images],
                        "label": onehot.argmax(axis=1)})
    out["split"] = grouped_random_split(out["subject"], fractions, seed)
    return _finish(out, "isic2019", "multiclass", "balanced_accuracy", ISIC_CLASSES)


_CBIS_FILES = {("mass", "train"): "mass_case_description_train_set.csv",
               ("calc", "train"): "calc_case_description_train_set.csv",
               ("mass", "test"): "mass_case_description_test_set.csv",
               ("calc", "test"): "calc_case_description_test_set.csv"}


def load_cbis_ddsm(root: str | Path, *, without_callback: str = "normal") -> pd.DataFrame:
    """CBIS-DDSM whole mammograms: label 1 if the image holds a benign or malignant
    finding, 0 if its only findings are ``BENIGN_WITHOUT_CALLBACK``.

    CBIS-DDSM has no lesion-free images; the "normal" class of the study's
    normal-vs-(benign or cancer) task maps to findings that needed no callback
    (``without_callback="normal"``); ``"drop"`` removes those images instead.
    The split is the given train/test lists. Paths: the CSV's ``image file path``
    under ``root``, or else the single DICOM inside ``root/<its first folder>``
    (the TCIA download renames the inner folders).
    """
    root = Path(root)
    frames = []
    for (kind, split), name in _CBIS_FILES.items():
        if (root / name).is_file():
            frames.append(pd.read_csv(root / name).assign(split=split, abnormality=kind))
    if not frames:
        raise ManifestError(f"{root}: no CBIS-DDSM case description CSVs ({', '.join(_CBIS_FILES.values())})")
    df = pd.concat(frames, ignore_index=True)
    need = {"patient_id", "pathology", "image file path"}
    if not need <= set(df.columns):
        raise ManifestError(f"{root}: case description CSVs need columns {', '.join(sorted(need))}")
    if without_callback not in ("normal", "drop"):
        raise InputError(f"without_callback={without_callback!r}: use 'normal' or 'drop'")
    df["image file path"] = df["image file path"].astype(str).str.strip()
    df["finding"] = df["pathology"].str.upper().isin(["BENIGN", "MALIGNANT"]).astype(int)
    img = df.groupby("image file path", sort=True).agg(
        patient=("patient_id", "first"), split=("split", "first"), label=("finding", "max"))
    if without_callback == "drop":
        img = img[img["label"] == 1]
    out = pd.DataFrame({"item_id": [p.split("/")[0] for p in img.index], "subject": img["patient"].astype(str),
                        "path": [_cbis_path(root, p) for p in img.index], "label": img["label"].astype(int),
                        "split": img["split"]})
    return _finish(out, "cbis_ddsm", "binary", "auc", ["normal", "benign_or_cancer"])


def _cbis_path(root: Path, rel: str) -> str:
    direct = root / rel
    if direct.is_file():
        return str(direct)
    folder = root / rel.split("/")[0]
    found = sorted(folder.rglob("*.dcm")) if folder.is_dir() else []
    return str(found[0]) if len(found) == 1 else str(direct)


def load_chexpert(root: str | Path, *, seed: int = 0, val_fraction: float = 0.1,
                  frontal_only: bool = False) -> pd.DataFrame:
    """CheXpert: 14 labels; uncertain (-1) and missing count as 0, and rows left with
    no positive label get ``No Finding`` = 1. ``train.csv`` gives train and a
    validation part (``val_fraction`` of patients); ``valid.csv`` is the test set."""
    root = Path(root)
    parts = [_csv(root / "train.csv").assign(split="train"), _csv(root / "valid.csv").assign(split="test")]
    df = pd.concat(parts, ignore_index=True)
    missing = [c for c in ("Path", *CHEXPERT_LABELS) if c not in df.columns]
    if missing:
        raise ManifestError(f"{root}: CheXpert CSVs lack columns {', '.join(missing)}")
    if frontal_only and "Frontal/Lateral" in df:
        df = df[df["Frontal/Lateral"] == "Frontal"].reset_index(drop=True)
    labels = df[list(CHEXPERT_LABELS)].fillna(0.0).to_numpy()
    labels = (labels == 1.0).astype(np.int64)  # -1 (uncertain) and blank -> 0
    labels[labels.sum(axis=1) == 0, 0] = 1
    paths = df["Path"].astype(str)
    subject = paths.str.extract(r"(patient\d+)", expand=False).fillna(paths)
    out = pd.DataFrame({"item_id": paths.str.replace(r"^[^/]*/", "", regex=True), "subject": subject,
                        "path": [_chexpert_path(root, p) for p in paths]})
    out[list(CHEXPERT_LABELS)] = labels
    split = df["split"].to_numpy(dtype=object)
    train = split == "train"
    split[train] = grouped_random_split(out.loc[train, "subject"], (1 - val_fraction, val_fraction), seed,
                                        names=("train", "val"))
    out["split"] = split
    return _finish(out, "chexpert", "multilabel", "auc", CHEXPERT_LABELS)


def _chexpert_path(root: Path, rel: str) -> str:
    """The CSV's Path starts with the release folder (CheXpert-v1.0[-small]/...)."""
    for cand in (root / rel, root.parent / rel, root / rel.split("/", 1)[-1]):
        if cand.is_file():
            return str(cand)
    return str(root / rel.split("/", 1)[-1])


def load_image_csv(csv_path: str | Path, *, path_column: str = "path", label_column: str = "label",
                   subject_column: str | None = None, split_column: str | None = "split",
                   fractions: Sequence[float] = (0.70, 0.15, 0.15), seed: int = 0,
                   task: str = "multiclass", metric: str = "balanced_accuracy") -> pd.DataFrame:
    """Any image folder with a CSV: paths relative to the CSV, a label column, and
    optionally subject and split columns (a random grouped split when there is none)."""
    csv_path = Path(csv_path)
    df = _csv(csv_path)
    for col in (path_column, label_column):
        if col not in df:
            raise ManifestError(f"{csv_path}: no {col!r} column (columns: {', '.join(map(str, df.columns))})")
    paths = [p if Path(p).is_absolute() else str(csv_path.parent / p) for p in df[path_column].astype(str)]
    item_id = df["item_id"].astype(str) if "item_id" in df else pd.Series([Path(p).stem for p in paths])
    subject = df[subject_column].astype(str) if subject_column else item_id
    classes, label = np.unique(df[label_column].astype(str), return_inverse=True)
    if pd.to_numeric(df[label_column], errors="coerce").notna().all():
        classes, label = np.unique(df[label_column].astype(int), return_inverse=True)
    out = pd.DataFrame({"item_id": item_id.to_numpy(), "subject": subject.to_numpy(), "path": paths,
                        "label": label})
    if split_column and split_column in df:
        out["split"] = df[split_column].astype(str).to_numpy()
    else:
        out["split"] = grouped_random_split(out["subject"], fractions, seed)
    return _finish(out, csv_path.stem, task, metric, [str(c) for c in classes])


DATASETS = {"aptos2019": load_aptos2019, "isic2019": load_isic2019, "cbis_ddsm": load_cbis_ddsm,
            "chexpert": load_chexpert}


def read_image(path: str | Path) -> np.ndarray:
    """A PNG, JPEG or DICOM image as float32: (H, W) grey or (H, W, 3) colour.

    DICOM pixel values get RescaleSlope/RescaleIntercept, and MONOCHROME1
    images are inverted so that larger always means brighter.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image not found")
    if path.suffix.lower() in (".dcm", ".dicom") or _is_dicom(path):
        return _read_dicom(path)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("RGBA", "P", "CMYK", "YCbCr", "LA"):
                im = im.convert("RGB")
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: unreadable image ({exc})") from None
    return arr.astype(np.float32)


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array.astype(np.float32)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad files
        raise InputError(f"{path}: unreadable DICOM ({type(exc).__name__}: {exc})") from None
    arr = arr * float(getattr(ds, "RescaleSlope", 1.0)) + float(getattr(ds, "RescaleIntercept", 0.0))
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        arr = arr.max() + arr.min() - arr
    return arr.astype(np.float32)
