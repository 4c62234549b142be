"""The benchmark harness on a tiny grid, its JSON schema, and FLOP counts against hand counts."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medfeat.bench.harness import time_call
from medfeat.bench.run import load_grid, run_grid, validate_result, write_outputs
from medfeat.export.backbones.flops import model_flops


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
    from _cohort import tiny_cohort

    from medfeat.bench.run import plan_cohort

    manifest = tiny_cohort(tmp_path_factory, subjects=4)
    plan = plan_cohort(str(manifest), "unet3d", ["down.0"], sample=2, tiny=True, log=lambda _: None)
    assert plan["sample_items"] == 4 and plan["cohort_items"] == 8  # 2 of 4 subjects, 2 scans each
    assert plan["estimated_seconds"] == pytest.approx(plan["seconds_per_item"] * 8)
    assert plan["peak_rss_bytes"] > 0


# -- the pipeline stage: the pipeline against a sequential loop, its efficiency ------------
@pytest.fixture(scope="module")
def pipeline_doc() -> dict:
    """The tiny grid's pipeline case, run once for the tests below (a few seconds)."""
    cases = [c for c in load_grid("tiny") if c.stage == "pipeline"]
    assert len(cases) == 1 and cases[0].extra["schedulers"] == ("threads:1",)
    return run_grid(cases, quick_limits=True, log=lambda _: None)


def test_tiny_pipeline_stage_rows_validate(pipeline_doc, tmp_path) -> None:
    validate_result(pipeline_doc)
    rows = pipeline_doc["rows"]
    assert not [r for r in rows if "error" in r], rows
    assert [r["impl"] for r in rows] == ["sequential", "pipeline[threads:1]", "read alone[threads:1]",
                                         "preprocess alone[threads:1]", "infer alone[threads:1]",
                                         "write alone[threads:1]"]
    assert {r["scans"] for r in rows} == {4}  # 2 subjects, 2 scans each
    write_outputs(pipeline_doc, tmp_path)
    assert (tmp_path / "pipeline_efficiency.png").is_file()
    md = (tmp_path / "bench.md").read_text()
    assert "pipeline[threads:1]" in md and "efficiency " in md and "slowest stage alone" in md
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][1]["slowest_stage"]


def test_tiny_pipeline_efficiency_and_ratio_follow_from_the_rows(pipeline_doc) -> None:
    rows = {r["impl"]: r for r in pipeline_doc["rows"]}
    pipe, seq = rows["pipeline[threads:1]"], rows["sequential"]
    alone = {s: rows[f"{s} alone[threads:1]"]["items_per_s"] for s in ("read", "preprocess", "infer", "write")}
    assert alone == pipe["alone_items_per_s"]
    assert all(math.isfinite(v) and v > 0 for v in alone.values())
    slowest = min(alone, key=alone.__getitem__)
    assert pipe["slowest_stage"] == slowest and rows[f"{slowest} alone[threads:1]"]["slowest"]
    assert math.isfinite(pipe["efficiency"]) and pipe["efficiency"] > 0
    assert pipe["efficiency"] == pytest.approx(pipe["items_per_s"] / alone[slowest], rel=1e-9)
    assert pipe["ratio_to_sequential"] == pytest.approx(pipe["items_per_s"] / seq["items_per_s"], rel=1e-9)
    assert pipe["time_sharing_items_per_s"] == pytest.approx(1 / sum(1 / v for v in alone.values()))
    assert 0 < pipe["infer_busy_fraction"] and pipe["failed"] == 0 and pipe["peak_rss_driver_mib"] > 0


def _pipeline_row(**changes) -> dict:
    row = {"stage": "pipeline", "impl": "pipeline[threads:1]", "role": "pipeline", "seconds": 1.0,
           "items_per_s": 4.0, "ratio_to_sequential": 2.0, "efficiency": 0.5, "slowest_stage": "infer",
           "alone_items_per_s": {"read": 50.0, "preprocess": 20.0, "infer": 8.0, "write": 90.0}}
    return {"environment": {}, "limits": {}, "rows": [{**row, **changes}]}


@pytest.mark.parametrize("changes, message", [
    ({}, None),
    ({"efficiency": float("nan")}, "bad efficiency"),
    ({"efficiency": 0.0}, "bad efficiency"),
    ({"ratio_to_sequential": None}, "bad ratio_to_sequential"),
    ({"alone_items_per_s": {"read": 50.0, "infer": 8.0}}, "alone_items_per_s needs"),
    ({"alone_items_per_s": {"read": 50.0, "preprocess": 20.0, "infer": float("inf"), "write": 1.0}},
     "bad items/s of infer alone"),
    ({"slowest_stage": "read"}, "is not the slowest"),
    ({"role": "other"}, "bad role"),
])
def test_validate_checks_pipeline_rows(changes, message) -> None:
    doc = _pipeline_row(**changes)
    if message is None:
        validate_result(doc)
    else:
        with pytest.raises(ValueError, match=message):
            validate_result(doc)


