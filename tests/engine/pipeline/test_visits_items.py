"""Cohorts as they come: visit labels, pairings, and extra columns into the store's items table."""
from __future__ import annotations

import shutil

import _tiny_backbone  # noqa: F401
import pandas as pd
import pytest
from _cohort import tiny_cohort

from medfeat.engine.pipeline.config import ExtractConfig
from medfeat.engine.pipeline.extract import extract
from medfeat.engine.store.feature_store import FeatureStore


@pytest.fixture(scope="module")
def adni_like(tmp_path_factory):
    """The tiny cohort relabelled ADNI-style (bl, m12) with a third visit m24, and extra columns."""
    src = tiny_cohort(tmp_path_factory)
    root = tmp_path_factory.mktemp("adni")
    shutil.copytree(src.parent, root / "c")
    df = pd.read_csv(root / "c" / "manifest.csv", dtype=str, keep_default_na=False)
    df["timepoint"] = df["timepoint"].map({"baseline": "bl", "followup": "m12"})
    third = df[df["timepoint"] == "m12"].assign(timepoint="m24")
    df = pd.concat([df, third], ignore_index=True)
    df["age"] = [str(60 + i) for i in range(len(df))]
    df["site"] = ["A", "B", "A"] * (len(df) // 3)
    df["kl_grade"] = ["0", "1", "2"] * (len(df) // 3)
    df.to_csv(root / "c" / "manifest.csv", index=False)
    return root / "c" / "manifest.csv"


def _cfg(manifest, store, model="tiny3d_test", **kw):
    return ExtractConfig.from_settings(str(manifest), str(store), model, ("conv2",), scheduler_kind="sync", random_init=True,
                                       progress=False, **kw)


def test_per_scan_items_carry_labels_and_extra_columns(adni_like, tmp_path):
    r = extract(_cfg(adni_like, tmp_path / "s"))
    assert r.items.done == 9 and not r.failures
    items = FeatureStore.open(tmp_path / "s").items()
    assert set(items["timepoint"]) == {"bl", "m12", "m24"}
    assert {"age", "site", "kl_grade", "label"} <= set(items.columns)
    row = items.set_index("item_id").loc["S0001/m24"]
    assert row["kl_grade"] in {"0", "1", "2"} and row["age"].isdigit()


def test_pairs_from_visit_labels(adni_like, tmp_path):
    r = extract(_cfg(adni_like, tmp_path / "p", model="tinypair_test", pairs="consecutive"))
    assert r.items.done == 6 and not r.failures
    items = FeatureStore.open(tmp_path / "p").items()
    assert sorted(items["item_id"])[:2] == ["S0000/bl->m12", "S0000/m12->m24"]
    assert set(items["timepoint"]) == {"bl+m12", "m12+m24"}
    r = extract(_cfg(adni_like, tmp_path / "p", model="tinypair_test", baseline_visit="bl", followup_visit="m24"))
    assert r.items.done == 3
    # the default pair (baseline/followup) does not exist here: one clear reason per subject
    r = extract(_cfg(adni_like, tmp_path / "q", model="tinypair_test"))
    assert r.items.done == 0 and "--baseline-visit" in r.failures[0]["reason"]


def test_alignment_reference_is_the_named_or_first_visit(adni_like, tmp_path):
    r = extract(_cfg(adni_like, tmp_path / "o", align="oracle"))
    assert r.items.done == 9 and not r.failures  # bl is each subject's first visit
    r = extract(_cfg(adni_like, tmp_path / "o2", align="oracle", baseline_visit="m12"))
    assert r.items.done == 9 and not r.failures
