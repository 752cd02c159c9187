"""The ``credkeeper`` command line (click and rich, from the ``cli`` extra).

The only part of credkeeper that imports click or rich; the core never imports this package.
``main`` is what the console script and ``python -m credkeeper`` run; ``cli`` is the click group,
for ``click.testing.CliRunner``.
"""

from __future__ import annotations

from ._commands import cli, main

__all__ = ["cli", "main"]
