"""The CLI starts without the heavy libraries.

``medfeat --help`` and every ``medfeat ... --help`` must not import torch, pandas, zarr,
dask, numba or scipy: command modules import them inside the command functions. Checked in
a fresh interpreter, since this test process has long imported all of them.
"""
from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "pandas", "zarr", "dask", "numba", "scipy", "timm", "open_clip", "monai", "sklearn")

# Runs in a fresh interpreter: import the CLI, then ask every group and command for --help,
# and print which heavy modules got imported at each step.
_PROBE = """
import json, sys
HEAVY = %r

def loaded():
    return sorted(m for m in HEAVY if m in sys.modules)

import medfeat.cli
from click.testing import CliRunner

steps = {"import medfeat.cli": loaded()}

def walk(cmd, path):
    yield path
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from walk(sub, path + [name])

runner = CliRunner()
for path in walk(medfeat.cli.cli, []):
    result = runner.invoke(medfeat.cli.cli, path + ["--help"])
    if result.exit_code != 0:
        raise SystemExit(f"{path} --help exited {result.exit_code}: {result.output}")
    steps[" ".join(["medfeat", *path, "--help"])] = loaded()
print(json.dumps(steps))
"""


def test_cli_import_and_every_help_skip_heavy_modules() -> None:
    proc = subprocess.run([sys.executable, "-c", _PROBE % (HEAVY,)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    steps = json.loads(proc.stdout.splitlines()[-1])
    assert len(steps) > 10, steps  # the root, the groups and their commands were all asked
    heavy = {step: mods for step, mods in steps.items() if mods}
    assert heavy == {}, f"heavy modules imported at start-up: {heavy}"
