"""2D dataset loaders on tiny fake trees in the public layouts; image reading."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from medfeat.cohorts import datasets2d as d2
from medfeat.errors import InputError, ManifestError


def _png(path, value=10, shape=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


def test_aptos(tmp_path):
    ids = [f"a{i:03d}" for i in range(40)]
    pd.DataFrame({"id_code": ids, "diagnosis": np.arange(40) % 5}).to_csv(tmp_path / "train.csv", index=False)
    _png(tmp_path / "train_images" / "a000.png")
    df = d2.load_aptos2019(tmp_path, split="grouped", seed=1)
    assert df.attrs["metric"] == "kappa" and df.attrs["task"] == "ordinal"
    assert df.attrs["mean_std"] == [[0.415, 0.221, 0.073], [0.275, 0.150, 0.081]]  # the study's statistics
    assert df["split"].value_counts().to_dict() == {"train": 28, "val": 6, "test": 6}
    assert df["path"][0].endswith("train_images/a000.png") and df["label"].tolist()[:6] == [0, 1, 2, 3, 4, 0]
    assert not df["split"].equals(d2.load_aptos2019(tmp_path, split="grouped", seed=2)["split"])
    pd.DataFrame({"id_code": ["x"], "diagnosis": [7]}).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(ManifestError, match="x"):
        d2.load_aptos2019(tmp_path)


def test_isic2019_one_hot_and_lesion_groups(tmp_path):
    n = 30
    images = [f"ISIC_{i:07d}" for i in range(n)]
    onehot = np.zeros((n, 9), int)
    onehot[np.arange(n), np.arange(n) % 8] = 1
    gt = pd.DataFrame(onehot, columns=[*d2.ISIC_CLASSES, "UNK"]).astype(float)
    gt.insert(0, "image", images)
    gt.to_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", index=False)
    pd.DataFrame({"image": images, "lesion_id": [f"L{i // 3}" for i in range(n)]}).to_csv(
        tmp_path / "ISIC_2019_Training_Metadata.csv", index=False)
    df = d2.load_isic2019(tmp_path, split="grouped")
    assert df["label"].tolist() == (np.arange(n) % 8).tolist()
    assert df.attrs["metric"] == "balanced_accuracy" and len(df.attrs["classes"]) == 8
    assert df.groupby("subject")["split"].nunique().max() == 1  # a lesion's images share a split
    assert df["split"].value_counts()["train"] == 24
    assert df["path"][0].endswith("ISIC_2019_Training_Input/ISIC_0000000.jpg")


def test_cbis_ddsm_whole_image_labels_and_given_split(tmp_path):
    cols = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
            "abnormality type", "pathology", "image file path"]
    rows_train = [["P_00001", 3, "LEFT", "CC", 1, "mass", "MALIGNANT", "Mass-Training_P_00001_LEFT_CC/1.2/1.3/000000.dcm"],
                  ["P_00001", 3, "LEFT", "CC", 2, "mass", "BENIGN_WITHOUT_CALLBACK",
                   "Mass-Training_P_00001_LEFT_CC/1.2/1.3/000000.dcm"],
                  ["P_00002", 2, "RIGHT", "MLO", 1, "mass", "BENIGN_WITHOUT_CALLBACK",
                   "Mass-Training_P_00002_RIGHT_MLO/1.2/1.3/000000.dcm\n"]]
    rows_test = [["P_00003", 2, "LEFT", "MLO", 1, "calcification", "BENIGN",
                  "Calc-Test_P_00003_LEFT_MLO/1.2/1.3/000000.dcm"]]
    pd.DataFrame(rows_train, columns=cols).to_csv(tmp_path / "mass_case_description_train_set.csv", index=False)
    pd.DataFrame(rows_test, columns=cols).to_csv(tmp_path / "calc_case_description_test_set.csv", index=False)
    renamed = tmp_path / "Calc-Test_P_00003_LEFT_MLO" / "08-29-2017-DDSM-NA-09887" / "1.000000-full-37355"
    renamed.mkdir(parents=True)
    (renamed / "1-1.dcm").write_bytes(b"")
    df = d2.load_cbis_ddsm(tmp_path).set_index("item_id")
    assert df.loc["Mass-Training_P_00001_LEFT_CC", "label"] == 1  # any benign/malignant finding
    assert df.loc["Mass-Training_P_00002_RIGHT_MLO", "label"] == 0  # only no-callback findings
    assert df.loc["Calc-Test_P_00003_LEFT_MLO", "split"] == "test"
    assert df.loc["Calc-Test_P_00003_LEFT_MLO", "path"].endswith("1-1.dcm")  # TCIA folder names resolved
    assert len(d2.load_cbis_ddsm(tmp_path, without_callback="drop")) == 2


def test_chexpert_label_rules(tmp_path):
    cols = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *d2.CHEXPERT_LABELS]
    blank = [np.nan] * 14

    def row(patient, labels):
        return [f"CheXpert-v1.0-small/train/patient{patient:05d}/study1/view1_frontal.jpg", "F", 50, "Frontal", "AP",
                *labels]

    lab1 = blank.copy()  # Cardiomegaly + uncertain Edema
    lab1[2], lab1[5] = 1.0, -1.0
    lab2 = blank.copy()  # only uncertain -> No Finding
    lab2[5], lab2[0] = -1.0, 0.0
    train = [row(i, lab1 if i % 2 else lab2) for i in range(1, 21)]
    pd.DataFrame(train, columns=cols).to_csv(tmp_path / "train.csv", index=False)
    valid = [row(99, lab1)]
    valid[0][0] = valid[0][0].replace("train", "valid")
    pd.DataFrame(valid, columns=cols).to_csv(tmp_path / "valid.csv", index=False)
    _png(tmp_path / "train" / "patient00001" / "study1" / "view1_frontal.jpg")
    df = d2.load_chexpert(tmp_path, split="official")
    labels = df[list(d2.CHEXPERT_LABELS)].to_numpy()
    assert labels.shape == (21, 14) and set(np.unique(labels)) == {0, 1}
    first, second = labels[0], labels[1]  # patient 1 (lab1), patient 2 (lab2)
    assert first[2] == 1 and first[5] == 0 and first[0] == 0
    assert second[0] == 1 and second.sum() == 1
    assert (labels.sum(axis=1) > 0).all()
    assert df["split"].iloc[-1] == "test" and set(df["split"].iloc[:-1]) == {"train", "val"}
    assert df["subject"].iloc[0] == "patient00001" and df["path"].iloc[0] == str(
        tmp_path / "train" / "patient00001" / "study1" / "view1_frontal.jpg")


def test_generic_csv_loader(tmp_path):
    pd.DataFrame({"file": ["x/a.png", "x/b.png", "x/c.png", "x/d.png"], "cls": ["cat", "dog", "cat", "dog"],
                  "split": ["train", "train", "test", "test"]}).to_csv(tmp_path / "labels.csv", index=False)
    df = d2.load_image_csv(tmp_path / "labels.csv", path_column="file", label_column="cls")
    assert df["label"].tolist() == [0, 1, 0, 1] and df.attrs["classes"] == ["cat", "dog"]
    assert df["path"][0] == str(tmp_path / "x/a.png") and df["split"].tolist()[2] == "test"


def test_read_png_jpeg_and_dicom(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(d2.read_image(tmp_path / "a.png"), rgb.astype(np.float32))
    Image.fromarray(rgb[..., 0]).save(tmp_path / "a.jpg", quality=95)
    jpg = d2.read_image(tmp_path / "a.jpg")
    assert jpg.dtype == np.float32 and jpg.shape == (6, 7)
    Image.fromarray(np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)).save(tmp_path / "b16.png")
    assert d2.read_image(tmp_path / "b16.png").max() == 65535
    pixels = np.array([[0, 100], [200, 4095]], dtype=np.uint16)
    _write_dicom(tmp_path / "m.dcm", pixels, slope=2.0, intercept=-10.0, photometric="MONOCHROME2")
    np.testing.assert_array_equal(d2.read_image(tmp_path / "m.dcm"), pixels * 2.0 - 10.0)
    _write_dicom(tmp_path / "inv", pixels, photometric="MONOCHROME1")  # no suffix: sniffed by DICM
    np.testing.assert_array_equal(d2.read_image(tmp_path / "inv"), 4095.0 - pixels)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="bad.png"):
        d2.read_image(tmp_path / "bad.png")


def _write_dicom(path, pixels, slope=1.0, intercept=0.0, photometric="MONOCHROME2"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # digital mammography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_cli_dataset2d(tmp_path):
    from medfeat.cli import cli

    pd.DataFrame({"id_code": [f"a{i}" for i in range(10)], "diagnosis": np.arange(10) % 5}).to_csv(
        tmp_path / "train.csv", index=False)
    res = CliRunner().invoke(cli, ["cohort", "dataset2d", "aptos2019", str(tmp_path), "--out", str(tmp_path / "m.csv")])
    assert res.exit_code == 0, res.output
    assert "kappa" in res.output and len(pd.read_csv(tmp_path / "m.csv")) == 10


def _study_ids(total, held_out):
    """The study's BaseSet.get_validation_ids + halving, restated: Random(42) shuffle of 0..N-1."""
    import random

    ids = list(range(total))
    random.Random(42).shuffle(ids)
    held = ids[:int(total * held_out)]
    return set(ids[int(total * held_out):]), set(held[:len(held) // 2]), set(held[len(held) // 2:])


@pytest.mark.parametrize("dataset,held_out", [("aptos2019", 0.3), ("isic2019", 0.2)])
def test_study_random_split_and_val_ids_json(tmp_path, dataset, held_out):
    import json

    n = 57
    if dataset == "aptos2019":
        pd.DataFrame({"id_code": [f"a{i:03d}" for i in range(n)], "diagnosis": np.arange(n) % 5}).to_csv(
            tmp_path / "train.csv", index=False)
        load = d2.load_aptos2019
    else:
        onehot = np.zeros((n, 9))
        onehot[np.arange(n), np.arange(n) % 8] = 1
        gt = pd.DataFrame(onehot, columns=[*d2.ISIC_CLASSES, "UNK"])
        gt.insert(0, "image", [f"ISIC_{i:07d}" for i in range(n)])
        gt.to_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", index=False)
        load = d2.load_isic2019
    df = load(tmp_path)
    train, val, test = _study_ids(n, held_out)
    for name, ids in (("train", train), ("val", val), ("test", test)):
        assert set(np.flatnonzero(df["split"].to_numpy() == name)) == ids, name
    assert (df["subject"] == df["item_id"]).all()  # the study's split is by image
    # the study's val_ids.json is read back (here: another split, as a list of held-out rows)
    held = list(range(int(n * held_out)))
    (tmp_path / "val_ids.json").write_text(json.dumps(held))
    df = load(tmp_path)
    assert set(np.flatnonzero(df["split"] == "val")) == set(held[:len(held) // 2])
    assert set(np.flatnonzero(df["split"] == "test")) == set(held[len(held) // 2:])
    (tmp_path / "val_ids.json").write_text(json.dumps({"train_split": list(range(5, n)), "val_split": [0, 1]}))
    with pytest.raises(ManifestError, match="val_ids.json"):
        load(tmp_path)


def test_chexpert_study_split_reproduces_loc_slicing(tmp_path):
    """train.csv in an order that sorting by Path permutes: the study's ``.loc`` slices go by
    the original row labels. Reference: the slices restated with list positions."""
    cols = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *d2.CHEXPERT_LABELS]
    rng = np.random.default_rng(0)
    n = 100
    # studies 1..12 of consecutive patients: "study10" sorts before "study2", so sorting permutes
    paths = [f"CheXpert-v1.0-small/train/patient{i // 12 + 1:05d}/study{i % 12 + 1}/view1_frontal.jpg"
             for i in range(n)]
    labels = rng.choice([np.nan, 0.0, 1.0, -1.0], size=(n, 14))
    frame = pd.DataFrame([[p, "F", 50, "Frontal", "AP", *row] for p, row in zip(paths, labels)], columns=cols)
    frame.to_csv(tmp_path / "train.csv", index=False)
    df = d2.load_chexpert(tmp_path)
    order = sorted(range(n), key=lambda i: paths[i])  # original labels in sorted order
    assert order != list(range(n))
    cut = int(0.2 * n) + 15
    p_cut = order.index(cut)
    train, held = order[p_cut:], order[:p_cut + 1]  # .loc is inclusive of its end label
    half = int(len(held) / 2)
    p_half = held.index(half)
    val, test = held[:p_half + 1], held[p_half:]
    split_of = dict(zip(df["item_id"], df["split"]))
    for name, rows in (("train", train), ("val", val), ("test", test)):
        got = {i for i in rows if split_of[paths[i].split("/", 1)[1]] == name}
        expected = set(rows) - (set(test) if name != "test" else set())  # rows listed twice stay in test
        assert got == expected, name
    assert sorted(df.attrs["listed_twice"]) == sorted(paths[i].split("/", 1)[1] for i in (cut, half))
    assert len(df) == n and set(df["split"]) == {"train", "val", "test"}
    assert df.attrs["mean_std"] == [[0.503], [0.292]]


def test_ddsm_raw_lists_and_file_name_labels(tmp_path):
    lists = tmp_path / "ddsm_raw_image_lists"
    lists.mkdir()
    (lists / "train.txt").write_text("normal_01_A_0001_1.LEFT_CC.png\nbenign_02_B_0002_1.RIGHT_MLO.png\n")
    (lists / "val.txt").write_text("cancer_05_C_0010_1.LEFT_MLO.png\n")
    (lists / "test.txt").write_text("normal_07_A_0100_1.RIGHT_CC.png\ncancer_09_C_0200_1.LEFT_CC.png\n")
    df = d2.load_ddsm(tmp_path).set_index("item_id")
    assert df["label"].to_dict() == {"normal_01_A_0001_1.LEFT_CC.png": 0, "benign_02_B_0002_1.RIGHT_MLO.png": 1,
                                     "cancer_05_C_0010_1.LEFT_MLO.png": 1, "normal_07_A_0100_1.RIGHT_CC.png": 0,
                                     "cancer_09_C_0200_1.LEFT_CC.png": 1}
    assert df["split"].tolist() == ["train", "train", "val", "test", "test"]
    assert df["path"].iloc[0] == str(tmp_path / "ddsm_raw" / "normal_01_A_0001_1.LEFT_CC.png")
    three = d2.load_ddsm(tmp_path, n_classes=3)
    assert three["label"].tolist() == [0, 1, 2, 0, 2] and three.attrs["task"] == "multiclass"
    (lists / "val.txt").write_text("calc_05_C_0010_1.LEFT_MLO.png\n")
    with pytest.raises(ManifestError, match="calc_05"):
        d2.load_ddsm(tmp_path)
    with pytest.raises(ManifestError, match="cbis_ddsm"):
        d2.load_ddsm(tmp_path / "nowhere")
