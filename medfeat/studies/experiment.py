"""Experiments as files: a YAML grid of cohort × models × taps × preprocessing variants,
run end to end (extraction reusing what the store has, probes, report).

An experiment file::

    name: progression
    kind: progression            # progression (3D pairs) | transfer2d (2D images)
    cohort:                      # or  cohorts: [{name: ..., ...}, ...]  (one run each)
      synth: {subjects: 48, seed: 0, shape: [64, 64, 64]}
      # or  manifest: PATH  |  synth2d: {images: 300}  |  dataset: {name: aptos2019, root: DIR}
    target: label
    models:
      - name: unigradicon
        taps: [A.enc.1, A.enc.3]
        weights: Step_2_final.trch     # looked up in --weights-dir; random init if absent
      - name: unigradicon
        label: unigradicon_trained     # a second entry of one backbone needs its own label
        train: true                    # GradICON on the cohort's scans (train_args: GradiconConfig)
        train_args: {tiny: true}
        input_size: [64, 64, 64]
        taps: [A.enc.3, B.phi.logjac]
        pooling: grid2,B.phi.logjac=stats+grid2   # this model's pooling, per tap
      - name: unigradicon
        label: unigradicon_random
        weights: random                # seeded random weights, on purpose (a control)
        tiny: true
        taps: [A.enc.3]
      - name: unet3d
        taps: [down.1, bottom]
        train: true                    # train on the cohort's masks when no weights are given
    variants:                          # the product; or a list: [none-whole, rigid-crop]
      align: [none, rigid, affine, atlas]
      roi: [whole, crop]
    pair_modes: [diff, concat+diff]    # per-scan models; pair models give one row per pair
    probe: {n_splits: 5, seeds: [0, 1, 2], probe: linear}
    extract: {batch_size: 4, scheduler_kind: threads}
    threads: 2                         # torch threads for the whole run (training included)
    report: {figures: [variants]}      # variants | depth | roc (default: all)
    findings: {registration: [unigradicon_trained], control: [unigradicon_random],
               segmentation: [unet3d]}   # roles of the findings paragraph (default: guessed)

Relative paths in the file are relative to the file; a dataset whose local copy is absent
is skipped with a note. Outputs go to ``OUT/`` (``OUT/<cohort name>/`` with several
cohorts): ``cohort/`` (synthetic or dataset manifests), ``features.zarr`` (and
``features-<label>.zarr`` for entries with a label of their own: a store holds one set of
weights per backbone), ``weights/`` (trained models); and ``OUT/results.json`` (+ CSV /
Parquet; with each configuration's out-of-fold predictions), ``OUT/report/`` (the results
table, the findings of the progression study computed from the numbers, figures).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medfeat.engine.pipeline.config import ExtractConfig, RunRecord
from medfeat.errors import InputError, ManifestError
from medfeat.probes.report import FIGURES, write_report
from medfeat.probes.sweep import sweep_store, write_results
from medfeat.studies.findings import ROLES, default_roles, findings_paragraph, study_effects

Log = Callable[[str], None]


@dataclass
class ModelEntry:
    """One model of the grid."""

    name: str
    taps: list[str]
    weights: str | None = None  # a file name, or "random" (seeded random weights on purpose)
    train: bool = False
    tiny: bool = False
    input_size: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # the name in stores and results (default: ``name``)
    pooling: str | None = None  # this model's pooling (overrides the extract block's)

    @property
    def store_name(self) -> str:
        return self.label or self.name


@dataclass
class Experiment:
    """A parsed experiment file."""

    name: str
    kind: str
    cohorts: list[dict[str, Any]]
    target: str
    models: list[ModelEntry]
    variants: list[tuple[str, str]]  # (alignment, ROI) pairs
    pair_modes: list[str | None]
    probe: dict[str, Any]
    extract: dict[str, Any]
    source: Path
    threads: int | None = None
    report: dict[str, Any] = field(default_factory=dict)
    findings: dict[str, list[str]] | None = None


def load_experiment(path: str | Path) -> Experiment:
    """Parse and check an experiment YAML file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: experiment file not found")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: an experiment file is a mapping")
    for key in ("name", "models"):
        if key not in doc:
            raise InputError(f"{path}: missing key {key!r}")
    if ("cohort" in doc) == ("cohorts" in doc):
        raise InputError(f"{path}: give either cohort (one) or cohorts (a list)")
    cohorts = [dict(doc["cohort"])] if "cohort" in doc else [dict(c) for c in doc["cohorts"]]
    models = []
    for i, m in enumerate(doc["models"]):
        if not isinstance(m, dict) or "name" not in m or "taps" not in m:
            raise InputError(f"{path}: models[{i}] needs a name and taps")
        known = {"name", "taps", "weights", "train", "tiny", "input_size", "label", "pooling"}
        models.append(ModelEntry(m["name"], [str(t) for t in m["taps"]], m.get("weights"), bool(m.get("train")),
                                 bool(m.get("tiny")), m.get("input_size"),
                                 {k: v for k, v in m.items() if k not in known},
                                 str(m["label"]) if m.get("label") else None, m.get("pooling")))
    _check_labels(models, path)
    variants = doc.get("variants", {})
    unknown = set(doc.get("extract", {})) - ExtractConfig.settings()
    if unknown:
        raise InputError(f"{path}: unknown extract setting(s) {', '.join(sorted(unknown))}; "
                         f"settings: {', '.join(sorted(ExtractConfig.settings()))}")
    return Experiment(
        name=str(doc["name"]), kind=str(doc.get("kind", "progression")), cohorts=cohorts,
        target=str(doc.get("target", "label")), models=models,
        variants=_variants(variants, path),
        pair_modes=[None if p in (None, "none") else str(p) for p in doc.get("pair_modes", ["diff"])],
        probe=dict(doc.get("probe", {})), extract=dict(doc.get("extract", {})), source=path,
        threads=int(doc["threads"]) if doc.get("threads") else None, report=dict(doc.get("report", {})),
        findings=_roles(doc.get("findings"), path),
    )


