"""Store-backed loading, sweep, report and the `medfeat probe` CLI on a tiny store."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from medfeat.probes.features import load_features
from medfeat.probes.report import write_report
from medfeat.probes.sweep import read_results, sweep_store

N_SUBJ = 40
FAST = ["--folds", "3", "--seeds", "1", "--n-boot", "50"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A store with baseline/follow-up scans of 40 subjects, two models x two taps, and labels."""
    from medfeat.engine.store.feature_store import ArrayKey, FeatureStore

    root = tmp_path_factory.mktemp("probe_store")
    rng = np.random.default_rng(0)
    label = rng.integers(0, 2, N_SUBJ)
    store = FeatureStore.create(root / "store.zarr", chunk_items=16)
    records = [{"item_id": f"s{i:02d}/{tp}", "subject": f"s{i:02d}", "timepoint": tp, "kind": "scan",
                "source": f"s{i:02d}_{tp}.nii.gz"} for i in range(N_SUBJ) for tp in ("baseline", "followup")]
    idx = store.add_items(records)
    tp_is_follow = np.array([r["timepoint"] == "followup" for r in records])
    y_item = np.repeat(label, 2)
    for model, strength in (("segnet", 4.0), ("regnet", 0.0)):
        for tap, scale in (("encoder.1", 0.3), ("encoder.3", 1.0)):
            key = ArrayKey(model, tap, "none")
            X = rng.normal(size=(len(records), 6)).astype(np.float32)
            X[:, 0] += strength * scale * y_item * tp_is_follow  # progression shows at follow-up
            store.ensure_array(key, 6, {"model": model, "tap": tap})
            store.write(key, idx, X)
    labels = root / "labels.csv"
    pd.DataFrame({"subject": [f"s{i:02d}" for i in range(N_SUBJ)], "progression": label}).to_csv(labels, index=False)
    return root / "store.zarr", labels


def test_load_features_pairs_scans(tiny):
    store, labels = tiny
    fs = load_features(store, "segnet:encoder.3", labels, "progression", pair_mode="concat+diff")
    assert fs.X.shape == (N_SUBJ, 18) and len(set(fs.groups)) == N_SUBJ
    scans = load_features(store, "segnet:encoder.3:none", labels, "progression")
    assert scans.X.shape == (2 * N_SUBJ, 6) and len(set(scans.groups)) == N_SUBJ


