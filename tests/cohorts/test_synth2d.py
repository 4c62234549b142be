"""Synthetic 2D fundus set: determinism, layout, lesions growing with grade, CLI."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from medfeat.cohorts.synth2d import render_fundus, synth2d_cohort
from medfeat.errors import InputError


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic_and_manifest(tmp_path):
    m1 = synth2d_cohort(tmp_path / "a", images=6, seed=3, size=64)
    synth2d_cohort(tmp_path / "b", images=6, seed=3, size=64)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    df = pd.read_csv(m1)
    assert list(df.columns) == ["item_id", "subject", "path", "label", "split"]
    assert df["label"].between(0, 4).all() and set(df["split"]) <= {"train", "val", "test"}
    from PIL import Image

    im = Image.open(tmp_path / "a" / df["path"][0])
    assert im.size == (64, 64) and im.mode == "RGB"
    synth2d_cohort(tmp_path / "c", images=6, seed=4, size=64)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def _lesion_fraction(img):
    """Share of fundus pixels far from the background colour (red dots, exudates, spots)."""
    f = img.astype(float) / 255
    inside = f.sum(axis=2) > 0.1
    yellow = (f[..., 1] > 0.6) & inside
    dark = (f[..., 0] < 0.45) & inside
    return (yellow | dark).sum() / inside.sum()


def test_findings_grow_with_grade():
    means = [np.mean([_lesion_fraction(render_fundus(g, np.random.default_rng(i), 128)) for i in range(6)])
             for g in range(5)]
    assert means[4] > means[2] > means[0]
    assert all(b >= a * 0.9 for a, b in zip(means, means[1:]))


def test_bad_arguments():
    with pytest.raises(InputError, match="grade"):
        render_fundus(5, np.random.default_rng(0))
    with pytest.raises(InputError, match="size"):
        synth2d_cohort("/nonexistent-never-written", images=2, size=8)


def test_cli(tmp_path):
    from medfeat.cli import cli

    res = CliRunner().invoke(cli, ["cohort", "synth2d", str(tmp_path / "s"), "--images", "3", "--size", "48"])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "s" / "manifest.csv")) == 3
