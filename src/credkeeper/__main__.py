"""``python -m credkeeper``: the command line (for now, the embedded end-to-end demo)."""

from __future__ import annotations

import argparse
import sys

from ._demo import run_demo


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; the process exit code."""
    parser = argparse.ArgumentParser(prog="credkeeper", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="refresh through several expiries with a fake provider and an encrypted file store",
    )
    demo.add_argument("--workers", type=int, default=32, help="concurrent workers (default 32)")
    demo.add_argument("--seconds", type=float, default=8.0, help="how long to run (default 8)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo(workers=args.workers, seconds=args.seconds, out=sys.stdout)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
