"""``python -m credkeeper``: the command line, as the ``credkeeper`` console script runs it."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
