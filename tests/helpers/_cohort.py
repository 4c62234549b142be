"""A tiny synthetic knee cohort shared by the engine and CLI tests (made once per session)."""
from __future__ import annotations

from pathlib import Path

_CACHE: dict[str, Path] = {}


def tiny_cohort(factory, subjects: int = 3) -> Path:
    """Manifest of a ``subjects``-subject cohort of 16^3 scans (with atlas and masks)."""
    key = f"c{subjects}"
    if key not in _CACHE:
        from medfeat.cohorts.synth import synth_cohort

        _CACHE[key] = Path(synth_cohort(factory.mktemp(key), subjects=subjects, seed=0, shape=(16, 16, 16)))
    return _CACHE[key]
