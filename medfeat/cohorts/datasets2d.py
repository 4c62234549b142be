"""Manifests for local copies of public 2D datasets, with each study's label and split rules.

Every loader returns a DataFrame with ``item_id, subject, path, split`` and
either ``label`` (int) or one 0/1 column per label (multi-label), plus
``attrs`` ``{"dataset", "task", "metric", "classes"}`` (and ``"mean_std"``, the transfer
study's normalisation of that dataset, where it has one). Nothing is downloaded: point
``root`` at the unpacked public release.

| dataset   | layout read                                             | task / metric                 | split (default: the study's) |
|-----------|---------------------------------------------------------|-------------------------------|-------|
| APTOS2019 | ``train.csv`` (id_code, diagnosis), ``train_images/*.png`` | ordinal 5 grades / quadratic kappa | 70/15/15, ``random.Random(42)`` or ``val_ids.json`` |
| ISIC2019  | ``ISIC_2019_Training_GroundTruth.csv`` (one-hot MEL..UNK), ``ISIC_2019_Training_Input/*.jpg`` | 8 classes / macro recall | 80/10/10, likewise |
| DDSM      | ``ddsm_raw_image_lists/{train,val,test}.txt``, ``ddsm_raw/*`` (the original DDSM, with normal cases) | normal 0 vs benign-or-cancer 1 / AUC | the given lists |
| CBIS-DDSM | ``{mass,calc}_case_description_{train,test}_set.csv`` + DICOMs | normal 0 vs benign-or-cancer 1 / AUC | the given train/test lists |
| CheXpert  | ``train.csv`` / ``valid.csv`` (Path + 14 labels)         | 14-label / mean AUC           | train.csv sorted by Path, first int(0.2 N) + 15 rows halved into val and test; or valid.csv as test |

The study's random splits (:mod:`medfeat.cohorts.study_splits`) are by image: its subject is
the image. ``split="grouped"`` keeps images of one patient or lesion together instead.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from medfeat.cohorts.study_splits import STUDY_MEAN_STD, chexpert_study_split, study_split_ids
from medfeat.errors import InputError, ManifestError

__all__ = ["CHEXPERT_LABELS", "ISIC_CLASSES", "DATASETS", "STUDY_MEAN_STD", "grouped_random_split",
           "load_aptos2019", "load_isic2019", "load_ddsm", "load_cbis_ddsm", "load_chexpert", "load_image_csv",
           "read_image"]
SPLITS = ("study", "grouped")

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
    if dataset in STUDY_MEAN_STD:
        df.attrs["mean_std"] = [list(v) for v in STUDY_MEAN_STD[dataset]]
    return df


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"split={split!r}: use one of {', '.join(SPLITS)}")


def _study_splits(total: int, held_out: float, json_path: Path) -> np.ndarray:
    """Split names per row of the study's random split (``val_ids.json`` when present)."""
    train, val, test = study_split_ids(total, held_out, json_path)
    names = np.empty(total, dtype=object)
    names[train], names[val], names[test] = "train", "val", "test"
    return names


def grouped_random_split(subjects: Sequence[str], fractions: Sequence[float], seed: int,
                         names: Sequence[str] = ("train", "val", "test")) -> np.ndarray:
    """Split names per row; subjects are shuffled and cut by the cumulative fractions."""
    subject_of_row = np.asarray(subjects, dtype=object)
    uniq = np.unique(subject_of_row)
    order = np.random.default_rng(seed).permutation(len(uniq))
    bounds = np.round(np.cumsum(fractions) / np.sum(fractions) * len(uniq)).astype(int)
    part = np.searchsorted(bounds, np.arange(len(uniq)), side="right")
    split_of = dict(zip(uniq[order], np.asarray(names, dtype=object)[part]))
    return np.array([split_of[s] for s in subject_of_row], dtype=object)


