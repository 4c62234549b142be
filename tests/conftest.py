"""Shared test configuration: markers and skips for hardware-dependent tests."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# Tests share 2 cores with whatever else runs; keep BLAS/OpenMP from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# Test helpers (tiny backbones, tiny cohorts) import by bare name, also in spawned Dask
# workers, which inherit sys.path: put their folder on it once, here.
sys.path.insert(0, str(Path(__file__).parent / "helpers"))


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any import failure means no CUDA here
        return False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "tensorrt: needs the tensorrt package and a GPU (skipped without)")
    config.addinivalue_line("markers", "slow: longer tests (still run in CI)")
    config.addinivalue_line("markers", "parity: features equal to the upstream implementation's (tests/parity; "
                                       "`make parity` installs the parity extra and runs them)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = _cuda_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU on this machine"))
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            item.add_marker(pytest.mark.skip(reason="tensorrt not installed or no GPU"))


@pytest.fixture(autouse=True)
def _forget_plugins():
    """Backbones that a test's plugin registered, and the plugin modules it imported from its
    temporary folder, are forgotten after it: later tests see the registry they were collected
    with (``test_registry`` lists every model)."""
    registry = sys.modules.get("medfeat.export.backbones.registry")
    before = set(getattr(registry, "_REGISTRY", {}))
    modules = set(sys.modules)
    yield
    registry = sys.modules.get("medfeat.export.backbones.registry")
    if registry is None:
        return
    from medfeat.export.backbones.models import BACKBONE_MODULES

    for name in set(registry._REGISTRY) - before - set(BACKBONE_MODULES):
        del registry._REGISTRY[name]
    for name in set(sys.modules) - modules:
        if "pytest-of-" in str(getattr(sys.modules[name], "__file__", "") or ""):
            del sys.modules[name]
