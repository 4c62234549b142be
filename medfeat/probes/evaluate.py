"""Cross-validated probe evaluation: out-of-fold predictions, metrics, CIs.

For each seed the outer grouped k-fold produces one out-of-fold (OOF)
prediction per item; metrics are computed on the pooled OOF predictions of
that seed. The reported value is the mean over seeds, and its CI comes from
a bootstrap over subjects in which each replicate draws one set of subjects
and averages the metric over seeds on it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfeat.errors import InputError
from medfeat.probes.linear import make_probe, shared_preconditioner
from medfeat.probes.metrics import METRICS_BY_TASK, best_f1_threshold, prepared_auc, roc_curve_points
from medfeat.probes.splits import repeated_grouped_kfold
from medfeat.probes.stats import CI, PairedResult, bootstrap_cis, delong_test, paired_bootstrap
from medfeat.probes.threads import cores, thread_map

__all__ = ["TASKS", "ProbeResult", "cross_validate_probe", "holdout_probe", "compare_probes", "infer_task",
           "score_predictions"]

TASKS = ("binary", "multiclass", "ordinal", "multilabel")


@dataclass
class ProbeResult:
    """Outcome of :func:`cross_validate_probe`.

    ``scores`` is (n_seeds, n, C): pooled OOF probabilities (C = 1 for binary,
    the positive class). ``preds`` is (n_seeds, n) or (n_seeds, n, L).
    """

    task: str
    probe: str
    classes: list
    n_splits: int
    seeds: list[int]
    y: np.ndarray
    groups: np.ndarray
    scores: np.ndarray
    preds: np.ndarray
    metrics: dict[str, dict] = field(default_factory=dict)
    folds: list[dict] = field(default_factory=list)
    item_ids: list[str] | None = None
    seconds: float = 0.0

    @property
    def headline(self) -> str:
        """The task's main metric name (AUC, kappa, macro recall)."""
        return next(iter(METRICS_BY_TASK[self.task]))

    def to_dict(self, include_predictions: bool = False) -> dict:
        """JSON-ready summary (ROC points included for binary tasks)."""
        out = {
            "task": self.task, "probe": self.probe, "classes": [_py(c) for c in self.classes],
            "n_items": int(len(self.y)), "n_subjects": int(len(np.unique(self.groups))),
            "n_splits": self.n_splits, "seeds": self.seeds, "headline": self.headline,
            "metrics": self.metrics, "folds": self.folds, "seconds": round(self.seconds, 3),
        }
        if self.task == "binary":
            out["roc"] = [dict(zip(("fpr", "tpr"), roc_curve_points(self.y, s[:, 0])))
                          for s in self.scores]
        if include_predictions:
            out["item_ids"] = self.item_ids
            out["y"] = self.y.tolist()
            out["groups"] = [str(g) for g in self.groups]
            out["scores"] = self.scores.tolist()
            out["preds"] = self.preds.tolist()
        return out

    @classmethod
    def from_dict(cls, doc: dict) -> ProbeResult:
        """A result back from :meth:`to_dict` ``(include_predictions=True)`` (for paired comparisons)."""
        missing = [k for k in ("y", "groups", "scores", "preds") if k not in doc]
        if missing:
            raise InputError(f"probe result lacks its predictions ({', '.join(missing)}): "
                             "write it with include_predictions=True")
        return cls(doc["task"], doc["probe"], list(doc["classes"]), int(doc["n_splits"]), list(doc["seeds"]),
                   np.asarray(doc["y"]), np.asarray(doc["groups"], dtype=object), np.asarray(doc["scores"], float),
                   np.asarray(doc["preds"], dtype=np.int64), dict(doc["metrics"]), list(doc.get("folds", [])),
                   doc.get("item_ids"), float(doc.get("seconds", 0.0)))

    def rows(self, **extra: object) -> list[dict]:
        """Tidy rows, one per metric: extra columns first, then the numbers."""
        rows = []
        for name, m in self.metrics.items():
            rows.append({**extra, "task": self.task, "probe": self.probe, "metric": name,
                         "value": m["value"], "ci_low": m["ci_low"], "ci_high": m["ci_high"],
                         "seed_std": m["seed_std"], "n_items": int(len(self.y)),
                         "n_subjects": int(len(np.unique(self.groups)))})
        return rows


