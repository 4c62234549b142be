"""The package's shape: rooms on floors, no import circle, no upward import, small files.

The import graph is read with ``ast`` from the sources (module- and function-level imports;
imports under ``if TYPE_CHECKING:`` are type-only and do not count), so an import hidden
inside a function to dodge a circle is still seen.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medfeat"

# The house, written once: each room's floor. A module may import from its own room and from
# rooms on lower floors only; two rooms on one floor do not import each other.
FLOORS: dict[str, int] = {
    "medfeat.errors": 0,
    "medfeat.version": 0,
    "medfeat.timeutil": 0,
    "medfeat.io": 1,
    "medfeat.kernels": 1,
    "medfeat.cohorts": 2,
    "medfeat.export.backbones": 2,
    "medfeat.export": 2,  # the package's own __init__ (its rooms are listed apart)
    "medfeat.export.runtimes": 3,
    "medfeat.export.training": 3,
    "medfeat.engine": 4,  # the package's own __init__
    "medfeat.engine.store": 4,
    "medfeat.engine.pipeline": 5,
    "medfeat.probes": 6,
    "medfeat.studies": 7,
    "medfeat.bench": 7,
    "medfeat.doctor": 8,
    "medfeat.api": 8,
    "medfeat.commands": 9,
    "medfeat.cli": 10,
    "medfeat.__main__": 11,
    "medfeat": 11,  # the root package re-exports the Python face (lazily)
}
MAX_FILE_LINES = 600
MAX_ROOM_SHARE = 0.25


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def room_of(module: str) -> str:
    """The longest room name that is ``module`` or a package above it."""
    best = ""
    for room in FLOORS:
        if (module == room or module.startswith(room + ".")) and len(room) > len(best):
            best = room
    if not best:
        raise AssertionError(f"{module} lies in no room of the house; add its room to FLOORS")
    return best


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports_of(module: str) -> list[tuple[str, str, int]]:
    """``(imported medfeat module, name imported from it or "", line)`` for every import."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "medfeat"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "medfeat":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, "", node.lineno) if sub in MODULES else (base, alias.name, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports_of(m) if t in MODULES and t != m} for m in MODULES}


def test_every_module_lies_in_a_room() -> None:
    for module in MODULES:
        room_of(module)


def test_no_import_runs_up_or_sideways() -> None:
    bad = []
    for module in MODULES:
        here = room_of(module)
        for target, _, line in imports_of(module):
            if target not in MODULES:
                bad.append(f"{module}:{line} imports {target}, which does not exist")
                continue
            there = room_of(target)
            if there != here and FLOORS[there] >= FLOORS[here]:
                bad.append(f"{module}:{line} ({here}, floor {FLOORS[here]}) imports {target} "
                           f"({there}, floor {FLOORS[there]})")
    assert not bad, "\n".join(bad)


def test_no_import_circle() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_private_name_is_imported_across_modules() -> None:
    bad = []
    for module in MODULES:
        for target, name, line in imports_of(module):
            if name.startswith("_") and not name.startswith("__"):
                bad.append(f"{module}:{line} imports the private name {name} from {target}")
            leaf = target.rpartition(".")[2]
            if not name and leaf.startswith("_") and not leaf.startswith("__") \
                    and target.rpartition(".")[0] != module.rpartition(".")[0]:
                bad.append(f"{module}:{line} imports the private module {target} from outside its package")
    assert not bad, "\n".join(bad)


def test_files_stay_small_and_no_room_holds_a_quarter() -> None:
    lines = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    big = [f"{MODULES[m].relative_to(ROOT)}: {n} lines" for m, n in lines.items() if n > MAX_FILE_LINES]
    assert not big, "\n".join(big)
    total = sum(lines.values())
    per_room: dict[str, int] = {}
    for m, n in lines.items():
        per_room[room_of(m)] = per_room.get(room_of(m), 0) + n
    crowded = {r: round(n / total, 3) for r, n in per_room.items() if n > MAX_ROOM_SHARE * total}
    assert not crowded, f"rooms over {MAX_ROOM_SHARE:.0%} of the package's lines: {crowded}"


def test_readme_layout_matches_the_tree() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"medfeat/[\w/]+\.py|medfeat/[\w/]+/", section))
    for entry in listed:
        assert (ROOT / entry).exists(), f"README's layout names {entry}, which is not in the tree"
    rooms = {r for r in FLOORS if r != "medfeat"}
    for room in rooms:
        rel = room.replace(".", "/")
        entry = f"{rel}/" if (ROOT / rel).is_dir() else f"{rel}.py"
        assert entry in listed, f"README's layout does not name {entry}"


@pytest.mark.parametrize("room", sorted(r for r in FLOORS if (ROOT / r.replace(".", "/")).is_dir()))
def test_every_room_says_what_it_holds(room: str) -> None:
    init = ROOT / room.replace(".", "/") / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc.split()) >= 5, f"{init.relative_to(ROOT)} needs a docstring saying what the room holds"
