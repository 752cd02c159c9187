"""PostgreSQL's ``LISTEN``/``NOTIFY`` as the store's change notices.

Every write of a PostgreSQL store sends ``pg_notify(channel, "<version> <key>")`` in its own
transaction, so the notice leaves at commit and never for a write that was rolled back (a lost
compare-and-swap). A store asked for its :meth:`~credkeeper_sql.SQLStore.changes` listens
through a :class:`~credkeeper.storekit.ChangeListener` on one connection of its own, outside
the engine's pool: callers waiting on a peer's refresh read the record again the moment the
peer's tokens are committed, instead of on a schedule.

The listening connection is psycopg's (3.x), whatever driver the engine uses; without
psycopg installed, or on another database, a store posts no notices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator
from importlib import metadata
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL

from credkeeper import storekit as kit

__all__ = ["channel_for", "listener", "notify_statement"]

_NOTIFY = sa.text("SELECT pg_notify(:channel, :payload)")
# How long the feed waits for a notice before it yields, so that a stop is seen.
_POLL = 0.5


def channel_for(schema: str | None, table: str) -> str:
    """The store's notification channel: one per table, short enough for any identifier."""
    name = table if schema is None else f"{schema}.{table}"
    return "credkeeper_" + hashlib.sha256(name.encode()).hexdigest()[:16]


def notify_statement(
    channel: str, key: str, version: str | None
) -> tuple[sa.TextClause, dict[str, str]]:
    """The statement that announces a write of ``key`` (to ``version``; ``None``: deleted),
    sent inside the writing transaction. The payload is the version, a space, the key."""
    return _NOTIFY, {"channel": channel, "payload": f"{version or ''} {key}"}


def listener(url: URL, channel: str) -> kit.ChangeListener | None:
    """The listener of ``channel`` on the database at ``url``; ``None`` without psycopg 3.2 or
    newer (``Connection.notifies(timeout=)``)."""
    try:
        major, minor = (int(part) for part in metadata.version("psycopg").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return None
    if (major, minor) < (3, 2):
        return None
    conninfo = _conninfo(url)

    def feed() -> Generator[tuple[str, str | None] | None, None, None]:
        import psycopg  # noqa: PLC0415 - optional: the listener's only driver
        from psycopg import sql  # noqa: PLC0415

        with psycopg.connect(**conninfo, autocommit=True) as connection:
            connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            while True:
                yield None
                for notice in connection.notifies(timeout=_POLL):
                    version, _, key = notice.payload.partition(" ")
                    yield key, version or None

    return kit.ChangeListener(f"PostgreSQL channel {channel}", feed)


def _conninfo(url: URL) -> dict[str, Any]:
    """psycopg's connection arguments for the engine's URL, the driver's query included.

    Only the URL: an engine's ``connect_args`` or ``creator`` are not the listener's (open the
    store with ``notify=false`` when the URL alone does not connect). TCP keepalives notice a
    connection a firewall dropped while it idled within about a minute, not the system's two
    hours; ``application_name`` shows the connection for what it is.
    """
    arguments: dict[str, Any] = url.translate_connect_args(username="user", database="dbname")
    for name, value in url.query.items():
        if isinstance(value, str):
            # asyncpg's spelling of libpq's sslmode.
            arguments.setdefault("sslmode" if name == "ssl" else name, value)
    for name, default in _LISTENING.items():
        arguments.setdefault(name, default)
    return arguments


_LISTENING: dict[str, object] = {
    "application_name": "credkeeper-listen",
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
