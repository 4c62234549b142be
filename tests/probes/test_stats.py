"""Bootstrap CIs (coverage by simulation), paired tests, DeLong against a direct O(n^2) reference."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from medfeat.probes.metrics import prepared_auc, roc_auc
from medfeat.probes.stats import bootstrap_ci, bootstrap_weights, delong_test, paired_bootstrap


def test_group_weights_resample_whole_groups():
    groups = np.repeat(np.arange(10), 3)
    for block in bootstrap_weights(groups, 30, 50, np.random.default_rng(0)):
        w = block.reshape(len(block), 10, 3)
        assert np.all(w == w[:, :, :1])  # the rows of one group share a weight
        assert np.all(block.sum(axis=1) == 30)


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_auc_ci_covers_true_auc_at_nominal_rate(method):
    # Binormal model: positives ~ N(d, 1), negatives ~ N(0, 1); true AUC = Phi(d / sqrt(2)).
    d, n, sims = 1.0, 120, 200
    true_auc = sps.norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(123)
    covered = 0
    for i in range(sims):
        y = np.r_[np.ones(n // 2), np.zeros(n // 2)].astype(int)
        s = rng.normal(size=n) + d * y
        ci = bootstrap_ci(prepared_auc(y, s), n, n_boot=200, method=method, seed=i)
        covered += ci.low <= true_auc <= ci.high
    assert 0.88 <= covered / sims <= 0.99


def test_group_bootstrap_is_wider_for_clustered_data():
    rng = np.random.default_rng(0)
    subjects = np.repeat(np.arange(60), 4)  # four highly correlated items per subject
    y = rng.integers(0, 2, 60)[subjects]
    s = (rng.normal(size=60) + y[::4])[subjects] + 0.05 * rng.normal(size=240)
    stat = prepared_auc(y, s)
    rows = bootstrap_ci(stat, 240, n_boot=300)
    grouped = bootstrap_ci(stat, 240, groups=subjects, n_boot=300)
    assert (grouped.high - grouped.low) > 1.5 * (rows.high - rows.low)


def _delong_direct(y, a, b):
    """DeLong covariance of two AUCs by explicit pairwise kernels (independent reference)."""
    y = y.astype(bool)
    out = []
    for s in (a, b):
        pos, neg = s[y], s[~y]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        out.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    m, k = y.sum(), (~y).sum()
    v10 = np.cov(np.vstack([out[0][1], out[1][1]]))
    v01 = np.cov(np.vstack([out[0][2], out[1][2]]))
    cov = v10 / m + v01 / k
    diff = out[0][0] - out[1][0]
    se = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return out[0][0], out[1][0], 2 * sps.norm.sf(abs(diff / se))


def test_delong_matches_direct_reference():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 150)
    a = np.round(y + rng.normal(size=150), 1)  # ties on purpose
    b = np.round(0.5 * y + rng.normal(size=150), 1)
    res = delong_test(y, a, b)
    ref_a, ref_b, ref_p = _delong_direct(y, a, b)
    assert res.value_a == pytest.approx(ref_a, abs=1e-12)
    assert res.value_b == pytest.approx(ref_b, abs=1e-12)
    assert res.value_a == pytest.approx(roc_auc(y, a), abs=1e-12)
    assert res.p_value == pytest.approx(ref_p, rel=1e-9)
    assert res.low < res.difference < res.high


def test_paired_bootstrap_agrees_with_delong():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    a = y + rng.normal(size=200)
    b = 0.6 * y + rng.normal(size=200)
    pb = paired_bootstrap(prepared_auc(y, a), prepared_auc(y, b), 200, n_boot=1000)
    dl = delong_test(y, a, b)
    assert pb.difference == pytest.approx(dl.difference, abs=1e-12)
    assert (pb.p_value < 0.05) == (dl.p_value < 0.05)
    same = paired_bootstrap(prepared_auc(y, a), prepared_auc(y, a), 200, n_boot=200)
    assert same.difference == 0 and same.p_value == 1.0


def test_a_block_of_replicates_equals_one_replicate_at_a_time():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 500)
    s = np.round(y + rng.normal(size=500), 1)  # ties
    block = next(bootstrap_weights(np.arange(500) // 3, 500, 40, rng))
    assert block.shape == (40, 500)
    np.testing.assert_allclose(prepared_auc(y, s)(block), [roc_auc(y, s, w) for w in block], rtol=1e-12)


def test_replicates_do_not_depend_on_the_number_of_threads(monkeypatch):
    import medfeat.probes.stats as stats_module

    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, 3000)
    stat = prepared_auc(y, y + rng.normal(size=3000))
    runs = []
    for workers in (1, 2):
        monkeypatch.setattr(stats_module, "cores", lambda w=workers: w)
        runs.append(bootstrap_ci(stat, 3000, groups=np.arange(3000) // 2, n_boot=300, seed=3))
    assert runs[0] == runs[1]
