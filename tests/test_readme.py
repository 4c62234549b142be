"""The README's examples run as they are written: the plugin file and its commands, and the
notebook session of the Python face."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from medfeat.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def python_block(first_line: str) -> str:
    """The fenced ```python block whose first line is ``first_line``."""
    for block in re.findall(r"```python\n(.*?)```", README, flags=re.S):
        if block.splitlines()[0].strip() == first_line:
            return block
    raise AssertionError(f"README has no python block starting with {first_line!r}")


def commands_after(marker: str) -> list[list[str]]:
    """The indented ``medfeat ...`` commands right after ``marker`` (continuations joined)."""
    tail = README.split(marker, 1)[1]
    lines = []
    for line in tail.split("\n## ", 1)[0].splitlines():
        if line.startswith("    medfeat ") or (lines and lines[-1].endswith("\\")):
            lines.append(line.strip())
    joined = " ".join(lines).replace("\\ ", "")
    return [shlex.split(cmd) for cmd in re.split(r"\s(?=medfeat )", joined) if cmd.strip()]


def _run(args: list[str], capsys) -> str:
    try:
        main(args[1:])
    except SystemExit as exc:
        assert not exc.code, capsys.readouterr()
    return capsys.readouterr().out


def test_plugin_example(tmp_path, monkeypatch, capsys) -> None:
    from medfeat.cohorts.synth import synth_cohort

    monkeypatch.chdir(tmp_path)
    code = python_block("# my_models.py")
    (tmp_path / "my_models.py").write_text(code)
    synth_cohort(tmp_path / "cohort", subjects=2, seed=0, shape=(16, 16, 16))
    show, extract = commands_after("# my_models.py")[:2]
    assert show[:3] == ["medfeat", "models", "show"] and extract[1] == "extract"
    assert "stage3" in _run(show, capsys)
    out = _run(extract, capsys)
    assert "4 done now" in out and "2 workers" in out


def test_python_session(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("xarray")
    monkeypatch.chdir(tmp_path)
    code = python_block("import medfeat")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    out = capsys.readouterr().out
    assert "24 items" in out and "AUC" in out
    assert namespace["cube"].dims == ("item", "feature") and len(namespace["frame"]) == 24
    assert namespace["store"].arrays() == ["unet3d:bottom:oracle-crop", "unet3d:down.1:oracle-crop"]  # as printed


def test_speed_figures_are_the_measured_ones() -> None:
    """Each speed figure of the README's "Speed defaults" paragraph (ratios, seconds,
    milliseconds) is one that benchmarks/RESULTS.md records with its command: the README
    cannot quote a figure no benchmark printed, or keep one after its section is re-measured."""
    results = (Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md").read_text()
    paragraph = README.split("**Speed defaults.**", 1)[1].split("\n\n", 1)[0]
    figures = re.findall(r"\b\d+(?:\.\d+)?(?:x| s\b| ms\b)", paragraph)
    assert len(figures) >= 4, paragraph
    # ratios as written ("2.1x"); times as numbers (a table's column gives the unit)
    missing = [f for f in figures if not re.search(r"(?<![\d.])" + re.escape(f.split(" ")[0].rstrip("x")) + r"(?![\d])"
                                                   + ("x" if f.endswith("x") else ""), results)]
    assert not missing, f"README quotes {missing}, which benchmarks/RESULTS.md does not record"
