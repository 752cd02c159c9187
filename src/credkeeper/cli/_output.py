"""What ``credkeeper status`` shows: records as rows, times the way people say them.

Only a record's coordination fields are read here (expiry, status, lease, failures), never its
token fields, so nothing on this path can print a token, sealed or not. Damaged records are
named with the store's reason, which names keys and fields, never values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from credkeeper._exceptions import StoreCorrupted
from credkeeper._migrate import MigrateReport
from credkeeper._record import Record, Status
from credkeeper._store import CredentialStore, reported_damage
from credkeeper._sweeper import SweepReport

if TYPE_CHECKING:  # the SQL store is an optional extra
    from credkeeper_sql import FieldMapping

__all__ = [
    "FAR_FUTURE",
    "expiry_phrase",
    "expiry_text",
    "humanise",
    "last_refresh_line",
    "load_records",
    "mapping_table",
    "migrate_summary",
    "progress_bar",
    "record_json",
    "status_table",
    "sweep_progress",
    "sweep_summary",
]

#: Every record expires before this, so ``scan_due(FAR_FUTURE)`` lists every key. Whole
#: seconds: a backend keeping milliseconds would round .999999 into the year 10000.
FAR_FUTURE = datetime.max.replace(microsecond=0, tzinfo=UTC)

# Below this an access token is about to be refreshed (the engine's default leeway).
_SOON = 15 * 60


def humanise(seconds: float) -> str:
    """A duration in its two largest units: ``45s``, ``3m``, ``7h 59m``, ``2d 3h``."""
    total = int(abs(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


def expiry_text(expires_at: datetime, *, now: datetime) -> str:
    """``in 7h 59m`` for a valid token, ``expired 3m ago`` for one past its expiry."""
    left = (expires_at - now).total_seconds()
    return f"in {humanise(left)}" if left > 0 else f"expired {humanise(left)} ago"


def expiry_phrase(expires_at: datetime, *, now: datetime) -> str:
    """``expires in 7h 59m`` or ``expired 3m ago``, for sentences."""
    text = expiry_text(expires_at, now=now)
    return f"expires {text}" if text.startswith("in ") else text


def load_records(store: CredentialStore) -> tuple[list[Record], dict[str, str]]:
    """Every readable record in ``store``, and every damaged one's key with the reason.

    Both sorted by key; keys deleted during the scan are left out. A store whose ``scan_due``
    skips damaged records (the file store) lists them through its ``damaged_records()``.
    """
    # Keys first, then reads: a scan cursor held across reads can block writers on some stores.
    keys = sorted(set(store.scan_due(FAR_FUTURE)))
    records: list[Record] = []
    damaged: dict[str, str] = {}
    for key in keys:
        try:
            record = store.get(key)
        except StoreCorrupted as exc:
            damaged[key] = str(exc)
            continue
        if record is not None:
            records.append(record)
    damaged.update(reported_damage(store))
    return records, dict(sorted(damaged.items()))


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record_json(record: Record, *, now: datetime) -> dict[str, Any]:
    """A record's non-secret fields for ``status --json``; times in ISO 8601 UTC."""
    lease_active = record.lease_until is not None and record.lease_until > now
    return {
        "key": record.key,
        "status": record.status.value,
        "expires_at": _iso(record.expires_at),
        "expires_in_seconds": int((record.expires_at - now).total_seconds()),
        "scopes": list(record.scopes),
        "subscription_type": record.subscription_type,
        "lease_owner": record.lease_owner,
        "lease_until": _iso(record.lease_until),
        "lease_active": lease_active,
        "failures": record.failures,
        "last_error": record.last_error,
        "cooldown_until": _iso(record.cooldown_until),
        "refreshed_at": _iso(record.refreshed_at),
    }


def _expiry_cell(record: Record, now: datetime) -> Text:
    left = (record.expires_at - now).total_seconds()
    style = "red" if left <= 0 else "yellow" if left <= _SOON else ""
    return Text(expiry_text(record.expires_at, now=now), style=style)


def _status_cell(record: Record) -> Text:
    return Text(record.status.value, style="green" if record.status is Status.ACTIVE else "red")


def _lease_cell(record: Record, now: datetime) -> Text:
    if record.lease_owner is None or record.lease_until is None:
        return Text("-", style="dim")
    left = (record.lease_until - now).total_seconds()
    if left > 0:
        return Text(f"{record.lease_owner} ({humanise(left)} left)", style="cyan")
    # A lapsed lease is free for the next refresher to take over.
    return Text(f"{record.lease_owner} (lapsed {humanise(left)} ago)", style="dim")


