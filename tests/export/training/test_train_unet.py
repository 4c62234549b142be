"""``medfeat models train-unet`` and :mod:`medfeat.export.training.train_unet` on a tiny cohort of spheres."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from medfeat.cli import main
from medfeat.errors import ManifestError
from medfeat.export.backbones.registry import create_backbone
from medfeat.export.training.train_unet import (
    TrainConfig,
    dice_per_class,
    percentile_normalise,
    split_subjects,
    train_unet,
)

TINY_NET = dict(channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def _sphere_cohort(root, subjects: int = 6, size: int = 16) -> str:
    """Two scans per subject: a bright ball (label 1) inside a dimmer shell (label 2), noise."""
    from medfeat.io.nifti import write_volume

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float32)
    rows = ["subject,timepoint,path,mask_path"]
    for s in range(subjects):
        for tp in ("baseline", "followup"):
            centre = size / 2 + rng.uniform(-2, 2, 3)
            r = np.linalg.norm(grid - centre, axis=-1)
            radius = rng.uniform(size * 0.18, size * 0.28)
            label = np.where(r < radius, 1, np.where(r < radius + 2.5, 2, 0)).astype(np.uint8)
            image = np.choose(label, [100.0, 900.0, 500.0]) + rng.normal(0, 40, label.shape)
            affine = np.diag([1.5, 1.5, 1.5, 1.0])
            img_p, mask_p = root / f"s{s}_{tp}.nii.gz", root / f"s{s}_{tp}_mask.nii.gz"
            write_volume(img_p, image.astype(np.float32), affine)
            write_volume(mask_p, label, affine)
            rows.append(f"s{s},{tp},{img_p.name},{mask_p.name}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return str(manifest)


def test_dice_matches_sklearn_f1() -> None:
    rng = np.random.default_rng(1)
    pred, target = rng.integers(0, 4, (6, 7, 8)), rng.integers(0, 3, (6, 7, 8))
    ours = dice_per_class(torch.from_numpy(pred), torch.from_numpy(target), 5)
    reference = f1_score(target.ravel(), pred.ravel(), labels=[0, 1, 2, 3], average=None, zero_division=0)
    np.testing.assert_allclose(ours[:4], reference, atol=1e-12)
    assert np.isnan(ours[4])  # in neither map


def test_split_is_by_subject_and_reproducible() -> None:
    subjects = [f"s{i}" for i in range(10) for _ in range(2)]
    train, held = split_subjects(subjects, 0.3, seed=4)
    assert len(held) == 3 and not set(train) & set(held) and set(train) | set(held) == set(subjects)
    assert split_subjects(subjects, 0.3, seed=4) == (train, held)
    with pytest.raises(ManifestError):
        split_subjects(["only"] * 2, 0.5, seed=0)


def test_percentile_normalise_range() -> None:
    data = np.arange(1000, dtype=np.float32)
    out = percentile_normalise(data)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.isclose(out[500], 500 / np.percentile(data, 99))


def test_train_unet_learns_spheres_and_weights_load_into_registry(tmp_path) -> None:
    manifest = _sphere_cohort(tmp_path)
    cfg = TrainConfig(epochs=20, size=16, patch=0, val_fraction=0.34, batch_size=4, lr=1e-2, num_classes=3,
                      class_names=("background", "ball", "shell"), **TINY_NET)
    report = train_unet(manifest, tmp_path / "unet.safetensors", cfg)
    saved = json.loads((tmp_path / "unet.json").read_text())
    assert saved["heldout_dice"] == report["heldout_dice"]
    assert len(report["heldout_subjects"]) == 2 and report["heldout_scans"] == 4
    assert not set(report["heldout_subjects"]) & set(report["train_subjects"])
    assert report["heldout_dice"]["ball"] > 0.8, report  # an easy task: it must actually learn
    assert report["train"]["losses"][-1] < report["train"]["losses"][0]
    backbone = create_backbone("unet3d", ["up.0"], weights=str(tmp_path / "unet.safetensors"),
                               config=report["config"])
    assert backbone.provenance["weights_sha256"] == report["weights_sha256"]
    assert backbone(torch.zeros(1, 1, 16, 16, 16))["up.0"].shape == (1, 3)
    # The safetensors file carries its build config: no config needed to load it.
    plain = create_backbone("unet3d", ["up.0"], weights=str(tmp_path / "unet.safetensors"))
    assert plain.provenance["config"]["channels"] == report["config"]["channels"]
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(plain(x)["up.0"], backbone(x)["up.0"])


def test_cli_train_unet(tmp_path, capsys) -> None:
    manifest = _sphere_cohort(tmp_path, subjects=3, size=32)
    out = tmp_path / "cli" / "unet.pt"
    main(["models", "train-unet", "--cohort", manifest, "--out", str(out), "--epochs", "1", "--size", "32", "--patch", "0",
          "--val-fraction", "0.34", "--max-subjects", "2"])
    text = capsys.readouterr().out
    assert "dice femur" in text and out.is_file()
    report = json.loads(out.with_suffix(".json").read_text())
    assert len(report["train_subjects"]) + len(report["heldout_subjects"]) == 2  # of 3, --max-subjects
    assert set(report["heldout_dice"]) == {"background", "femur", "tibia", "femoral_cartilage",
                                           "tibial_cartilage", "other_tissue"}
    create_backbone("unet3d", ["bottom"], weights=str(out), config={"input_size": report["config"]["input_size"]})


def test_train_unet_needs_masks(tmp_path) -> None:
    (tmp_path / "m.csv").write_text("subject,path\ns0,a.nii.gz\n")
    with pytest.raises(ManifestError, match="mask_path"):
        train_unet(tmp_path / "m.csv", tmp_path / "u.pt", TrainConfig(epochs=1))


def test_max_subjects_trains_on_a_seeded_subset(tmp_path) -> None:
    manifest = _sphere_cohort(tmp_path, subjects=6, size=16)
    cfg = dict(epochs=1, size=16, val_fraction=0.34, num_classes=3, class_names=("bg", "ball", "shell"), **TINY_NET)
    report = train_unet(manifest, tmp_path / "a.safetensors", TrainConfig(max_subjects=3, **cfg))
    used = report["train_subjects"] + report["heldout_subjects"]
    assert len(used) == 3 and report["heldout_scans"] == 2 and report["train"]["max_subjects"] == 3
    again = train_unet(manifest, tmp_path / "b.safetensors", TrainConfig(max_subjects=3, **cfg))
    assert again["train_subjects"] + again["heldout_subjects"] == used  # same seed, same subset
    everyone = train_unet(manifest, tmp_path / "d.safetensors", TrainConfig(**cfg))
    assert len(everyone["train_subjects"] + everyone["heldout_subjects"]) == 6
