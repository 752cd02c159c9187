"""``python -m credkeeper`` and the ``credkeeper`` console script.

The command line needs click and rich, which the core library does not: they come with the
``cli`` extra, and without them the command says how to install them instead of failing with
an import traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(args: Sequence[str] | None = None) -> int:
    """Run ``credkeeper`` with ``args`` (default: the process's); return the exit code."""
    try:
        from .cli import main as cli_main  # noqa: PLC0415, TID251 - click and rich are optional
    except ImportError as exc:
        if exc.name not in ("click", "rich"):
            raise
        print(  # noqa: T201 - the command line's one error line
            f"credkeeper: error: the command line needs {exc.name}; "
            "install it with pip install 'credkeeper[cli]'",
            file=sys.stderr,
        )
        return 2
    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
