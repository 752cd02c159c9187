"""The documentation as its tests read it: the pages, their fenced blocks, and the deployment
values a page shows that a test swaps for its own.

``tests/docs/test_examples.py`` runs the python blocks, ``tests/docs/test_cli_examples.py``
checks the command lines of the shell blocks, ``tests/server/test_client_snippets.py`` runs the
Node.js and PHP blocks: all three find the blocks here, so they agree on what a block is.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# Installed drivers of the Node.js example, not documentation (mkdocs.yml excludes them too).
IGNORED = DOCS / "examples" / "app_cipher" / "node_modules"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>[^\n]*)$")


def pages() -> list[Path]:
    """Every markdown page under docs/, in a stable order (the README is not among them)."""
    return [path for path in sorted(DOCS.rglob("*.md")) if not path.is_relative_to(IGNORED)]


@dataclass(frozen=True)
class Fenced:
    """One fenced block: its language, where its opening fence is, its lines."""

    language: str
    #: the opening fence's line number (from 1); the body starts on the next line
    line: int
    #: the lines between the fences, without the opening fence's indentation
    lines: tuple[str, ...]

    @property
    def body(self) -> str:
        """The block's text, as a file holding it would read."""
        return "\n".join(self.lines) + "\n"


def fenced(lines: list[str]) -> Iterator[Fenced]:
    """The fenced blocks of a page read as ``lines``, in page order; an unclosed one runs to
    the end of the page, as markdown reads it."""
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        index += 1
        if opening is None:
            continue
        indent, fence = opening["indent"], opening["fence"]
        start = index
        while index < len(lines) and not (
            lines[index].strip().startswith(fence) and lines[index].strip().strip(fence[0]) == ""
        ):
            index += 1
        language = opening["info"].strip().split(" ")[0].lower()
        body = tuple(line.removeprefix(indent) for line in lines[start:index])
        yield Fenced(language, start, body)
        index += 1


def check_shown(text: str, literals: Mapping[str, object], where: str, owner: str) -> None:
    """Fail unless ``text`` shows each literal a test stands in for: a page that moved on to
    other values would have the test run something other than what it shows."""
    for literal in literals:
        if literal not in text:
            pytest.fail(
                f"{where} no longer shows {literal!r}, which {owner} stands in for: "
                f"update {owner} to what the page shows",
                pytrace=False,
            )


def stand_in(text: str, swaps: Mapping[str, str], where: str, owner: str) -> str:
    """``text`` with each value the page shows replaced by the test's local one; each must
    appear (:func:`check_shown`)."""
    check_shown(text, swaps, where, owner)
    return swapped(text, swaps)


def swapped(text: str, swaps: Mapping[str, str]) -> str:
    """``text`` with each value the page shows replaced by the test's local one."""
    for literal, local in swaps.items():
        text = text.replace(literal, local)
    return text
