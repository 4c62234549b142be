"""Fine-tuning a 2D registry backbone with a linear classifier, as the transfer study does.

The model is the registry backbone truncated at ``tap`` (the study's ``drop_cutoff``: the
backbone cut at an intermediate block; default its last tap), pooled as the study reads it
(ViT block taps: the CLS token after the final norm, ``norm-cls``, as its DINOv2 and BLIP
code applies the norm after the cut block; other taps: their default pooling), then one
linear layer. ``unfreeze_from`` (the study's ``unfreeze_cutoff``) trains only the tap
modules from that block to the cut (the final norm stays frozen, as its
``partial_unfreeze``) and the classifier; without it the whole backbone trains. Frozen
BatchNorm layers stay in eval mode.

Images stream from a manifest's paths through the same readers and transforms as
extraction: training images get the study's augmentation drawn from
``view_rng(seed, item, 0, epoch)`` (:mod:`medfeat.kernels.augment2d`), evaluation images
the eval transform. The loop is :class:`~medfeat.export.training.loop.Trainer` (the
study's optimiser settings; resumable: rerun with the same ``out`` to go on after the
last finished epoch). The best epoch's weights are written as ``model.safetensors``.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from medfeat.errors import InputError, UnknownNameError
from medfeat.export.backbones.pooling import split_normed
from medfeat.export.backbones.registry import Backbone, create_backbone, get_spec
from medfeat.export.training.loop import Trainer, TrainResult, TrainSettings, cpu_threads_for
from medfeat.io.readers import read_image
from medfeat.kernels.augment2d import AUGMENTS, eval_view, rule_mean_std, study_view, view_rng

__all__ = ["FinetuneConfig", "FinetuneModel", "ImageItems", "build_model", "finetune", "predict_proba"]


@dataclass(frozen=True)
class FinetuneConfig:
    """What is fine-tuned and how. ``tap``: the cut (default the model's last tap);
    ``unfreeze_from``: the first trained block (default: all of the backbone trains)."""

    model: str
    weights: str | None = None
    tap: str | None = None
    unfreeze_from: str | None = None
    pooling: str | None = None
    tiny: bool = False
    input_size: int | None = None
    augment: str = "study"
    seed: int = 0
    num_workers: int = 0
    settings: TrainSettings = field(default_factory=TrainSettings)
    build_config: dict[str, Any] = field(default_factory=dict)  # architecture overrides (create_backbone config)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


@dataclass
class ImageItems:
    """Images to train or score on: ids, paths, and labels as class indices (n,) or a 0/1
    matrix (n, L)."""

    item_ids: list[str]
    paths: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)


class FinetuneModel(nn.Module):
    """A truncated backbone, its pooled tap, and a linear classifier: (B, 3, s, s) -> logits."""

    def __init__(self, backbone: Backbone, n_out: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.tap = backbone.tap_names[-1]
        self.fc = nn.Linear(backbone.output_dims()[self.tap], n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x)[self.tap])


def _default_pooling(backbone_name: str, tap: str, tiny: bool) -> str | None:
    """The study's reading of a cut: a ViT block's CLS after the final norm."""
    table = {t.name: t for t in get_spec(backbone_name).tap_table(**(get_spec(backbone_name).tiny_config if tiny else {}))}
    spec = table.get(tap)
    if spec is None or spec.kind != "tokens" or tap == "norm":
        return None
    return f"norm-{spec.pooling}"


def build_model(cfg: FinetuneConfig, n_out: int) -> FinetuneModel:
    """The model of ``cfg`` with ``n_out`` outputs, its parameters frozen as asked."""
    spec = get_spec(cfg.model)
    if spec.input_kind != "image2d":
        raise InputError(f"fine-tuning takes 2D image models; {cfg.model} takes {spec.input_kind}")
    tap = cfg.tap or spec.tap_table(**{**(spec.tiny_config if cfg.tiny else {}), **cfg.build_config})[-1].name
    pooling = cfg.pooling or _default_pooling(cfg.model, tap, cfg.tiny)
    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.model, [tap], weights=cfg.weights, pooling=pooling, seed=cfg.seed, tiny=cfg.tiny,
                               config=cfg.build_config or None)
    if split_normed(backbone.poolings[backbone.tap_names[-1]])[0]:
        backbone.trunk.final_norm(torch.zeros(1, 1, backbone.taps[-1].channels))  # the family has one: fail now
    model = FinetuneModel(backbone, n_out)
    if cfg.unfreeze_from is not None:
        freeze_before(model, cfg.unfreeze_from, tap)
    return model


def freeze_before(model: FinetuneModel, first: str, cut: str) -> list[str]:
    """Freeze the backbone but the tap modules from ``first`` to ``cut`` (the final norm tap
    excepted, as the study); returns the trained module names."""
    trunk = model.backbone.trunk
    names = trunk.tap_names()
    if first not in names or names.index(first) > names.index(cut):
        raise UnknownNameError(f"--unfreeze-from {first}: not a tap at or before the cut {cut}; taps: {', '.join(names)}")
    modules = dict(trunk.named_modules())
    trained = [t for t in names[names.index(first): names.index(cut) + 1] if t != "norm"]
    missing = [t for t in trained if t not in modules]
    if missing:
        raise UnknownNameError(f"{model.backbone.spec.name}: tap {missing[0]} is not a module of the model, so it "
                               "cannot be unfrozen alone; fine-tune the whole backbone instead")
    for p in trunk.parameters():
        p.requires_grad = False
    for t in trained:
        for p in modules[t].parameters():
            p.requires_grad = True
    return trained


def train_mode(model: nn.Module) -> None:
    """Train mode, but modules whose parameters are all frozen stay in eval mode (BatchNorm
    statistics of a frozen part do not move, as the study keeps its frozen backbone in eval)."""
    model.train()
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):
            module.eval()


EVAL_CACHE_BYTES = 1 << 30  # eval views kept in memory (per process) up to this size


class _ImageSet(Dataset):
    """Images of ``items`` as (3, s, s) float32: augmented views (``train``) or the eval view.

    Eval views are the same every epoch: they are made once and kept while the set's views
    fit in :data:`EVAL_CACHE_BYTES` (validation sets are scored every epoch).
    """

    def __init__(self, items: ImageItems, size: int, mean: Sequence[float], std: Sequence[float], gray: str,
                 *, train: bool, augment: str, seed: int) -> None:
        self.items, self.size, self.mean, self.std, self.gray = items, size, mean, std, gray
        self.train, self.augment, self.seed, self.epoch = train, augment, seed, 0
        self.augmented = train and augment == "study"
        self.cache: dict[int, torch.Tensor] | None = None
        if not self.augmented and len(items) * 3 * size * size * 4 <= EVAL_CACHE_BYTES:
            self.cache = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        label = torch.as_tensor(self.items.labels[i])
        if self.cache is not None and i in self.cache:
            return self.cache[i], label
        image = read_image(self.items.paths[i])
        if self.augmented:
            rng = view_rng(self.seed, self.items.item_ids[i], 0, self.epoch)
            x = torch.from_numpy(study_view(image, rng, self.size, self.mean, self.std, gray=self.gray))
        else:
            x = torch.from_numpy(eval_view(image, self.size, self.mean, self.std, gray=self.gray))
        if self.cache is not None:
            self.cache[i] = x
        return x, label


class _EpochOrder(Sampler[int]):
    """A permutation of the items drawn from (seed, epoch): the same order on a resume."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())


def _loader(ds: _ImageSet, batch: int, workers: int, sampler: Sampler[int] | None = None,
            drop_last: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      pin_memory=torch.cuda.is_available())


def finetune(cfg: FinetuneConfig, train: ImageItems, val: ImageItems, *, task: str, n_out: int,
             score: Callable[[np.ndarray, np.ndarray], float], out: str | Path,
             on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
             ) -> tuple[FinetuneModel, TrainResult]:
    """Fine-tune on ``train``, keep the epoch with the best ``score(y_val, proba_val)``.

    ``task``: binary, multiclass, ordinal (cross-entropy over ``n_out`` classes) or
    multilabel (binary cross-entropy over ``n_out`` labels). State and the best weights go
    to ``out``; an ``out`` holding a run of this config resumes it.
    """
    if cfg.augment not in AUGMENTS:
        raise UnknownNameError(f"unknown augmentation {cfg.augment!r}; augmentations: {', '.join(AUGMENTS)}")
    if len(train) == 0:
        raise InputError("no training images")
    model = build_model(cfg, n_out)
    spec = model.backbone.spec
    size = int(cfg.input_size or spec.input_size[0])
    mean, std = rule_mean_std(spec.preprocess)
    gray = str(model.backbone.provenance.get("config", {}).get("gray", "repeat"))
    train_ds = _ImageSet(train, size, mean, std, gray, train=True, augment=cfg.augment, seed=cfg.seed)
    order = _EpochOrder(len(train), cfg.seed)
    bs = cfg.settings.batch_size
    train_dl = _loader(train_ds, bs, cfg.num_workers, order, drop_last=len(train) > bs)
    val_dl = _loader(_ImageSet(val, size, mean, std, gray, train=False, augment="none", seed=cfg.seed),
                     bs, cfg.num_workers)
    multilabel = task == "multilabel"

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if multilabel:
            return nn.functional.binary_cross_entropy_with_logits(logits.float(), target.float())
        return nn.functional.cross_entropy(logits.float(), target.long())

    def batches(epoch: int) -> DataLoader:
        train_ds.epoch = order.epoch = epoch
        return train_dl

    trainer = Trainer(model, loss_fn, cfg.settings, state_dir=out, config={"finetune": cfg.to_dict(),
                      "n_train": len(train), "n_val": len(val), "task": task, "n_out": n_out},
                      train_mode=train_mode)

    def evaluate(m: nn.Module) -> float:
        if len(val) == 0:
            return float("nan")
        return float(score(val.labels, _proba(m, val_dl, multilabel, trainer)))

    result = trainer.fit(batches, evaluate, on_epoch_end)
    _save_model(model, Path(out) / "model.safetensors", cfg, result)
    return model, result


def _proba(model: nn.Module, loader: DataLoader, multilabel: bool, trainer: Trainer | None) -> np.ndarray:
    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.inference_mode(), cpu_threads_for(model, device) as pin:
        for x, _ in loader:
            pin()
            with trainer.autocast() if trainer is not None else torch.autocast(device.type, enabled=False):
                logits = model(x.to(device)).float()
            out.append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, 0))


def predict_proba(model: FinetuneModel, items: ImageItems, cfg: FinetuneConfig, *, multilabel: bool) -> np.ndarray:
    """Class (or label) probabilities of ``items`` under the eval transform, (n, n_out)."""
    spec = model.backbone.spec
    size = int(cfg.input_size or spec.input_size[0])
    mean, std = rule_mean_std(spec.preprocess)
    gray = str(model.backbone.provenance.get("config", {}).get("gray", "repeat"))
    ds = _ImageSet(items, size, mean, std, gray, train=False, augment="none", seed=cfg.seed)
    return _proba(model, _loader(ds, cfg.settings.batch_size, cfg.num_workers), multilabel, None)


def _save_model(model: FinetuneModel, path: Path, cfg: FinetuneConfig, result: TrainResult) -> None:
    from safetensors.torch import save_file

    meta = {"medfeat_finetune": json.dumps({"config": cfg.to_dict(), "best_epoch": result.best_epoch,
                                            "best_score": result.best_score, "tap": model.tap,
                                            "pooling": model.backbone.poolings[model.tap]})}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
