"""Experiments as files: parsing, a tiny grid end to end, reuse of the store, skipped datasets."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _cohort import tiny_cohort  # noqa: E402

from medfeat.engine.store.feature_store import FeatureStore  # noqa: E402
from medfeat.errors import InputError  # noqa: E402
from medfeat.studies.experiment import load_experiment, run_experiment  # noqa: E402


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return tiny_cohort(tmp_path_factory, subjects=8)


def _yaml(manifest: Path, extra_cohort: str = "") -> str:
    return f"""
name: tiny
cohorts:
  - {{name: knee, manifest: {manifest}}}
{extra_cohort}
target: label
models:
  - {{name: unet3d, tiny: true, taps: [down.0, bottom]}}
variants: {{align: [none], roi: [whole, crop]}}
pair_modes: [diff]
probe: {{n_splits: 2, seeds: [0], n_boot: 50}}
extract: {{batch_size: 4, scheduler_kind: sync, progress: false}}
"""


def test_tiny_grid_end_to_end_and_rerun_reuses_the_store(manifest, tmp_path) -> None:
    exp = load_experiment(_write(tmp_path / "e.yaml", _yaml(manifest)))
    lines: list[str] = []
    paths = run_experiment(exp, tmp_path / "out", log=lines.append)
    configs = json.loads(Path(paths["results"]).read_text())["configs"]
    specs = {(c["spec"], c["pair_mode"]) for c in configs}
    assert specs == {(f"unet3d:{t}:none-{r}", "diff") for t in ("down.0", "bottom") for r in ("whole", "crop")}
    assert all(c["weights"] == "random" for c in configs)
    assert Path(paths["report"]).is_file()
    store = FeatureStore.open(paths["store"])
    assert len(store.arrays()) == 4 and len(store.items()) == 16

    lines.clear()
    run_experiment(exp, tmp_path / "out", log=lines.append)
    assert sum("0 extracted, 16 already in the store" in line for line in lines) == 2


def test_missing_dataset_copy_is_skipped_not_fatal(manifest, tmp_path) -> None:
    extra = "  - {name: aptos, dataset: {name: aptos2019, root: /nonexistent/APTOS2019}}"
    exp = load_experiment(_write(tmp_path / "e.yaml", _yaml(manifest, extra)))
    lines: list[str] = []
    paths = run_experiment(exp, tmp_path / "out", log=lines.append)
    assert any("no local copy" in line for line in lines)
    assert {c["cohort"] for c in json.loads(Path(paths["results"]).read_text())["configs"]} == {"knee"}


@pytest.mark.parametrize("text, message", [
    ("name: x\nmodels: []\n", "either cohort"),
    ("name: x\ncohort: {synth: {}}\nmodels: [{name: unet3d}]\n", "needs a name and taps"),
    ("[not, a, mapping]", "is a mapping"),
])
def test_bad_experiment_files_name_the_problem(tmp_path, text, message) -> None:
    with pytest.raises(InputError, match=message):
        load_experiment(_write(tmp_path / "bad.yaml", text))


def test_shipped_experiment_files_parse() -> None:
    root = Path(__file__).resolve().parents[2] / "experiments"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"progression.yaml", "transfer2d.yaml"} <= set(names)
    for path in root.glob("*.yaml"):
        exp = load_experiment(path)
        assert exp.models and exp.cohorts


def test_run_cli_missing_file_is_one_line(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "medfeat", "run", str(tmp_path / "none.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "experiment file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_variants_as_product_or_list(tmp_path) -> None:
    base = "name: x\ncohort: {synth: {}}\nmodels: [{name: unet3d, taps: [bottom]}]\n"
    product = load_experiment(_write(tmp_path / "a.yaml", base + "variants: {align: [none, rigid], roi: [crop]}\n"))
    assert product.variants == [("none", "crop"), ("rigid", "crop")]
    listed = load_experiment(_write(tmp_path / "b.yaml", base + "variants: [none-whole, oracle_atlas-crop]\n"))
    assert listed.variants == [("none", "whole"), ("oracle_atlas", "crop")]
    with pytest.raises(InputError, match="ALIGN-ROI"):
        load_experiment(_write(tmp_path / "c.yaml", base + "variants: [nonewhole]\n"))


def test_transfer2d_follows_the_study_by_default() -> None:
    """experiments/transfer2d.yaml makes the transfer study's choices (its code, a7aa194)."""
    from medfeat.cohorts.study_splits import STUDY_MEAN_STD
    from medfeat.studies.experiment import cohort_mean_std

    exp = load_experiment(Path(__file__).resolve().parents[2] / "experiments" / "transfer2d.yaml")
    features = {m.name: (m.taps, m.pooling) for m in exp.models}
    assert features == {
        "sam_vit_b": (["blocks.11"], None), "seem_focalt": (["res5"], None), "dinov2_vitb14": (["norm"], None),
        "blip_vitb16": (["norm"], "token1"), "openclip_vitb16": (["proj"], None), "deit_b16": (["norm"], None),
        "dino_vitb16": (["norm"], None), "resnet50": (["layer4"], None)}
    from medfeat.export.backbones.registry import get_spec

    defaults = {name: get_spec(name).tap_table()[-1].pooling for name in features}
    assert defaults == {"sam_vit_b": "avg", "seem_focalt": "avg", "dinov2_vitb14": "cls", "blip_vitb16": "cls",
                        "openclip_vitb16": "none", "deit_b16": "cls", "dino_vitb16": "cls", "resnet50": "avg"}
    assert exp.extract["gray"] == "first_channel" and exp.extract["resize"] == "square"
    assert exp.probe["split_column"] == "split"
    cohorts = {c["name"]: c for c in exp.cohorts}
    for name in ("aptos2019", "isic2019", "ddsm", "chexpert"):
        assert cohort_mean_std(exp, cohorts[name]) == STUDY_MEAN_STD[name], name
        assert cohorts[name]["dataset"].get("split", "study") == "study", name
    assert STUDY_MEAN_STD["chexpert"] == ((0.503,), (0.292,))
    assert STUDY_MEAN_STD["aptos2019"] == ((0.415, 0.221, 0.073), (0.275, 0.150, 0.081))
    assert cohort_mean_std(exp, cohorts["cbis_ddsm"]) is None and cohorts["ddsm"]["dataset"]["name"] == "ddsm"


