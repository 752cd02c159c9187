"""Every ```python block of the documentation runs, so the docs cannot drift from the code.

The convention, for whoever writes a page:

- A block runs as it is, in a fresh namespace, in a temporary working directory, with
  ``CREDKEEPER_KEYS`` set to a test key ring and ``CREDKEEPER_STORE`` to a file store there. It
  may use the fakes (``credkeeper.testing``), relative paths and the local PostgreSQL. A block
  with top-level ``await`` (the body of a coroutine) runs on an event loop of its own.
- A block made of ``>>>`` lines is a doctest: its printed output must match.
- HTML comments on the lines above a block (blank lines between are allowed; several stack, one
  per line) say how it runs. They render to nothing, so the reader sees only the code:

  - ``<!-- run: continues -->``: the block goes on from the page's earlier blocks. Its test
    runs every earlier block of the page that runs (doctests and pytest modules aside), in
    order and with their setups, in one namespace, then this block in it: a fragment using
    ``open_store`` that the page's first block imported is run as the page reads.
  - ``<!-- setup: NAME -->``: before the block runs, the hidden setup ``NAME`` (the fixture
    ``setup_NAME`` of ``tests/docs/conftest.py``, dashes as underscores) puts into its
    namespace what the page leaves to the application (a ``client``, a login as
    ``credentials``), and stands in for a deployment's addresses: each text it names
    (``mongodb://db.internal/app``, ``/etc/credkeeper/api-keys``) is replaced by a local one in
    the code that runs, and must appear in the block. Remote services are played by local ones
    (SecantusDB, PostgreSQL, the fakes behind a TLS proxy for the public wrapper); a setup
    whose server cannot be reached fails on CI (``CI=true``) and skips elsewhere, naming how
    to start it.
  - ``<!-- run: pytest -->``: the block is a test module, run by pytest in a child process
    (for the complete example tests users copy).
  - ``<!-- not run: <reason> -->``: it cannot run here (AWS, a Docker engine, an excerpt of a
    file); its run is skipped with the reason, and it must still compile (top-level ``await``
    allowed). Prefer a setup: a block that only compiles can drift unseen.

  After a block (or a chain of continuing blocks) the managers and wrapper clients its
  namespace still holds are closed, as the end of the program would close them.

Blocks in other languages (console, json, text, ...) are not run.
"""

from __future__ import annotations

import ast
import asyncio
import doctest
import inspect
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.docs import conftest
from tests.docs.conftest import close_opened
from tests.markdown import DOCS, README, fenced, pages

MARKER = re.compile(r"^\s*<!--\s*(?P<verb>run|not run|setup):\s*(?P<detail>.*?)\s*-->\s*$")
FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


@dataclass(frozen=True)
class Block:
    """One fenced ```python block: where it is, its source and what its markers ask."""

    page: str
    line: int
    source: str
    mode: str  # "exec", "doctest", "pytest" or "skip"
    reason: str = ""
    continues: bool = False
    setups: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        """``page:line``, the test id that points at the block."""
        return f"{self.page}:{self.line}"


def blocks(path: Path, root: Path = DOCS) -> Iterator[Block]:
    """The ```python blocks of one page, each with the mode its markers (or its shape) give."""
    page = path.relative_to(root).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    runs = False
    for fence in fenced(lines):
        if fence.language not in {"python", "py", "pycon"}:
            continue
        block = _block(page, fence.line, fence.body, _markers(lines, index=fence.line - 1))
        if block.continues and not runs:
            raise ValueError(f"{block.id}: 'run: continues', but no earlier block of the page runs")
        runs = runs or block.mode == "exec"
        yield block


def _markers(lines: list[str], *, index: int) -> list[re.Match[str]]:
    """The marker comments stacked above the fence at ``index``, top to bottom."""
    found = []
    above = index - 1
    while above >= 0:
        if lines[above].strip():
            marker = MARKER.match(lines[above])
            if marker is None:
                break
            found.append(marker)
        above -= 1
    return found[::-1]


