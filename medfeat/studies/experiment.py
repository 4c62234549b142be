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
    plugins: [my_models.py]            # files or modules that register backbones (optional)
    threads: 2                         # torch threads for the whole run (training included)
    report: {figures: [variants]}      # variants | depth | roc (default: all)
    findings: {registration: [unigradicon_trained], control: [unigradicon_random],
               segmentation: [unet3d]}   # roles of the findings paragraph (default: guessed)

A model may be generic (``timm:resnet50``, ``hf:DIR``, ``onnx:FILE``, ``torchscript:FILE``,
``module:PKG.MOD:FACTORY``) with ``input_kind``, ``input_size``, ``intensity`` and build
``args`` (a mapping) where the model does not declare them.

A model may set ``pooling`` (one pooling for its taps, e.g. ``token1``). A 2D cohort may set
``normalize``: ``model`` (the default: each model's own intensity rule), ``dataset`` (the
dataset's own mean/std, as the transfer study does; :data:`~medfeat.cohorts.study_splits.STUDY_MEAN_STD`)
or ``{mean: [...], std: [...]}``; it is recorded in each array's provenance.

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
    pooling: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    input_kind: str | None = None
    intensity: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # the name in stores and results (default: the store key)

    def settings(self) -> dict[str, Any]:
        """The model's extract settings beyond name and taps."""
        return {"tiny": self.tiny, "input_size": tuple(self.input_size) if self.input_size else None,
                "input_kind": self.input_kind, "intensity": self.intensity, "model_args": self.args}

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
    # the transfer study's training settings (studies/transfer.py), kind transfer2d only
    transfer: dict[str, Any] = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)
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
        known = {"name", "taps", "weights", "train", "tiny", "input_size", "pooling", "input_kind", "intensity", "args",
                 "label"}
        if not isinstance(m.get("args", {}), dict):
            raise InputError(f"{path}: models[{i}].args is a mapping of build arguments")
        models.append(ModelEntry(str(m["name"]), [str(t) for t in m["taps"]], m.get("weights"), bool(m.get("train")),
                                 bool(m.get("tiny")), m.get("input_size"), m.get("pooling"),
                                 {k: v for k, v in m.items() if k not in known},
                                 m.get("input_kind"), m.get("intensity"), dict(m.get("args", {})),
                                 str(m["label"]) if m.get("label") else None))
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
        transfer=_transfer_block(doc, path),
        plugins=[_plugin_path(str(p), path) for p in doc.get("plugins", []) or []],
        threads=int(doc["threads"]) if doc.get("threads") else None, report=dict(doc.get("report", {})),
        findings=_roles(doc.get("findings"), path),
    )


