"""Map features (tensor-based morphometry): Jacobian determinant, log-Jacobian, displacement.

References, independent of the code under test:

* NumPy: ``numpy.gradient`` of each component and ``numpy.linalg.det`` per voxel, float64;
  agreement to 1e-10 (the same differences, summed in another order).
* SimpleITK's ``DisplacementFieldJacobianDeterminantFilter`` (ITK's central differences; its
  boundary condition differs from numpy's one-sided edges, so inner voxels only); its output is
  float32: agreement to 1e-5 relative.
* Analytic maps: for an affine map every finite difference is exact, so the determinant is the
  matrix's, edges included (1e-5 in float32).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medfeat.errors import UnknownNameError
from medfeat.export.backbones.deformation import (
    LOGJAC_FLOOR,
    displacement_voxels,
    folded_fraction,
    jacobian_determinant,
    log_jacobian,
)
from medfeat.export.backbones.models.unigradicon_net import identity_grid
from medfeat.export.backbones.pooling import STATS_PERCENTILES, parse_pooling, pool, pooled_dim
from medfeat.export.backbones.registry import create_backbone, get_spec

SIZE = (9, 11, 13)


def _smooth_map(seed: int = 0, amplitude: float = 1.5, size=SIZE, dtype=torch.float64) -> torch.Tensor:
    """Identity plus a smooth random displacement of about ``amplitude`` voxels, [0, 1] units."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, n) for n in size], indexing="ij")
    disp = np.zeros((3, *size))
    for d in range(3):
        for _ in range(3):
            k = rng.uniform(0.5, 2.0, 3)
            phase = rng.uniform(0, 2 * np.pi)
            disp[d] += np.sin(sum(k[i] * np.pi * grids[i] for i in range(3)) + phase)
        disp[d] *= amplitude / 3 / (size[d] - 1)
    return identity_grid(size, dtype=dtype) + torch.from_numpy(disp[None]).to(dtype)


def _numpy_det(phi: np.ndarray) -> np.ndarray:
    vox = phi * (np.array(phi.shape[1:]) - 1.0)[:, None, None, None]
    jac = np.stack([np.stack(np.gradient(vox[i], axis=(0, 1, 2)), -1) for i in range(3)], -2)  # (.., i, j)
    return np.linalg.det(jac)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_determinant_matches_numpy_gradient(seed):
    phi = _smooth_map(seed)
    ours = jacobian_determinant(phi)[0, 0].numpy()
    np.testing.assert_allclose(ours, _numpy_det(phi[0].numpy()), rtol=0, atol=1e-10)
    assert ours.min() < 0.9 and ours.max() > 1.1  # the test map deforms


def test_determinant_matches_simpleitk_inside():
    sitk = pytest.importorskip("SimpleITK")
    phi = _smooth_map(3)
    disp = displacement_voxels(phi)[0].numpy()  # (3, D, H, W), channel d along array axis d
    # ITK: image axis k is array axis 2 - k, and so is the vector component k.
    field = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(disp[::-1], 0, -1)), isVector=True)
    ref = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    ours = jacobian_determinant(phi)[0, 0].numpy()
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(ours[inner], ref[inner], rtol=1e-5)


def test_affine_maps_have_their_matrix_determinant_everywhere():
    rng = np.random.default_rng(4)
    linear = np.eye(3) + rng.uniform(-0.2, 0.2, (3, 3))
    n = np.array(SIZE) - 1.0
    idx = np.indices(SIZE).reshape(3, -1).astype(np.float64)
    moved = (linear @ idx + rng.uniform(-2, 2, (3, 1))) / n[:, None]
    phi = torch.from_numpy(moved.reshape(1, 3, *SIZE)).float()
    det = jacobian_determinant(phi)
    assert det.dtype == torch.float32
    np.testing.assert_allclose(det.numpy(), np.linalg.det(linear), rtol=1e-5)
    # a rigid motion (any rotation, any shift) changes no volume: log-Jacobian 0
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    rigid = torch.from_numpy(((rot @ idx + 1.5) / n[:, None]).reshape(1, 3, *SIZE))
    assert float(log_jacobian(rigid).abs().max()) < 1e-10
    assert torch.allclose(displacement_voxels(identity_grid(SIZE, dtype=torch.float64) + 2.0 / torch.tensor(n).view(
        1, 3, 1, 1, 1)), torch.full((1, 3, *SIZE), 2.0, dtype=torch.float64))


