"""The transfer study's training loop, shared by token heads and fine-tuning.

Settings (defaults: the study's params.json, joanaapa/Foundation-Medical): AdamW with
lr 1e-4 and weight decay 1e-5 (not on biases and other 1-D parameters, as its
``get_params_groups``), batch 64, 100 epochs, a linear warm-up from 1e-8 to the learning
rate over the first 1,000 iterations then a constant rate (its ``LinearWarmup``), gradient
norm clipped at 1.0, mixed precision on a GPU (bfloat16 autocast where the GPU has it, else
float16 with a gradient scaler; float32 on the CPU), and the epoch with the best
validation score kept. Optionally stops after ``patience`` epochs without improvement.

:class:`Trainer` runs it on any model, loss and batch source. With ``state_dir`` it
writes, after every epoch, ``state.pt`` (model, optimiser, scheduler, scaler, torch RNG,
epoch, history) and, when the epoch is the best so far, ``best.pt`` (model weights), each
to a temporary file renamed into place; a later ``fit`` on the same ``state_dir`` resumes
after the last finished epoch and ends where an uninterrupted run would (bit for bit on
the CPU, given batch sources that depend only on the epoch).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medfeat.errors import InputError

__all__ = ["TrainSettings", "Trainer", "TrainResult", "cpu_threads_for", "param_groups", "resolve_device",
           "warmup_factor"]

ETA_MIN = 1e-8  # the study's LinearWarmup starts here
# Models below this many parameters train on one CPU thread: their small matrix products
# gain nothing from more, and on busy cores each op waits for the other threads (measured
# here: a 20k-parameter head 20-40x slower on two threads than on one while cores are shared).
SMALL_MODEL = 2_000_000


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser and loop settings; defaults are the study's."""

    lr: float = 1e-4
    weight_decay: float = 1e-5
    batch_size: int = 64
    epochs: int = 100
    warmup_iters: int = 1000
    grad_clip: float = 1.0
    patience: int | None = None
    mixed_precision: bool = True
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {"lr": self.lr > 0, "weight_decay": self.weight_decay >= 0, "batch_size": self.batch_size >= 1,
                  "epochs": self.epochs >= 1, "warmup_iters": self.warmup_iters >= 0,
                  "grad_clip": self.grad_clip > 0, "patience": self.patience is None or self.patience >= 1}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"training setting {bad[0]}={getattr(self, bad[0])!r} is out of range")


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did: one record per epoch, the best epoch and its score."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = float("nan")
    resumed_from: int = 0
    device: str = "cpu"
    precision: str = "float32"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; a CUDA device asked for without a
    GPU is refused (no silent CPU run)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} asked for, but this machine has no CUDA GPU")
    return dev


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: decayed (weights) and not (biases, norms, 1-D)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_factor(iteration: int, warmup_iters: int, lr: float) -> float:
    """Learning rate of ``iteration`` as a fraction of ``lr``: linear from 1e-8 over the warm-up."""
    if warmup_iters <= 0 or iteration >= warmup_iters:
        return 1.0
    return (ETA_MIN + (lr - ETA_MIN) * iteration / warmup_iters) / lr


Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class Trainer:
    """Trains ``model`` with ``loss_fn(logits, target)`` on batches from ``batches(epoch)``,
    scoring each epoch with ``evaluate(model) -> float`` (higher is better).

    ``config`` (JSON-able) is stored with the state; resuming with another config is refused.
    ``train_mode(model)`` sets train/eval modes before each epoch (default ``model.train()``;
    fine-tuning keeps frozen parts in eval mode).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 settings: TrainSettings, *, state_dir: str | Path | None = None,
                 config: dict[str, Any] | None = None,
                 train_mode: Callable[[nn.Module], None] | None = None) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.config = json.loads(json.dumps({**(config or {}), "settings": asdict(settings)}, default=str))
        self.train_mode = train_mode or (lambda m: m.train())
        params = param_groups(model, settings.weight_decay)
        if not any(g["params"] for g in params):
            raise InputError("the model has no trainable parameter")
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: warmup_factor(it, settings.warmup_iters, settings.lr))
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self._pin: Callable[[], None] = lambda: None

    def _amp_dtype(self) -> torch.dtype | None:
        if not self.settings.mixed_precision or self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    @property
    def precision(self) -> str:
        return "float32" if self.amp_dtype is None else f"mixed {str(self.amp_dtype).replace('torch.', '')}"

    def autocast(self) -> torch.autocast:
        """The forward's autocast context (a no-op on the CPU)."""
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast("cuda", dtype=self.amp_dtype)

    # -- the loop ------------------------------------------------------------------------
    def fit(self, batches: Batches, evaluate: Callable[[nn.Module], float],
            on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
        """Train up to ``settings.epochs`` epochs (resuming a saved state); leave the model
        holding the best epoch's weights (the last epoch's when no score was finite)."""
        with cpu_threads_for(self.model, self.device) as self._pin:
            return self._fit(batches, evaluate, on_epoch_end)

    def _fit(self, batches: Batches, evaluate: Callable[[nn.Module], float],
             on_epoch_end: Callable[[int, dict[str, float]], None] | None) -> TrainResult:
        torch.manual_seed(self.settings.seed)
        result = TrainResult(device=str(self.device), precision=self.precision)
        best_state: dict[str, torch.Tensor] | None = None
        start, bad = 0, 0
        if self.state_dir is not None and (self.state_dir / "state.pt").is_file():
            start, bad, best_state = self._resume(result)
        for epoch in range(start, self.settings.epochs):
            t0 = time.perf_counter()
            loss = self._train_epoch(batches(epoch))
            self.model.eval()
            score = float(evaluate(self.model))
            record = {"epoch": epoch, "train_loss": loss, "val_score": score,
                      "lr": float(self.optimizer.param_groups[0]["lr"]), "seconds": time.perf_counter() - t0}
            result.history.append(record)
            improved = np.isfinite(score) and not score <= result.best_score  # NaN best: any finite wins
            if improved:
                result.best_epoch, result.best_score, bad = epoch, score, 0
                best_state = _cpu_copy(self.model.state_dict())
            else:
                bad += 1
            if self.state_dir is not None:
                self._save(epoch, bad, result, best_state if improved else None)
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
            if self.settings.patience is not None and bad >= self.settings.patience:
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        self.model.eval()
        return result

    def _train_epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        self.train_mode(self.model)
        trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        total, count = 0.0, 0
        for x, y in batches:
            self._pin()  # loading the batch may have reset the thread count (see cpu_threads_for)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.autocast():
                loss = self.loss_fn(self.model(x), y)
            if not torch.isfinite(loss):
                raise InputError(f"training diverged: the loss is {float(loss)} (lower the learning rate?)")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(trainable, self.settings.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
        return total / max(count, 1)

    # -- checkpoints -----------------------------------------------------------------------
    def _save(self, epoch: int, bad: int, result: TrainResult, best_state: dict[str, torch.Tensor] | None) -> None:
        """Best weights (when improved) to ``best-eNNNN.pt``, then the state naming that file,
        then older best files removed: a kill anywhere leaves a state whose best file exists."""
        folder = self.state_dir
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        best_file = f"best-e{result.best_epoch:04d}.pt" if result.best_epoch >= 0 else ""
        if best_state is not None:
            _atomic_save({"model": best_state, "epoch": epoch}, folder / best_file)
        _atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                      "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                      "rng": torch.get_rng_state(), "epoch": epoch, "bad": bad, "history": result.history,
                      "best_epoch": result.best_epoch, "best_score": result.best_score, "best_file": best_file,
                      "config": self.config}, folder / "state.pt")
        for old in folder.glob("best-e*.pt"):
            if old.name != best_file:
                old.unlink()

    def _resume(self, result: TrainResult) -> tuple[int, int, dict[str, torch.Tensor] | None]:
        folder = self.state_dir
        if folder is None:
            return 0, 0, None
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        old, new = _comparable(state.get("config", {})), _comparable(self.config)
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise InputError(f"{folder}: holds a training run of another configuration "
                             f"({', '.join(diff[:3])} differ); use another output folder")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        result.history = list(state["history"])
        result.best_epoch, result.best_score = int(state["best_epoch"]), float(state["best_score"])
        result.resumed_from = int(state["epoch"]) + 1
        best = None
        if state.get("best_file"):
            best = torch.load(folder / state["best_file"], map_location="cpu", weights_only=True)["model"]
        return result.resumed_from, int(state["bad"]), best


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config without what may change between a run and its resumption (more epochs)."""
    settings = {k: v for k, v in dict(config.get("settings", {})).items() if k not in ("epochs", "patience")}
    return {**config, "settings": settings}


@contextlib.contextmanager
def cpu_threads_for(model: nn.Module, device: torch.device) -> Iterator[Callable[[], None]]:
    """One torch thread while a small model runs on the CPU (see :data:`SMALL_MODEL`).

    Yields ``pin()``, to call before each step: the first parallel Numba kernel of a
    process (the image transforms) starts an OpenMP runtime that resets the thread count
    torch shares with it, which would change the count, and so the float rounding of
    reductions, part-way through a run (and make a resumed run differ from an unbroken one).
    """
    small = device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL
    before = torch.get_num_threads()

    def pin() -> None:
        if small and torch.get_num_threads() != 1:
            torch.set_num_threads(1)

    pin()
    try:
        yield pin
    finally:
        if small:
            torch.set_num_threads(before)


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