def _check_labels(models: list[ModelEntry], path: Path) -> None:
    """Store names must be unique and usable in a file name."""
    seen: set[str] = set()
    for m in models:
        name = m.store_name
        if name in seen:
            raise InputError(f"{path}: two model entries are called {name!r}; give each a distinct label")
        if not all(ch.isalnum() or ch in "_-." for ch in name):
            raise InputError(f"{path}: label {name!r}: use letters, digits, '_', '-' and '.'")
        seen.add(name)


def _roles(spec: Any, path: Path) -> dict[str, list[str]] | None:
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) - set(ROLES):
        raise InputError(f"{path}: findings maps roles ({', '.join(ROLES)}) to model labels")
    return {r: [str(m) for m in (spec.get(r) or [])] if not isinstance(spec.get(r), str) else [spec[r]]
            for r in ROLES}


def _variants(spec: Any, path: Path) -> list[tuple[str, str]]:
    """``{align: [...], roi: [...]}`` (their product) or a list of ``ALIGN-ROI`` names."""
    if isinstance(spec, dict):
        return [(str(a), str(r)) for a in spec.get("align", ["none"]) for r in spec.get("roi", ["whole"])]
    pairs = [str(v).rsplit("-", 1) for v in spec]
    if not all(len(p) == 2 for p in pairs):
        raise InputError(f"{path}: variants are ALIGN-ROI names such as none-whole or rigid-crop")
    return [(a, r) for a, r in pairs]


def prepare_cohort(exp: Experiment, cohort: dict[str, Any], out: Path, log: Log) -> Path | None:
    """The cohort manifest: given, made from a dataset's local copy, or synthesised into
    ``out/cohort`` (reused when present). None when a dataset's local copy is absent."""
    if "manifest" in cohort:
        manifest = (exp.source.parent / cohort["manifest"]).resolve()
        if not manifest.is_file():
            raise ManifestError(f"{manifest}: manifest not found")
        return manifest
    target = out / "cohort"
    manifest = target / "manifest.csv"
    if manifest.is_file():
        log(f"cohort: reusing {manifest}")
        return manifest
    if "synth" in cohort:
        from medfeat.cohorts.synth import synth_cohort

        params = dict(cohort["synth"])
        if "shape" in params:
            params["shape"] = tuple(params["shape"])
        log(f"cohort: synthesising {params} into {target}")
        return Path(synth_cohort(target, **params))
    if "synth2d" in cohort:
        from medfeat.cohorts.synth2d import synth2d_cohort

        log(f"cohort: synthesising 2D images {cohort['synth2d']} into {target}")
        return Path(synth2d_cohort(target, **cohort["synth2d"]))
    if "dataset" in cohort:
        return _dataset_manifest(exp, dict(cohort["dataset"]), manifest, log)
    raise InputError(f"{exp.source}: a cohort needs one of manifest, synth, synth2d, dataset")


