"""The benchmark harness on a tiny grid, its JSON schema, and FLOP counts against hand counts."""
from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys

import pytest
import torch

from medfeat.engine.bench_run import load_grid, run_grid, validate_result, write_outputs
from medfeat.engine.benchmark import time_call
from medfeat.export.flops import model_flops


def test_flops_of_small_3d_conv_net_match_hand_count() -> None:
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, stride=2, padding=1), torch.nn.LeakyReLU(),
                              torch.nn.Conv3d(4, 8, 3, padding=1))
    x = torch.randn(1, 1, 8, 8, 8)
    # 2 FLOPs per multiply-add: out voxels (4^3) x out channels x in channels x 27 taps.
    hand = 2 * 64 * 4 * 1 * 27 + 2 * 64 * 8 * 4 * 27
    assert model_flops(net, x) == hand


def test_flops_of_small_vit_match_hand_count() -> None:
    timm = pytest.importorskip("timm")
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=0)
    n, d, heads, hd = 17, 16, 2, 8  # 16 patches + CLS
    patch_embed = 2 * 16 * d * 3 * 8 * 8
    block = (2 * n * d * 3 * d          # qkv
             + 2 * 2 * heads * n * n * hd  # q k^T and attn @ v
             + 2 * n * d * d            # proj
             + 2 * 2 * n * d * 2 * d)   # mlp fc1 + fc2
    assert model_flops(vit.eval(), torch.randn(1, 3, 32, 32)) == patch_embed + 2 * block


def test_time_call_counts_repeats() -> None:
    calls = []
    timing = time_call(lambda: calls.append(1), warmup=2, repeats=4)
    assert len(calls) == 6 and timing.repeats == 4 and timing.median_s >= 0


def test_tiny_grid_runs_and_json_validates(tmp_path) -> None:
    cases = [c for c in load_grid("tiny") if c.stage in ("read", "resample", "store_write")]
    doc = run_grid(cases, quick_limits=True, log=lambda _: None)
    validate_result(doc)
    assert not [r for r in doc["rows"] if "error" in r]
    impls = {r["impl"] for r in doc["rows"] if r["stage"] == "resample"}
    assert {"medfeat", "scipy", "torch_grid_sample"} <= impls
    assert all(0 < r["fraction"] < 10 for r in doc["rows"] if "fraction" in r)
    paths = write_outputs(doc, tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert any(p.suffix == ".png" for p in paths)


def test_validate_rejects_bad_rows() -> None:
    with pytest.raises(ValueError, match="lacks"):
        validate_result({"environment": {}, "limits": {}})
    with pytest.raises(ValueError, match="bad seconds"):
        validate_result({"environment": {}, "limits": {}, "rows": [{"stage": "x", "impl": "y", "seconds": 0.0,
                                                                    "items_per_s": 1.0}]})


def test_bench_cli_unknown_grid_is_one_line_error() -> None:
    result = subprocess.run([sys.executable, "-m", "medfeat", "bench", "--grid", "nope"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown benchmark grid" in result.stderr and "Traceback" not in result.stderr


def test_plan_estimates_cohort_time_and_memory_from_a_sample(tmp_path_factory) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _cohort import tiny_cohort

    from medfeat.engine.bench_run import plan_cohort

    manifest = tiny_cohort(tmp_path_factory, subjects=4)
    plan = plan_cohort(str(manifest), "unet3d", ["down.0"], sample=2, tiny=True, log=lambda _: None)
    assert plan["sample_items"] == 4 and plan["cohort_items"] == 8  # 2 of 4 subjects, 2 scans each
    assert plan["estimated_seconds"] == pytest.approx(plan["seconds_per_item"] * 8)
    assert plan["peak_rss_bytes"] > 0