def load_aptos2019(root: str | Path, *, split: str = "study", seed: int = 0,
                   fractions: Sequence[float] = (0.70, 0.15, 0.15)) -> pd.DataFrame:
    """APTOS 2019 blindness detection: grades 0..4 from ``train.csv``; random 70/15/15 split,
    the study's (``random.Random(42)``, or ``root/val_ids.json``) or, with ``split="grouped"``,
    medfeat's seeded one."""
    _check_split(split)
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
    if split == "study":
        out["split"] = _study_splits(len(out), 0.3, root / "val_ids.json")
    else:
        out["split"] = grouped_random_split(out["subject"], fractions, seed)
    return _finish(out, "aptos2019", "ordinal", "kappa", [str(g) for g in range(5)])


def load_isic2019(root: str | Path, *, split: str = "study", seed: int = 0,
                  fractions: Sequence[float] = (0.80, 0.10, 0.10)) -> pd.DataFrame:
    """ISIC 2019: 8 lesion classes from the one-hot ground truth; random 80/10/10 split.

    ``split="study"``: the study's split of the CSV's rows (``random.Random(42)``, or
    ``root/val_ids.json``), by image. ``"grouped"``: images of one lesion (``lesion_id`` in
    the metadata CSV, when present) stay in one part of a seeded split. Images are read from
    ``ISIC_2019_Training_Input/`` (the release) or ``train/`` (the study's folder).
    """
    _check_split(split)
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
    if meta_path.is_file() and split == "grouped":
        meta = pd.read_csv(meta_path).set_index("image")
        if "lesion_id" in meta:
            lesion = meta["lesion_id"].reindex(images).to_numpy()
            subject = pd.Series(np.where(pd.isna(lesion), images, lesion), dtype=str)
    folder = "train" if (root / "train").is_dir() and not (root / "ISIC_2019_Training_Input").is_dir() \
        else "ISIC_2019_Training_Input"
    out = pd.DataFrame({"item_id": images, "subject": subject.to_numpy(),
                        "path": [str(root / folder / f"{i}.jpg") for i in images],
                        "label": onehot.argmax(axis=1)})
    if split == "study":
        out["split"] = _study_splits(len(out), 0.2, root / "val_ids.json")
    else:
        out["split"] = grouped_random_split(out["subject"], fractions, seed)
    return _finish(out, "isic2019", "multiclass", "balanced_accuracy", ISIC_CLASSES)


_DDSM_LABELS = {"normal": 0, "benign": 1, "cancer": 2}


def load_ddsm(root: str | Path, *, n_classes: int = 2) -> pd.DataFrame:
    """The original DDSM with normal cases, as the study used it (its ``DDSM`` dataset).

    ``root/ddsm_raw_image_lists/{train,val,test}.txt`` list image paths relative to
    ``root/ddsm_raw`` (one per line, the split); the label is the file name's prefix before
    the first ``_``: ``normal`` 0, ``benign`` 1, ``cancer`` 2, with benign and cancer merged
    into 1 for ``n_classes=2`` (the study's task: normal vs benign-or-cancer). Each image is
    its own subject (the lists are the split).
    """
    if n_classes not in (2, 3):
        raise InputError(f"n_classes={n_classes}: DDSM has 2 (normal, benign or cancer) or 3 classes")
    root = Path(root)
    lists = root / "ddsm_raw_image_lists"
    rows = []
    for split in ("train", "val", "test"):
        path = lists / f"{split}.txt"
        if not path.is_file():
            raise ManifestError(f"{path}: not found (the original DDSM's image lists; CBIS-DDSM is cbis_ddsm)")
        for line in path.read_text().splitlines():
            rel = line.split(" ")[0].strip()
            if not rel:
                continue
            prefix = Path(rel).name.split("_")[0]
            if prefix not in _DDSM_LABELS:
                raise ManifestError(f"{path}: image {rel} is not named normal_*, benign_* or cancer_*")
            label = min(_DDSM_LABELS[prefix], n_classes - 1)
            rows.append({"item_id": rel, "subject": rel, "path": str(root / "ddsm_raw" / rel), "label": label,
                         "split": split})
    out = pd.DataFrame(rows, columns=["item_id", "subject", "path", "label", "split"])
    classes = ["normal", "benign_or_cancer"] if n_classes == 2 else ["normal", "benign", "cancer"]
    return _finish(out, "ddsm", "binary" if n_classes == 2 else "multiclass",
                   "auc" if n_classes == 2 else "balanced_accuracy", classes)


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


