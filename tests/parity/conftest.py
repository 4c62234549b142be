"""The parity suite: every registry family against its upstream implementation.

Every test here carries the ``parity`` marker (``pytest -m parity`` runs only them; ``make
parity`` installs the ``parity`` extra first). At the end of a run the largest relative
error per family is printed (see ``tests/helpers/parity_common.py``).
"""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.parity)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    from parity_common import ERRORS

    if not ERRORS:
        return
    terminalreporter.section("parity: largest relative error per family (max|ours - upstream| / max|upstream|)")
    for family, err in sorted(ERRORS.items()):
        terminalreporter.write_line(f"{family:<28} {err:.2e}")