def test_scheduler_list_parses_and_rejects_bad_entries() -> None:
    from medfeat.bench.pipeline import parse_kinds
    from medfeat.errors import InputError

    assert parse_kinds("threads:1, local:2") == [("threads", 1), ("local", 2)]
    assert parse_kinds(("local:1",)) == [("local", 1)]
    for bad in ("sync:1", "threads", "local:0", "threads:x"):
        with pytest.raises(InputError, match="scheduler"):
            parse_kinds(bad)


def test_bench_pipeline_script_keeps_its_results_section(tmp_path, monkeypatch) -> None:
    """The thin script's RESULTS.md section: same heading, command and table as before the
    measurements moved into medfeat.bench.pipeline; a rerun replaces its section."""
    import importlib.util

    path = Path(__file__).parents[2] / "benchmarks" / "bench_pipeline.py"
    spec = importlib.util.spec_from_file_location("bench_pipeline_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "HERE", tmp_path)
    args = {"subjects": 2, "shape": 16, "model": "unet3d", "taps": "0", "tiny": True, "input_size": None,
            "device": "cpu", "batch": 2, "threads": 2, "memory_limit": "4GB", "repeats": 1, "kinds": "threads:1",
            "memory_demo": 0, "no_record": False, "work": None}
    run = {"kind": "threads", "workers": 1, "threads_per_worker": 2, "items_per_s": 10.0,
           "ratio_vs_sequential": 4.0, "alone_items_per_s": {"read": 300.0, "preprocess": 200.0, "infer": 12.5,
                                                             "write": 250.0},
           "slowest_stage": "infer", "efficiency": 0.8, "infer_busy_fraction": 0.9,
           "peak_rss_driver_mib": 1200, "peak_rss_worker_mib": 0}
    result = {"args": args, "date": "2026-11-23 08:00 UTC", "machine": "x86_64, 2 cores",
              "load_average": {"start": [1.0, 1.0, 1.0], "end": [2.0, 2.0, 2.0]},
              "cohort": {"scans": 4, "bytes_float32": 65536}, "sequential": {"items_per_s": 2.5},
              "pipeline": [run], "memory_demo": None}
    (tmp_path / "RESULTS.md").write_text("# Benchmark results\n\n## Other\n\ntext\n")
    script._write_results(result)
    script._write_results({**result, "date": "2026-11-23 09:00 UTC"})
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count("## Pipeline vs sequential loop, unet3d tap 0 (2026-11-23 09:00 UTC)") == 1
    assert "08:00 UTC" not in text and "## Other" in text
    assert "--kinds threads:1 --repeats 1 --memory-limit 4GB --tiny`" in text
    assert "| threads | 1 x 2 | 10 | 4.00x | 300 / 200 / 12.5 / 250 | infer | 0.80 | 0.90 | 1200 / 0 |" in text
    assert "pipeline_cpu_unet3d_tiny_16.json" in text


def test_bench_cli_rejects_a_stage_the_grid_lacks() -> None:
    result = subprocess.run([sys.executable, "-m", "medfeat", "bench", "--grid", "tiny", "--stages", "pipeline,nope"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "has no stage nope" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.gpu
def test_gpu_cases_run_and_validate(tmp_path) -> None:
    """The ``gpu`` preset's stages at small sizes on CUDA: kernels, eager/compiled inference, pipeline."""
    cases = [
        {"stage": "resample", "size": [40, 40, 40], "out_size": [32, 32, 32], "device": "cuda", "repeats": 3},
        {"stage": "fused", "size": [40, 40, 40], "out_size": [32, 32, 32], "batch": 2, "device": "cuda"},
        {"stage": "infer", "model": "unet3d", "tiny": True, "size": [16, 16, 16], "batch": 2, "device": "cuda",
         "precision": "bf16", "runtimes": ["eager"], "repeats": 3},
        {"stage": "pipeline", "model": "unet3d", "tiny": True, "size": [16, 16, 16], "batch": 2,
         "device": "cuda", "subjects": 2, "schedulers": ["threads:1"], "repeats": 1},
    ]
    grid = tmp_path / "gpu.yaml"
    grid.write_text(json.dumps({"cases": cases}))  # JSON is YAML
    doc = run_grid(load_grid(str(grid)), quick_limits=True, log=lambda _: None)
    validate_result(doc)
    assert not [r for r in doc["rows"] if "error" in r], doc["rows"]
    assert doc["environment"].get("gpu")
    assert {r["stage"] for r in doc["rows"]} == {"resample", "fused", "infer", "pipeline"}
