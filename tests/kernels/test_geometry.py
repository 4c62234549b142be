"""World-space resampling: SimpleITK reference on oblique anisotropic NIfTI, and geometry properties.

Tolerances: inside the volume (every source index in [0, n-1]) our float32
result and SimpleITK's linear resampler agree to 1e-4 relative to the data's
range (measured ~1e-7; the differences are float32 rounding of the two
index maps). At the border, ITK interpolates with clamped neighbours up to
half a voxel outside the first/last voxel centres and returns the default
value beyond; our mode='nearest' reproduces the half-voxel band (same 1e-4
bound there), mode='constant' returns cval as soon as a sample leaves [0, n-1].
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfeat.errors import InputError
from medfeat.kernels import Grid, crop, index_map, paste, resample_world, rigid_matrix
from medfeat.kernels.geometry import box_grid, edge_box_grid, fov_grid, world_box_to_voxels

nib = pytest.importorskip("nibabel")
sitk = pytest.importorskip("SimpleITK")


def _oblique_affine(spacing, rotvec, origin):
    a = rigid_matrix(rotvec, origin)
    a[:3, :3] = a[:3, :3] @ np.diag(spacing)
    return a


def _smooth(shape, seed=0):
    from scipy.ndimage import gaussian_filter

    x = np.random.default_rng(seed).standard_normal(shape)
    return (gaussian_filter(x, 1.5) * 100 + 300).astype(np.float32)


def _sitk_reference_image(grid):
    """Empty ITK image on ``grid`` (RAS affine) with ITK index (x, y, z) = (i, j, k), physical LPS."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ grid.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img = sitk.Image([int(s) for s in grid.shape], sitk.sitkFloat32)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    return img


@pytest.fixture(scope="module")
def oblique_nifti(tmp_path_factory):
    data = _smooth((14, 11, 9))
    affine = _oblique_affine([0.8, 1.4, 2.6], [0.3, -0.2, 0.25], [-10.0, 5.0, 20.0])
    path = tmp_path_factory.mktemp("nii") / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path, data, affine


@pytest.mark.parametrize("mode", ["constant", "nearest"])
def test_matches_simpleitk_on_oblique_nifti(oblique_nifti, mode):
    path, data, affine = oblique_nifti
    img = nib.load(str(path))
    vol, aff = np.asarray(img.dataobj, dtype=np.float32), img.affine  # independent read of the same file
    target = Grid((12, 13, 10), _oblique_affine([1.1, 0.9, 1.7], [-0.1, 0.35, 0.05], [-9.0, 4.0, 18.0]))
    ours = resample_world(vol, aff, target, order=1, mode=mode)
    ref_img = sitk.Resample(sitk.ReadImage(str(path)), _sitk_reference_image(target), sitk.Transform(), sitk.sitkLinear, 0.0)
    ref = sitk.GetArrayFromImage(ref_img).transpose(2, 1, 0)  # ITK array is (z, y, x)
    m, off = index_map(aff, target)
    idx = np.indices(target.shape).reshape(3, -1)
    src = (m @ idx + off[:, None]).T
    n = np.array(vol.shape)
    inside = np.all((src >= 1e-4) & (src <= n - 1 - 1e-4), axis=1)
    band = np.all((src >= -0.5 + 1e-4) & (src <= n - 0.5 - 1e-4), axis=1)
    scale = float(np.ptp(vol))
    assert inside.sum() > 100 and (~band).sum() > 50  # the grid straddles the border
    err = np.abs(ours.ravel() - ref.ravel()) / scale
    assert err[inside].max() <= 1e-4
    if mode == "nearest":
        assert err[band].max() <= 1e-4
    else:
        assert np.all(ours.ravel()[~band] == 0.0)


