"""The static name -> family index of the backbone registry, and lazy family loading.

``medfeat.export.backbones.models.BACKBONE_MODULES`` lets ``get_spec`` import one family instead of
all; it must name exactly what the family modules register. Which module registers which
name is traced in a fresh interpreter (this test process has imported every family long
ago), by wrapping ``register_backbone`` before any family is imported and reading the
registering module off the caller's frame.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from functools import cache

import pytest

from medfeat.errors import UnknownNameError
from medfeat.export.backbones import registry
from medfeat.export.backbones.models import BACKBONE_MODULES

_PROBE = """
import json, sys
import medfeat.export.backbones.registry as registry

owner = {}
_register = registry.register_backbone

def traced(spec):
    owner[spec.name] = sys._getframe(1).f_globals["__name__"].rsplit(".", 1)[-1]
    return _register(spec)

registry.register_backbone = traced  # family modules bind it when they are first imported

def families():
    return sorted(m.rsplit(".", 1)[-1] for m in sys.modules if m.startswith("medfeat.export.backbones.models."))

registry.get_spec("unet3d")
after_unet3d = families()
registry.create_backbone("dinov2_vits14", [-1], tiny=True)
after_dinov2 = families()
heavy_after_dinov2 = sorted(m for m in ("open_clip", "monai") if m in sys.modules)
names = registry.list_backbones()
print(json.dumps({"owner": owner, "names": names, "unavailable": registry._UNAVAILABLE,
                  "after_unet3d": after_unet3d, "after_dinov2": after_dinov2,
                  "heavy_after_dinov2": heavy_after_dinov2}))
"""


@cache
def traced() -> dict:
    """Run the probe once: registering module per name, and what each lookup imported."""
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_every_index_name_registers_from_its_module() -> None:
    run = traced()
    for name, module in sorted(BACKBONE_MODULES.items()):
        if module in run["unavailable"]:
            continue  # its architecture package is not installed here
        assert run["owner"].get(name) == module, f"{name}: index says {module}, registered by {run['owner'].get(name)}"


def test_every_built_in_name_is_in_the_index() -> None:
    run = traced()
    assert set(run["names"]) == set(run["owner"])  # nothing registered behind the tracer's back
    unindexed = sorted(set(run["owner"]) - set(BACKBONE_MODULES))
    assert not unindexed, f"add to medfeat.export.backbones.models.BACKBONE_MODULES: {unindexed}"


def test_get_spec_imports_only_the_named_family() -> None:
    run = traced()
    # unet3d builds on the MONAI-layout blocks of monai_blocks (which registers nothing)
    assert set(run["after_unet3d"]) == {"unet3d", "monai_blocks"}
    # dinov2 builds on the shared ViT helpers of vit2d (which registers nothing either)
    assert set(run["after_dinov2"]) == {"unet3d", "monai_blocks", "dinov2", "vit2d"}
    assert run["heavy_after_dinov2"] == []


@pytest.fixture
def plugin_spec():
    """A backbone registered at run time under a name the index does not know; removed after."""
    spec = dataclasses.replace(registry.get_spec("unet3d"), name="plugin_unet_for_index_test")
    registry.register_backbone(spec)
    yield spec
    registry._REGISTRY.pop(spec.name, None)


def test_run_time_registration_needs_no_index(plugin_spec) -> None:
    assert plugin_spec.name not in BACKBONE_MODULES
    assert registry.get_spec(plugin_spec.name) is plugin_spec
    assert plugin_spec.name in registry.list_backbones()
    backbone = registry.create_backbone(plugin_spec.name, [-1], tiny=True)
    assert backbone.provenance["model"] == plugin_spec.name


def _missing_package(target: str, real_import):
    """An ``import_module`` under which the family module ``target`` lacks its package."""

    def import_module(name: str, *args):
        if name == f"medfeat.export.backbones.models.{target}":
            raise ModuleNotFoundError("No module named 'notinstalledpkg'", name="notinstalledpkg")
        return real_import(name, *args)

    return import_module


def test_indexed_model_with_missing_package_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(BACKBONE_MODULES, "ghost_vit", "ghost_family")
    monkeypatch.setattr(registry, "_UNAVAILABLE", {})
    monkeypatch.setattr(registry.importlib, "import_module",
                        _missing_package("ghost_family", registry.importlib.import_module))
    with pytest.raises(UnknownNameError) as err:
        registry.get_spec("ghost_vit")
    message = str(err.value)
    assert "ghost_vit" in message and "notinstalledpkg" in message and "pip install" in message
    assert "\n" not in message


def test_list_backbones_records_a_family_with_missing_package(monkeypatch) -> None:
    monkeypatch.setattr(registry, "_UNAVAILABLE", {})
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(registry.importlib, "import_module",
                        _missing_package("seem", registry.importlib.import_module))
    names = registry.list_backbones()
    assert "notinstalledpkg" in registry._UNAVAILABLE["seem"]
    assert "unet3d" in names and "dinov2_vitb14" in names  # the other families are still listed
    with pytest.raises(UnknownNameError) as err:
        registry.get_spec("no_such_model")
    assert "family seem unavailable" in str(err.value) and "unet3d" in str(err.value)
