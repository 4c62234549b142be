"""The Python face: medfeat.extract / open_store / probe against the store and the probe code."""
from __future__ import annotations

import _tiny_backbone  # noqa: F401
import numpy as np
import pytest
from _cohort import tiny_cohort

import medfeat
from medfeat.engine.store.feature_store import FeatureStore
from medfeat.errors import InputError


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    manifest = tiny_cohort(tmp_path_factory)
    path = tmp_path_factory.mktemp("api") / "f.zarr"
    record = medfeat.extract(manifest, path, model="tiny3d_test", taps=["conv1", "conv2"], scheduler_kind="sync",
                             random_init=True)
    assert record.items.done == 6 and record.store == str(path)
    path.with_name("manifest.txt").write_text(str(manifest))  # for the probe test's reference run
    return path


def test_lazy_names_and_unknown_options(store, tmp_path) -> None:
    assert set(medfeat.__all__) >= {"open_store", "extract", "probe", "Store"}
    with pytest.raises(AttributeError):
        medfeat.nothing_here  # noqa: B018
    with pytest.raises(InputError, match="unknown extract setting"):
        medfeat.extract(tmp_path / "m.csv", tmp_path / "s", model="tiny3d_test", taps=["conv1"], colour="red")


def test_store_views_agree_with_the_store(store) -> None:
    s = medfeat.open_store(store)
    assert s.arrays() == ["tiny3d_test:conv1:none-whole", "tiny3d_test:conv2:none-whole"]
    ids, ref = FeatureStore.open(store).read("tiny3d_test:conv2:none-whole")
    items, X = s.features("tiny3d_test:conv2:none-whole")
    assert list(items["item_id"]) == ids and X.dtype == np.float32
    np.testing.assert_array_equal(X, ref)
    frame = s.to_pandas("tiny3d_test:conv2:none-whole")
    np.testing.assert_array_equal(frame[[f"f{i}" for i in range(16)]].to_numpy(), ref)
    assert "label" in frame.columns  # carried from the manifest
    runs = s.runs()
    assert runs[-1].items.done == 6 and runs[-1].arrays == s.arrays()
    xr = pytest.importorskip("xarray")
    cube = s.to_xarray("tiny3d_test:conv1:none-whole")
    assert isinstance(cube, xr.DataArray) and cube.shape == (6, 8)
    assert list(cube["subject"].values) == list(items["subject"]) and cube.attrs["provenance"]["tap"] == "conv1"


def test_probe_uses_the_items_table_by_default(store) -> None:
    kw = dict(target="label", pair_mode="diff", n_splits=3, seeds=(0,), n_boot=20, probe_params={"Cs": [1.0]})
    res = medfeat.probe(store, "tiny3d_test:conv2", **kw)
    labelled = medfeat.probe(store, "tiny3d_test:conv2", labels=store.with_name("manifest.txt").read_text(), **kw)
    assert len(res.y) == 3 and "auc" in res.metrics
    np.testing.assert_array_equal(res.y, labelled.y)
    np.testing.assert_allclose(res.scores, labelled.scores)
