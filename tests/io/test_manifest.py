"""Manifest reading, validation errors, transform parsing and baseline/follow-up pairing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfeat.errors import ManifestError
from medfeat.io.manifest import format_transform, pairs, parse_transform, read_manifest

EYE = " ".join(["1", "0", "0", "0", "0", "1", "0", "0", "0", "0", "1", "0", "0", "0", "0", "1"])
SHIFT = "1 0 0 2.5 0 1 0 -1 0 0 1 0 0 0 0 1"


def _write(tmp_path: Path, text: str, name: str = "manifest.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _longitudinal(tmp_path: Path, rows: list[str] | None = None) -> Path:
    rows = rows if rows is not None else [
        f"A,baseline,a0.nii.gz,m/a0.nii.gz,1,{EYE}",
        f"A,followup,a1.nii.gz,m/a1.nii.gz,1,{SHIFT}",
        f"B,baseline,b0.nii.gz,,0,{EYE}",
        "B,Follow-Up,b1.nii.gz,,0,",
    ]
    return _write(tmp_path, "subject,timepoint,path,mask_path,label,transform\n" + "\n".join(rows) + "\n")


def test_minimal_manifest_resolves_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    path = _write(tmp_path / "sub", "subject,path,site\n007,x.nii.gz,Boston\n008,/abs/y.nii,Oslo\n")
    df = read_manifest(path)
    assert list(df["subject"]) == ["007", "008"]  # ids stay strings, zeros kept
    assert df["path"].iloc[0] == str((tmp_path / "sub" / "x.nii.gz").resolve())
    assert df["path"].iloc[1] == "/abs/y.nii"
    assert list(df["site"]) == ["Boston", "Oslo"]


def test_longitudinal_columns_are_parsed(tmp_path):
    df = read_manifest(_longitudinal(tmp_path))
    assert list(df["timepoint"]) == ["baseline", "followup", "baseline", "followup"]
    assert str(df["label"].dtype) == "Int64" and list(df["label"]) == [1, 1, 0, 0]
    np.testing.assert_array_equal(df["transform"].iloc[0], np.eye(4))
    assert df["transform"].iloc[1][0, 3] == 2.5
    assert df["transform"].iloc[3] is None
    assert df["mask_path"].iloc[0].endswith("m/a0.nii.gz") and df["mask_path"].iloc[2] is None


def test_pairs(tmp_path):
    p = pairs(read_manifest(_longitudinal(tmp_path)))
    assert list(p["subject"]) == ["A", "B"]
    assert p["baseline_path"].iloc[0].endswith("a0.nii.gz")
    assert p["followup_path"].iloc[0].endswith("a1.nii.gz")
    assert list(p["label"]) == [1, 0]
    assert p["transform"].iloc[0][1, 3] == -1.0 and p["transform"].iloc[1] is None
    assert p["followup_mask_path"].iloc[0].endswith("m/a1.nii.gz")


def test_pairs_missing_followup(tmp_path):
    df = read_manifest(_longitudinal(tmp_path, [f"A,baseline,a0.nii.gz,,1,{EYE}",
                                                f"A,followup,a1.nii.gz,,1,{SHIFT}",
                                                f"C,baseline,c0.nii.gz,,0,{EYE}"]))
    with pytest.raises(ManifestError, match="subject C: no followup"):
        pairs(df)
    assert list(pairs(df, missing="skip")["subject"]) == ["A"]
    with pytest.raises(ManifestError, match="timepoint"):
        pairs(df.drop(columns="timepoint"))


def test_transform_text_round_trips_exactly():
    m = np.eye(4)
    m[:3, :3] = [[0.1234567890123, -0.99, 0.0], [0.99, 0.1234567890123, 1e-12], [0, 0, 1]]
    m[:3, 3] = [1 / 3, -2 / 7, 5.5]
    np.testing.assert_array_equal(parse_transform(format_transform(m)), m)


@pytest.mark.parametrize("text,match", [
    ("1 0 0 0 0 1 0 0 0 0 1 0 0 0 0", "expected 16 numbers, got 15"),
    ("1 0 0 x 0 1 0 0 0 0 1 0 0 0 0 1", "not a number"),
    ("1 0 0 0 0 1 0 0 0 0 1 0 0 0 1 1", "last row"),
    ("1 0 0 0 0 0 0 0 0 0 1 0 0 0 0 1", "singular"),
    ("1 0 0 nan 0 1 0 0 0 0 1 0 0 0 0 1", "non-finite"),
])
def test_parse_transform_errors(text, match):
    with pytest.raises(ManifestError, match=match):
        parse_transform(text)


def test_missing_empty_and_columnless_manifests(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "none.csv")
    with pytest.raises(ManifestError, match="empty"):
        read_manifest(_write(tmp_path, ""))
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(_write(tmp_path, "subject,path\n"))
    with pytest.raises(ManifestError, match="missing required column.*path"):
        read_manifest(_write(tmp_path, "subject,file\nA,a.nii\n"))


@pytest.mark.parametrize("row,column,match", [
    (f"B,baseline,,,0,{EYE}", "path", "empty path"),
    (f",baseline,b.nii,,0,{EYE}", "subject", "empty subject"),
    (f"B,week/12,b.nii,,0,{EYE}", "timepoint", "may not contain"),
    (f"B,baseline,b.nii,,0.5,{EYE}", "label", "not an integer"),
    ("B,followup,b.nii,,0,1 0 0 1 0 1 0 0 0 0 1", "transform", "expected 16 numbers"),
])
def test_bad_row_names_row_and_column(tmp_path, row, column, match):
    path = _longitudinal(tmp_path, [f"A,baseline,a0.nii.gz,,1,{EYE}", row])
    with pytest.raises(ManifestError, match=match) as info:
        read_manifest(path)
    message = str(info.value)
    assert f"row 2 (line 3), column '{column}'" in message and str(path) in message
    assert "\n" not in message


def test_exact_duplicates_are_dropped_with_a_note_and_conflicts_refused(tmp_path):
    from medfeat.io.manifest import read_manifest_rows

    rows = [f"A,baseline,a0.nii.gz,,1,{EYE}", f"A,followup,a1.nii.gz,,1,{EYE}", f"A,baseline,a0.nii.gz,,1,{EYE}"]
    got = read_manifest_rows(_longitudinal(tmp_path, rows))
    assert got.frame["timepoint"].tolist() == ["baseline", "followup"] and got.bad == []
    assert len(got.notes) == 1 and "line 4 repeats line 2 exactly; dropped" in got.notes[0]
    conflict = _longitudinal(tmp_path, [*rows[:2], f"A,Baseline,other.nii.gz,,1,{EYE}"])
    with pytest.raises(ManifestError, match="lines 2 and 4 are different rows for one scan"):
        read_manifest_rows(conflict)


def test_bad_rows_keep_their_line_numbers_after_dropped_duplicates(tmp_path):
    from medfeat.io.manifest import read_manifest_rows

    rows = [f"A,baseline,a0.nii.gz,,1,{EYE}", f"A,baseline,a0.nii.gz,,1,{EYE}", f"B,baseline,b.nii,,0.5,{EYE}"]
    got = read_manifest_rows(_longitudinal(tmp_path, rows))
    assert len(got.frame) == 1 and got.bad[0][0] == "row 3" and "row 3 (line 4)" in got.bad[0][1]


def test_semicolon_manifest_gets_a_delimiter_hint(tmp_path):
    with pytest.raises(ManifestError, match="separated by semicolons"):
        read_manifest(_write(tmp_path, "subject;path\nA;a.nii\n"))


def test_check_files(tmp_path):
    (tmp_path / "a0.nii.gz").write_bytes(b"")
    path = _write(tmp_path, "subject,path\nA,a0.nii.gz\nB,b0.nii.gz\n")
    assert len(read_manifest(path)) == 2  # missing files are the bulk run's business by default
    with pytest.raises(ManifestError, match="row 2 .*file not found"):
        read_manifest(path, check_files=True)


def test_atlas_transform_is_checked_but_kept_as_text(tmp_path):
    good = _write(tmp_path, f"subject,path,atlas_transform\nA,a.nii,{SHIFT}\nB,b.nii,\n")
    df = read_manifest(good)
    assert df["atlas_transform"].iloc[0] == SHIFT
    np.testing.assert_array_equal(parse_transform(df["atlas_transform"].iloc[0])[:3, 3], [2.5, -1, 0])
    bad = _write(tmp_path, "subject,path,atlas_transform\nA,a.nii,1 2 3\n", "bad.csv")
    with pytest.raises(ManifestError, match="row 1 \\(line 2\\), column 'atlas_transform'"):
        read_manifest(bad)
