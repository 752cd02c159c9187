"""The layers of docs/design.md: only the command line imports click and rich, and no core module
imports a store's package or the fakes (ruff's banned-api rule covers click and rich too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import credkeeper

#: The core is the package's top-level modules; cli/ and testing/ are layers above it.
CORE = Path(credkeeper.__file__).parent
CORE_MODULES = sorted(path.name for path in CORE.glob("*.py"))

#: Optional packages (the extras) and the layers above the core.
ABOVE_THE_CORE = (
    "click",
    "rich",
    "credkeeper_file",
    "credkeeper_sql",
    "credkeeper_mongo",
    "credkeeper_aws",
    "credkeeper.testing",
    "credkeeper.cli",
)


def imported_modules(path: Path) -> set[str]:
    """Every module the file imports, at the top or inside a function, relative names made
    absolute (the file being a top-level module of credkeeper)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = ".".join(filter(None, ["credkeeper" if node.level else "", node.module]))
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def above_the_core(name: str) -> bool:
    """Whether the module ``name`` is, or is inside, one the core must not import."""
    return any(name == top or name.startswith(f"{top}.") for top in ABOVE_THE_CORE)


@pytest.mark.parametrize("module", [name for name in CORE_MODULES if name != "__main__.py"])
def test_the_core_imports_nothing_above_it(module: str) -> None:
    """A core module imports no CLI library, store package, fake or the command line: the
    library installs without the extras, and stores are opened by URL through the registry."""
    assert set() == {name for name in imported_modules(CORE / module) if above_the_core(name)}


def test_main_imports_only_the_command_line() -> None:
    """``python -m credkeeper`` reaches click and rich only through credkeeper.cli, so it can
    name the missing extra."""
    imported = imported_modules(CORE / "__main__.py")

    assert {"credkeeper.cli.main"} == {name for name in imported if above_the_core(name)}