def _dataset_manifest(exp: Experiment, dataset: dict[str, Any], manifest: Path, log: Log) -> Path | None:
    """Write the manifest of a public dataset's local copy with the study's label and split rules."""
    import os

    from medfeat.cohorts.datasets2d import DATASETS

    name = dataset.pop("name", None)
    if name not in DATASETS:
        raise InputError(f"{exp.source}: unknown dataset {name!r}; datasets: {', '.join(DATASETS)}")
    root = Path(os.path.expandvars(str(dataset.pop("root", "")))).expanduser()
    root = root if root.is_absolute() else exp.source.parent / root
    if not root.is_dir():
        log(f"{name}: no local copy at {root}; skipping this cohort")
        return None
    frame = DATASETS[name](root, **dataset)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(manifest, index=False)
    return manifest


def resolve_weights(entry: ModelEntry, weights_dir: Path | None, manifest: Path, out: Path,
                    log: Log) -> str | None:
    """A local weights file for ``entry``: found in ``weights_dir``, trained, or None (random:
    asked for with ``weights: random``, or the named file is absent and nothing is trained)."""
    if entry.weights == "random":
        return None
    if entry.weights:
        for base in (weights_dir, Path.cwd()):
            if base is not None and (base / entry.weights).is_file():
                return str((base / entry.weights).resolve())
        if not entry.train:
            log(f"{entry.store_name}: weights {entry.weights} not found"
                f"{f' in {weights_dir}' if weights_dir else ''}; using seeded random weights")
            return None
    if entry.train:
        path = out / "weights" / f"{entry.store_name}.safetensors"
        if not path.is_file():
            train_model(entry, manifest, path, weights_dir, log)
        return str(path)
    return None


def train_model(entry: ModelEntry, manifest: Path, path: Path, weights_dir: Path | None, log: Log) -> None:
    """Train ``entry`` on the cohort into ``path``: the task UNet on the masks, uniGradICON
    with the GradICON objective (``train_args``: their configs' fields; uniGradICON also
    ``tiny: true`` and ``init: FILE``)."""
    args = dict(entry.extra.get("train_args", {}))
    log(f"{entry.store_name}: training on {manifest} ...")
    if entry.name == "unet3d":
        from medfeat.export.training.train_unet import TrainConfig, train_unet

        report = train_unet(manifest, path, TrainConfig(**args))
        log(f"{entry.store_name}: held-out Dice {_dice_line(report['heldout_dice'])} "
            f"(mean foreground {report['heldout_mean_foreground_dice']:.3f}, {report['seconds']:.0f} s)")
    elif entry.name == "unigradicon":
        from medfeat.export.training.train_gradicon import GradiconConfig, train_gradicon

        tiny, init = bool(args.pop("tiny", False)), args.pop("init", None)
        for key in ("down_channels", "up_channels"):
            if key in args:
                args[key] = tuple(args[key])
        cfg = GradiconConfig.tiny(**args) if tiny else GradiconConfig(**args)
        start = None
        if init is not None:
            start = next((b / init for b in (weights_dir, Path.cwd()) if b is not None and (b / init).is_file()), None)
            if start is None:
                raise InputError(f"{entry.store_name}: init checkpoint {init} not found (in --weights-dir or here)")
        report = train_gradicon(manifest, path, cfg, init=start)
        log(f"{entry.store_name}: {_registration_line(report)} ({report['seconds']['total']:.0f} s)")
    else:
        raise InputError(f"{entry.store_name}: medfeat trains unet3d and unigradicon, not {entry.name}")