def _failures_cell(record: Record, now: datetime) -> Text:
    if record.failures == 0:
        return Text("-", style="dim")
    text = f"{record.failures}"
    if record.last_error:
        text += f" ({record.last_error})"
    if record.cooldown_until is not None and record.cooldown_until > now:
        text += f", cooldown {humanise((record.cooldown_until - now).total_seconds())}"
    return Text(text, style="yellow")


def status_table(records: list[Record], *, now: datetime) -> Table:
    """The ``status`` table: key, expiry, status, lease holder, failures and cooldown."""
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False, pad_edge=False)
    table.add_column("key", overflow="fold")
    table.add_column("expires", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("lease", overflow="fold")
    table.add_column("failures", overflow="fold")
    for record in records:
        table.add_row(
            Text(record.key),
            _expiry_cell(record, now),
            _status_cell(record),
            _lease_cell(record, now),
            _failures_cell(record, now),
        )
    return table


def last_refresh_line(record: Record, *, now: datetime) -> Text:
    """``show``'s line saying when the credential's tokens were last obtained, if known."""
    if record.refreshed_at is None:
        return Text("last refresh: unknown (stored before credkeeper kept it)", style="dim")
    ago = humanise((now - record.refreshed_at).total_seconds())
    return Text(f"last refresh: {_iso(record.refreshed_at)} ({ago} ago)")


def mapping_table(fields: Iterable[FieldMapping]) -> Table:
    """``init-store --check``'s table: each field's column, type and format."""
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False, pad_edge=False)
    for heading in ("field", "column", "type", "format"):
        table.add_column(heading, overflow="fold")
    for row in fields:
        table.add_row(*(Text(value) for value in (row.field, row.column, row.type, row.format)))
    return table


def sweep_summary(report: SweepReport) -> Text:
    """One line closing a sweep: what was due, what became of it, and who must log in again."""
    parts = [
        f"{report.refreshed} refreshed",
        f"{report.fresh} already fresh",
        f"{report.by_peer} by a peer",
    ]
    if report.deleted:
        parts.append(f"{report.deleted} deleted meanwhile")
    if report.idle:
        parts.append(f"{report.kept_alive} of {report.idle} idle kept alive")
    line = Text(f"swept {report.due} due credential(s) in {report.seconds:.1f} s: ")
    line.append(", ".join(parts))
    if report.needs_reauth:
        keys = ", ".join(repr(key) for key in report.needs_reauth)
        line.append(f"; {len(report.needs_reauth)} must log in again ({keys})", style="yellow")
    if report.deferred:
        deferred = ", ".join(f"{key!r} ({reason})" for key, reason in report.deferred)
        line.append(f"; {len(report.deferred)} deferred: {deferred}", style="yellow")
    if report.failed:
        failed = ", ".join(f"{key!r} ({outcome})" for key, outcome in report.failed)
        line.append(f"; {len(report.failed)} failed: {failed}", style="bold red")
    if report.throttled:
        line.append(f"; the provider throttled {report.throttled} time(s)", style="dim")
    return line


def sweep_progress(
    console: Console, *, enabled: bool
) -> contextlib.AbstractContextManager[Callable[[int, int], None]]:
    """A progress bar for one sweep on a terminal, as the sweeper's ``progress`` callback;
    elsewhere (a pipe, ``--json``) a callback that shows nothing."""
    return progress_bar(console, "sweeping", enabled=enabled)


@contextlib.contextmanager
def progress_bar(
    console: Console, label: str, *, enabled: bool
) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback drawing a bar headed ``label`` on a terminal;
    elsewhere (a pipe, ``--json``) one that shows nothing."""
    if not (enabled and console.is_terminal):
        yield lambda done, total: None
        return
    columns = (TextColumn(f"  {label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def migrate_summary(report: MigrateReport, *, source: str, destination: str) -> Text:
    """One line closing a migration: what became of the credentials, and which failed."""
    moved = report.copied + report.updated + report.unchanged + report.kept_newer
    line = Text(f"migrated {moved} credential(s) from {source} to {destination}: ")
    line.append(
        f"{report.copied} copied, {report.updated} updated, {report.unchanged} unchanged, "
        f"{report.kept_newer} kept newer"
    )
    if report.failed:
        failed = ", ".join(f"{key!r} ({reason})" for key, reason in report.failed.items())
        line.append(f"; {len(report.failed)} failed: {failed}", style="bold red")
    return line
