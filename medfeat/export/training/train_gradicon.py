"""Train or fine-tune the uniGradICON cascade (registry entry ``unigradicon``) on a cohort.

Self-supervised: the network never sees labels. Each step draws a batch of scan pairs from
the training subjects, intra-subject (a subject's two timepoints, either way round) or
inter-subject (two subjects) with probability ``inter_fraction``, applies uniGradICON's
augmentation and minimises the GradICON objective
(:mod:`medfeat.export.training.gradicon_loss`) with Adam. Scans are read once, clamped to
[min, 99th percentile], scaled to [0, 1] and resized to ``size``^3 (trilinear), the model's
preprocessing. ``stages`` (``A``, ``AB``, ``ABC``, ``ABCD``) says which stages of the cascade
are trained; the later ones keep their initial state, whose zero last convolution makes them
the identity (upstream trains ``ABC`` first, then all four from that result). ``init`` starts
from a checkpoint in any layout the registry reads (e.g. the published ``Step_2_final.trch``).

The result is the whole cascade in medfeat's own layout (``stages.A.downConvs.0.weight``, ...)
as safetensors, whose metadata carry the build config (widths, training grid) so
``create_backbone("unigradicon", ..., weights=out)`` builds it without flags, and a JSON report
beside it: the config, the stages trained, the loss curve and the registration quality on
held-out subjects (:mod:`medfeat.export.training.registration_quality`).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfeat.errors import InputError, ManifestError
from medfeat.export.backbones.models.unigradicon_net import (
    DOWN_CHANNELS,
    STAGE_POOLINGS,
    STAGES,
    UP_CHANNELS,
    UniGradICONNet,
    compose,
    identity_grid,
    warp,
)
from medfeat.export.training.gradicon_loss import SIMILARITIES, augment_pair, gradicon_penalty, make_similarity
from medfeat.export.training.registration_quality import (
    HeldOutPair,
    ScanGeometry,
    pair_quality,
    summarise,
)
from medfeat.export.training.reproducible import reproducible
from medfeat.export.training.train_unet import percentile_normalise, split_subjects

STAGE_CHOICES = ("A", "AB", "ABC", "ABCD")


@dataclass(frozen=True)
class GradiconConfig:
    """Training settings. The defaults are the published model and uniGradICON's optimiser
    (Adam, lr 5e-5, LNCC, lambda 1.5) on the published grid; :meth:`tiny` is a narrow,
    three-level cascade that trains on two idle CPU cores in about a minute at 64^3.

    ``lncc_sigma``: LNCC window in voxels (None: upstream's 5 voxels at 175^3, scaled to ``size``).
    ``threads``: torch threads while training (None: leave as is); fixed, so reruns match.
    """

    size: int = 175
    stages: str = "ABCD"
    steps: int = 2000
    similarity: str = "lncc"
    lmbda: float = 1.5
    lncc_sigma: float | None = None
    lr: float = 5e-5
    batch_size: int = 2
    inter_fraction: float = 0.5
    augment: bool = True
    affine_noise: float = 0.05
    val_fraction: float = 0.25
    max_subjects: int = 0
    max_heldout_pairs: int = 16
    seed: int = 0
    threads: int | None = 2
    device: str = "cpu"
    down_channels: tuple[int, ...] = DOWN_CHANNELS
    up_channels: tuple[int, ...] = UP_CHANNELS
    log_every: int = 20

    @classmethod
    def tiny(cls, **overrides: Any) -> GradiconConfig:
        """The tiny config, with ``overrides``: the registry's tiny cascade (three levels,
        widths 4-16, so ``create_backbone(..., tiny=True)`` with random weights is the same
        network untrained), stages A and B, 120 steps of Adam at 5e-3 on 64^3 grids."""
        from medfeat.export.backbones.registry import get_spec

        tiny = get_spec("unigradicon").tiny_config
        base = cls(size=64, stages="AB", steps=120, lr=5e-3, batch_size=2, max_subjects=32,
                   down_channels=tuple(tiny["down_channels"]), up_channels=tuple(tiny["up_channels"]))
        return replace(base, **overrides)

    @property
    def sigma(self) -> float:
        return self.lncc_sigma if self.lncc_sigma is not None else max(1.0, round(5.0 * self.size / 175.0))

    def check(self) -> None:
        """Raise InputError naming the first bad setting."""
        smallest = 2 ** (max(STAGE_POOLINGS.values()) + len(self.up_channels) - 1) + 1
        if self.size < smallest:
            raise InputError(f"size {self.size}: a {len(self.up_channels)}-level cascade needs >= {smallest} voxels")
        if self.stages not in STAGE_CHOICES:
            raise InputError(f"stages {self.stages!r}: use one of {', '.join(STAGE_CHOICES)}")
        if self.similarity not in SIMILARITIES:
            raise InputError(f"similarity {self.similarity!r}: use one of {', '.join(SIMILARITIES)}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.lmbda < 0:
            raise InputError("steps and batch size must be >= 1, lr > 0 and lambda >= 0")
        if not 0.0 <= self.inter_fraction <= 1.0:
            raise InputError(f"inter_fraction {self.inter_fraction}: expected a value in [0, 1]")


@dataclass
class Cohort:
    """The loaded scans: (N, 1, S, S, S) in [0, 1], and per scan its subject, timepoint,
    recorded transform (or None) and geometry."""

    scans: torch.Tensor
    subjects: list[str]
    timepoints: list[str]
    transforms: list[np.ndarray | None]
    geometry: list[ScanGeometry]


def load_cohort(manifest: str | Path, size: int, max_subjects: int = 0, seed: int = 0) -> Cohort:
    """Every scan of a seeded subset of ``max_subjects`` subjects (0: all), resized to ``size``^3."""
    from medfeat.io.manifest import read_manifest
    from medfeat.io.readers import read_scan

    df = read_manifest(manifest)
    unique = sorted(set(df["subject"].astype(str)))
    if 0 < max_subjects < len(unique):
        keep = {unique[i] for i in np.random.default_rng(seed).permutation(len(unique))[:max_subjects]}
        df = df[df["subject"].astype(str).isin(keep)]
    scans, geometry = [], []
    for path in df["path"]:
        volume = read_scan(path)
        try:
            image = torch.from_numpy(percentile_normalise(np.asarray(volume.data, dtype=np.float32)))[None, None]
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None
        scans.append(F.interpolate(image, size=(size,) * 3, mode="trilinear", align_corners=False)[0])
        geometry.append(ScanGeometry(np.asarray(volume.affine, np.float64), tuple(volume.data.shape)))
    timepoints = [str(t) for t in df["timepoint"]] if "timepoint" in df else [""] * len(df)
    transforms = list(df["transform"]) if "transform" in df else [None] * len(df)
    return Cohort(torch.stack(scans), [str(s) for s in df["subject"]], timepoints,
                  [None if t is None else np.asarray(t, np.float64) for t in transforms], geometry)


def heldout_pairs(cohort: Cohort, held: list[str], limit: int) -> list[HeldOutPair]:
    """Each held-out subject's follow-up registered to its baseline (with ``T`` when both rows
    record it), then inter-subject pairs of consecutive held-out subjects' first scans."""
    by_subject: dict[str, list[int]] = {}
    for i, s in enumerate(cohort.subjects):
        if s in held:
            by_subject.setdefault(s, []).append(i)
    intra, inter = [], []
    for s, rows in sorted(by_subject.items()):
        rows = sorted(rows, key=lambda i: cohort.timepoints[i] != "baseline")  # baseline first
        if len(rows) >= 2:
            base, follow = rows[0], rows[-1]
            t_base, t_follow = cohort.transforms[base], cohort.transforms[follow]
            known = t_follow is not None and t_base is not None and np.allclose(t_base, np.eye(4))
            intra.append(HeldOutPair(s, "intra", follow, base, t_follow if known else None))
    firsts = [rows[0] for _, rows in sorted(by_subject.items())]
    for k in range(len(firsts) - 1):
        inter.append(HeldOutPair(f"{cohort.subjects[firsts[k + 1]]}->{cohort.subjects[firsts[k]]}", "inter",
                                 firsts[k + 1], firsts[k]))
    half = max(1, limit // 2)
    return intra[:half] + inter[: max(0, limit - min(len(intra), half))]


def sample_pairs(train_rows: dict[str, list[int]], batch: int, inter_fraction: float,
                 gen: torch.Generator) -> tuple[list[int], list[int]]:
    """(moving rows, fixed rows) of one batch: intra-subject pairs of subjects with two or more
    scans, or, with probability ``inter_fraction`` (or when none has two), inter-subject pairs."""
    subjects = sorted(train_rows)
    multi = [s for s in subjects if len(train_rows[s]) >= 2]
    moving, fixed = [], []
    for _ in range(batch):
        inter = len(subjects) >= 2 and (not multi or float(torch.rand(1, generator=gen)) < inter_fraction)
        if inter:
            a, b = (subjects[int(i)] for i in torch.randperm(len(subjects), generator=gen)[:2])
            rows_a, rows_b = train_rows[a], train_rows[b]
            moving.append(rows_a[int(torch.randint(len(rows_a), (1,), generator=gen))])
            fixed.append(rows_b[int(torch.randint(len(rows_b), (1,), generator=gen))])
        else:
            rows = train_rows[multi[int(torch.randint(len(multi), (1,), generator=gen))]]
            i, j = (rows[int(k)] for k in torch.randperm(len(rows), generator=gen)[:2])
            moving.append(i)
            fixed.append(j)
    return moving, fixed


def with_checkpoint_widths(cfg: GradiconConfig, init: str | Path | None) -> GradiconConfig:
    """``cfg`` with the widths a medfeat checkpoint records in its metadata (a cascade trained
    here, e.g. stages ABC before ABCD); other checkpoints must fit ``cfg``'s widths."""
    from medfeat.export.backbones.weights import checkpoint_config

    stored = checkpoint_config(init) if init is not None else {}
    if "down_channels" not in stored or "up_channels" not in stored:
        return cfg
    return replace(cfg, down_channels=tuple(int(v) for v in stored["down_channels"]),
                   up_channels=tuple(int(v) for v in stored["up_channels"]))


def build_network(cfg: GradiconConfig, init: str | Path | None) -> UniGradICONNet:
    """The cascade at ``cfg``'s widths, from seeded random init or loaded strictly from ``init``."""
    from medfeat.export.backbones.registry import get_spec
    from medfeat.export.backbones.weights import load_strict, read_checkpoint

    spec = get_spec("unigradicon")
    model = spec.build(down_channels=cfg.down_channels, up_channels=cfg.up_channels)
    if init is not None:
        state = read_checkpoint(init)
        if spec.convert_checkpoint is not None:
            state = spec.convert_checkpoint(state)
        load_strict(model, state, "unigradicon", source=str(init))
    if not isinstance(model, UniGradICONNet):
        raise TypeError("the unigradicon entry no longer builds a UniGradICONNet")
    return model


def train_steps(model: UniGradICONNet, cohort: Cohort, train_rows: dict[str, list[int]], cfg: GradiconConfig,
                progress: Callable[[str], None] | None = None) -> list[dict[str, float]]:
    """Run ``cfg.steps`` Adam steps on the GradICON objective; returns the logged loss means."""
    for name, stage in model.stages.items():
        stage.requires_grad_(name in cfg.stages)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    similarity = make_similarity(cfg.similarity, cfg.sigma)
    gen = torch.Generator().manual_seed(cfg.seed)
    identity = identity_grid((cfg.size,) * 3, device=torch.device(cfg.device))
    log: list[dict[str, float]] = []
    totals = np.zeros(3)
    model.train()
    for step in range(1, cfg.steps + 1):
        rows_m, rows_f = sample_pairs(train_rows, cfg.batch_size, cfg.inter_fraction, gen)
        a, b = cohort.scans[rows_m], cohort.scans[rows_f]
        if cfg.augment:
            a, b = augment_pair(a, b, gen, cfg.affine_noise)
        a, b = a.to(cfg.device), b.to(cfg.device)
        disps_ab = model.displacements(a, b, cfg.stages)
        disps_ba = model.displacements(b, a, cfg.stages)
        sim = (similarity(warp(a, compose(disps_ab, identity), "zeros"), b)
               + similarity(warp(b, compose(disps_ba, identity), "zeros"), a))
        ic = gradicon_penalty(disps_ab, disps_ba, identity, gen)
        loss = sim + cfg.lmbda * ic
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals += [float(loss.detach()), float(sim.detach()), float(ic.detach())]
        if step % cfg.log_every == 0 or step == cfg.steps:
            n = (step - 1) % cfg.log_every + 1
            mean = totals / n
            log.append({"step": step, "loss": round(mean[0], 6), "similarity": round(mean[1], 6),
                        "gradicon": round(mean[2], 6)})
            totals[:] = 0
            if progress is not None:
                progress(f"step {step}/{cfg.steps}: loss {mean[0]:.4f} (similarity {mean[1]:.4f}, "
                         f"gradicon {mean[2]:.4f})")
    model.eval()
    return log


def train_gradicon(manifest: str | Path, out: str | Path, cfg: GradiconConfig | None = None,
                   init: str | Path | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train on the manifest's training subjects, score held-out pairs, write weights + report.

    Returns the report (also written to ``out`` with suffix ``.json``).
    """
    from medfeat.export.backbones.weights import sha256_file

    cfg = with_checkpoint_widths(cfg or GradiconConfig(), init)
    cfg.check()
    t0 = time.perf_counter()
    with reproducible(cfg.threads, cfg.seed, cfg.device):
        cohort = load_cohort(manifest, cfg.size, cfg.max_subjects, cfg.seed)
        train_s, held_s = split_subjects(cohort.subjects, cfg.val_fraction, cfg.seed)
        train_rows: dict[str, list[int]] = {}
        for i, s in enumerate(cohort.subjects):
            if s in set(train_s):
                train_rows.setdefault(s, []).append(i)
        model = build_network(cfg, init).to(cfg.device)
        if progress is not None:
            progress(f"loaded {len(cohort.subjects)} scans at {cfg.size}^3 in {time.perf_counter() - t0:.1f} s; "
                     f"training stages {cfg.stages} on {len(train_s)} subjects")
        log = train_steps(model, cohort, train_rows, cfg, progress)
        t_train = time.perf_counter() - t0
        pairs = heldout_pairs(cohort, held_s, cfg.max_heldout_pairs)
        if not pairs:
            raise ManifestError(f"{manifest}: no held-out pair to score (need two held-out scans)")
        similarity = make_similarity(cfg.similarity, cfg.sigma)
        model.cpu()
        quality = [pair_quality(model, cohort.scans, p, cfg.stages, similarity, cohort.geometry) for p in pairs]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    build_config = {"input_size": [cfg.size] * 3, "down_channels": list(cfg.down_channels),
                    "up_channels": list(cfg.up_channels)}
    training = {"stages_trained": cfg.stages, "stages_identity": "".join(s for s in STAGES if s not in cfg.stages),
                "objective": "GradICON", "similarity": cfg.similarity, "lncc_sigma": cfg.sigma,
                "lambda": cfg.lmbda, "steps": cfg.steps, "seed": cfg.seed,
                "init": str(init) if init else None, "init_sha256": sha256_file(init) if init else None}
    save_weights(model, out, build_config)
    report = {
        "model": "unigradicon", "weights": str(out), "weights_sha256": sha256_file(out),
        "config": build_config, "training": training,
        "train": {k: v for k, v in asdict(cfg).items() if k not in ("down_channels", "up_channels", "size")},
        "loss": log, "train_subjects": train_s, "heldout_subjects": held_s,
        "heldout": summarise(quality, cfg.similarity),
        "extract_with": f"--input-size {cfg.size},{cfg.size},{cfg.size}",
        "seconds": {"train": round(t_train, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    return report


def save_weights(model: torch.nn.Module, out: Path, config: dict[str, Any]) -> None:
    """The state dict in medfeat's layout; a safetensors file carries ``config`` (the build
    config :func:`~medfeat.export.backbones.weights.checkpoint_config` reads) in its metadata,
    other suffixes are written with ``torch.save``. One metadata entry only: safetensors
    writes several in no fixed order, and the file's bytes must repeat with the run."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        from medfeat.export.backbones.weights import CONFIG_METADATA_KEY

        save_file(state, str(out), metadata={CONFIG_METADATA_KEY: json.dumps(config)})
    else:
        torch.save(state, out)


def config_fields() -> set[str]:
    """Names of :class:`GradiconConfig`'s settings (for experiment files)."""
    return {f.name for f in fields(GradiconConfig)}
