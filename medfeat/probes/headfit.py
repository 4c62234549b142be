"""Trained heads as probes: :class:`HeadProbe`, with scikit-learn's estimator contract.

``fit(X, y, groups=None, X_val=None, y_val=None)`` trains one of the heads of
:mod:`medfeat.probes.heads` with the study's settings
(:class:`medfeat.export.training.loop.TrainSettings`: AdamW 1e-4, weight decay 1e-5,
batch 64, warm-up over 1,000 iterations, clipping 1.0, mixed precision on a GPU) and keeps
the epoch with the best headline metric (AUC, kappa, macro recall) on the validation rows:
``X_val`` when given (a fixed split's ``val`` part), else a random ``val_fraction`` of the
training subjects. ``X``:

* ``mlp``: (n, D) pooled vectors;
* ``attention``, ``transformer``: (n, N, C) tokens, or (n, V, N, C) stored views; training
  draws one of the augmented views 1..V-1 per item and epoch, prediction uses view 0 (the
  eval transform). The first ``prefix_tokens`` tokens (CLS, registers) are dropped, as the
  study feeds its head the patch tokens only.

Runs on the GPU when there is one (``device="auto"``), else on the CPU.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from medfeat.errors import InputError
from medfeat.export.training.loop import Trainer, TrainSettings, cpu_threads_for
from medfeat.probes.heads import AttentiveHead, MLPHead, TransformerHead, deit_base_grid, load_deit
from medfeat.probes.metrics import headline_from_proba

__all__ = ["HEAD_KINDS", "HeadProbe"]

HEAD_KINDS = ("mlp", "attention", "transformer")
_PREDICT_BATCH = 256


class HeadProbe(ClassifierMixin, BaseEstimator):
    """A trained head (``head``: mlp, attention or transformer) on frozen features.

    Parameters
    ----------
    task : binary | multiclass | ordinal | multilabel (inferred from y when None).
    epochs, lr, weight_decay, batch_size, warmup_iters, grad_clip, patience, mixed_precision,
        device : training settings (see :class:`TrainSettings`).
    val_fraction : share of training subjects held out for model selection when no
        ``X_val`` is given.
    grid : (gh, gw) token grid (transformer; default: a square grid of the patch tokens).
    prefix_tokens : leading tokens to drop.
    width, depth, heads : transformer size (the study: 768, 12, 12); ``heads`` also sets the
        attentive head's attention heads.
    queries : learned queries of the attentive head.
    hidden, dropout : MLP head.
    weights : a local DeiT checkpoint (timm layout) initialising the transformer head.
    random_state : seeds the initialisation, batches, view draws and validation subjects.
    """

    def __init__(self, *, head: str = "attention", task: str | None = None, epochs: int = 100,
                 lr: float = 1e-4, weight_decay: float = 1e-5, batch_size: int = 64, warmup_iters: int = 1000,
                 grad_clip: float = 1.0, patience: int | None = None, val_fraction: float = 0.15,
                 device: str = "auto", mixed_precision: bool = True, random_state: int = 0,
                 grid: Sequence[int] | None = None, prefix_tokens: int = 0, width: int = 768, depth: int = 12,
                 heads: int = 12, queries: int = 1, hidden: int = 512, dropout: float = 0.1,
                 weights: str | None = None) -> None:
        self.head = head
        self.task = task
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.warmup_iters = warmup_iters
        self.grad_clip = grad_clip
        self.patience = patience
        self.val_fraction = val_fraction
        self.device = device
        self.mixed_precision = mixed_precision
        self.random_state = random_state
        self.grid = grid
        self.prefix_tokens = prefix_tokens
        self.width = width
        self.depth = depth
        self.heads = heads
        self.queries = queries
        self.hidden = hidden
        self.dropout = dropout
        self.weights = weights

    # -- fitting ----------------------------------------------------------------------------
    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None,
            X_val: np.ndarray | None = None, y_val: np.ndarray | None = None) -> HeadProbe:  # noqa: N803
        """Train on X, y; select the epoch on (X_val, y_val) or on held-out training subjects."""
        X, y = self._check_xy(X), np.asarray(y)
        if len(y) != len(X):
            raise InputError(f"{len(X)} feature rows but {len(y)} labels")
        self.task_ = self.task or ("multilabel" if y.ndim == 2 else "binary" if len(np.unique(y)) == 2
                                   else "multiclass")
        self.multilabel_ = self.task_ == "multilabel"
        self.classes_ = np.arange(y.shape[1]) if self.multilabel_ else np.unique(y)
        if X_val is None:
            train, val = self._split(len(X), groups)
            X_val, y_val, X, y = X[val], y[val], X[train], y[train]
        else:
            X_val, y_val = self._check_xy(X_val), np.asarray(y_val)
        torch.manual_seed(self.random_state)
        model = self._build(X)
        settings = TrainSettings(lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size,
                                 epochs=self.epochs, warmup_iters=self.warmup_iters, grad_clip=self.grad_clip,
                                 patience=self.patience, mixed_precision=self.mixed_precision,
                                 device=self.device, seed=self.random_state)
        trainer = Trainer(model, self._loss, settings)
        Xt, yt = self._inputs(X), self._targets(y)
        Xv = self._inputs(X_val)

        def evaluate(m: nn.Module) -> float:
            if len(y_val) == 0:
                return float("nan")
            return headline_from_proba(self.task_, self._encode_eval(y_val), self._proba(m, Xv, trainer))

        result = trainer.fit(lambda epoch: self._batches(Xt, yt, epoch), evaluate)
        self.model_ = model.cpu().eval()
        self.history_, self.best_epoch_ = result.history, result.best_epoch
        self.device_, self.precision_ = result.device, result.precision
        self.weights_sha256_ = getattr(model, "weights_sha256", None)  # the DeiT checkpoint, if any
        self.item_shape_ = tuple(X.shape[1:]) if self.head == "mlp" else tuple(X.shape[-2:])
        self.n_features_in_ = int(np.prod(self.item_shape_))
        self.val_y_ = y_val if len(y_val) else None
        self.val_proba_ = self._proba(self.model_, Xv, None) if len(y_val) else None
        return self

    def _check_xy(self, X: np.ndarray) -> np.ndarray:
        if self.head not in HEAD_KINDS:
            raise InputError(f"unknown head {self.head!r}; heads: linear, {', '.join(HEAD_KINDS)}")
        X = np.asarray(X)
        want = (2,) if self.head == "mlp" else (3, 4)
        if X.ndim not in want:
            shape = "(items, dim) pooled vectors" if self.head == "mlp" else "(items, [views,] tokens, dim) tokens"
            raise InputError(f"head {self.head} takes {shape}; got features of shape {X.shape}")
        if not np.isfinite(X).all():
            raise InputError("features contain NaN or inf")
        return X

    def _split(self, n: int, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Training and validation rows: whole subjects, about ``val_fraction`` of them."""
        groups = np.arange(n) if groups is None else np.asarray(groups)
        uniq, inv = np.unique(groups, return_inverse=True)
        n_val = int(round(self.val_fraction * len(uniq)))
        if n_val < 1 or n_val >= len(uniq):
            return np.arange(n), np.arange(0)  # too few subjects: no selection, the last epoch
        held = np.zeros(len(uniq), dtype=bool)
        held[np.random.default_rng(self.random_state).permutation(len(uniq))[:n_val]] = True
        return np.flatnonzero(~held[inv]), np.flatnonzero(held[inv])

    def _build(self, X: np.ndarray) -> nn.Module:
        n_out = len(self.classes_)
        if self.head == "mlp":
            x = torch.from_numpy(X.astype(np.float32))
            std = x.std(0)
            return MLPHead(X.shape[1], n_out, hidden=self.hidden, dropout=self.dropout, mean=x.mean(0),
                           std=torch.where(std > 1e-12, std, torch.ones_like(std)))
        n_tokens, dim = X.shape[-2] - self.prefix_tokens, X.shape[-1]
        if n_tokens < 1:
            raise InputError(f"{X.shape[-2]} tokens, {self.prefix_tokens} of them prefix tokens: no patch token left")
        if self.head == "attention":
            return AttentiveHead(dim, n_out, n_tokens, queries=self.queries, heads=self.heads)
        grid = tuple(self.grid) if self.grid is not None else _square(n_tokens)
        width, base = self.width, None
        if self.weights:
            base, width, blocks = deit_base_grid(self.weights)
            if self.depth > blocks:
                raise InputError(f"{self.weights} has {blocks} blocks; the head asks for depth {self.depth}")
        head = TransformerHead(dim, n_out, grid, width=width, depth=self.depth, heads=self.heads, base_grid=base)
        return load_deit(head, self.weights) if self.weights else head

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.multilabel_:
            return nn.functional.binary_cross_entropy_with_logits(logits.float(), target.float())
        return nn.functional.cross_entropy(logits.float(), target)

    def _targets(self, y: np.ndarray) -> torch.Tensor:
        if self.multilabel_:
            return torch.from_numpy((np.asarray(y) > 0).astype(np.float32))
        return torch.from_numpy(self._encode_eval(y).astype(np.int64))

    def _encode_eval(self, y: np.ndarray) -> np.ndarray:
        """Labels as indices into ``classes_`` (multi-label: the 0/1 matrix)."""
        if self.multilabel_:
            return (np.asarray(y) > 0).astype(np.int64)
        index = np.searchsorted(self.classes_, y)
        return np.clip(index, 0, len(self.classes_) - 1)

    def _inputs(self, X: np.ndarray) -> torch.Tensor:
        """Model inputs kept in their stored precision (float16 tokens stay float16)."""
        if self.head != "mlp":
            X = X[..., self.prefix_tokens:, :]
        return torch.from_numpy(np.ascontiguousarray(X))

    def _batches(self, X: torch.Tensor, y: torch.Tensor, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled batches of one epoch (the study drops the last incomplete batch when there
        is a full one); with views, one augmented view per item, drawn per epoch."""
        rng = np.random.default_rng([self.random_state, epoch])
        order = rng.permutation(len(X))
        views = rng.integers(1, X.shape[1], len(X)) if X.ndim == 4 and X.shape[1] > 1 else None
        stop = len(order) - len(order) % self.batch_size if len(order) > self.batch_size else len(order)
        for start in range(0, stop, self.batch_size):
            idx = torch.from_numpy(order[start:start + self.batch_size])
            x = X[idx] if views is None else X[idx, torch.from_numpy(views[idx.numpy()])]
            yield x.float(), y[idx]

    def _proba(self, model: nn.Module, X: torch.Tensor, trainer: Trainer | None) -> np.ndarray:
        """Class (or label) probabilities of view 0, (n, K) float64."""
        device = next(model.parameters()).device
        out = []
        with torch.inference_mode(), cpu_threads_for(model, device) as pin:
            for start in range(0, len(X), _PREDICT_BATCH):
                pin()
                x = X[start:start + _PREDICT_BATCH]
                x = (x[:, 0] if x.ndim == 4 else x).float().to(device)
                with trainer.autocast() if trainer is not None else torch.autocast(device.type, enabled=False):
                    logits = model(x).float()
                out.append((torch.sigmoid(logits) if self.multilabel_ else torch.softmax(logits, 1)).cpu())
        if not out:
            return np.zeros((0, len(self.classes_)))
        return torch.cat(out).numpy().astype(np.float64)

    # -- prediction -----------------------------------------------------------------------
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, K) class probabilities, or (n, L) label probabilities for multi-label."""
        check_is_fitted(self, "model_")
        X = self._check_xy(X)
        shape = tuple(X.shape[1:]) if self.head == "mlp" else tuple(X.shape[-2:])
        if shape != self.item_shape_:
            raise InputError(f"X has items of shape {shape}, the head was fitted on {self.item_shape_}")
        return self._proba(self.model_, self._inputs(X), None)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class labels (n,), or a 0/1 matrix (n, L) at 0.5 for multi-label."""
        p = self.predict_proba(X)
        if self.multilabel_:
            return (p >= 0.5).astype(np.int64)
        return self.classes_[np.argmax(p, axis=1)]


def _square(n: int) -> tuple[int, int]:
    side = int(round(n ** 0.5))
    if side * side != n:
        raise InputError(f"{n} patch tokens are not a square grid: give the grid (gh, gw)")
    return side, side
