"""cross_validate_probe end to end on in-memory arrays; pairs and label joins."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medfeat.errors import InputError, ManifestError
from medfeat.probes.evaluate import compare_probes, cross_validate_probe
from medfeat.probes.features import features_from_arrays
from medfeat.probes.pairs import combine_pair, pair_scans, timepoint_rank

FAST = dict(n_splits=3, seeds=(0, 1), n_boot=100, probe_params={"Cs": (1e-2, 1.0)})


def _data(n_subj=60, per=2, signal=2.0, seed=0, d=8):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_subj), per)
    y = rng.integers(0, 2, n_subj)[groups]
    X = rng.normal(size=(len(groups), d)).astype(np.float32)
    X[:, 0] += signal * y
    return X, y, groups


def test_separable_binary_has_auc_near_one_and_ci():
    X, y, g = _data(signal=6.0)
    r = cross_validate_probe(X, y, g, **FAST)
    auc = r.metrics["auc"]
    assert auc["value"] > 0.97 and auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    assert set(r.metrics) == {"auc", "f1", "accuracy", "balanced_accuracy"}
    assert r.metrics["f1"]["value"] > 0.9
    assert all(f["threshold"] is not None for f in r.folds)
    d = r.to_dict()
    assert d["headline"] == "auc" and len(d["roc"]) == 2 and d["n_subjects"] == 60


def test_folds_in_parallel_give_what_folds_in_turn_give(monkeypatch):
    import medfeat.probes.evaluate as evaluate_module

    X, y, g = _data(signal=1.0, d=12)
    names = np.array([f"subject-{v:03d}" for v in g], dtype=object)  # names that sort as the numbers do
    runs = []
    for workers in (1, 2):
        monkeypatch.setattr(evaluate_module, "cores", lambda w=workers: w)
        runs.append(cross_validate_probe(X, y, names, n_splits=3, seeds=(0, 1), n_boot=50))
    np.testing.assert_allclose(runs[0].scores, runs[1].scores, rtol=1e-6, atol=1e-7)
    assert [f["C"] for f in runs[0].folds] == [f["C"] for f in runs[1].folds]
    assert runs[0].metrics == runs[1].metrics
    numbered = cross_validate_probe(X, y, g, n_splits=3, seeds=(0, 1), n_boot=50)
    np.testing.assert_allclose(numbered.scores, runs[1].scores, rtol=1e-6, atol=1e-7)  # the same folds as names


def test_random_labels_have_auc_near_half():
    X, y, g = _data(signal=0.0, n_subj=100, seed=4)
    r = cross_validate_probe(X, y, g, **FAST)
    assert 0.38 < r.metrics["auc"]["value"] < 0.62
    assert r.metrics["auc"]["ci_low"] < 0.5 + 0.05


def test_out_of_fold_predictions_do_not_see_subject():
    # A subject-identity feature lets a leaky split look perfect; grouped CV must not.
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(50), 4)
    y = rng.integers(0, 2, 50)[groups]
    X = np.eye(50, dtype=np.float32)[groups] + 0.01 * rng.normal(size=(200, 50)).astype(np.float32)
    r = cross_validate_probe(X, y, groups, probe="knn", n_splits=5, seeds=(0,), n_boot=0)
    assert r.metrics["auc"]["value"] < 0.75


@pytest.mark.parametrize("task,headline", [("ordinal", "kappa"), ("multiclass", "balanced_accuracy")])
def test_multiclass_tasks(task, headline):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 200)
    X = rng.normal(size=(200, 6)).astype(np.float32)
    X[:, 0] += 2 * y
    r = cross_validate_probe(X, y, None, task=task, **FAST)
    assert r.headline == headline and r.metrics[headline]["value"] > 0.6
    assert r.scores.shape == (2, 200, 4)


def test_multilabel_and_knn():
    rng = np.random.default_rng(3)
    Y = rng.integers(0, 2, (150, 3))
    X = rng.normal(size=(150, 6)).astype(np.float32)
    X[:, :3] += 3 * Y
    for probe in ("linear", "knn"):
        r = cross_validate_probe(X, Y, None, task="multilabel", probe=probe, n_splits=3, seeds=(0,), n_boot=50,
                                 probe_params={"Cs": (1.0,)} if probe == "linear" else None)
        assert r.metrics["auc"]["value"] > 0.9, probe


def test_compare_finds_the_better_feature_set():
    X, y, g = _data(signal=3.0, n_subj=80)
    noise = np.random.default_rng(7).normal(size=X.shape).astype(np.float32)
    a = cross_validate_probe(X, y, g, **FAST)
    b = cross_validate_probe(noise, y, g, **FAST)
    tests = compare_probes(a, b, n_boot=300)
    assert tests["paired_bootstrap"]["difference"] > 0.3 and tests["paired_bootstrap"]["p_value"] < 0.01
    assert tests["delong"]["p_value"] < 0.001


def test_bad_task_inputs():
    X, y, g = _data()
    with pytest.raises(InputError, match="2 classes"):
        cross_validate_probe(X, np.arange(len(y)) % 3, g, task="binary", **FAST)
    with pytest.raises(InputError, match="unknown task"):
        cross_validate_probe(X, y, g, task="regression", **FAST)


def test_pair_modes():
    b = np.array([[1.0, 2.0]], np.float32)
    f = np.array([[4.0, 0.0]], np.float32)
    np.testing.assert_array_equal(combine_pair(b, f, "concat"), [[1, 2, 4, 0]])
    np.testing.assert_array_equal(combine_pair(b, f, "diff"), [[3, -2]])
    np.testing.assert_array_equal(combine_pair(b, f, "absdiff"), [[3, 2]])
    np.testing.assert_array_equal(combine_pair(b, f, "concat+diff"), [[1, 2, 4, 0, 3, -2]])
    assert timepoint_rank("baseline") < timepoint_rank("followup") and timepoint_rank("m12") == 12


def _items():
    return pd.DataFrame({"item_id": ["s1/baseline", "s1/followup", "s2/followup", "s2/baseline", "s3/baseline"],
                         "subject": ["s1", "s1", "s2", "s2", "s3"],
                         "timepoint": ["baseline", "followup", "followup", "baseline", "baseline"],
                         "kind": ["scan"] * 5, "source": [""] * 5})


def test_pair_scans_matches_by_subject_and_skips_singletons():
    items = _items()
    X = np.arange(10, dtype=np.float32).reshape(5, 2)
    Xp, subjects, ids = pair_scans(items, items["item_id"].tolist(), X, "diff")
    assert subjects.tolist() == ["s1", "s2"]
    assert ids == ["s1/baseline->s1/followup", "s2/baseline->s2/followup"]
    np.testing.assert_array_equal(Xp, [[2, 2], [-2, -2]])


def test_label_joins():
    items = _items()
    X = np.arange(10, dtype=np.float32).reshape(5, 2)
    ids = items["item_id"].tolist()
    per_subject = pd.DataFrame({"subject": ["s1", "s2", "s3"], "label": [1, 0, 1]})
    fs = features_from_arrays(items, ids, X, per_subject, "label", pair_mode="concat")
    assert fs.y.tolist() == [1, 0] and fs.X.shape == (2, 4) and fs.groups.tolist() == ["s1", "s2"]
    per_scan = pd.DataFrame({"subject": ["s1", "s1", "s2"], "timepoint": ["baseline", "followup", "baseline"],
                             "grade": [0, 2, 1]})
    fs = features_from_arrays(items, ids, X, per_scan, "grade")
    assert fs.item_ids == ["s1/baseline", "s1/followup", "s2/baseline"] and fs.y.tolist() == [0, 2, 1]
    by_id = pd.DataFrame({"item_id": ids, "A": [1, 0, 0, 1, 1], "B": [0, 0, 1, 1, 0]})
    fs = features_from_arrays(items, ids, X, by_id, "A,B")
    assert fs.y.shape == (5, 2)
    bad = pd.DataFrame({"subject": ["s1", "s1"], "label": [0, 1]})
    with pytest.raises(ManifestError, match="s1"):
        features_from_arrays(items, ids, X, bad, "label", pair_mode="diff")
    with pytest.raises(ManifestError, match="nope"):
        features_from_arrays(items, ids, X, per_subject, "nope")


def test_holdout_probe_uses_the_given_split():
    from medfeat.probes.evaluate import holdout_probe

    X, y, g = _data(signal=5.0, n_subj=60, per=1)
    split = np.array(["train"] * 40 + ["val"] * 5 + ["test"] * 15)
    r = holdout_probe(X, y, g, split, n_boot=100, probe_params={"Cs": (0.1, 1.0)})
    assert len(r.y) == 15 and r.n_splits == 0 and r.folds[0]["n_train"] == 45
    assert r.metrics["auc"]["value"] > 0.9
    with pytest.raises(InputError, match="subject 0"):  # test item 59 shares subject 0 with a training item
        holdout_probe(X, y, np.r_[g[:59], g[0]], split, n_boot=0)


def test_read_labels_normalises_timepoints(tmp_path):
    from medfeat.probes.features import read_labels

    (tmp_path / "l.csv").write_text("subject,timepoint,label\ns1,Baseline,0\ns1,follow-up,1\ns2,m12,1\n")
    assert read_labels(tmp_path / "l.csv")["timepoint"].tolist() == ["baseline", "followup", "m12"]
    with pytest.raises(ManifestError, match="not found"):
        read_labels(tmp_path / "missing.csv")


@pytest.mark.parametrize("y, message", [
    (np.array([0, 1] * 20 + [2]), "occur once"),  # a typo in a 0/1 column
    (np.array(["0", "1"] * 20 + ["O"]), "mixes numbers with text"),
    (np.linspace(0.0, 3.0, 41), "looks continuous"),
    (np.arange(41) % 30, "looks continuous"),
])
def test_task_inference_is_strict(y, message):
    from medfeat.probes.evaluate import infer_task

    with pytest.raises(InputError, match=message):
        infer_task(y)


def test_task_inference_accepts_real_tasks():
    from medfeat.probes.evaluate import infer_task

    assert infer_task(np.array([0, 1, 1, 0])) == "binary"
    assert infer_task(np.array([0, 1, 2, 3, 4] * 4)) == "multiclass"
    assert infer_task(np.zeros((4, 3))) == "multilabel"
