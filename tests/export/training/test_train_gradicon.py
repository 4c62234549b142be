"""``medfeat models train-gradicon`` and the GradICON objective, on small synthetic cohorts.

References, independent of the code under test:

* the GradICON penalty recomputed in NumPy with ``scipy.ndimage.map_coordinates`` (order 1,
  mode ``nearest``: trilinear with border padding) on the same jittered points, float64, 1e-9;
* LNCC recomputed with ``scipy.ndimage.gaussian_filter`` (zero padding), 1e-6;
* the augmentation without noise is an exact signed axis permutation of the images;
* rigid recovery against the recorded transform of the synthetic cohort (must beat identity).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from medfeat.cli import main
from medfeat.errors import InputError
from medfeat.export.backbones.models.unigradicon import to_regis_net_layout
from medfeat.export.backbones.models.unigradicon_net import compose, identity_grid
from medfeat.export.backbones.registry import create_backbone
from medfeat.export.backbones.weights import checkpoint_config, read_checkpoint, sha256_file
from medfeat.export.training.gradicon_loss import (
    augment_pair,
    gradicon_penalty,
    lncc_loss,
    transform_points,
)
from medfeat.export.training.registration_quality import fit_rigid
from medfeat.export.training.train_gradicon import GradiconConfig, train_gradicon

TINY = dict(size=32, stages="AB", down_channels=(4, 8, 16), up_channels=(4, 8, 8), max_heldout_pairs=4,
            threads=2, log_every=2)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """12 subjects at 32^3 (a 128 x 102 x 102 mm field of view, 4 x 3.2 x 3.2 mm voxels)."""
    from medfeat.cohorts.synth import synth_cohort

    return synth_cohort(tmp_path_factory.mktemp("knees"), subjects=12, seed=3, shape=(32, 32, 32), workers=2)


# --- the objective --------------------------------------------------------------------------

def _sample(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear, border-clamped sampling of a (3, *n) field at (3, *m) points in [0, 1] units."""
    n = np.array(field.shape[1:]) - 1.0
    index = points * n.reshape(3, *([1] * (points.ndim - 1)))
    return np.stack([ndimage.map_coordinates(field[c], index, order=1, mode="nearest") for c in range(3)])


def _numpy_penalty(disps_ab, disps_ba, points: np.ndarray, delta: float = 1e-3) -> float:
    def phi(disps, x):
        for u in reversed(disps):
            x = x + _sample(u, x)
        return x
    error = points - phi(disps_ab, phi(disps_ba, points))
    total = 0.0
    for d in range(3):
        moved = points.copy()
        moved[d] += delta
        error_d = moved - phi(disps_ab, phi(disps_ba, moved))
        total += np.mean(((error - error_d) / delta) ** 2)
    return total


