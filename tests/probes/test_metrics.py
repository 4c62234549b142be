"""Metrics against scikit-learn on fixed inputs, with and without sample weights."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from medfeat.probes import metrics as m

RNG = np.random.default_rng(42)
N = 300
Y_BIN = RNG.integers(0, 2, N)
# Rounded scores so that ties occur and their half-credit is exercised.
SCORE = np.round(Y_BIN * 0.8 + RNG.normal(size=N), 1)
W = RNG.integers(0, 4, N).astype(float)
Y_MC = RNG.integers(0, 5, N)
PRED_MC = np.where(RNG.random(N) < 0.6, Y_MC, RNG.integers(0, 5, N))


@pytest.mark.parametrize("w", [None, W])
def test_auc_matches_sklearn(w):
    assert m.roc_auc(Y_BIN, SCORE, w) == pytest.approx(skm.roc_auc_score(Y_BIN, SCORE, sample_weight=w), abs=1e-12)
    assert m.prepared_auc(Y_BIN, SCORE)(w) == pytest.approx(m.roc_auc(Y_BIN, SCORE, w), abs=1e-15)


def test_auc_undefined_for_one_class():
    assert np.isnan(m.roc_auc(np.ones(5), np.arange(5.0)))


@pytest.mark.parametrize("w", [None, W])
def test_confusion_metrics_match_sklearn(w):
    assert m.accuracy(Y_MC, PRED_MC, w) == pytest.approx(skm.accuracy_score(Y_MC, PRED_MC, sample_weight=w))
    assert m.balanced_accuracy(Y_MC, PRED_MC, None, w) == pytest.approx(
        skm.balanced_accuracy_score(Y_MC, PRED_MC, sample_weight=w))
    assert m.quadratic_weighted_kappa(Y_MC, PRED_MC, None, w) == pytest.approx(
        skm.cohen_kappa_score(Y_MC, PRED_MC, weights="quadratic", sample_weight=w))
    assert m.macro_f1(Y_MC, PRED_MC, None, w) == pytest.approx(
        skm.f1_score(Y_MC, PRED_MC, average="macro", sample_weight=w))
    pred = (SCORE > 0.3).astype(int)
    assert m.f1_binary(Y_BIN, pred, w) == pytest.approx(skm.f1_score(Y_BIN, pred, sample_weight=w))


def test_multiclass_and_multilabel_auc_match_sklearn():
    proba = RNG.dirichlet(np.ones(5), N) + np.eye(5)[Y_MC] * 0.3
    proba /= proba.sum(axis=1, keepdims=True)
    assert m.multiclass_auc(Y_MC, proba) == pytest.approx(
        skm.roc_auc_score(Y_MC, proba, multi_class="ovr", average="macro"))
    Y = RNG.integers(0, 2, (N, 3))
    S = Y + RNG.normal(size=(N, 3))
    assert m.mean_label_auc(Y, S) == pytest.approx(skm.roc_auc_score(Y, S, average="macro"))


def test_best_f1_threshold_is_the_best_cut():
    t = m.best_f1_threshold(Y_BIN, SCORE)
    best = m.f1_binary(Y_BIN, SCORE >= t)
    for cut in np.unique(SCORE):  # brute force over every cut
        assert m.f1_binary(Y_BIN, SCORE >= cut) <= best + 1e-12
    precision, recall, _ = skm.precision_recall_curve(Y_BIN, SCORE)
    f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    assert best == pytest.approx(f1)


def test_roc_points_match_sklearn():
    fpr, tpr = m.roc_curve_points(Y_BIN, SCORE, max_points=10_000)
    ref_fpr, ref_tpr, _ = skm.roc_curve(Y_BIN, SCORE, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-5)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-5)


def test_every_metric_takes_a_block_of_replicate_weights():
    """A (B, n) weight matrix gives the B values that B single weight vectors give."""
    from medfeat.probes.metrics import METRICS_BY_TASK

    rng = np.random.default_rng(7)
    n, k = 80, 4
    W = rng.poisson(1.0, size=(6, n)).astype(float)
    W[0, :] = 0.0
    W[0, :3] = 1.0  # a replicate where most classes are absent
    data = {
        "binary": (rng.integers(0, 2, n), rng.random((n, 1)), None),
        "multiclass": (rng.integers(0, k, n), rng.dirichlet(np.ones(k), n), None),
        "ordinal": (rng.integers(0, k, n), rng.dirichlet(np.ones(k), n), None),
        "multilabel": (rng.integers(0, 2, (n, 3)), rng.random((n, 3)), None),
    }
    for task, metrics in METRICS_BY_TASK.items():
        y, score, _ = data[task]
        pred = (score >= 0.5).astype(int) if task == "multilabel" else (
            (score[:, 0] >= 0.5).astype(int) if task == "binary" else score.argmax(1))
        for name, (kind, fn) in metrics.items():
            arr = score[:, 0] if (task == "binary" and kind == "score") else (score if kind == "score" else pred)
            block = np.asarray(fn(y, arr, W))
            single = np.array([fn(y, arr, w) for w in W])
            np.testing.assert_allclose(block, single, rtol=1e-12, equal_nan=True, err_msg=f"{task} {name}")
