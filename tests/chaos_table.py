"""The chaos table: what each chaos case measured on each backend, printed after the run.

Chaos cases call :func:`record` once per run with what they measured; this plugin (registered
in ``tests/conftest.py``) prints one Markdown table at the end of the pytest run, cases down,
backends across, so that ``docs/reliability.md`` can show it as printed. Each cell reads
``lost / needless re-auth / provider calls (xruns)``: credentials lost and needless
``needs_reauth`` are summed over the case's runs; provider calls are those for the one expiry
of a run, ``refreshes+refused`` (refused: answered 429, 503 or ``invalid_grant``), as a range
when runs differ; ``-`` where the case did not run on that backend.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import pytest


@dataclass
class Cell:
    """What the runs of one case on one backend measured."""

    runs: int = 0
    lost: int = 0
    needless_reauth: int = 0
    refreshes: list[int] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    notes: Counter[str] = field(default_factory=Counter)

    def render(self) -> str:
        """``lost / needless re-auth / calls``, the calls as a range, the runs if several, and
        how the runs went when the case says."""
        runs = f" (x{self.runs})" if self.runs > 1 else ""
        notes = "; ".join(f"{note} x{count}" for note, count in self.notes.items())
        return (
            f"{self.lost} / {self.needless_reauth} / {_calls(self.refreshes, self.refused)}{runs}"
            + (f" [{notes}]" if notes else "")
        )


_CELLS: dict[tuple[str, str], Cell] = {}


def _merge(case: str, backend: str, other: Cell) -> None:
    cell = _CELLS.setdefault((case, backend), Cell())
    cell.runs += other.runs
    cell.lost += other.lost
    cell.needless_reauth += other.needless_reauth
    cell.refreshes += other.refreshes
    cell.refused += other.refused
    cell.notes.update(other.notes)


def record(
    backend: str,
    case: str,
    *,
    lost: int,
    needless_reauth: int,
    refreshes: int,
    refused: int,
    note: str | None = None,
) -> None:
    """Add one run of ``case`` on ``backend`` to the table; ``note`` says how it went."""
    notes = Counter([note] if note else [])
    _merge(case, backend, Cell(1, lost, needless_reauth, [refreshes], [refused], notes))


def table() -> list[str]:
    """The table's lines, in the order cases and backends first ran; empty before any run."""
    cases = list(dict.fromkeys(case for case, _ in _CELLS))
    backends = list(dict.fromkeys(backend for _, backend in _CELLS))
    lines = [
        "| case | " + " | ".join(backends) + " |",
        "|---|" + "---|" * len(backends),
    ]
    for case in cases:
        cells = [_CELLS.get((case, backend)) for backend in backends]
        rendered = ["-" if cell is None else cell.render() for cell in cells]
        lines.append(f"| {case} | " + " | ".join(rendered) + " |")
    return lines if _CELLS else []


def _calls(refreshes: list[int], refused: list[int]) -> str:
    def span(values: list[int]) -> str:
        low, high = min(values), max(values)
        return str(low) if low == high else f"{low}..{high}"

    return span(refreshes) if not any(refused) else f"{span(refreshes)}+{span(refused)}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the table when chaos cases ran."""
    lines = table()
    if not lines:
        return
    terminalreporter.section("chaos table: lost / needless re-auth / provider calls per expiry")
    for line in lines:
        terminalreporter.write_line(line)


# Under pytest-xdist (``-n``) each worker process runs some cases: a worker hands its cells to
# the controlling process when it finishes, which prints the one table.


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On an xdist worker, send this worker's cells to the controller."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        # Plain dicts and lists only: what execnet carries between processes.
        output["chaos_cells"] = [
            [case, backend, {**dataclasses.asdict(cell), "notes": dict(cell.notes)}]
            for (case, backend), cell in _CELLS.items()
        ]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    """On the xdist controller, add a finished worker's cells to the table."""
    for case, backend, fields in getattr(node, "workeroutput", {}).get("chaos_cells", []):
        _merge(case, backend, Cell(**{**fields, "notes": Counter(fields["notes"])}))