def test_sweep_and_report(tiny, tmp_path):
    store, labels = tiny
    configs = sweep_store(store, labels, "progression", pair_modes=("diff",), n_splits=3, seeds=(0,),
                          n_boot=50, probe_params={"Cs": (0.1, 1.0)})
    assert len(configs) == 4
    best = {c["spec"]: c["result"]["metrics"]["auc"]["value"] for c in configs}
    assert best["segnet:encoder.3:none"] > 0.9 and best["regnet:encoder.3:none"] < 0.8
    assert {c["tap_depth"] for c in configs} == {0, 1}
    md = write_report(configs, tmp_path / "rep")
    assert (tmp_path / "rep" / "depth.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "roc.png").stat().st_size > 1000
    text = md.read_text()
    assert "segnet" in text and "depth.png" in text


def test_cli_train_compare_sweep_report(tiny, tmp_path):
    from medfeat.cli import cli

    store, labels = tiny
    run = CliRunner().invoke
    common = ["--store", str(store), "--labels", str(labels), "--target", "progression", *FAST]
    res = run(cli, ["probe", "train", *common, "--features", "segnet:encoder.3", "--pair-mode", "diff",
                    "--out", str(tmp_path / "one.json")])
    assert res.exit_code == 0, res.output
    assert "auc" in res.output and "f1" in res.output and "95% CI" in res.output
    assert read_results(tmp_path / "one.json")[0]["pair_mode"] == "diff"

    res = run(cli, ["probe", "compare", *common, "--features", "segnet:encoder.3", "regnet:encoder.3",
                    "--pair-mode", "diff", "--out", str(tmp_path / "cmp.json")])
    assert res.exit_code == 0, res.output
    assert "delong" in res.output and "paired_bootstrap" in res.output
    assert json.loads((tmp_path / "cmp.json").read_text())["tests"]["delong"]["difference"] > 0

    res = run(cli, ["probe", "sweep", *common, "--model", "segnet", "--pair-mode", "diff",
                    "--out", str(tmp_path / "sw")])
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(tmp_path / "sw" / "results.parquet")
    assert set(table["tap"]) == {"encoder.1", "encoder.3"} and (table["metric"] == "auc").sum() == 2
    assert len(pd.read_csv(tmp_path / "sw" / "results.csv")) == len(table)

    res = run(cli, ["probe", "report", str(tmp_path / "sw"), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "report.md").exists()


def test_cli_unknown_array_is_one_line_error(tiny, capsys):
    from medfeat.cli import main

    store, labels = tiny
    with pytest.raises(SystemExit) as exc:
        main(["probe", "train", "--store", str(store), "--labels", str(labels), "--target", "progression",
              "--features", "nonet:encoder.1", *FAST])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "nonet:encoder.1" in err and err.count("\n") == 1


def test_cli_2d_fixed_split_from_synth2d_manifest(tmp_path):
    """synth2d manifest -> store of (stand-in) image features -> ordinal probe on the given split."""
    from medfeat.cli import cli
    from medfeat.cohorts.synth2d import synth2d_cohort
    from medfeat.engine.store.feature_store import ArrayKey, FeatureStore

    manifest = pd.read_csv(synth2d_cohort(tmp_path / "fundus", images=60, seed=1, size=32))
    store = FeatureStore.create(tmp_path / "f.zarr", chunk_items=32)
    idx = store.add_items([{"item_id": i, "subject": i, "kind": "image"} for i in manifest["item_id"]])
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5)).astype(np.float32)
    X[:, 0] += 2.0 * manifest["label"].to_numpy()  # features that encode the grade
    key = ArrayKey("vit2d", "blocks.11", "none")
    store.ensure_array(key, 5, {"model": "vit2d"})
    store.write(key, idx, X)
    res = CliRunner().invoke(cli, ["probe", "train", "--store", str(tmp_path / "f.zarr"), "--labels",
                                   str(tmp_path / "fundus" / "manifest.csv"), "--target", "label", "--task",
                                   "ordinal", "--features", "vit2d:blocks.11", "--split-column", "split",
                                   "--n-boot", "50"])
    assert res.exit_code == 0, res.output
    assert "fixed split" in res.output and "kappa" in res.output
    kappa = float(res.output.split("kappa")[1].split()[0])
    assert kappa > 0.7


def test_tap_depth_order_from_registry_else_names():
    from medfeat.engine.store.feature_store import ArrayKey
    from medfeat.probes.sweep import tap_depths

    keys = [ArrayKey("unet3d", "bottom"), ArrayKey("unet3d", "down.0"),
            ArrayKey("mynet", "blocks.10"), ArrayKey("mynet", "blocks.9")]
    depth = tap_depths(keys)
    assert depth[("unet3d", "down.0")] < depth[("unet3d", "bottom")]  # forward order, not alphabetical
    assert depth[("mynet", "blocks.9")] < depth[("mynet", "blocks.10")]  # natural sort for unknown models


def test_results_json_is_strict_and_report_shows_missing_ci(tmp_path):
    from medfeat.probes.evaluate import cross_validate_probe
    from medfeat.probes.sweep import config_record, write_results

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    X = (rng.normal(size=(40, 3)) + y[:, None]).astype(np.float32)
    res = cross_validate_probe(X, y, None, n_splits=3, seeds=(0,), n_boot=0, probe_params={"Cs": (1.0,)})
    path = write_results([config_record("m:t", res)], tmp_path / "r.json")[0]

    def no_nan(token):
        raise AssertionError(f"non-strict JSON constant {token}")

    doc = json.loads(path.read_text(), parse_constant=no_nan)
    assert doc["configs"][0]["result"]["metrics"]["auc"]["ci_low"] is None
    text = write_report(read_results(path), tmp_path / "rep").read_text()
    assert "n/a" in text