def load_chexpert(root: str | Path, *, split: str = "study", seed: int = 0, val_fraction: float = 0.1,
                  frontal_only: bool = False) -> pd.DataFrame:
    """CheXpert: 14 labels; uncertain (-1) and missing count as 0, and rows left with
    no positive label get ``No Finding`` = 1 (the study's U-zeros).

    ``split="study"``: ``train.csv`` alone, split as the study's code does
    (:func:`~medfeat.cohorts.study_splits.chexpert_study_split`: sorted by Path, the first
    int(0.2 N) + 15 rows halved into val and test by ``.loc`` labels; the at most two rows
    that code lists twice are kept in test, named in ``attrs["listed_twice"]``); each image
    is its own subject. ``split="official"``: ``valid.csv`` is the test set and
    ``val_fraction`` of ``train.csv``'s patients the validation set (by patient).
    """
    if split not in ("study", "official"):
        raise InputError(f"split={split!r}: use study or official")
    root = Path(root)
    train_csv = _csv(root / "train.csv")
    twice: list[str] = []
    if split == "study":
        _require_chexpert_columns(root, train_csv)
        train_csv, names, twice = chexpert_study_split(train_csv)
        df = train_csv.assign(split=names).reset_index(drop=True)
    else:
        parts = [train_csv.assign(split="train"), _csv(root / "valid.csv").assign(split="test")]
        df = pd.concat(parts, ignore_index=True)
        _require_chexpert_columns(root, df)
    if frontal_only and "Frontal/Lateral" in df:
        df = df[df["Frontal/Lateral"] == "Frontal"].reset_index(drop=True)
    labels = df[list(CHEXPERT_LABELS)].fillna(0.0).to_numpy()
    labels = (labels == 1.0).astype(np.int64)  # -1 (uncertain) and blank -> 0
    labels[labels.sum(axis=1) == 0, 0] = 1
    paths = df["Path"].astype(str)
    patient = paths.str.extract(r"(patient\d+)", expand=False).fillna(paths)
    item_id = paths.str.replace(r"^[^/]*/", "", regex=True)
    out = pd.DataFrame({"item_id": item_id, "subject": item_id if split == "study" else patient,
                        "path": [_chexpert_path(root, p) for p in paths]})
    out[list(CHEXPERT_LABELS)] = labels
    names = df["split"].to_numpy(dtype=object)
    if split == "official":
        train = names == "train"
        names[train] = grouped_random_split(out.loc[train, "subject"], (1 - val_fraction, val_fraction), seed,
                                            names=("train", "val"))
    out["split"] = names
    result = _finish(out, "chexpert", "multilabel", "auc", CHEXPERT_LABELS)
    result.attrs["listed_twice"] = [p.split("/", 1)[-1] for p in twice]
    return result


def _require_chexpert_columns(root: Path, df: pd.DataFrame) -> None:
    missing = [c for c in ("Path", *CHEXPERT_LABELS) if c not in df.columns]
    if missing:
        raise ManifestError(f"{root}: CheXpert CSVs lack columns {', '.join(missing)}")


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


# name -> loader(root, **options): each loader takes its own keyword options
DATASETS: dict[str, Callable[..., pd.DataFrame]] = {"aptos2019": load_aptos2019, "isic2019": load_isic2019, "ddsm": load_ddsm, "cbis_ddsm": load_cbis_ddsm,
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