def _registration_line(report: dict) -> str:
    held = report["heldout"]
    q = held.get("intra") or held.get("inter")
    text = (f"held-out {held['similarity']} loss {q['similarity_before']:.3f} -> {q['similarity_after']:.3f}, "
            f"folded {100 * q['folded_fraction']:.2f}%, inverse consistency {q['inverse_consistency_vox']:.2f} vox")
    rigid = held.get("rigid_recovery")
    if rigid:
        text += (f", rigid misalignment {rigid['error_mm']:.2f} mm vs identity {rigid['identity_error_mm']:.2f} mm"
                 + ("" if rigid["beats_identity"] else " (does NOT beat the identity)"))
    return text


def _dice_line(dice: dict[str, float | None]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in dice.items() if isinstance(v, (int, float)))


def run_experiment(exp: Experiment, out: str | Path, *, weights_dir: str | Path | None = None,
                   log: Log = print, progress: bool = False) -> dict[str, Any]:
    """Run the whole grid; returns the paths of the (first) manifest and store, results and
    report, the number of failed items and the findings paragraph's lines."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wdir = Path(weights_dir) if weights_dir else None
    configs: list[dict] = []
    paths: dict[str, Any] = {"failed": 0}
    threads = torch.get_num_threads()
    if exp.threads:
        torch.set_num_threads(exp.threads)  # the run's numbers then repeat to the bit
    try:
        for cohort in exp.cohorts:
            name = str(cohort.get("name", "cohort"))
            folder = out if len(exp.cohorts) == 1 else out / name
            manifest = prepare_cohort(exp, cohort, folder, log)
            if manifest is None:
                continue
            found, failed = _run_cohort(exp, cohort, manifest, folder, wdir, log, progress)
            configs += [{**c, "cohort": name} for c in found]
            paths["failed"] += failed
            paths.setdefault("manifest", manifest)
            paths.setdefault("store", folder / "features.zarr")
        if not configs:
            raise InputError(f"{exp.source}: no cohort could be run")
        paths["findings"] = _findings(exp, configs)
    finally:
        torch.set_num_threads(threads)
    paths["results"] = write_results(configs, out / "results.json", tables=True)[0]
    paths["report"] = write_report(configs, out / "report", findings=paths["findings"],
                                   figures=tuple(exp.report.get("figures", FIGURES)))
    return paths


def _findings(exp: Experiment, configs: list[dict]) -> list[str]:
    """The findings paragraph of a progression grid with several variants (empty otherwise)."""
    from medfeat.export.backbones.registry import get_spec

    if exp.kind != "progression" or len({c["variant"] for c in configs}) < 2:
        return []
    kinds: dict[str, str] = {c["model"]: get_spec(c["backbone"]).input_kind for c in configs}
    roles = exp.findings or default_roles(configs, kinds)
    lines: list[str] = []
    for cohort in dict.fromkeys(c["cohort"] for c in configs):
        group = [c for c in configs if c["cohort"] == cohort]
        head = [f"Cohort {cohort}:"] if len(exp.cohorts) > 1 else []
        found = findings_paragraph(group, study_effects(group, roles), roles)
        closing = _closing_note(group, roles) if found.verdicts["registration"] not in ("reproduced", "not tested") else []
        lines += head + found.lines + closing
    return lines


def _closing_note(configs: list[dict], roles: dict[str, list[str]]) -> list[str]:
    """Why finding 1 may fail here: what the registration networks were (their training
    reports, for networks trained here), next to the study's published uniGradICON."""
    notes = []
    for model in roles.get("registration", []):
        weights = next((c["weights"] for c in configs if c["model"] == model), None)
        report = Path(weights).with_suffix(".json") if weights and weights != "random" else None
        if report is None or not report.is_file():
            notes.append(f"{model} uses weights {weights}.")
            continue
        doc = json.loads(report.read_text())
        train, held = doc.get("train", {}), doc.get("heldout", {})
        text = (f"{model} was trained here: stages {doc['training']['stages_trained']}, widths "
                f"{doc['config']['down_channels']}, {train.get('steps')} steps at {doc['config']['input_size'][0]}^3 "
                f"on {len(doc.get('train_subjects', []))} subjects")
        rigid = held.get("rigid_recovery")
        if rigid:
            text += (f" (held-out rigid misalignment recovered to {rigid['error_mm']:.2f} mm vs "
                     f"{rigid['identity_error_mm']:.2f} mm for the identity map)")
        notes.append(text + ".")
    return ["Why: " + " ".join(notes) + " The study's network is the published uniGradICON (four full-size "
            "stages trained on millions of image pairs, OAI knees among them), which these machines do not "
            "have; a cascade trained here in a minute registers only coarsely, so the finding is not tested "
            "at the study's scale."] if notes else []