def test_gradicon_penalty_matches_a_numpy_reference():
    g = torch.Generator().manual_seed(0)
    size = (9, 10, 11)
    disps_ab = [0.03 * torch.randn(1, 3, 5, 5, 6, generator=g, dtype=torch.float64),
                0.02 * torch.randn(1, 3, *size, generator=g, dtype=torch.float64)]
    disps_ba = [0.03 * torch.randn(1, 3, 5, 5, 6, generator=g, dtype=torch.float64),
                0.02 * torch.randn(1, 3, *size, generator=g, dtype=torch.float64)]
    identity = identity_grid(size, dtype=torch.float64)
    ours = float(gradicon_penalty(disps_ab, disps_ba, identity, torch.Generator().manual_seed(5)))
    noise = torch.randn(identity.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    points = (identity + 2 * noise.double() / size[-1])[0, :, ::2, ::2, ::2].numpy()
    ref = _numpy_penalty([u[0].numpy() for u in disps_ab], [u[0].numpy() for u in disps_ba], points)
    assert ours == pytest.approx(ref, rel=1e-9) and ours > 0.01


def test_inverse_consistent_maps_cost_nothing_and_constant_errors_too():
    size = (8, 8, 8)
    identity = identity_grid(size, dtype=torch.float64)
    shift = torch.full((1, 3, *size), 0.05, dtype=torch.float64)
    # x -> x + t and x -> x - t are inverses; x -> x + 2t is a constant error, whose gradient is 0
    for ab, ba in ((shift, -shift), (shift, shift)):
        assert float(gradicon_penalty([ab], [ba], identity, torch.Generator().manual_seed(0))) < 1e-12
    points = identity + 0.01
    assert torch.allclose(transform_points([shift], points), points + 0.05)


def test_lncc_matches_scipy():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(1, 1, 12, 13, 14, generator=g, dtype=torch.float64), torch.rand(1, 1, 12, 13, 14, generator=g,
                                                                                       dtype=torch.float64)
    b = 0.5 * a + 0.5 * b

    def blur(x):
        return ndimage.gaussian_filter(x, 2.0, mode="constant", cval=0.0, truncate=2.0)
    x, y = a[0, 0].numpy(), b[0, 0].numpy()
    cov = blur(x * y) - blur(x) * blur(y)
    var_x = np.maximum(blur(x * x) - blur(x) ** 2, 0) + 1e-5
    var_y = np.maximum(blur(y * y) - blur(y) ** 2, 0) + 1e-5
    ref = 1 - np.mean(cov / np.sqrt(var_x * var_y))
    assert float(lncc_loss(2.0)(a, b)) == pytest.approx(ref, abs=1e-6)
    assert float(lncc_loss(2.0)(a, a)) < 1e-3


def test_augmentation_without_noise_is_one_signed_permutation_for_both_images():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(3, 1, 6, 6, 6, generator=g), torch.rand(3, 1, 6, 6, 6, generator=g)
    out_a, out_b = augment_pair(a, b, torch.Generator().manual_seed(0), noise=0.0)
    for i in range(3):
        found = []
        for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
            for flips in range(8):
                dims = [2 + k for k in range(3) if flips >> k & 1]
                cand = a[i:i + 1].permute(0, 1, *(2 + p for p in perm))
                cand = cand.flip(dims) if dims else cand
                if torch.allclose(cand, out_a[i:i + 1], atol=1e-5):
                    cand_b = b[i:i + 1].permute(0, 1, *(2 + p for p in perm))
                    found.append(torch.allclose(cand_b.flip(dims) if dims else cand_b, out_b[i:i + 1], atol=1e-5))
        assert found == [True]


def test_stage_displacements_compose_to_the_network_map():
    torch.manual_seed(0)
    net = create_backbone("unigradicon", ["D.phi"], tiny=True).trunk
    for stage in net.stages.values():
        torch.nn.init.normal_(stage.lastConv.weight, std=0.05)
    pair = torch.rand(2, 2, 18, 21, 25, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        disps = net.displacements(pair[:, :1], pair[:, 1:], "AB")
        taps = net.forward_taps(pair, ["B.phi"])
    assert [tuple(d.shape[2:]) for d in disps] == [(5, 6, 7), (9, 11, 13)]  # stage A at 1/4, B at 1/2
    assert torch.equal(compose(disps, identity_grid((18, 21, 25))), taps["B.phi"])
    with pytest.raises(InputError, match="not a prefix"):
        net.displacements(pair[:, :1], pair[:, 1:], "BC")


def test_kabsch_recovers_a_rigid_transform():
    rng = np.random.default_rng(0)
    c, s = math.cos(0.2), math.sin(0.2)
    truth = np.eye(4)
    truth[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    truth[:3, 3] = [3.0, -2.0, 1.0]
    x = rng.normal(size=(50, 3)) * 20
    np.testing.assert_allclose(fit_rigid(x, x @ truth[:3, :3].T + truth[:3, 3]), truth, atol=1e-10)


# --- training -------------------------------------------------------------------------------

def test_cli_trains_loadable_reproducible_weights_and_a_report(cohort, tmp_path, capsys):
    args = ["models", "train-gradicon", "--cohort", str(cohort), "--tiny", "--size", "32", "--steps", "4",
            "--max-subjects", "8", "--threads", "2"]
    main(args + ["--out", str(tmp_path / "a.safetensors")])
    text = capsys.readouterr().out
    assert "rigid misalignment recovered" in text and "--input-size 32,32,32" in text
    main(args + ["--out", str(tmp_path / "b.safetensors")])
    assert sha256_file(tmp_path / "a.safetensors") == sha256_file(tmp_path / "b.safetensors")  # to the bit
    report = json.loads((tmp_path / "a.json").read_text())
    held = report["heldout"]
    assert set(held) >= {"intra", "inter", "rigid_recovery", "pairs"} and held["rigid_recovery"]["n"] == 2
    for key in ("similarity_before", "similarity_after", "folded_fraction", "inverse_consistency_vox"):
        assert math.isfinite(held["intra"][key])
    assert report["training"]["stages_trained"] == "AB" and report["training"]["stages_identity"] == "CD"
    assert not set(report["train_subjects"]) & set(report["heldout_subjects"])
    config = checkpoint_config(tmp_path / "a.safetensors")
    assert config == {"input_size": [32, 32, 32], "down_channels": [4, 8, 16], "up_channels": [4, 8, 8]}
    backbone = create_backbone("unigradicon", ["B.phi.logjac"], weights=str(tmp_path / "a.safetensors"))
    assert backbone.provenance["weights_sha256"] == report["weights_sha256"]
    with torch.no_grad():
        out = backbone(torch.rand(1, 2, 32, 32, 32))["B.phi.logjac"]
    assert out.shape == (1, 6) and torch.isfinite(out).all()  # default pooling stats: mean and 5 percentiles


@pytest.mark.slow
def test_training_registers_better_than_the_identity(cohort, tmp_path):
    """300 steps at 32^3 (about 15 s on 2 idle cores): the recovered rigid misalignment beats
    the identity map's by about 0.8 mm (7.05 vs 7.84 mm on this cohort's 2 held-out pairs)."""
    cfg = GradiconConfig.tiny(**{**TINY, "steps": 300, "lr": 5e-3})
    report = train_gradicon(cohort, tmp_path / "w.safetensors", cfg)
    held = report["heldout"]
    assert held["intra"]["similarity_after"] < held["intra"]["similarity_before"]
    assert held["intra"]["folded_fraction"] < 0.01
    assert held["rigid_recovery"]["beats_identity"], held["rigid_recovery"]
    losses = [row["loss"] for row in report["loss"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_fine_tuning_starts_from_a_published_layout_and_keeps_untrained_stages(cohort, tmp_path):
    cfg = GradiconConfig.tiny(**{**TINY, "steps": 1, "stages": "A", "lr": 1e-9})
    torch.manual_seed(7)
    start = create_backbone("unigradicon", ["D.phi"], tiny=True).trunk  # random, last convs zero
    for stage in start.stages.values():
        torch.nn.init.normal_(stage.lastConv.weight, std=0.01)
    init = tmp_path / "Step_2_final.trch"
    torch.save(to_regis_net_layout(start.state_dict()), init)
    train_gradicon(cohort, tmp_path / "tuned.safetensors", cfg, init=init)
    tuned = read_checkpoint(tmp_path / "tuned.safetensors")
    for key, value in start.state_dict().items():
        if "running" in key or "num_batches" in key:
            continue  # batch-norm statistics move in train mode even at lr ~ 0
        if key.startswith(("stages.B", "stages.C", "stages.D")):
            assert torch.equal(tuned[key], value), key  # not trained: exactly the init
        else:
            torch.testing.assert_close(tuned[key], value, rtol=0, atol=1e-6)
    training = json.loads((tmp_path / "tuned.json").read_text())["training"]
    assert training["stages_trained"] == "A" and training["init_sha256"] == sha256_file(init)


def test_bad_settings_are_refused_in_one_line(cohort, tmp_path):
    with pytest.raises(InputError, match="needs >= 17"):
        train_gradicon(cohort, tmp_path / "w.safetensors", GradiconConfig.tiny(size=16))
    with pytest.raises(InputError, match="stages 'BC'"):
        train_gradicon(cohort, tmp_path / "w.safetensors", GradiconConfig.tiny(stages="BC"))