def _py(v: object) -> object:
    return v.item() if isinstance(v, np.generic) else v


MAX_INFERRED_CLASSES = 20  # more distinct values than this looks like a measurement, not a class


def infer_task(y: np.ndarray) -> str:
    """The task a target column asks for, strictly: ``multilabel`` for a 2D y, ``binary`` for
    exactly two values, ``multiclass`` for a few classes each seen more than once. A column
    that looks continuous, mixes numbers with text, or has a class seen once (a typo?) is an
    InputError with a hint: pass the task (``--task``) to override, or fix or bin the column."""
    y = np.asarray(y)
    if y.ndim == 2:
        return "multilabel"
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) == 2:
        return "binary"
    if len(classes) < 2:
        raise InputError(f"the target has a single class ({classes.tolist()}): nothing to probe")
    numeric = np.array([_is_number(v) for v in classes])
    if numeric.any() and not numeric.all():
        odd = [str(v) for v in classes[~numeric]][:3]
        raise InputError(f"the target mixes numbers with text {odd}: a typo? fix the labels, or pass --task "
                         "multiclass to treat every value as a class")
    if numeric.all() and (not all(float(v).is_integer() for v in classes) or len(classes) > MAX_INFERRED_CLASSES):
        raise InputError(f"the target has {len(classes)} distinct numeric values: it looks continuous; bin it "
                         "into classes, or pass --task multiclass (or ordinal) to treat each value as a class")
    once = [str(v) for v, c in zip(classes, counts) if c == 1]
    if once:
        raise InputError(f"the target's class(es) {once[:3]} occur once among {len(y)} items: a typo? fix the "
                         "labels, or pass --task multiclass to keep them")
    return "multiclass"


def _is_number(v: object) -> bool:
    try:
        float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def _encode(y: np.ndarray, task: str) -> tuple[np.ndarray, list]:
    y = np.asarray(y)
    if task == "multilabel":
        if y.ndim != 2:
            raise InputError(f"task multilabel needs an (items, labels) target, got shape {y.shape}")
        return (y > 0).astype(np.int64), list(range(y.shape[1]))
    if y.ndim != 1:
        raise InputError(f"task {task} needs one label per item, got shape {y.shape}")
    classes, enc = np.unique(y, return_inverse=True)
    if task == "binary" and len(classes) != 2:
        raise InputError(f"task binary needs 2 classes, found {len(classes)}: {classes[:10].tolist()}")
    if len(classes) < 2:
        raise InputError(f"the target has a single class ({classes.tolist()}): nothing to probe")
    return enc, classes.tolist()


