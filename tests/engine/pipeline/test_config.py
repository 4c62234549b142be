"""Typed extraction config: flat settings routed to their parts, unknown keys named, run records."""
from __future__ import annotations

import pytest

from medfeat.engine.pipeline.config import ClusterConfig, ExtractConfig, ItemCounts, ModelConfig, RunRecord, Variant
from medfeat.errors import InputError, UnknownNameError


def test_flat_settings_go_to_the_part_that_owns_them() -> None:
    cfg = ExtractConfig.from_settings("m.csv", "s.zarr", "unet3d", ["bottom"], weights="w.pt", align="rigid",
                                      roi="crop", roi_labels=[3, 4], workers=2, scheduler_kind="threads",
                                      input_size=[64, 64, 64], batch_size=8)
    assert cfg.model == ModelConfig("unet3d", ("bottom",), weights="w.pt", input_size=(64, 64, 64))
    assert cfg.variant == Variant("rigid", "crop", (3, 4)) and cfg.variant.name == "rigid-crop"
    assert cfg.cluster == ClusterConfig("threads", workers=2)
    assert cfg.batch_size == 8
    hash(cfg.model)  # the worker's model cache key


def test_an_unknown_setting_is_named() -> None:
    with pytest.raises(InputError, match="unknown extract setting.*batchsize"):
        ExtractConfig.from_settings("m.csv", "s.zarr", "unet3d", ["bottom"], batchsize=8)


@pytest.mark.parametrize("make, message", [
    (lambda: Variant("sideways"), "unknown alignment 'sideways'"),
    (lambda: Variant("none", "box"), "unknown ROI 'box'"),
    (lambda: Variant.parse("rigid"), "not ALIGN-ROI"),
    (lambda: ClusterConfig("mpi"), "unknown scheduler kind 'mpi'"),
])
def test_bad_parts_are_refused(make, message) -> None:
    with pytest.raises(UnknownNameError, match=message):
        make()


def test_variant_parse_round_trips() -> None:
    assert Variant.parse("oracle_atlas-crop") == Variant("oracle_atlas", "crop")


def test_run_record_round_trips_through_a_dict() -> None:
    rec = RunRecord(config={"store": "s.zarr"}, variant="none-whole", arrays=["m:t:none-whole"],
                    scheduler="sync", versions={"medfeat": "0"}, items=ItemCounts(3, 1, 2, 0),
                    timings={"pipeline_wall": 1.0}, items_per_s=2.0, failures=[])
    again = RunRecord.from_dict(rec.to_dict())
    assert again == rec and again.store == "s.zarr"
    with pytest.raises(InputError, match="lacks"):
        RunRecord.from_dict({"config": {}})