def test_folds_are_counted_and_floored_in_the_log():
    phi = identity_grid(SIZE, dtype=torch.float64).clone()
    phi[:, 0] = 1.0 - phi[:, 0]  # a mirror along axis 0: det -1 everywhere
    assert float(folded_fraction(phi)[0]) == 1.0
    assert torch.allclose(log_jacobian(phi), torch.full((1, 1, *SIZE), np.log(LOGJAC_FLOOR), dtype=torch.float64))
    assert float(folded_fraction(_smooth_map(0))[0]) == 0.0
    with pytest.raises(ValueError, match=r"\(B, 3, D, H, W\)"):
        jacobian_determinant(torch.zeros(1, 2, 4, 4, 4))


def test_half_precision_maps_are_differentiated_in_float32():
    phi = _smooth_map(5, amplitude=0.8).half()
    ours = log_jacobian(phi)
    assert ours.dtype == torch.float16
    ref = np.log(np.maximum(_numpy_det(phi[0].double().numpy()), LOGJAC_FLOOR))
    np.testing.assert_allclose(ours[0, 0].float().numpy(), ref, atol=2e-3)


# --- pooling --------------------------------------------------------------------------------

def test_stats_pooling_is_mean_then_numpy_percentiles_per_channel():
    x = torch.randn(2, 3, 5, 6, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = pool(x, "map", "stats")
    assert out.shape == (2, pooled_dim(3, "stats")) == (2, 18)
    flat = x.flatten(2).numpy()
    ref = np.concatenate([flat.mean(-1, keepdims=True),
                          np.moveaxis(np.percentile(flat, STATS_PERCENTILES, axis=-1), 0, -1)], -1)
    np.testing.assert_allclose(out.numpy(), ref.reshape(2, -1), atol=1e-12)
    both = pool(x, "map", "stats+grid2")
    assert both.shape == (2, pooled_dim(3, "stats+grid2")) == (2, 18 + 24)
    torch.testing.assert_close(both[:, 18:], pool(x, "map", "grid2"))


def test_pooling_text_names_a_default_and_per_tap_poolings():
    assert parse_pooling("grid2") == ("grid2", {})
    assert parse_pooling("grid2,B.phi.logjac=stats+grid2") == ("grid2", {"B.phi.logjac": "stats+grid2"})
    assert parse_pooling("A.enc.1=max") == (None, {"A.enc.1": "max"})
    with pytest.raises(UnknownNameError, match="two default"):
        parse_pooling("avg,max")


# --- the unigradicon taps -------------------------------------------------------------------

@pytest.fixture(scope="module")
def moving_backbone():
    """The tiny cascade with random last convolutions, so its maps move."""
    torch.manual_seed(0)
    backbone = create_backbone("unigradicon", ["A.enc.2", "B.phi", "B.phi.disp", "B.phi.logjac"], tiny=True,
                               pooling="grid2,B.phi.logjac=stats+grid2")
    for stage in backbone.trunk.stages.values():
        torch.nn.init.normal_(stage.lastConv.weight, std=0.05)
    return backbone


def test_map_features_are_the_deformation_of_the_stage_map(moving_backbone):
    trunk = moving_backbone.trunk
    pair = torch.rand(2, 2, *get_spec("unigradicon").tiny_config["input_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = trunk.forward_taps(pair, ["B.phi", "B.phi.disp", "B.phi.logjac"])
        pooled = moving_backbone(pair)
    assert raw["B.phi.logjac"].shape == (2, 1, *pair.shape[2:]) and raw["B.phi.disp"].shape == (2, 3, *pair.shape[2:])
    torch.testing.assert_close(raw["B.phi.logjac"], log_jacobian(raw["B.phi"]), rtol=0, atol=0)
    torch.testing.assert_close(raw["B.phi.disp"], displacement_voxels(raw["B.phi"]), rtol=0, atol=0)
    assert float(raw["B.phi.logjac"].abs().max()) > 0.01  # the maps are not the identity
    assert moving_backbone.output_dims() == {"A.enc.2": 16 * 8, "B.phi": 24, "B.phi.disp": 24, "B.phi.logjac": 6 + 8}
    torch.testing.assert_close(pooled["B.phi.logjac"], pool(raw["B.phi.logjac"], "map", "stats+grid2"))
    # features follow their map: the backbone was pruned after stage B
    assert set(trunk.stages) == {"A", "B"}
    assert trunk.tap_names()[-1] == "D.phi" and "B.phi.logjac" in trunk.feature_names()


def test_pooling_must_name_extracted_taps_and_fit_their_kind():
    with pytest.raises(UnknownNameError, match="not extracted"):
        create_backbone("unigradicon", ["A.enc.0"], tiny=True, pooling="avg,A.phi.logjac=stats")
    with pytest.raises(UnknownNameError, match="tap A.enc.0: unknown pooling 'cls' for a map tap"):
        create_backbone("unigradicon", ["A.enc.0"], tiny=True, pooling="cls")