def store_path(folder: Path, entry: ModelEntry) -> Path:
    """``features.zarr``, or ``features-<label>.zarr`` for an entry with a label of its own."""
    return folder / ("features.zarr" if entry.store_name == entry.name else f"features-{entry.store_name}.zarr")


def _run_cohort(exp: Experiment, cohort: dict[str, Any], manifest: Path, folder: Path,
                wdir: Path | None, log: Log, progress: bool) -> tuple[list[dict], int]:
    """Extract every (model, variant) of the grid into its store and probe every array."""
    from medfeat.engine.pipeline.extract import extract
    from medfeat.export.backbones.registry import get_spec

    target = str(cohort.get("target", exp.target))
    probe = {**exp.probe, **cohort.get("probe", {})}
    configs: list[dict] = []
    failed = 0
    for entry in exp.models:
        spec = get_spec(entry.name)
        weights = resolve_weights(entry, wdir, manifest, folder, log)
        store = store_path(folder, entry)
        settings = {"progress": progress, **exp.extract, **_weights_setting(weights)}
        if entry.pooling:
            settings["pooling"] = entry.pooling
        for align, roi in exp.variants:
            cfg = ExtractConfig.from_settings(
                str(manifest), str(store), entry.name, tuple(entry.taps), weights=weights, align=align,
                roi=roi, tiny=entry.tiny, input_size=tuple(entry.input_size) if entry.input_size else None,
                **settings)
            record = extract(cfg)
            failed += record.items.failed
            log(f"{entry.store_name} {align}-{roi}: {_summary_line(record)}")
        found = []
        for variants, pair_modes in _probe_groups(spec.input_kind, exp):
            specs = [f"{entry.name}:{t}:{a}-{r}" for t in entry.taps for a, r in variants]
            found += sweep_store(store, manifest, target, specs=specs, pair_modes=pair_modes, predictions=True,
                                 log=_relabel_log(log, entry), **probe)
        names = [f"{a}-{r}" for a, r in exp.variants]
        found.sort(key=lambda c: (entry.taps.index(c["tap"]), names.index(c["variant"])))  # the file's order
        configs += [{**c, "model": entry.store_name, "spec": f"{entry.store_name}:{c['tap']}:{c['variant']}",
                     "backbone": entry.name, "weights": weights or "random"} for c in found]
    return configs, failed


def _probe_groups(input_kind: str, exp: Experiment) -> list[tuple[list[tuple[str, str]], list[str | None]]]:
    """(variants, pair modes) to probe: per-scan 3D models combine baseline and follow-up with
    the experiment's pair modes; pair models store one row per subject pair, except with the
    atlas, where each scan is paired with the atlas and the rows combine like per-scan ones."""
    single: list[str | None] = [None]
    if input_kind == "volume3d":
        return [(exp.variants, exp.pair_modes)]
    if input_kind != "pair3d":
        return [(exp.variants, single)]
    atlas = [v for v in exp.variants if v[0] == "atlas"]
    rest = [v for v in exp.variants if v[0] != "atlas"]
    groups = [(rest, single), (atlas, exp.pair_modes)]
    return [g for g in groups if g[0]]


def _weights_setting(weights: str | None) -> dict[str, Any]:
    """Random weights said out loud where the extraction config has a flag for it."""
    return {"random_init": True} if weights is None and "random_init" in ExtractConfig.settings() else {}


def _relabel_log(log: Log, entry: ModelEntry) -> Log:
    if entry.store_name == entry.name:
        return log
    return lambda line: log(entry.store_name + line[len(entry.name):] if line.startswith(entry.name) else line)


def _summary_line(record: RunRecord) -> str:
    items = record.items
    return (f"{items.done} extracted, {items.skipped} already in the store, {items.failed} failed "
            f"({record.wall_s:.1f} s)")
