"""The ``medfeat`` command line: a thin click group over the library.

Commands live in :mod:`medfeat.commands`; each module there has a
``register(groups)`` function that adds its commands to the groups below.
User errors (:class:`medfeat.errors.MedfeatError`) print as one line and exit 2.
Importing this module imports no heavy library (torch, pandas, ...): the command
modules defer those to the commands that run, so ``medfeat --help`` starts in well
under a second.
"""
from __future__ import annotations

import importlib
import sys

import click

from medfeat.commands import COMMAND_MODULES
from medfeat.errors import MedfeatError
from medfeat.version import __version__


@click.group()
@click.version_option(__version__, prog_name="medfeat")
def cli() -> None:
    """medfeat: foundation-model features and linear probes for medical imaging cohorts."""


@cli.group()
def cohort() -> None:
    """Make, convert and inspect cohorts (manifests of scans or images)."""


@cli.group()
def models() -> None:
    """List, inspect and train backbones."""


@cli.group()
def store() -> None:
    """Inspect, verify and export feature stores."""


@cli.group()
def probe() -> None:
    """Train and compare probes on stored features."""


GROUPS = {"root": cli, "cohort": cohort, "models": models, "store": store, "probe": probe}

for _name in COMMAND_MODULES:
    importlib.import_module(f"medfeat.commands.{_name}").register(GROUPS)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors into one line and exit code 2."""
    try:
        cli.main(args=argv, prog_name="medfeat", standalone_mode=False)
    except MedfeatError as exc:
        click.echo(f"medfeat: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("medfeat: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
