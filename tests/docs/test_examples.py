"""Every ```python block of the documentation runs, so the docs cannot drift from the code.

The convention, for whoever writes a page:

- A block runs as it is, in a fresh namespace, in a temporary working directory, with
  ``CREDKEEPER_KEYS`` set to a test key ring and ``CREDKEEPER_STORE`` to a file store there. It
  may use the fakes (``credkeeper.testing``), relative paths and the local PostgreSQL.
- A block made of ``>>>`` lines is a doctest: its printed output must match.
- ``<!-- run: pytest -->`` on the line above a block: the block is a test module, run by pytest
  in a child process (for the complete example tests users copy).
- ``<!-- not run: <reason> -->`` above a block (blank lines between are allowed): it cannot run
  here (a real token endpoint, AWS, a Docker engine, a fragment of a larger program); its run is
  skipped with the reason, and it must still compile (top-level ``await`` allowed).

Blocks in other languages (console, json, text, ...) are not run.
"""

from __future__ import annotations

import ast
import base64
import doctest
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
# Installed drivers of the Node.js example, not documentation (mkdocs.yml excludes them too).
IGNORED = ("examples/app_cipher/node_modules/",)
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>[^\n]*)$")
MARKER = re.compile(r"^\s*<!--\s*(?P<verb>run|not run):\s*(?P<detail>.*?)\s*-->\s*$")
# A key ring that is no one's: 32 zero bytes, base64url, under the id "docs".
KEYS = "docs:" + base64.urlsafe_b64encode(bytes(32)).decode().rstrip("=")


@dataclass(frozen=True)
class Block:
    """One fenced ```python block: where it is, its source and what its marker asks."""

    page: str
    line: int
    source: str
    mode: str  # "exec", "doctest", "pytest" or "skip"
    reason: str = ""

    @property
    def id(self) -> str:
        """``page:line``, the test id that points at the block."""
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """Every markdown page of the site, in a stable order."""
    found = []
    for path in sorted(DOCS.rglob("*.md")):
        relative = path.relative_to(DOCS).as_posix()
        if not relative.startswith(IGNORED):
            found.append(path)
    return found


def blocks(path: Path) -> Iterator[Block]:
    """The ```python blocks of one page, each with the mode its marker (or its shape) gives."""
    page = path.relative_to(DOCS).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        language = opening["info"].strip().split(" ")[0].lower()
        body_start = index + 1
        index = body_start
        while index < len(lines) and not (
            lines[index].strip().startswith(fence) and lines[index].strip().strip(fence[0]) == ""
        ):
            index += 1
        if language in {"python", "py", "pycon"}:
            body = [line.removeprefix(indent) for line in lines[body_start:index]]
            yield _block(page, body_start, "\n".join(body) + "\n", _marker(lines, body_start - 1))
        index += 1


def _marker(lines: list[str], fence_line: int) -> re.Match[str] | None:
    above = fence_line - 1
    while above >= 0 and not lines[above].strip():
        above -= 1
    return MARKER.match(lines[above]) if above >= 0 else None


def _block(page: str, line: int, source: str, marker: re.Match[str] | None) -> Block:
    if marker is not None and marker["verb"] == "not run":
        return Block(page, line, source, "skip", marker["detail"])
    if marker is not None and marker["detail"] == "pytest":
        return Block(page, line, source, "pytest")
    if marker is not None:
        raise ValueError(f"{page}:{line}: unknown marker 'run: {marker['detail']}'")
    if source.lstrip().startswith(">>>"):
        return Block(page, line, source, "doctest")
    return Block(page, line, source, "exec")


ALL = [block for path in pages() for block in blocks(path)]


def params() -> list[object]:
    """One pytest parameter per block; the marked ones skip, naming why."""
    return [
        pytest.param(
            block,
            id=block.id,
            marks=[pytest.mark.skip(reason=f"{block.id} not run: {block.reason}")]
            if block.mode == "skip"
            else [],
        )
        for block in ALL
    ]


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary working directory and the CREDKEEPER_* settings the examples assume."""
    monkeypatch.chdir(tmp_path)
    for name in [name for name in os.environ if name.startswith("CREDKEEPER_")]:
        if not name.startswith("CREDKEEPER_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CREDKEEPER_KEYS", KEYS)
    monkeypatch.setenv("CREDKEEPER_STORE", f"file://{tmp_path}/credentials.db")
    monkeypatch.setenv("CREDKEEPER_JOURNAL", str(tmp_path / "journal"))
    return tmp_path


@pytest.mark.parametrize("block", params())
def test_block_runs(block: Block, sandbox: Path) -> None:
    """The block runs to the end without an error (a doctest: with the output it shows)."""
    if block.mode == "pytest":
        module = sandbox / "test_docs_example.py"
        module.write_text(block.source, encoding="utf-8")
        # A child pytest with no configuration file: the user's project, not credkeeper's.
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        command += ["--rootdir", str(sandbox), "-c", os.devnull, str(module)]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert (0, "") == (result.returncode, "" if result.returncode == 0 else result.stdout)
    elif block.mode == "doctest":
        parser = doctest.DocTestParser()
        test = parser.get_doctest(block.source, {}, block.id, block.page, block.line)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        failures: list[str] = []
        runner.run(test, out=failures.append)
        assert [] == failures
    else:
        code = compile(block.source, block.id, "exec")
        exec(code, {"__name__": "__docs__"})  # noqa: S102


@pytest.mark.parametrize(
    "block", [pytest.param(block, id=block.id) for block in ALL if block.mode == "skip"]
)
def test_marked_block_compiles(block: Block) -> None:
    """A block marked not run is still valid Python, so it cannot rot unseen."""
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    assert block.id == compile(block.source, block.id, "exec", flags=flags).co_filename


def test_every_page_is_scanned() -> None:
    """The pages written for the site are all found, so a renamed docs directory fails loudly."""
    found = {path.relative_to(DOCS).as_posix() for path in pages()}
    expected = {"index.md", "quickstart.md", "testing-your-app.md", "troubleshooting.md"}
    assert expected == expected & found


def test_the_complete_example_runs_under_pytest() -> None:
    """The testing page's complete example test is run by pytest, not skipped."""
    modes = [block.mode for block in ALL if block.page == "testing-your-app.md"]
    assert "pytest" in modes
