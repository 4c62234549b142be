"""Probes: scikit-learn contract, separable data, random labels, multi-label, kNN."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from medfeat.errors import InputError
from medfeat.probes.linear import KNNProbe, LinearProbe

CS = (1e-3, 1e-1, 1e1)


def _blobs(n=200, d=12, shift=3.0, seed=0, k=2):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, d)).astype(np.float32)
    X[:, :k] += shift * np.eye(k)[y]
    return X, y


def test_contract_fit_returns_self_and_clone():
    X, y = _blobs()
    p = LinearProbe(Cs=CS, inner_splits=3)
    assert p.fit(X, y) is p
    assert p.C_ in CS and p.n_features_in_ == 12
    assert clone(p).get_params() == p.get_params()
    assert not hasattr(clone(p), "C_")
    assert p.predict_proba(X).shape == (200, 2)
    np.testing.assert_allclose(p.predict_proba(X).sum(axis=1), 1.0, rtol=1e-6)


def _sklearn_exact(X, y, C, **kw):
    """scikit-learn's L2 logistic regression on standardised X, converged far below defaults
    (newton-cg: its lbfgs stops on the objective's relative change before the gradient is small)."""
    import warnings

    Z = StandardScaler().fit(X.astype(np.float64)).transform(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegression(C=C, max_iter=20000, tol=1e-12, solver="newton-cg", **kw).fit(Z, y).predict_proba(Z)


@pytest.mark.parametrize("k, kw", [(2, {}), (4, {}), (2, {"class_weight": "balanced"})],
                         ids=["binary", "multinomial", "balanced"])
def test_fixed_C_equals_sklearn_at_its_optimum(k, kw):
    X, y = _blobs(seed=3, k=k)
    if kw:  # unequal classes, so the weights matter
        keep = (y == 1) | (np.arange(len(y)) % 3 == 0)
        X, y = X[keep], y[keep]
    ref = _sklearn_exact(X, y, 0.5, **kw)
    tight = LinearProbe(Cs=(0.5,), tol=1e-8, **kw).fit(X, y).predict_proba(X)
    np.testing.assert_allclose(tight, ref, atol=5e-5)  # float32 features: about 1e-5 is the floor
    default = LinearProbe(Cs=(0.5,), **kw).fit(X, y).predict_proba(X)
    np.testing.assert_allclose(default, ref, atol=5e-4)  # scikit-learn's own default tol: ~3e-4 here


def test_separable_and_random_labels():
    from sklearn.metrics import roc_auc_score

    X, y = _blobs(n=300, shift=4.0)
    Xt, yt = _blobs(n=300, shift=4.0, seed=9)
    p = LinearProbe(Cs=CS).fit(X, y)
    assert roc_auc_score(yt, p.predict_proba(Xt)[:, 1]) > 0.98
    rng = np.random.default_rng(5)
    noise = LinearProbe(Cs=CS).fit(X, rng.integers(0, 2, 300))
    assert 0.35 < roc_auc_score(rng.integers(0, 2, 300), noise.predict_proba(Xt)[:, 1]) < 0.65


def test_multiclass_and_string_labels():
    X, y = _blobs(n=300, k=4)
    labels = np.array(["a", "b", "c", "d"])[y]
    p = LinearProbe(Cs=CS).fit(X, labels, groups=np.arange(300) // 2)
    assert list(p.classes_) == ["a", "b", "c", "d"]
    assert (p.predict(X) == labels).mean() > 0.9


def test_multilabel_one_model_per_label_and_constant_label():
    X, y = _blobs(n=200, k=3)
    Y = np.eye(3, dtype=int)[y]
    Y[:, 2] = 0  # a label never present: constant prediction, no crash
    p = LinearProbe(Cs=CS).fit(X, Y)
    proba = p.predict_proba(X)
    assert proba.shape == (200, 3) and np.all(proba[:, 2] == 0)
    assert ((proba[:, 0] > 0.5) == Y[:, 0]).mean() > 0.9


def test_bad_input_errors():
    with pytest.raises(InputError, match="NaN"):
        LinearProbe().fit(np.full((4, 2), np.nan), [0, 1, 0, 1])
    with pytest.raises(InputError, match="labels"):
        LinearProbe().fit(np.zeros((4, 2)), [0, 1])


def test_non_finite_rows_are_named_and_huge_finite_rows_pass():
    from medfeat.probes.checks import check_xy

    X = np.zeros((6, 3), dtype=np.float32)
    X[1] = 3e38  # finite values whose sum overflows float32: not an error
    X[2, 0], X[4, 2], X[5] = np.nan, -np.inf, [np.inf, -np.inf, 1.0]
    with pytest.raises(InputError, match=r"rows \[2, 4, 5\]"):
        check_xy(X)
    assert check_xy(X[:2])[0] is not None


def test_non_finite_rows_by_blocks_and_in_float16(monkeypatch):
    import medfeat.engine.store.finite as finite

    monkeypatch.setattr(finite, "_BLOCK_BYTES", 64)  # 4 rows of 4 float32 sums per block
    X = np.zeros((30, 4), dtype=np.float16)
    X[7] = 60000.0  # finite float16 values whose sum overflows float16 (not float32)
    X[5, 1], X[13, 0], X[29, 3] = np.nan, np.inf, -np.inf
    assert finite.non_finite_rows(X).tolist() == [5, 13, 29]


@pytest.mark.parametrize("normalize", ["l2", "standard"])
def test_knn_probe(normalize):
    X, y = _blobs(n=300, shift=4.0)
    p = KNNProbe(n_neighbors=10, normalize=normalize).fit(X[:200], y[:200])
    assert (p.predict(X[200:]) == y[200:]).mean() > 0.9
    loo = p.loo_proba()
    assert loo.shape == (200, 2) and np.all(loo.max(axis=1) < 1.0 + 1e-12)
    # Leave-one-out differs from in-sample prediction (which sees the item itself).
    assert not np.allclose(loo, p.predict_proba(X[:200]))


def test_knn_matches_brute_force_cosine():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 6)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    q = rng.normal(size=(4, 6)).astype(np.float32)
    p = KNNProbe(n_neighbors=5, temperature=0.1, batch_size=3).fit(X, y)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    for i, row in enumerate(q / np.linalg.norm(q, axis=1, keepdims=True)):
        sim = Xn @ row
        nn = np.argsort(-sim)[:5]
        w = np.exp(sim[nn] / 0.1)
        ref = np.bincount(y[nn], weights=w, minlength=3) / w.sum()
        np.testing.assert_allclose(p.predict_proba(q[i:i + 1])[0], ref, rtol=1e-4)


@pytest.mark.parametrize("probe", [LinearProbe(Cs=CS), KNNProbe()], ids=["linear", "knn"])
def test_predict_before_fit_raises_not_fitted(probe):
    from sklearn.exceptions import NotFittedError

    X, _ = _blobs(n=10)
    for method in (probe.predict, probe.predict_proba):
        with pytest.raises(NotFittedError):
            method(X)


@pytest.mark.parametrize("probe", [LinearProbe(Cs=CS), KNNProbe(n_neighbors=5)], ids=["linear", "knn"])
def test_wrong_feature_count_names_the_fitted_count(probe):
    X, y = _blobs(n=60)
    probe.fit(X, y)
    with pytest.raises(InputError, match="X has 5 features, but .* fitted with 12 features"):
        probe.predict(X[:, :5])


@pytest.mark.parametrize("probe, message", [
    (LinearProbe(inner_splits=1), "inner_splits=1"),
    (LinearProbe(Cs=()), "Cs=()"),
    (LinearProbe(Cs=(1.0, -1.0)), "positive"),
    (LinearProbe(tol=0), "tol=0"),
    (KNNProbe(n_neighbors=0), "n_neighbors=0"),
    (KNNProbe(temperature=0.0), "temperature=0.0"),
    (KNNProbe(normalize="l1"), "normalize='l1'"),
])
def test_parameters_are_checked_in_fit(probe, message):
    X, y = _blobs(n=30)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        probe.fit(X, y)


def test_too_few_subjects_to_tune_is_an_error_not_a_guess():
    X, y = _blobs(n=40)
    groups = np.repeat([0, 1], 20)  # two subjects: three inner folds cannot be made
    with pytest.raises(InputError, match="tuning C needs at least inner_splits=3 subjects"):
        LinearProbe(Cs=CS).fit(X, y, groups)
    assert LinearProbe(Cs=(1.0,)).fit(X, y, groups).C_ == 1.0  # a single C needs no tuning


def test_fewer_rows_than_features_preconditioner_equals_the_full_one():
    """With n < d rows the preconditioner comes from a thin SVD; it must act as the d x d
    eigendecomposition's (zero-variance directions scaled by C)."""
    from medfeat.probes.logistic import Preconditioner

    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 50))
    thin = Preconditioner.of(X)
    assert thin.V.shape == (50, 20)
    centred = X - X.mean(axis=0)
    lam, V = np.linalg.eigh(centred.T @ centred / len(X))
    full = Preconditioner(V, np.maximum(lam, 0.0))
    q = rng.normal(size=(51, 6))  # 3 C values x 2 classes
    Cs = np.array([1e-2, 1.0, 1e3])
    np.testing.assert_allclose(thin.apply(q, 20, Cs, 2), full.apply(q, 20, Cs, 2), rtol=1e-7, atol=1e-8)


def test_wide_features_fit_the_same_model_as_scikit_learn():
    """More features than rows (the thin preconditioner's case): the fixed-C optimum is
    scikit-learn's."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40)
    X = rng.normal(size=(40, 300)).astype(np.float32)
    X[:, 0] += 2.0 * y
    ref = _sklearn_exact(X, y, 0.1)
    ours = LinearProbe(Cs=(0.1,), tol=1e-8).fit(X, y).predict_proba(X)
    np.testing.assert_allclose(ours, ref, atol=5e-5)
