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
import importlib.util
from collections.abc import Generator
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
    """The listener of ``channel`` on the database at ``url``; ``None`` without psycopg."""
    if importlib.util.find_spec("psycopg") is None:
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
    """psycopg's connection arguments for the engine's URL, the driver's query included."""
    arguments: dict[str, Any] = url.translate_connect_args(username="user", database="dbname")
    for name, value in url.query.items():
        if isinstance(value, str):
            arguments.setdefault(name, value)
    arguments.setdefault("connect_timeout", 5)
    return arguments
