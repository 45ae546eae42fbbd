"""``spatialbias``: the command line. Bad input prints one ``error:`` line and exits 2.

One module per command group: :mod:`.runs` (report, eval, causal), :mod:`.bench`, :mod:`.sweep`,
:mod:`.probes` (probe build), :mod:`.organisms` (organism train, zoo, finetune); the app, its
groups and what the commands share: :mod:`.base`. Importing them registers the commands, in the
order ``--help`` lists them.
"""
from analyses.cli.base import app

# each import registers its commands, in this (the --help) order
from analyses.cli import runs  # noqa: E402,F401  isort: skip
from analyses.cli import bench  # noqa: E402,F401  isort: skip
from analyses.cli import sweep  # noqa: E402,F401  isort: skip
from analyses.cli import probes  # noqa: E402,F401  isort: skip
from analyses.cli import organisms  # noqa: E402,F401  isort: skip

__all__ = ["app", "main"]


def main() -> None:
    app()
