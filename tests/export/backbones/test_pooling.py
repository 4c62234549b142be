"""Pooling of raw tap outputs, checked against direct NumPy reductions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medfeat.errors import UnknownNameError
from medfeat.export.backbones.pooling import pool, pooled_dim


@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (2, 3, 4, 6, 8)])
def test_map_poolings_match_numpy(shape) -> None:
    x = torch.randn(*shape)
    a = x.numpy()
    axes = tuple(range(2, a.ndim))
    ndim = a.ndim - 2
    np.testing.assert_allclose(pool(x, "map", "avg"), a.mean(axes), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pool(x, "map", "max"), a.max(axes), rtol=1e-6)
    np.testing.assert_allclose(pool(x, "map", "avgmax"), np.concatenate([a.mean(axes), a.max(axes)], 1),
                               rtol=1e-5, atol=1e-6)
    grid = pool(x, "map", "grid2")
    assert grid.shape == (2, pooled_dim(3, "grid2", ndim))
    # Cells in C-order: channel-major, then the 2^ndim cells; each the mean of its half-box.
    halves = [np.split(np.arange(n), 2) for n in shape[2:]]
    cells = [a[(slice(None), slice(None)) + np.ix_(*[h[i] for h, i in zip(halves, idx)])].mean(axes)
             for idx in np.ndindex(*([2] * ndim))]
    np.testing.assert_allclose(grid.numpy(), np.stack(cells, -1).reshape(2, -1), rtol=1e-5, atol=1e-6)


def test_token_poolings() -> None:
    x = torch.randn(2, 5, 4)  # CLS + 4 patches
    np.testing.assert_array_equal(pool(x, "tokens", "cls", prefix=1), x[:, 0])
    np.testing.assert_allclose(pool(x, "tokens", "mean", prefix=1), x[:, 1:].mean(1))
    assert pool(x, "tokens", "cls+mean", prefix=1).shape == (2, pooled_dim(4, "cls+mean"))


def test_unknown_pooling_is_named() -> None:
    with pytest.raises(UnknownNameError, match="pooling 'median'"):
        pool(torch.randn(1, 2, 3, 3), "map", "median")
