"""The SQL store and time: the database's clock (``now()``), and SQLite's lock waits.

``now()`` is the clock leases are judged on; SQLite's wait for another writer's lock ends by the
credkeeper call's deadline.

Against the real backends: a SQLite file (whose clock is its host's), PostgreSQL and MariaDB.
A server clock that disagrees with the host's is made with MariaDB's ``SET timestamp``, which
moves the session's clock (``NOW()``, ``UTC_TIMESTAMP()``) and nothing else.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from credkeeper import ConflictError, StoreUnavailable, open_store
from credkeeper._budget import budget  # not yet public: a call's deadline, set by the manager
from credkeeper_sql import AsyncSQLStore, ColumnMap, SQLStore, init_store
from tests.adapters.conftest import record

from .conftest import async_url

AHEAD = timedelta(minutes=5)

# Each server's clock read another way than the store reads it, as epoch seconds.
SERVER_CLOCK = {
    "postgres": "SELECT extract(epoch FROM clock_timestamp())",
    "mysql": "SELECT UNIX_TIMESTAMP(NOW(6))",
}


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file, or a server's database; no credkeeper table needed."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'credentials.db'}"
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


def server_clock(engine: sa.Engine) -> datetime:
    """The database's clock, read independently of the store; SQLite's is the host's."""
    backend = "postgres" if engine.dialect.name == "postgresql" else engine.dialect.name
    if backend == "sqlite":
        return datetime.now(UTC)
    with engine.connect() as connection:
        seconds = connection.execute(sa.text(SERVER_CLOCK[backend])).scalar_one()
    return datetime.fromtimestamp(float(seconds), UTC)


def on_connect(engine: sa.Engine | AsyncEngine, statement: str) -> None:
    """Run ``statement`` on every new connection of ``engine``, as a session setting."""
    target = engine.sync_engine if isinstance(engine, AsyncEngine) else engine

    def setup(connection: Any, _record: object) -> None:
        cursor = connection.cursor()
        cursor.execute(statement)
        cursor.close()

    event.listen(target, "connect", setup)


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    """A plain engine on the database, disposed of afterwards."""
    made = sa.create_engine(database_url)
    yield made
    made.dispose()


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class TestServerClock:
    def test_now_is_the_databases_clock(self, engine: sa.Engine) -> None:
        """now() lies between two readings of the database's clock taken around it."""
        store = SQLStore(engine)
        before = server_clock(engine) - timedelta(milliseconds=1)
        now = store.now()
        after = server_clock(engine) + timedelta(milliseconds=1)
        assert (True, True) == (before <= now, now <= after)

    def test_async_now_is_the_databases_clock(self, database_url: str, engine: sa.Engine) -> None:
        """The async store's now() lies between two readings of the database's clock too."""

        async def read() -> datetime:
            async with AsyncSQLStore(async_url(database_url)) as store:
                return await store.now()

        before = server_clock(engine) - timedelta(milliseconds=1)
        now = asyncio.run(read())
        after = server_clock(engine) + timedelta(milliseconds=1)
        assert (True, True) == (before <= now, now <= after)

    def test_a_server_clock_five_minutes_ahead_is_what_now_reads(self, mysql_url: str) -> None:
        """A MariaDB whose clock runs 5 minutes ahead of the host: now() is 5 minutes ahead."""
        engine = sa.create_engine(mysql_url)
        on_connect(engine, f"SET timestamp = UNIX_TIMESTAMP() + {AHEAD.total_seconds():.0f}")
        with SQLStore(engine) as store:
            ahead = store.now() - datetime.now(UTC)
        engine.dispose()
        assert AHEAD.total_seconds() == pytest.approx(ahead.total_seconds(), abs=2)

    def test_async_a_server_clock_five_minutes_ahead_is_what_now_reads(
        self, mysql_url: str
    ) -> None:
        """The async store reads the same MariaDB clock 5 minutes ahead of the host."""

        async def read() -> timedelta:
            engine = create_async_engine(async_url(mysql_url))
            on_connect(engine, f"SET timestamp = UNIX_TIMESTAMP() + {AHEAD.total_seconds():.0f}")
            try:
                return await AsyncSQLStore(engine).now() - datetime.now(UTC)
            finally:
                await engine.dispose()

        ahead = asyncio.run(read())
        assert AHEAD.total_seconds() == pytest.approx(ahead.total_seconds(), abs=2)

    @pytest.mark.parametrize(
        ("backend", "setting"),
        [
            ("postgres", "SET TIME ZONE 'Asia/Kathmandu'"),
            ("mysql", "SET time_zone = '+05:45'"),
        ],
    )
    def test_the_session_time_zone_does_not_move_now(
        self, request: pytest.FixtureRequest, backend: str, setting: str
    ) -> None:
        """A session in UTC+05:45 still gets the UTC instant, labelled UTC."""
        engine = sa.create_engine(request.getfixturevalue(f"{backend}_url"))
        on_connect(engine, setting)
        before = server_clock(engine) - timedelta(milliseconds=1)
        with SQLStore(engine) as store:
            now = store.now()
        after = server_clock(engine) + timedelta(milliseconds=1)
        engine.dispose()
        assert (UTC, True) == (now.tzinfo, before <= now <= after)


