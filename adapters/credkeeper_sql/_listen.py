"""PostgreSQL's ``LISTEN``/``NOTIFY`` as the store's change notices.

Every write of a PostgreSQL store sends ``pg_notify(channel, "<version> <key>")`` in its own
transaction, so the notice leaves at commit and never for a write that was rolled back (a lost
compare-and-swap). A store asked for its :meth:`~credkeeper_sql.SQLStore.changes` opens one
connection of its own, outside the engine's pool, ``LISTEN``s on the channel in a daemon
thread and posts each notified key, with the version written, to a
:class:`~credkeeper.storekit.ChangeNotices`: callers waiting on a peer's refresh read the
record again the moment the peer's tokens are committed, instead of on a schedule. One
connection per store and process, opened only once someone waits, and a lost one is opened
again with backoff; meanwhile waiters keep their schedule, so notices only ever shorten a wait.

The listening connection is psycopg's (3.x), whatever driver the engine uses; without
psycopg installed, or on another database, a store posts no notices.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL

from credkeeper import storekit as kit

__all__ = ["Listener", "channel_for", "notify_statement"]

logger = logging.getLogger("credkeeper")

# The longest wait for a notice before the thread checks whether it should stop.
_POLL = 0.5
_MAX_BACKOFF = 30.0
# Listeners a forked child inherited: kept referenced, never closed, because closing a
# connection the parent still uses would end the parent's session on the shared socket.
_INHERITED: list[Listener] = []


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


def _notice(payload: str) -> tuple[str, str | None]:
    """The key and version a payload announces."""
    version, _, key = payload.partition(" ")
    return key, version or None


_NOTIFY = sa.text("SELECT pg_notify(:channel, :payload)")


class Listener:
    """One ``LISTEN`` connection and its thread, started by the first :meth:`notices`."""

    def __init__(self, url: URL, channel: str) -> None:
        self._conninfo = _conninfo(url)
        self._channel = channel
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._board: kit.ChangeNotices | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False

    def notices(self) -> kit.ChangeNotices | None:
        """The board the thread posts to, starting the thread in this process if need be;
        ``None`` when psycopg is not installed."""
        if self._pid == os.getpid():
            return self._board
        with self._lock:
            if self._pid != os.getpid():
                if self._pid is not None:
                    _INHERITED.append(self._inherited())
                self._start()
        return self._board

    def close(self) -> None:
        """Stop listening and close the connection, within one poll."""
        self._stop.set()
        thread = self._thread
        if thread is not None and self._pid == os.getpid():
            thread.join(2 * _POLL)

    def _inherited(self) -> Listener:
        """What the parent left in a forked child, moved aside; this one starts afresh."""
        orphan = Listener.__new__(Listener)
        orphan.__dict__.update(self.__dict__)
        self._stop = threading.Event()
        self._thread = None
        return orphan

    def _start(self) -> None:
        self._pid = os.getpid()
        try:
            import psycopg  # noqa: F401, PLC0415 - optional: the listener's only driver
        except ImportError:
            self._board = None
            return
        self._board = kit.ChangeNotices()
        self._thread = threading.Thread(
            target=self._listen,
            args=(self._board,),
            name=f"credkeeper-listen:{self._channel}",
            daemon=True,
        )
        self._thread.start()

    def _listen(self, board: kit.ChangeNotices) -> None:
        import psycopg  # noqa: PLC0415
        from psycopg import sql  # noqa: PLC0415

        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(**self._conninfo, autocommit=True) as connection:
                    listen = sql.SQL("LISTEN {}").format(sql.Identifier(self._channel))
                    connection.execute(listen)
                    if self._failed:
                        logger.info("change notices of channel %s resumed", self._channel)
                    self._failed, backoff = False, 0.5
                    while not self._stop.is_set():
                        for notice in connection.notifies(timeout=_POLL):
                            board.post(*_notice(notice.payload))
            except psycopg.Error as exc:
                if not self._failed:
                    # Waiters keep their schedule meanwhile: slower, never wrong.
                    logger.warning(
                        "change notices of channel %s stopped (%s); waiting callers poll "
                        "until they resume",
                        self._channel,
                        type(exc).__name__,
                    )
                self._failed = True
                self._stop.wait(backoff)
                backoff = min(_MAX_BACKOFF, backoff * 2)


def _conninfo(url: URL) -> dict[str, Any]:
    """psycopg's connection arguments for the engine's URL, the driver's query included."""
    arguments: dict[str, Any] = url.translate_connect_args(username="user", database="dbname")
    for name, value in url.query.items():
        if isinstance(value, str):
            arguments.setdefault(name, value)
    arguments.setdefault("connect_timeout", 5)
    return arguments
