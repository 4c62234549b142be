"""``python -m medfeat`` runs the CLI."""
from medfeat.cli import main

main()
