"""Timestamps as medfeat writes them into stores, run records and reports."""
from __future__ import annotations

import datetime as _dt


def utc_now() -> str:
    """The current UTC time as ISO 8601 to the second, e.g. ``2026-11-29T10:00:00+00:00``."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
