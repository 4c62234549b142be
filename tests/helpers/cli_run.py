"""Run the ``medfeat`` CLI in this process, as the CLI tests do."""
from __future__ import annotations

from medfeat.cli import main


def run_medfeat(capsys, *args: str) -> tuple[int, str, str]:
    """``medfeat ARGS`` -> (exit code, stdout, stderr), captured by pytest's ``capsys``."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err