def test_identity_is_exact():
    data = _smooth((7, 6, 5))
    a = _oblique_affine([0.7, 1.3, 3.0], [0.4, 0.1, -0.3], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(resample_world(data, a, Grid(data.shape, a), mode="constant"), data)


def test_fov_grid_matches_half_pixel_resize():
    """fov_grid + resampling equals torch's trilinear resize (align_corners=False) to 1e-5."""
    torch = pytest.importorskip("torch")
    data = _smooth((10, 12, 8))
    a = _oblique_affine([1.0, 0.5, 2.0], [0.0, 0.2, 0.0], [0.0, 0.0, 0.0])
    g = fov_grid(data.shape, a, (7, 15, 11))
    ours = resample_world(data, a, g, mode="nearest")
    ref = torch.nn.functional.interpolate(torch.from_numpy(data)[None, None], size=(7, 15, 11), mode="trilinear", align_corners=False)
    np.testing.assert_allclose(ours, ref[0, 0].numpy(), rtol=0, atol=1e-5 * np.ptp(data))
    np.testing.assert_allclose(g.world_corners().mean(0), Grid(data.shape, a).world_corners().mean(0), atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    r1=st.lists(st.floats(-0.5, 0.5), min_size=3, max_size=3),
    r2=st.lists(st.floats(-0.5, 0.5), min_size=3, max_size=3),
    t=st.lists(st.floats(-20, 20), min_size=3, max_size=3),
)
def test_composition_and_inverse_of_index_maps(r1, r2, t):
    """index_map(T2 @ T1) = index_map through an intermediate grid; T then inv(T) is the identity."""
    src = _oblique_affine([0.9, 1.2, 2.0], [0.1, 0.2, 0.3], [5.0, -3.0, 1.0])
    mid = Grid((8, 8, 8), _oblique_affine([1.0, 1.0, 1.0], r1, t))
    tgt = Grid((6, 7, 5), _oblique_affine([1.5, 0.7, 1.1], r2, [0.0, 0.0, 0.0]))
    t1, t2 = rigid_matrix(r1, t, center=[3, 4, 5]), rigid_matrix(r2, [1, 2, 3])

    def hom(m, off):
        h = np.eye(4)
        h[:3, :3], h[:3, 3] = m, off
        return h

    direct = hom(*index_map(src, tgt, t1 @ t2))
    # target -> mid (pull through t2), then mid -> source (pull through t1)
    via = hom(*index_map(src, mid, t1)) @ hom(*index_map(mid.affine, tgt, t2))
    np.testing.assert_allclose(direct, via, atol=1e-9)
    round_trip = hom(*index_map(src, Grid((3, 3, 3), src), np.linalg.inv(t1) @ t1))
    np.testing.assert_allclose(round_trip, np.eye(4), atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(shift=st.lists(st.integers(-3, 3), min_size=3, max_size=3), flip=st.integers(0, 2))
def test_resampling_composition_equals_product_on_exact_maps(shift, flip):
    """Axis flips and whole-voxel shifts interpolate exactly, so resampling twice equals once with the product."""
    data = _smooth((6, 7, 5))
    a = _oblique_affine([1.0, 2.0, 0.5], [0.2, 0.0, 0.1], [0.0, 0.0, 0.0])
    t1 = a @ np.diag([-1.0 if i == flip else 1.0 for i in range(3)] + [1.0]) @ np.linalg.inv(a)
    t1[:3, 3] += a[:3, :3] @ (np.array([flip == 0, flip == 1, flip == 2]) * (np.array(data.shape) - 1))
    t2 = np.eye(4)
    t2[:3, 3] = a[:3, :3] @ np.asarray(shift, dtype=float)
    g = Grid(data.shape, a)
    twice = resample_world(resample_world(data, a, g, t2), a, g, t1)
    once = resample_world(data, a, g, t2 @ t1)
    np.testing.assert_allclose(twice, once, atol=1e-4)
    back = resample_world(resample_world(data, a, g, t1), a, g, np.linalg.inv(t1))  # inverse round trip
    np.testing.assert_allclose(back, data, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(lo=st.lists(st.integers(-4, 6), min_size=3, max_size=3), size=st.lists(st.integers(1, 9), min_size=3, max_size=3))
def test_crop_then_paste_round_trip(lo, size):
    data = _smooth((7, 6, 8))
    hi = np.add(lo, size)
    if np.any(hi <= 0) or np.any(np.asarray(lo) >= data.shape):
        with pytest.raises(InputError, match="wholly outside"):
            crop(data, lo, hi)
        return
    patch = crop(data, lo, hi, fill=-1.0)
    assert patch.shape == tuple(size)
    back = paste(patch, lo, data.shape, fill=-7.0)
    inside = np.zeros(data.shape, bool)
    inside[tuple(slice(max(a, 0), max(b, 0)) for a, b in zip(lo, hi))] = True
    np.testing.assert_array_equal(back[inside], data[inside])
    assert np.all(back[~inside] == -7.0)
    np.testing.assert_array_equal(crop(back, lo, hi, fill=-1.0)[patch != -1.0], patch[patch != -1.0])


def test_roi_grids_and_world_boxes():
    data = _smooth((10, 9, 8))
    a = _oblique_affine([1.0, 2.0, 1.5], [0.0, 0.0, 0.3], [10.0, 0.0, -5.0])
    g = box_grid(a, [2, 1, 3], [7, 6, 8])
    np.testing.assert_array_equal(resample_world(data, a, g), data[2:7, 1:6, 3:8])
    out_box = box_grid(a, [-2, 0, 0], [3, 4, 4])  # reaches outside: padded like crop
    np.testing.assert_array_equal(resample_world(data, a, out_box), crop(data, [-2, 0, 0], [3, 4, 4]))
    corners = Grid(data.shape, a).world_corners()
    lo, hi = world_box_to_voxels(a, corners.min(0), corners.max(0))
    assert np.all(lo <= 0) and np.all(hi >= data.shape)
    with pytest.raises(InputError, match="transform: singular"):
        resample_world(data, a, g, np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(InputError, match="source_affine: contains NaN"):
        resample_world(data, np.full((4, 4), np.nan), g)
    with pytest.raises(InputError, match="volume: expected 3 dimensions"):
        resample_world(data[0], a, g)


def test_mask_roi_grid_equals_crop_of_the_box():
    from medfeat.kernels import box_from_mask, mask_roi_grid

    data = _smooth((12, 10, 9))
    a = _oblique_affine([1.0, 0.8, 2.0], [0.1, 0.0, -0.2], [0.0, 5.0, 0.0])
    mask = np.zeros(data.shape, np.uint8)
    mask[3:7, 2:5, 4:9] = 1
    lo, hi = box_from_mask(mask, margin=1)
    assert lo.tolist() == [2, 1, 3] and hi.tolist() == [8, 6, 10]  # reaches past axis 2's end
    grid = mask_roi_grid(mask, a, margin=1)
    np.testing.assert_array_equal(resample_world(data, a, grid), crop(data, lo, hi))
    with pytest.raises(InputError, match="mask: has no nonzero voxel"):
        box_from_mask(np.zeros((3, 3, 3)))


def test_edge_box_grid_spans_voxel_edges():
    """A whole volume's edges give fov_grid; a fractional crop box keeps its exact edges."""
    a = _oblique_affine([0.8, 1.2, 2.0], [0.1, -0.2, 0.3], [10.0, -4.0, 2.5])
    shape = np.array([20, 17, 9])
    whole = edge_box_grid(a, -0.5, shape - 0.5, (8, 8, 8))
    ref = fov_grid(shape, a, (8, 8, 8))
    np.testing.assert_allclose(whole.affine, ref.affine, atol=1e-12)
    lo, hi = np.array([1.3, -0.7, 2.25]), np.array([9.8, 10.1, 7.5])
    g = edge_box_grid(a, lo, hi, (4, 6, 5))
    idx = np.linalg.solve(a, g.affine)  # box voxel -> volume voxel
    np.testing.assert_allclose(idx[:3, :3] @ np.full(3, -0.5) + idx[:3, 3], lo, atol=1e-12)  # first edge
    np.testing.assert_allclose(idx[:3, :3] @ (np.array([4, 6, 5]) - 0.5) + idx[:3, 3], hi, atol=1e-12)
    with pytest.raises(InputError, match="lo < hi"):
        edge_box_grid(a, hi, lo, (4, 4, 4))