def _block(page: str, line: int, source: str, markers: list[re.Match[str]]) -> Block:
    where = f"{page}:{line}"
    skips = [marker["detail"] for marker in markers if marker["verb"] == "not run"]
    runs = [marker["detail"] for marker in markers if marker["verb"] == "run"]
    setups = tuple(marker["detail"] for marker in markers if marker["verb"] == "setup")
    if skips:
        if len(markers) > 1:
            raise ValueError(f"{where}: 'not run' cannot be combined with other markers")
        return Block(page, line, source, "skip", skips[0])
    for detail in runs:
        if detail not in {"pytest", "continues"}:
            raise ValueError(f"{where}: unknown marker 'run: {detail}'")
    if "pytest" in runs:
        if len(markers) > 1:
            raise ValueError(f"{where}: 'run: pytest' cannot be combined with other markers")
        return Block(page, line, source, "pytest")
    doctest_shaped = source.lstrip().startswith(">>>")
    if doctest_shaped and markers:
        raise ValueError(f"{where}: a doctest block takes no marker; it runs in its own namespace")
    mode = "doctest" if doctest_shaped else "exec"
    return Block(page, line, source, mode, continues="continues" in runs, setups=setups)


# The README is the project's front page, with examples of its own: run as a page too.
ALL = [block for path in pages() for block in blocks(path)] + list(
    blocks(README, root=README.parent)
)


def chain(block: Block) -> list[Block]:
    """The blocks ``block``'s test runs, in order: the page's earlier runs first if it continues."""
    if not block.continues:
        return [block]
    earlier = [b for b in ALL if b.page == block.page and b.mode == "exec" and b.line < block.line]
    return [*earlier, block]


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


def run(block: Block, namespace: dict[str, object], request: pytest.FixtureRequest) -> None:
    """Run one exec block in ``namespace``, after its setups; top-level ``await`` on a loop."""
    source = block.source
    for name in block.setups:
        setup: conftest.Setup = request.getfixturevalue(f"setup_{name.replace('-', '_')}")
        namespace.update(setup.names)
        source = setup.apply(source, block.id)
    code = compile(source, block.id, "exec", flags=FLAGS)
    result = eval(code, namespace)  # noqa: S307
    if code.co_flags & inspect.CO_COROUTINE:
        asyncio.run(result)


@pytest.mark.parametrize("block", params())
def test_block_runs(block: Block, sandbox: Path, request: pytest.FixtureRequest) -> None:
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
        namespace: dict[str, object] = {"__name__": "__docs__"}
        try:
            for each in chain(block):
                run(each, namespace, request)
        finally:
            close_opened(namespace)


@pytest.mark.parametrize(
    "block", [pytest.param(block, id=block.id) for block in ALL if block.mode == "skip"]
)
def test_marked_block_compiles(block: Block) -> None:
    """A block marked not run is still valid Python, so it cannot rot unseen."""
    assert block.id == compile(block.source, block.id, "exec", flags=FLAGS).co_filename


def test_every_page_is_scanned() -> None:
    """The pages written for the site are all found, so a renamed docs directory fails loudly."""
    found = {path.relative_to(DOCS).as_posix() for path in pages()}
    expected = {"index.md", "quickstart.md", "testing-your-app.md", "troubleshooting.md"}
    assert expected == expected & found


def test_the_readmes_examples_run() -> None:
    """The README's python blocks are found and none is marked not run."""
    modes = [block.mode for block in ALL if block.page == "README.md"]
    assert (True, []) == (len(modes) >= 2, [mode for mode in modes if mode != "exec"])


def test_the_complete_example_runs_under_pytest() -> None:
    """The testing page's complete example test is run by pytest, not skipped."""
    modes = [block.mode for block in ALL if block.page == "testing-your-app.md"]
    assert "pytest" in modes


def test_every_setup_a_page_names_exists() -> None:
    """Each ``<!-- setup: NAME -->`` has its fixture, so a typo fails here, not as a skip."""
    named = {name for block in ALL for name in block.setups}
    missing = {name for name in named if not hasattr(conftest, f"setup_{name.replace('-', '_')}")}
    assert set() == missing


def test_markers_stack_above_a_block(tmp_path: Path) -> None:
    """A block takes every marker comment above it, and only those."""
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx = 1\n```\n\nText.\n<!-- run: continues -->\n\n<!-- setup: a-b -->\n"
        "<!-- setup: c -->\n\n```python\ny = x\n```\n",
        encoding="utf-8",
    )
    found = [(b.line, b.mode, b.continues, b.setups) for b in blocks(page, root=tmp_path)]
    assert [(1, "exec", False, ()), (11, "exec", True, ("a-b", "c"))] == found


def test_a_page_cannot_open_with_a_continuing_block(tmp_path: Path) -> None:
    """``run: continues`` needs an earlier block that runs on the page."""
    page = tmp_path / "page.md"
    page.write_text("<!-- run: continues -->\n```python\nx = 1\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no earlier block of the page runs"):
        list(blocks(page, root=tmp_path))
