"""Shared setup for the export tests: the tiny ``rt_tiny_*`` backbones of runtime_models.py.

They are registered when this conftest is imported, before any module here is collected,
so ``list_backbones()`` (read at collection time, e.g. by test_registry.py's parametrisation)
sees them whichever test files are selected.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _load_models() -> ModuleType:
    """Import runtime_models.py once per process, under a name dynamo can re-import."""
    name = "medfeat_runtime_models"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "helpers" / "runtime_models.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_load_models()
