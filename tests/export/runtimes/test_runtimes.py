"""Runtimes behind one interface: each against eager fp32 PyTorch (the reference), with the
precision's tolerance from :data:`medfeat.export.runtimes.parity.TOLERANCES`."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from medfeat.errors import InputError, RuntimeUnavailableError, UnknownNameError
from medfeat.export.backbones.registry import create_backbone
from medfeat.export.runtimes.factory import CompiledRuntime, choose_auto, make_runtime
from medfeat.export.runtimes.onnx_export import random_input
from medfeat.export.runtimes.ort_session import available_providers
from medfeat.export.runtimes.parity import check_parity


def _vit():
    return create_backbone("rt_tiny_vit", ["blocks.0", "blocks.2"])


def _warp():
    return create_backbone("rt_tiny_warp", ["stage_a", "stage_b.down.1"])


def test_unknown_runtime_and_precision():
    with pytest.raises(UnknownNameError, match="unknown runtime 'jax'"):
        make_runtime(_vit(), "jax")
    with pytest.raises(UnknownNameError, match="unknown precision"):
        make_runtime(_vit(), "eager", precision="fp8")


@pytest.mark.parametrize("make", [_vit, _warp], ids=["vit", "warp3d"])
def test_onnxruntime_cpu_matches_eager(make, tmp_path):
    backbone = make()
    runtime = make_runtime(backbone, "onnxruntime", cache_dir=tmp_path)
    assert runtime.name == "onnxruntime" and runtime.fallback_reason is None
    report = check_parity(backbone, runtime, runtime="onnxruntime", batches=(2, 5))
    assert report.passed, report.failures()
    with pytest.raises(InputError, match="does not match the exported"):
        runtime(torch.zeros(1, 3, 16, 16) if make is _vit else torch.zeros(1, 2, 8, 8, 8))


def test_eager_reduced_precision_within_tolerance():
    backbone = _vit()
    for precision in ("bf16", "fp16"):
        runtime = make_runtime(backbone, "eager", precision=precision)
        report = check_parity(backbone, runtime, runtime="eager", precision=precision)
        assert report.passed, (precision, report.failures())
        assert max(t.rel for t in report.taps.values()) > 1e-6  # autocast really ran


def test_compiled_cpu_matches_eager():
    # aot_eager: dynamo capture + AOT autograd, without inductor's C++ build (~1 min on 2
    # cores); inductor on the CPU is exercised, with a parity check, by bench_runtimes.py
    backbone = create_backbone("rt_tiny_cnn", ["layer1"])
    runtime = make_runtime(backbone, "compiled", compile={"backend": "aot_eager"})
    assert isinstance(runtime, CompiledRuntime)
    report = check_parity(backbone, runtime, runtime="compiled", batches=(2,))
    assert report.passed, report.failures()


def test_compiled_failure_is_a_clear_error():
    def broken_backend(gm, example_inputs):
        raise NotImplementedError("no kernel for aten::frobnicate")

    runtime = CompiledRuntime(create_backbone("rt_tiny_cnn", ["stem"]), backend=broken_backend)
    with pytest.raises(RuntimeUnavailableError, match="torch.compile.*rt_tiny_cnn"):
        runtime(torch.zeros(1, 3, 32, 32))
    # compilation fails at the first call, after make_runtime returned: fallback happens there
    backbone = create_backbone("rt_tiny_cnn", ["stem"])
    allowed = make_runtime(backbone, "compiled", allow_fallback=True, compile={"backend": broken_backend})
    out = allowed(torch.ones(2, 3, 32, 32))
    assert allowed.name == "eager" and "frobnicate" in allowed.fallback_reason
    with torch.inference_mode():
        np.testing.assert_allclose(out["stem"], backbone(torch.ones(2, 3, 32, 32))["stem"].numpy(), rtol=1e-6)


def test_auto_rule_on_cpu(tmp_path):
    assert choose_auto("cpu", "fp32", "volume3d") == ["onnxruntime", "eager"]
    assert choose_auto("cpu", "fp32", "image2d") == ["eager"]  # ORT measured no faster on 2D ViTs
    assert choose_auto("cpu", "bf16", "pair3d") == ["eager"]  # ORT's CPU provider lacks bf16 kernels
    assert make_runtime(_warp(), "auto", cache_dir=tmp_path).name == "onnxruntime"
    assert make_runtime(_vit(), "auto", cache_dir=tmp_path).name == "eager"


def test_missing_runtime_errors_unless_fallback_allowed(tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt installed: nothing to fall back from")
    backbone = _vit()
    with pytest.raises(RuntimeUnavailableError, match="TensorRT is not installed; pip install tensorrt"):
        make_runtime(backbone, "tensorrt", device="cpu")
    runtime = make_runtime(backbone, "tensorrt", device="cpu", allow_fallback=True, cache_dir=tmp_path)
    assert runtime.name == "onnxruntime" and "TensorRT" in runtime.fallback_reason


def test_unsupported_operator_falls_back_only_when_allowed(tmp_path):
    backbone = _vit()
    # bf16 graphs have no bf16 Conv in ONNX: ORT refuses, naming the operator
    with pytest.raises(RuntimeUnavailableError, match="operator Conv"):
        make_runtime(backbone, "onnxruntime", precision="bf16", cache_dir=tmp_path)
    runtime = make_runtime(backbone, "onnxruntime", precision="bf16", cache_dir=tmp_path, allow_fallback=True)
    assert runtime.name == "eager" and "operator Conv" in runtime.fallback_reason


# --- GPU paths (skipped without CUDA / the providers) ---------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_eager_cuda_autocast_channels_last(precision):
    backbone = create_backbone("rt_tiny_cnn", ["stem", "layer2"])
    runtime = make_runtime(backbone, "eager", device="cuda", precision=precision)
    assert runtime.memory_format is torch.channels_last
    report = check_parity(backbone, runtime, runtime="eager-cuda", precision=precision, device="cuda")
    assert report.passed, report.failures()


@pytest.mark.gpu
def test_compiled_cuda_graphs_match_eager():
    backbone = _warp()
    runtime = make_runtime(backbone, "compiled", device="cuda")
    assert runtime.mode == "reduce-overhead"
    first = runtime(random_input(backbone, 2, device="cuda"))
    again = runtime(random_input(backbone, 2, seed=9, device="cuda"))  # a replay must not alias outputs
    assert not np.allclose(first["stage_a"], again["stage_a"])
    report = check_parity(backbone, runtime, runtime="compiled-cuda", device="cuda", batches=(2,))
    assert report.passed, report.failures()


@pytest.mark.gpu
def test_onnxruntime_cuda_io_binding(tmp_path):
    if "CUDAExecutionProvider" not in available_providers():
        pytest.skip("onnxruntime-gpu (CUDA execution provider) not installed")
    backbone = _warp()
    runtime = make_runtime(backbone, "onnxruntime", device="cuda", cache_dir=tmp_path)
    assert runtime.runner.ep == "cuda"
    report = check_parity(backbone, runtime, runtime="ort-cuda", device="cuda", tolerance=1e-3)
    assert report.passed, report.failures()


@pytest.mark.gpu
def test_onnxruntime_tensorrt_provider(tmp_path):
    if "TensorrtExecutionProvider" not in available_providers():
        pytest.skip("onnxruntime-gpu with the TensorRT execution provider not installed")
    backbone = _vit()
    runtime = make_runtime(backbone, "ort-tensorrt", device="cuda", cache_dir=tmp_path)
    report = check_parity(backbone, runtime, runtime="ort-trt", device="cuda", tolerance=1e-3)
    assert report.passed, report.failures()


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_native_tensorrt_engine_parity_and_cache(precision, tmp_path):
    backbone = _warp()
    runtime = make_runtime(backbone, "tensorrt", device="cuda", precision=precision, cache_dir=tmp_path,
                           profile=(1, 2, 4))
    assert not runtime.artefact.hit
    report = check_parity(backbone, runtime, runtime="tensorrt", precision=precision, device="cuda")
    assert report.passed, report.failures()
    again = make_runtime(backbone, "tensorrt", device="cuda", precision=precision, cache_dir=tmp_path,
                         profile=(1, 2, 4))
    assert again.artefact.hit and again.artefact.key == runtime.artefact.key
    with pytest.raises(InputError, match="outside the engine's profile"):
        runtime(random_input(backbone, 5, device="cuda"))