def test_2d_study_settings_reach_the_store(tmp_path) -> None:
    """A fake APTOS2019 copy through a 2D grid with the study's settings: its own mean/std in
    the provenance, the model's pooling, the fixed split of the probe."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    root = tmp_path / "APTOS2019"
    (root / "train_images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 40
    for i in range(n):
        grade = i % 2
        img = rng.integers(0, 120, (40, 56, 3)) + 100 * grade
        Image.fromarray(img.astype(np.uint8)).save(root / "train_images" / f"a{i:03d}.png")
    pd.DataFrame({"id_code": [f"a{i:03d}" for i in range(n)], "diagnosis": np.arange(n) % 2}).to_csv(
        root / "train.csv", index=False)
    text = f"""
name: tiny2d
kind: transfer2d
cohort: {{name: aptos2019, dataset: {{name: aptos2019, root: {root}}}, normalize: dataset}}
target: label
models:
  - {{name: resnet50, tiny: true, input_size: [32, 32], taps: [layer2], pooling: max}}
probe: {{split_column: split, n_boot: 20, task: binary}}
extract: {{batch_size: 8, scheduler_kind: sync, progress: false, gray: first_channel, resize: square}}
"""
    exp = load_experiment(_write(tmp_path / "e.yaml", text))
    paths = run_experiment(exp, tmp_path / "out", log=lambda line: None)
    store = FeatureStore.open(paths["store"])
    (key,) = store.arrays()
    prov = store.provenance(key)
    assert prov["preprocessing"]["intensity"]["params"] == {"mean": [0.415, 0.221, 0.073],
                                                            "std": [0.275, 0.150, 0.081]}
    assert prov["preprocessing"]["intensity"]["source"] == "dataset" and prov["pooling"] == "max"
    (config,) = json.loads(Path(paths["results"]).read_text())["configs"]
    assert config["result"]["n_splits"] == 0  # the fixed split: fit on train + val, score on test
    bad = text.replace("normalize: dataset", "normalize: imagenet")
    with pytest.raises(InputError, match="normalize"):
        run_experiment(load_experiment(_write(tmp_path / "bad.yaml", bad)), tmp_path / "out2", log=lambda line: None)


def test_trained_registration_network_beside_its_random_control(manifest, tmp_path) -> None:
    text = f"""
name: reg
cohort: {{name: knee, manifest: {manifest}}}
target: label
models:
  - {{name: unigradicon, train: true, input_size: [24, 24, 24], taps: [A.enc.1, B.phi.logjac],
     train_args: {{tiny: true, size: 24, steps: 2, threads: 2}}, pooling: "avg,B.phi.logjac=stats"}}
  - {{name: unigradicon, label: unigradicon_random, weights: random, tiny: true, input_size: [24, 24, 24],
     taps: [A.enc.1, B.phi.logjac], pooling: "avg,B.phi.logjac=stats"}}
