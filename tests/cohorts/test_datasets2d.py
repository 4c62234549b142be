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
    df = d2.load_aptos2019(tmp_path, seed=1)
    assert df.attrs["metric"] == "kappa" and df.attrs["task"] == "ordinal"
    assert df["split"].value_counts().to_dict() == {"train": 28, "val": 6, "test": 6}
    assert df["path"][0].endswith("train_images/a000.png") and df["label"].tolist()[:6] == [0, 1, 2, 3, 4, 0]
    assert not df["split"].equals(d2.load_aptos2019(tmp_path, seed=2)["split"])
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
    df = d2.load_isic2019(tmp_path)
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
    df = d2.load_chexpert(tmp_path)
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