def _transfer_block(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    if "transfer" not in doc:
        return {}
    if doc.get("kind") != "transfer2d":
        raise InputError(f"{path}: a transfer block needs kind: transfer2d")
    from medfeat.studies.transfer import check_block

    return check_block(dict(doc["transfer"] or {}), path)


def _plugin_path(spec: str, path: Path) -> str:
    """A plugin file relative to the experiment file, or a module name as it is."""
    if spec.endswith(".py") and not Path(spec).is_absolute():
        return str((path.parent / spec).resolve())
    return spec


def _check_labels(models: list[ModelEntry], path: Path) -> None:
    """Store names must be unique, and labels usable in a file name."""
    seen: set[str] = set()
    for m in models:
        name = m.store_name
        if name in seen:
            raise InputError(f"{path}: two model entries are called {name!r}; give each a distinct label")
        if m.label and not all(ch.isalnum() or ch in "_-." for ch in name):
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


def cohort_mean_std(exp: Experiment, cohort: dict[str, Any]) -> Any:
    """The cohort's ``normalize`` setting as a ``mean_std`` extract setting (None: the models' rules)."""
    choice = cohort.get("normalize", "model")
    if choice == "model":
        return None
    if choice == "dataset":
        from medfeat.cohorts.study_splits import STUDY_MEAN_STD

        name = dict(cohort.get("dataset") or {}).get("name")
        if name not in STUDY_MEAN_STD:
            raise InputError(f"{exp.source}: cohort {cohort.get('name')!r}: normalize: dataset needs a dataset with "
                             f"statistics of its own ({', '.join(STUDY_MEAN_STD)}); give {{mean, std}} or model")
        return STUDY_MEAN_STD[name]
    if isinstance(choice, dict):
        return choice
    raise InputError(f"{exp.source}: cohort {cohort.get('name')!r}: normalize is model, dataset or {{mean, std}}, "
                     f"not {choice!r}")


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
                   log: Log = print, progress: bool = False, plugins: list[str] | None = None) -> dict[str, Any]:
    """Run the whole grid; returns the paths of the (first) manifest and store, results and
    report, the number of failed items and the findings paragraph's lines.

    ``plugins`` add to the experiment's own ``plugins:``."""
    import torch

    from medfeat.export.backbones.plugins import load_plugins

    exp.plugins = [*exp.plugins, *(plugins or [])]
    load_plugins(exp.plugins)

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
    if exp.kind != "progression" or len({c["variant"] for c in configs}) < 2:
        return []
    kinds: dict[str, str] = {c["model"]: c["input_kind"] for c in configs}
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
    from medfeat.export.backbones.generic import ModelInputs

    settings = {"progress": progress, "plugins": tuple(exp.plugins), **exp.extract}
    mean_std = cohort_mean_std(exp, cohort)
    if mean_std is not None:
        settings["mean_std"] = mean_std
    for entry in exp.models:
        spec = get_spec(entry.name, ModelInputs(entry.input_kind, tuple(entry.input_size) if entry.input_size else None,
                                                entry.intensity), entry.args or None)
        weights = resolve_weights(entry, wdir, manifest, folder, log)
        name = entry.label or spec.store_key
        store = store_path(folder, entry)
        for align, roi in exp.variants:
            cfg = ExtractConfig.from_settings(
                str(manifest), str(store), entry.name, tuple(entry.taps), weights=weights, align=align,
                roi=roi, random_init=weights is None, **entry.settings(),
                **{**settings, **({"pooling": entry.pooling} if entry.pooling else {})})
            record = extract(cfg)
            failed += record.items.remain_failed
            log(f"{name} {align}-{roi}{' (RANDOM weights)' if weights is None else ''}: {_summary_line(record)}")
        found = []
        for variants, pair_modes in _probe_groups(spec.input_kind, exp):
            specs = [f"{spec.store_key}:{t}:{a}-{r}" for t in entry.taps for a, r in variants]
            found += sweep_store(store, manifest, target, specs=specs, pair_modes=pair_modes, predictions=True,
                                 log=_relabel_log(log, spec.store_key, name), **probe)
        names = [f"{a}-{r}" for a, r in exp.variants]
        found.sort(key=lambda c: (entry.taps.index(c["tap"]), names.index(c["variant"])))  # the file's order
        configs += [{**c, "model": name, "spec": f"{name}:{c['tap']}:{c['variant']}",
                     "backbone": entry.name, "input_kind": spec.input_kind, "weights": weights or "random"}
                    for c in found]
        if exp.transfer:
            from medfeat.studies.transfer import run_settings

            configs += run_settings(exp.transfer, entry, manifest=manifest, store=store, folder=folder,
                                    target=target, weights=weights, weights_dir=wdir, extract_settings=settings,
                                    probe=probe, log=log)
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


def _relabel_log(log: Log, key: str, name: str) -> Log:
    """Log lines that start with the store key ``key`` start with the entry's ``name`` instead."""
    if key == name:
        return log
    return lambda line: log(name + line[len(key):] if line.startswith(key) else line)


def _summary_line(record: RunRecord) -> str:
    items = record.items
    return (f"{items.done} extracted, {items.skipped} already in the store, {items.failed} failed "
            f"({record.wall_s:.1f} s)")
