"""Plugins: user code that registers backbones, from a file, a module, or an installed package.

The contract: a plugin is a Python file or an importable module that, when imported, calls
:func:`medfeat.export.backbones.registry.register_backbone` for each model it offers
(a :class:`~medfeat.export.backbones.spec.BackboneSpec` whose ``build`` returns a
:class:`~medfeat.export.backbones.spec.TappedModel`). Importing it twice must be harmless.

* ``--plugin path/to/my_models.py`` imports the file as module ``my_models`` (its stem); the
  extraction driver ships the file to every Dask worker, local or remote, which imports it
  under the same name before building the model.
* ``--plugin my_package.models`` imports an installed module (workers import it by name).
* An installed distribution registers through the entry-point group ``medfeat.backbones``;
  each entry point names a module (imported) or a function (called with no arguments), and
  is loaded whenever the registry looks beyond its own families (``models list``, a name it
  does not know) -- in the driver and in every worker alike.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from medfeat.errors import InputError, one_line

ENTRY_POINT_GROUP = "medfeat.backbones"
_ENTRY_POINTS: dict[str, str] = {}  # entry point name -> "" when loaded, else why it failed
# Re-entrant and apart: a plugin's import may itself look names up (and so load entry points).
_FILE_LOCK = threading.RLock()
_ENTRY_LOCK = threading.RLock()
_FILES: dict[str, bytes] = {}  # module name -> content of the plugin file loaded under it


@dataclass(frozen=True)
class Plugin:
    """A loaded plugin: the module name it is imported as, and its file when it is one."""

    module: str
    file: str | None = None


def load_plugin(spec: str) -> Plugin:
    """Import the plugin ``spec`` (a ``.py`` file or a module name) into this process.

    Raises InputError naming the plugin when the file is missing or its import fails.
    """
    text = str(spec).strip()
    path = Path(text).expanduser()
    if text.endswith(".py") or path.is_file():
        return _load_file(path.resolve())
    try:
        importlib.import_module(text)
    except Exception as exc:
        raise InputError(f"plugin {text}: import failed ({type(exc).__name__}: {one_line(exc)})") from exc
    return Plugin(text)


def _load_file(path: Path) -> Plugin:
    if not path.is_file():
        raise InputError(f"plugin {path}: file not found")
    name = path.stem
    if not name.isidentifier():
        raise InputError(f"plugin {path}: its name must be a Python identifier (it is imported as {name!r})")
    with _FILE_LOCK:
        loaded = sys.modules.get(name)
        if loaded is not None:
            # the same file, or a copy of it (Dask's upload_file imports a copy here too)
            if _FILES.get(name) == path.read_bytes() or _same_source(getattr(loaded, "__file__", None), path):
                return Plugin(name, str(path))
            raise InputError(f"plugin {path}: a module {name!r} is already imported from elsewhere; rename the file")
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise InputError(f"plugin {path}: not a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        _FILES[name] = path.read_bytes()
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            del _FILES[name]
            raise InputError(f"plugin {path}: import failed ({type(exc).__name__}: {one_line(exc)})") from exc
    return Plugin(name, str(path))


def _same_source(loaded_file: str | None, path: Path) -> bool:
    if not loaded_file or not Path(loaded_file).is_file():
        return False
    return Path(loaded_file).resolve() == path or Path(loaded_file).read_bytes() == path.read_bytes()


def load_plugins(specs: tuple[str, ...] | list[str]) -> list[Plugin]:
    """:func:`load_plugin` for each spec, in order."""
    return [load_plugin(s) for s in specs]


def load_entry_points() -> dict[str, str]:
    """Load every ``medfeat.backbones`` entry point once per process; returns
    ``{entry point: ""}`` for those loaded and the reason for those that failed (a broken
    plugin must not hide the registry's own models)."""
    from importlib.metadata import entry_points

    with _ENTRY_LOCK:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in _ENTRY_POINTS:
                continue
            try:
                target = ep.load()
                if callable(target) and not isinstance(target, type(sys)):
                    target()
                _ENTRY_POINTS[ep.name] = ""
            except Exception as exc:  # noqa: BLE001 - recorded and shown by the registry
                _ENTRY_POINTS[ep.name] = f"{type(exc).__name__}: {one_line(exc)}"
        return dict(_ENTRY_POINTS)