class TestLayouts:
    @pytest.mark.parametrize("layout", ["own table", "existing table"])
    def test_now_needs_no_table(self, database_url: str, layout: str) -> None:
        """now() works in either layout before any table exists: it reads no table."""
        missing = f"ck_absent_{uuid.uuid4().hex[:8]}"
        columns = None
        if layout == "existing table":
            columns = ColumnMap(
                key="id", access_token="a", refresh_token="r", expires_at="e", expires_at_unit="s"
            )
        with SQLStore(database_url, table=missing, columns=columns) as store:
            now = store.now()
        assert timedelta(0) == now.utcoffset()


class TestErrors:
    @pytest.mark.parametrize("scheme", ["postgresql+psycopg", "mysql+pymysql"])
    def test_an_unreachable_server_is_store_unavailable(self, scheme: str) -> None:
        """A refused connection is StoreUnavailable, not a driver exception."""
        store = open_store(f"{scheme}://u@127.0.0.1:{closed_port()}/db")
        assert isinstance(store, SQLStore)
        with store, pytest.raises(StoreUnavailable):
            store.now()

    @pytest.mark.parametrize("scheme", ["postgresql+psycopg_async", "mysql+aiomysql"])
    def test_async_an_unreachable_server_is_store_unavailable(self, scheme: str) -> None:
        """The async store translates a refused connection the same way."""

        async def read() -> None:
            async with AsyncSQLStore(f"{scheme}://u@127.0.0.1:{closed_port()}/db") as store:
                await store.now()

        with pytest.raises(StoreUnavailable):
            asyncio.run(read())


# -- SQLite's lock waits share the call's budget ----------------------------------------------


@contextmanager
def write_locked(path: Path) -> Iterator[None]:
    """Another writer holding the SQLite file's exclusive lock for the block."""
    with closing(sqlite3.connect(path, isolation_level=None)) as holder:
        holder.execute("BEGIN EXCLUSIVE")
        yield


def busy_timeout(engine: sa.Engine) -> int:
    """The busy timeout of the engine's pooled connection, in milliseconds."""
    with engine.connect() as connection:
        return int(connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one())


class TestSQLiteLockWaits:
    def test_a_locked_file_is_waited_for_only_until_the_calls_deadline(
        self, tmp_path: Path
    ) -> None:
        """A store whose SQLite waits 30 s for a lock gives up at a 0.3 s budget instead."""
        path = tmp_path / "credentials.db"
        init_store(f"sqlite:///{path}")
        with opened_sqlite(path) as store, write_locked(path), budget(0.3):
            started = time.monotonic()
            with pytest.raises(ConflictError):
                store.put(record("alice"))
            elapsed = time.monotonic() - started
        # Generous: only a wait that ignored the budget (30 s) could miss it.
        assert True is (elapsed < 5)

    def test_the_async_store_waits_only_until_the_calls_deadline(self, tmp_path: Path) -> None:
        """The async store's SQLite gives up at a 0.3 s budget too."""
        path = tmp_path / "credentials.db"
        init_store(f"sqlite:///{path}")

        async def put() -> None:
            async with AsyncSQLStore(f"sqlite+aiosqlite:///{path}") as store:
                with budget(0.3):
                    await store.put(record("alice"))

        with write_locked(path):
            started = time.monotonic()
            with pytest.raises(ConflictError):
                asyncio.run(put())
            elapsed = time.monotonic() - started
        assert True is (elapsed < 5)

    def test_outside_a_budget_the_connections_own_timeout_comes_back(self, tmp_path: Path) -> None:
        """After a call under a 0.1 s budget, a call outside one waits the engine's 2 s again."""
        path = tmp_path / "credentials.db"
        init_store(f"sqlite:///{path}")
        engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 2})
        store = SQLStore(engine)
        with budget(0.1):
            store.get("alice")
        during = busy_timeout(engine)
        store.get("alice")
        after = busy_timeout(engine)
        engine.dispose()
        assert (True, 2000) == (during <= 100, after)

    def test_budgets_near_the_timeout_send_no_pragma_each_call(self, tmp_path: Path) -> None:
        """Once a 1.5 s budget set the 2 s timeout, calls with a 1.9 s budget or none keep it."""
        path = tmp_path / "credentials.db"
        init_store(f"sqlite:///{path}")
        engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 2})
        store = SQLStore(engine)
        with budget(1.5):
            store.get("alice")
        statements: list[str] = []
        event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
        for _ in range(3):
            store.get("alice")
            with budget(1.9):
                store.get("alice")
        engine.dispose()
        assert [] == [statement for statement in statements if "PRAGMA" in statement]

    def test_a_connection_no_budget_touched_keeps_its_setting(self, tmp_path: Path) -> None:
        """Without a budget the store sets no busy timeout: the engine's stays."""
        path = tmp_path / "credentials.db"
        init_store(f"sqlite:///{path}")
        engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 2})
        statements: list[str] = []
        event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
        SQLStore(engine).get("alice")
        engine.dispose()
        # The first call reflects credkeeper's table (PRAGMA table_info); none sets a timeout.
        assert [] == [statement for statement in statements if "busy_timeout" in statement]


@contextmanager
def opened_sqlite(path: Path) -> Iterator[SQLStore]:
    """A store on the SQLite file ``path`` through ``open_store``: a 30 s busy timeout."""
    store = open_store(f"sqlite:///{path}")
    assert isinstance(store, SQLStore)
    try:
        yield store
    finally:
        store.close()