def _fold_predict(probe, X: np.ndarray, y: np.ndarray, groups: np.ndarray, train: np.ndarray,
                  test: np.ndarray, task: str, n_cols: int, val: np.ndarray | None = None,
                  fit_params: dict | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit on train rows (trained heads select their epoch on ``val`` rows when given);
    return test scores (t, C), test predictions and fold info."""
    X_train = X[train]  # one copy of the training rows (a fit and a prediction read them)
    if val is not None:
        probe.fit(X_train, y[train], groups[train], X_val=X[val], y_val=y[val])
    else:
        probe.fit(X_train, y[train], groups[train], **(fit_params or {}))
    score = _full_proba(probe, probe.predict_proba(X[test]), task, n_cols)
    info: dict = {"C": _py_list(getattr(probe, "C_", None))}
    if hasattr(probe, "best_epoch_"):
        info["best_epoch"] = int(probe.best_epoch_)
        info["device"] = probe.device_
        if probe.weights_sha256_:
            info["weights_sha256"] = probe.weights_sha256_
    if task in ("multiclass", "ordinal"):
        return score, np.argmax(score, axis=1), info
    # Thresholds maximise F1 on held-out predictions where the probe has them (a trained
    # head's validation rows, kNN's leave-one-out), else on the training rows' predictions.
    y_thr = y[train]
    if getattr(probe, "val_proba_", None) is not None:
        y_thr, thr_proba = probe.val_y_, probe.val_proba_
    else:
        thr_proba = probe.loo_proba() if hasattr(probe, "loo_proba") else probe.predict_proba(X_train)
    train_score = _full_proba(probe, thr_proba, task, n_cols)
    cols = range(score.shape[1])
    thr = np.array([best_f1_threshold(y_thr if task == "binary" else y_thr[:, j], train_score[:, j])
                    for j in cols])
    info["threshold"] = _py_list(thr)
    pred = (score >= thr).astype(np.int64)
    return score, (pred[:, 0] if task == "binary" else pred), info


def _py_list(v: Any) -> Any:
    if v is None:
        return None
    arr = np.atleast_1d(np.asarray(v, dtype=float))
    vals = [None if not np.isfinite(x) else float(x) for x in arr]
    return vals[0] if np.ndim(v) == 0 else vals


def _full_proba(probe, proba: np.ndarray, task: str, n_cols: int) -> np.ndarray:
    """Probabilities in the global class order; binary keeps only the positive column."""
    if task == "multilabel":
        return proba
    full = np.zeros((len(proba), n_cols))
    full[:, np.asarray(probe.classes_, dtype=np.int64)] = proba
    return full[:, 1:2] if task == "binary" else full


def _metric_stat(task: str, name: str, y: np.ndarray, score: np.ndarray,
                 pred: np.ndarray) -> Callable[[np.ndarray | None], Any]:
    """A metric of one seed's OOF predictions as a function of row weights: (n,) gives a
    float, a block of bootstrap replicates (B, n) gives (B,) values."""
    kind, fn = METRICS_BY_TASK[task][name]
    if name == "auc":
        if task == "binary":
            return prepared_auc(y, score[:, 0])
        cols = [(y == k) if task != "multilabel" else y[:, k] for k in range(score.shape[1])]
        fs = [prepared_auc(c, score[:, k]) for k, c in enumerate(cols) if 0 < np.sum(c) < len(c)]
        def mean_auc(w: np.ndarray | None = None) -> Any:
            # Classes absent from a bootstrap replicate are skipped, as in the point estimate.
            return _finite_mean([f(w) for f in fs])

        return _vectorised(mean_auc)
    arr = score if kind == "score" else pred

    def metric(w: np.ndarray | None = None) -> Any:
        return fn(y, arr, w)

    return _vectorised(metric)


def _vectorised(fn: Callable[[np.ndarray | None], Any]) -> Callable[[np.ndarray | None], Any]:
    """Mark a weighted statistic as taking weight blocks (B, n) too (see medfeat.probes.stats)."""
    fn.vectorised = True  # type: ignore[attr-defined]
    return fn


def _finite_mean(vals: list) -> Any:
    """Mean over the list of (scalar or (B,)) values, skipping non-finite ones; NaN if all are."""
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in vals], axis=-1)
    finite = np.isfinite(stacked)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(finite, stacked, 0.0).sum(axis=-1) / finite.sum(axis=-1)
    return float(out) if out.ndim == 0 else out


def _seed_mean(stats: list[Callable]) -> Callable[[np.ndarray | None], Any]:
    """The mean over seeds of a metric; NaN where any seed's is undefined."""
    def mean(w: np.ndarray | None) -> Any:
        vals = np.stack([np.asarray(f(w), dtype=np.float64) for f in stats])
        out = np.where(np.isfinite(vals).all(axis=0), vals.mean(axis=0), np.nan)
        return float(out) if out.ndim == 0 else out
    return _vectorised(mean)


def cross_validate_probe(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, *,
                         task: str | None = None, n_splits: int = 5, seeds: Sequence[int] = (0, 1, 2),
                         probe: str = "linear", probe_params: dict | None = None, n_boot: int = 1000,
                         ci_method: str = "percentile", level: float = 0.95,
                         item_ids: Sequence[str] | None = None) -> ProbeResult:
    """Repeated grouped k-fold evaluation of a probe on features X (n, dim).

    Parameters
    ----------
    y : (n,) labels, or (n, L) 0/1 matrix for ``task="multilabel"``.
    groups : (n,) subject per item; defaults to one subject per item.
    task : binary | multiclass | ordinal | multilabel (inferred when None).
    n_boot : bootstrap replicates for the CIs (0 skips CIs).
    """
    start = time.perf_counter()
    task = task or infer_task(y)
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    X = np.asarray(X)
    y_enc, classes = _encode(y, task)
    groups = np.arange(len(X)) if groups is None else np.asarray(groups)
    if len(groups) != len(X) or len(y_enc) != len(X):
        raise InputError(f"features ({len(X)}), labels ({len(y_enc)}) and groups ({len(groups)}) differ in length")
    seeds = [int(s) for s in seeds]
    n_cols = len(classes)
    score_cols = 1 if task == "binary" else n_cols
    scores = np.zeros((len(seeds), len(X), score_cols))
    preds = np.zeros((len(seeds), len(X)) + ((n_cols,) if task == "multilabel" else ()), dtype=np.int64)
    folds = []
    fit_params = _shared_fit_params(probe, X)
    # Integer subject codes in the subjects' sorted order: the same folds as the names give,
    # without sorting strings in every fold.
    codes = np.unique(groups, return_inverse=True)[1].reshape(-1)
    splits = list(repeated_grouped_kfold(y_enc, codes, n_splits, seeds))

    def fold(split: Any) -> tuple[np.ndarray, np.ndarray, dict]:
        est = make_probe(probe, **(_with_seed(probe, probe_params, split.seed, task)))
        return _fold_predict(est, X, y_enc, codes, split.train, split.test, task, n_cols, fit_params=fit_params)

    workers = _fold_workers(probe, X, len(splits), n_splits)
    for split, (sc, pr, info) in zip(splits, thread_map(fold, splits, workers)):
        s = seeds.index(split.seed)
        scores[s, split.test], preds[s, split.test] = sc, pr
        folds.append({"seed": split.seed, "fold": split.fold, "n_train": int(len(split.train)),
                      "n_test": int(len(split.test)), **info})
    result = ProbeResult(task, probe, classes, n_splits, seeds, y_enc, groups, scores, preds,
                         folds=folds, item_ids=list(item_ids) if item_ids is not None else None)
    result.metrics = _summarise(result, n_boot, ci_method, level)
    result.seconds = time.perf_counter() - start
    return result


def holdout_probe(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, split: np.ndarray, *,
                  task: str | None = None, probe: str = "linear", probe_params: dict | None = None,
                  n_boot: int = 1000, ci_method: str = "percentile", level: float = 0.95,
                  train_splits: Sequence[str] = ("train", "val"), test_split: str = "test",
                  item_ids: Sequence[str] | None = None) -> ProbeResult:
    """Fit on the given training split(s), evaluate on the test split (2D study protocol).

    C is tuned by grouped inner CV on the training rows; metrics and subject
    bootstrap CIs are on the test rows only. The result has ``n_splits = 0``
    and one seed; its arrays cover the test rows.
    """
    start = time.perf_counter()
    task = task or infer_task(y)
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    X = np.asarray(X)
    y_enc, classes = _encode(y, task)
    groups = np.arange(len(X)) if groups is None else np.asarray(groups)
    split = np.asarray(split).astype(str)
    val = None
    if _is_head(probe):  # trained heads fit on train and choose their epoch on val, as the study
        train_splits = tuple(s for s in train_splits if s != "val")
        val = np.flatnonzero(split == "val") if np.any(split == "val") else None
    train = np.flatnonzero(np.isin(split, list(train_splits)))
    test = np.flatnonzero(split == test_split)
    if len(train) == 0 or len(test) == 0:
        raise InputError(f"split column has {len(train)} training and {len(test)} test items "
                         f"(values: {', '.join(sorted(set(split.tolist())))})")
    leak = set(groups[train].tolist()) & set(groups[test].tolist())
    if leak:
        raise InputError(f"subject {sorted(leak)[0]} is in both the training and the test split")
    est = make_probe(probe, **_with_seed(probe, probe_params, 0, task))
    sc, pr, info = _fold_predict(est, X, y_enc, groups, train, test, task, len(classes), val)
    ids = [item_ids[int(i)] for i in test] if item_ids is not None else None
    result = ProbeResult(task, probe, classes, 0, [0], y_enc[test], groups[test], sc[None], pr[None],
                         folds=[{"seed": 0, "fold": 0, "n_train": int(len(train)), "n_test": int(len(test)), **info}],
                         item_ids=ids)
    result.metrics = _summarise(result, n_boot, ci_method, level)
    result.seconds = time.perf_counter() - start
    return result


#: Feature matrices smaller than this (elements) fit their folds one after another: their
#: solver's time is Python's, which threads holding the GIL in turn only slow down.
PARALLEL_MIN_SIZE = 1_000_000


def _fold_workers(probe: str, X: np.ndarray, n_folds: int, n_splits: int) -> int:
    """Folds fitted at once: one per core for the linear probe (its products are memory-
    bound, and a fold per core also runs the work between products in parallel), bounded so
    the folds' copies of their training rows stay within twice X's memory. Trained heads
    run one at a time (torch uses the cores itself)."""
    if probe != "linear" or X.ndim != 2 or X.size < PARALLEL_MIN_SIZE:
        return 1
    fold_bytes = X.nbytes * (n_splits - 1) / max(n_splits, 1)
    return int(max(1, min(cores(), n_folds, 2 * X.nbytes // max(fold_bytes, 1))))


def _shared_fit_params(probe: str, X: np.ndarray) -> dict:
    """What every fold's fit can share: the linear probe's solver preconditioner."""
    if probe != "linear" or X.ndim != 2:
        return {}
    return {"preconditioner": shared_preconditioner(X)}


def _with_seed(probe: str, params: dict | None, seed: int, task: str | None = None) -> dict:
    params = dict(params or {})
    if probe == "linear":
        params.setdefault("random_state", seed)
    if _is_head(probe):
        params.setdefault("random_state", seed)
        params.setdefault("task", task)
    return params


def _is_head(probe: str) -> bool:
    return probe in ("mlp", "attention", "transformer")


def _summarise(r: ProbeResult, n_boot: int, ci_method: str, level: float) -> dict[str, dict]:
    out = {}
    by_seed = {name: [_metric_stat(r.task, name, r.y, r.scores[i], r.preds[i]) for i in range(len(r.seeds))]
               for name in METRICS_BY_TASK[r.task]}
    stats = {name: _seed_mean(fns) for name, fns in by_seed.items()}
    codes = np.unique(r.groups, return_inverse=True)[1].reshape(-1)
    cis = bootstrap_cis(stats, len(r.y), groups=codes, n_boot=n_boot, level=level, method=ci_method) \
        if n_boot > 0 else {}
    for name, fns in by_seed.items():
        per_seed = [float(fn(None)) for fn in fns]
        ci = cis.get(name) or CI(float(np.mean(per_seed)), float("nan"), float("nan"), level, ci_method, 0)
        out[name] = {"value": float(np.mean(per_seed)), "ci_low": ci.low, "ci_high": ci.high,
                     "level": level, "ci_method": ci_method, "n_boot": n_boot,
                     "seed_std": float(np.std(per_seed)), "per_seed": [float(v) for v in per_seed]}
    return out


def compare_probes(a: ProbeResult, b: ProbeResult, *, metric: str | None = None, n_boot: int = 2000,
                   level: float = 0.95) -> dict[str, dict]:
    """Paired comparison of two results on the same items and splits (A minus B).

    Always a paired subject bootstrap of the metric; for binary tasks also
    DeLong's test on the seed-averaged OOF scores.
    """
    if a.task != b.task or not np.array_equal(a.y, b.y) or not np.array_equal(a.groups, b.groups):
        raise InputError("the two results are not on the same items, labels and subjects")
    metric = metric or a.headline
    if metric not in a.metrics:
        raise InputError(f"metric {metric!r} not computed for task {a.task}: use one of {', '.join(a.metrics)}")
    sa = _seed_mean([_metric_stat(a.task, metric, a.y, a.scores[i], a.preds[i]) for i in range(len(a.seeds))])
    sb = _seed_mean([_metric_stat(b.task, metric, b.y, b.scores[i], b.preds[i]) for i in range(len(b.seeds))])
    out: dict[str, PairedResult] = {
        "paired_bootstrap": paired_bootstrap(sa, sb, len(a.y), groups=a.groups, n_boot=n_boot, level=level)}
    if a.task == "binary" and metric == "auc":
        out["delong"] = delong_test(a.y, a.scores.mean(axis=0)[:, 0], b.scores.mean(axis=0)[:, 0], level)
    return {k: {**v.as_dict(), "metric": metric} for k, v in out.items()}


def score_predictions(y: np.ndarray, proba: np.ndarray, groups: np.ndarray | None = None, *,
                      task: str | None = None, probe: str = "finetune", n_boot: int = 1000,
                      ci_method: str = "percentile", level: float = 0.95,
                      val: tuple[np.ndarray, np.ndarray] | None = None,
                      item_ids: Sequence[str] | None = None) -> ProbeResult:
    """Metrics with subject-bootstrap CIs of a model trained elsewhere (a fine-tuned
    backbone), on its test predictions: the table a probe's fixed split gives.

    Parameters
    ----------
    y : (n,) labels (class indices 0..K-1 in ``proba``'s column order) or (n, L) 0/1.
    proba : (n, K) class probabilities, or (n, L) label probabilities.
    val : (y_val, proba_val) to choose the F1 thresholds of binary and multi-label tasks
        (as the probes do on held-out rows); 0.5 without it.
    """
    start = time.perf_counter()
    y, proba = np.asarray(y), np.asarray(proba, dtype=np.float64)
    task = task or infer_task(y)
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    if len(proba) != len(y):
        raise InputError(f"{len(y)} labels but {len(proba)} predictions")
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    n_cols = proba.shape[1]
    classes = list(range(n_cols))
    y_enc = (y > 0).astype(np.int64) if task == "multilabel" else y.astype(np.int64)
    score = proba[:, 1:2] if task == "binary" else proba
    if task in ("multiclass", "ordinal"):
        pred = np.argmax(score, axis=1)
        info: dict = {}
    else:
        thr = np.full(score.shape[1], 0.5)
        if val is not None:
            yv, pv = np.asarray(val[0]), np.asarray(val[1], dtype=np.float64)
            pv = pv[:, 1:2] if task == "binary" else pv
            thr = np.array([best_f1_threshold(yv if task == "binary" else yv[:, j], pv[:, j])
                            for j in range(score.shape[1])])
        pred = (score >= thr).astype(np.int64)
        pred = pred[:, 0] if task == "binary" else pred
        info = {"threshold": _py_list(thr)}
    result = ProbeResult(task, probe, classes, 0, [0], y_enc, groups, score[None], pred[None],
                         folds=[{"seed": 0, "fold": 0, "n_train": 0, "n_test": int(len(y)), **info}],
                         item_ids=list(item_ids) if item_ids is not None else None)
    result.metrics = _summarise(result, n_boot, ci_method, level)
    result.seconds = time.perf_counter() - start
    return result
