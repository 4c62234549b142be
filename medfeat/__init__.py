"""medfeat: foundation-model features and linear probes for medical imaging cohorts.

``import medfeat`` stays light (the CLI starts from it); the Python face
(:mod:`medfeat.api`) loads on first use of one of its names.
"""
from __future__ import annotations

from typing import Any

from medfeat.version import __version__

_API_NAMES = ("open_store", "extract", "probe", "Store")


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        from medfeat import api

        return getattr(api, name)
    raise AttributeError(f"module 'medfeat' has no attribute {name!r}")


__all__ = ["__version__", *_API_NAMES]