variants: [none-whole, none-crop]
probe: {{n_splits: 2, seeds: [0], n_boot: 50}}
extract: {{batch_size: 4, scheduler_kind: sync, progress: false}}
threads: 2
report: {{figures: [variants]}}
"""
    exp = load_experiment(_write(tmp_path / "e.yaml", text))
    lines: list[str] = []
    paths = run_experiment(exp, tmp_path / "out", log=lines.append)
    configs = json.loads(Path(paths["results"]).read_text())["configs"]
    by = {(c["model"], c["tap"], c["variant"]): c for c in configs}
    assert len(by) == 8 and {c["backbone"] for c in configs} == {"unigradicon"}
    trained = tmp_path / "out" / "weights" / "unigradicon.safetensors"
    assert by[("unigradicon", "A.enc.1", "none-crop")]["weights"] == str(trained)
    assert by[("unigradicon_random", "A.enc.1", "none-crop")]["weights"] == "random"
    assert (tmp_path / "out" / "weights" / "unigradicon.json").is_file()
    # one store per set of weights: the control's arrays do not collide with the trained ones
    assert len(FeatureStore.open(tmp_path / "out" / "features.zarr").arrays()) == 4
    assert len(FeatureStore.open(tmp_path / "out" / "features-unigradicon_random.zarr").arrays()) == 4
    # random weights leave the last convolutions at zero: every map is the identity, log-Jacobian 0
    control = FeatureStore.open(tmp_path / "out" / "features-unigradicon_random.zarr")
    _, logjac = control.read(next(k for k in control.arrays() if k.tap == "B.phi.logjac"))
    assert logjac.shape == (8, 6) and np.abs(logjac).max() < 1e-5 and np.ptp(logjac, axis=0).max() == 0
    assert all("y" in c["result"] and "preds" in c["result"] for c in configs)  # kept for paired effects
    report = Path(paths["report"]).read_text()
    assert "unigradicon_random (random weights)" in report and "variants.png" in report
    assert "none-crop AUC" in report and "## Findings" in report and "depth.png" not in report
    assert any(line.startswith("unigradicon: held-out lncc loss") for line in lines)
    assert any(line.startswith("unigradicon_random:A.enc.1:none-crop") for line in lines)


def test_labels_must_be_distinct(tmp_path) -> None:
    base = "name: x\ncohort: {synth: {}}\nmodels: [{name: unet3d, taps: [bottom]}, {name: unet3d, taps: [bottom]}]\n"
    with pytest.raises(InputError, match="distinct label"):
        load_experiment(_write(tmp_path / "a.yaml", base))


@pytest.mark.slow
def test_quick_progression_grid_runs_every_alignment_on_a_small_cohort(tmp_path) -> None:
    """experiments/progression-quick.yaml as shipped, on 8 subjects at 32^3 with short training:
    affine and atlas variants run for the trained registration network and its control."""
    from dataclasses import replace

    exp = load_experiment(Path(__file__).resolve().parents[2] / "experiments" / "progression-quick.yaml")
    assert {"affine-crop", "atlas-crop", "rigid-crop"} <= {f"{a}-{r}" for a, r in exp.variants}
    for m in exp.models:
        m.weights = "random" if m.weights == "random" else None  # nothing from a weights folder
        if m.name == "unet3d":
            m.extra["train_args"].update(epochs=1, size=32)
        else:
            m.input_size = [32, 32, 32]
            if m.train:
                m.extra["train_args"].update(size=32, steps=2)
    exp = replace(exp, cohorts=[{"name": "knee", "synth": {"subjects": 8, "seed": 0, "shape": [32, 32, 32]}}],
                  probe={"n_splits": 2, "seeds": [0], "n_boot": 50}, extract={**exp.extract, "batch_size": 8})
    paths = run_experiment(exp, tmp_path, log=lambda line: None)
    assert paths["failed"] == 0
    configs = json.loads(Path(paths["results"]).read_text())["configs"]
    reg = {(c["variant"], c["pair_mode"]) for c in configs if c["model"] == "unigradicon" and c["tap"] == "B.phi.logjac"}
    assert ("affine-crop", "") in reg and ("rigid-crop", "") in reg
    # with the atlas, each scan is paired with it and the two timepoints combine like per-scan features
    assert {("atlas-crop", "diff"), ("atlas-crop", "concat+diff")} <= reg
    assert {c["variant"] for c in configs if c["model"] == "unet3d"} == {f"{a}-{r}" for a, r in exp.variants}
    assert {c["model"] for c in configs} == {"unet3d", "unigradicon", "unigradicon_random"}
    assert "Finding 2" in Path(paths["report"]).read_text()
