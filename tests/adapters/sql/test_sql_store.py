"""What the SQL store does beyond the conformance suite: URLs, tables, errors, paging, engines.

Everything runs against the real backends: a SQLite file, and the PostgreSQL and MariaDB
servers of ``tests/backends.py``. Tests that need a table of their own create it with
``init_store`` under a unique name and drop it afterwards.
"""

from __future__ import annotations

import multiprocessing
import random
import secrets
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from sqlalchemy import event
from sqlalchemy.engine import make_url

from credkeeper import (
    ConfigurationError,
    ConflictError,
    Provider,
    Record,
    StoreError,
    StoreUnavailable,
    TokenManager,
    open_store,
)
from credkeeper_sql import AsyncSQLStore, SQLStore, init_store
from credkeeper_sql._store import _translate

from .conftest import async_url

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
MS = timedelta(milliseconds=1)
# Long enough for a child to import SQLAlchemy, short enough to fail a hung test.
CHILD_TIMEOUT = 60
# How long a test waits for the server to show that a transaction is blocked on a lock.
LOCK_WAIT_TIMEOUT = 30.0


# -- backends and tables -------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def backend(request: pytest.FixtureRequest) -> str:
    """The backend a test runs on; tests that concern some backends only parametrize this."""
    name: str = request.param
    return name


@pytest.fixture
def database_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    """The backend's database without a table option: a new SQLite file, or a server."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'credentials.db'}"
    url: str = request.getfixturevalue(f"{backend}_url")
    return url


@pytest.fixture
def store_url(request: pytest.FixtureRequest, backend: str) -> str:
    """The backend's URL with this session's credkeeper table (``?table=...``)."""
    url: str = request.getfixturevalue(f"{backend}_store_url")
    return url


@pytest.fixture
def fresh_table(database_url: str) -> Iterator[str]:
    """A table name nothing uses yet; whatever a test creates under it is dropped after."""
    name = f"ck_sql_{uuid.uuid4().hex[:10]}"
    yield name
    drop_tables(database_url, name)


@pytest.fixture
def table(database_url: str, fresh_table: str) -> str:
    """A credkeeper table of the test's own, created by ``init_store``."""
    init_store(database_url, table=fresh_table)
    return fresh_table


def drop_tables(url: str, *names: str) -> None:
    """Drop the tables ``names`` if they exist."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            for name in names:
                sa.Table(name, sa.MetaData()).drop(connection, checkfirst=True)
    finally:
        engine.dispose()


def split_store_url(store_url: str) -> tuple[str, str]:
    """A session store URL as the database's URL and the table's name."""
    parsed = make_url(store_url)
    table = parsed.query["table"]
    assert isinstance(table, str)
    return parsed.difference_update_query(["table"]).render_as_string(hide_password=False), table


@contextmanager
def opened(url: str, **options: Any) -> Iterator[SQLStore]:
    """A synchronous store opened through ``open_store``, closed afterwards."""
    store = open_store(url, **options)
    assert isinstance(store, SQLStore)
    try:
        yield store
    finally:
        store.close()


@asynccontextmanager
async def opened_async(url: str, **options: Any) -> AsyncIterator[AsyncSQLStore]:
    """An asynchronous store opened through ``open_store``, closed afterwards."""
    store = open_store(url, **options)
    assert isinstance(store, AsyncSQLStore)
    try:
        yield store
    finally:
        await store.close()


def record(key: str, **changes: Any) -> Record:
    """A never-stored record under ``key``; ``changes`` override the plain defaults."""
    fields: dict[str, Any] = {
        "key": key,
        "access_token": "access-token",
        "refresh_token": "refresh-token",
        "expires_at": NOW + timedelta(hours=8),
    }
    return Record(**{**fields, **changes})


def unique_key() -> str:
    """A key no other test uses."""
    return f"sql-store-{uuid.uuid4().hex[:12]}"


def run_child(script: str) -> str:
    """Run ``script`` in a new interpreter; its stdout, after checking that it exited 0."""
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )
    assert 0 == completed.returncode, completed.stderr
    return completed.stdout


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: bound once to pick it, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail after LOCK_WAIT_TIMEOUT seconds."""
    deadline = time.monotonic() + LOCK_WAIT_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.01)


# -- without SQLAlchemy --------------------------------------------------------------------


class TestWithoutSQLAlchemy:
    def test_open_store_names_the_extra(self) -> None:
        """SQLAlchemy None in sys.modules (as if absent): UnknownSchemeError names the sql extra."""
        script = (
            "import sys\n"
            "sys.modules['sqlalchemy'] = None\n"
            "from credkeeper import open_store\n"
            "try:\n"
            "    open_store('postgresql://db/app')\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc, sep=': ')\n"
        )

        assert (
            "UnknownSchemeError: the store for scheme 'postgresql' failed to import "
            "(sqlalchemy); pip install 'credkeeper[sql]'\n"
        ) == run_child(script)

    def test_missing_driver_is_a_configuration_error_naming_it(self) -> None:
        """psycopg None in sys.modules (as if absent): a ConfigurationError names psycopg."""
        script = (
            "import sys\n"
            "sys.modules['psycopg'] = None\n"
            "from credkeeper import ConfigurationError, open_store\n"
            "try:\n"
            "    open_store('postgresql://db/app')\n"
            "except Exception as exc:\n"
            "    print(isinstance(exc, ConfigurationError), 'psycopg' in str(exc))\n"
        )

        assert "True True\n" == run_child(script)


# -- URLs and options ----------------------------------------------------------------------


class TestURLs:
    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("postgresql://u@db.example/app", ("postgresql", "psycopg")),
            ("mysql://u@db.example/app", ("mysql", "pymysql")),
            ("mariadb://u@db.example/app", ("mariadb", "pymysql")),
        ],
    )
    def test_url_without_driver_gets_the_tested_driver(
        self, url: str, expected: tuple[str, str]
    ) -> None:
        """A URL naming no driver gets psycopg (PostgreSQL) or PyMySQL (MySQL/MariaDB)."""
        with opened(url) as store:
            assert expected == (store.engine.dialect.name, store.engine.dialect.driver)

    def test_postgres_scheme_opens_a_postgresql_store(self) -> None:
        """postgres://, a registered scheme, opens a PostgreSQL store through psycopg."""
        with opened("postgres://u@db.example/app") as store:
            assert ("postgresql", "psycopg") == (
                store.engine.dialect.name,
                store.engine.dialect.driver,
            )

    def test_unknown_option_lists_the_options(self) -> None:
        """An option the store does not know is a ConfigurationError listing those it knows."""
        with pytest.raises(ConfigurationError) as caught:
            open_store("sqlite:///creds.db", tabel="credentials")

        assert (
            "unknown SQL store option(s) tabel; the options are access_token_column, create, "
            "delete_rows, expires_at_column, expires_at_unit, insert, key_column, lease_table, "
            "notify, page_size, plaintext, refresh_token_column, refreshed_at_column, schema, "
            "scopes_column, scopes_format, subscription_type_column, table"
        ) == str(caught.value)

    def test_a_bad_option_in_the_url_names_it_and_what_it_takes(self) -> None:
        """An option's value it cannot read, in the URL's query, is refused naming both."""
        with pytest.raises(ConfigurationError) as caught:
            open_store("sqlite:///creds.db?page_size=0")

        assert "SQL store option page_size must be a positive whole number, got '0'" == str(
            caught.value
        )

    def test_a_bad_option_keyword_names_it_and_what_it_takes(self) -> None:
        """An option's value it cannot read, as a keyword, is refused the same way."""
        with pytest.raises(ConfigurationError) as caught:
            SQLStore("sqlite:///creds.db", create="sometimes")  # type: ignore[arg-type]

        assert "SQL store option create must be true or false, got 'sometimes'" == str(caught.value)

    def test_option_in_url_and_keyword_is_refused(self) -> None:
        """An option given both in the URL's query and as a keyword is a ConfigurationError."""
        with pytest.raises(ConfigurationError) as caught:
            open_store("sqlite:///creds.db?table=one", table="two")

        assert "SQL store option(s) table given both in the URL and as keywords" == str(
            caught.value
        )

    def test_driver_query_parameter_reaches_psycopg(self, postgres_url: str) -> None:
        """A query parameter that is not a store option goes to the driver, here psycopg."""
        name = f"ck-{uuid.uuid4().hex[:8]}"
        separator = "&" if "?" in postgres_url else "?"

        with (
            opened(f"{postgres_url}{separator}application_name={name}") as store,
            store.engine.connect() as connection,
        ):
            shown = connection.execute(sa.text("SHOW application_name")).scalar_one()

        assert name == shown

    def test_charset_query_parameter_reaches_pymysql(self, mysql_url: str) -> None:
        """?charset= in a MySQL URL replaces the store's utf8mb4 default in the driver."""
        separator = "&" if "?" in mysql_url else "?"

        with opened(f"{mysql_url}{separator}charset=utf8") as store:
            connection = store.engine.raw_connection()
            try:
                charset = connection.driver_connection.charset  # type: ignore[union-attr]
            finally:
                connection.close()

        assert "utf8" == charset

    @pytest.mark.parametrize(
        ("backend", "timeout_of"),
        [
            ("postgres", lambda dbapi: dbapi.info.get_parameters()["connect_timeout"]),
            ("mysql", lambda dbapi: str(dbapi.connect_timeout)),
        ],
        ids=["postgres", "mysql"],
    )
    def test_connect_timeout_query_parameter_reaches_the_driver(
        self, database_url: str, timeout_of: Callable[[Any], str]
    ) -> None:
        """?connect_timeout=5 in the URL is the timeout the driver connects with."""
        separator = "&" if "?" in database_url else "?"

        with opened(f"{database_url}{separator}connect_timeout=5") as store:
            connection = store.engine.raw_connection()
            try:
                timeout = timeout_of(connection.driver_connection)
            finally:
                connection.close()

        assert "5" == timeout

    @pytest.mark.anyio
    @pytest.mark.parametrize(
        "url",
        [
            "postgresql+psycopg_async://u@db.example/app",
            "mysql+aiomysql://u@db.example/app",
            "sqlite+aiosqlite:///creds.db",
        ],
    )
    async def test_async_driver_gives_an_async_store(self, url: str) -> None:
        """A URL naming an async driver opens an AsyncSQLStore."""
        store = open_store(url)
        kind = type(store)
        if isinstance(store, AsyncSQLStore):
            await store.close()
        elif isinstance(store, SQLStore):
            store.close()

        assert AsyncSQLStore is kind

    def test_repr_hides_the_password(self) -> None:
        """repr() shows the URL with its password masked, and the table."""
        with opened("postgresql+psycopg://alice:s3cr3t@db.example:5432/app?table=creds") as store:
            assert (
                "SQLStore('postgresql+psycopg://alice:***@db.example:5432/app', table='creds')"
                == (repr(store))
            )

    @pytest.mark.parametrize("backend", ["sqlite"])
    def test_constructor_refuses_options_in_the_url(self, database_url: str, table: str) -> None:
        """SQLStore(url) takes options as keywords; one in the URL is refused, not dropped."""
        with pytest.raises(ConfigurationError, match="as keywords"):
            SQLStore(f"{database_url}?table={table}")


# -- tables ----------------------------------------------------------------------------------


class TestMissingTable:
    @pytest.mark.parametrize(
        "backend",
        [
            "sqlite",
            "postgres",
            "mysql",
        ],
    )
    def test_get_names_init_store(self, database_url: str, fresh_table: str) -> None:
        """get() on a database without the table: a ConfigurationError naming it and init-store."""
        with (
            opened(database_url, table=fresh_table) as store,
            pytest.raises(ConfigurationError) as caught,
        ):
            store.get("alice")

        assert (True, True) == (
            fresh_table in str(caught.value),
            "create credkeeper's tables with `credkeeper init-store URL`" in str(caught.value),
        )


class TestInitStore:
    def test_creates_the_table_once(self, database_url: str, fresh_table: str) -> None:
        """The first call creates the table and returns its name, the second returns []."""
        first = init_store(database_url, table=fresh_table)
        second = init_store(database_url, table=fresh_table)

        assert ([fresh_table], []) == (first, second)

    def test_keeps_the_rows_of_an_existing_table(self, database_url: str, table: str) -> None:
        """Calling it again on a table holding records leaves them as they are."""
        key = unique_key()
        with opened(database_url, table=table) as store:
            stored = store.put(record(key))

        init_store(database_url, table=table)

        with opened(database_url, table=table) as store:
            assert stored == store.get(key)

    def test_leaves_a_different_table_of_that_name_alone(
        self, database_url: str, fresh_table: str
    ) -> None:
        """A table of the same name with other columns is neither altered nor replaced."""
        engine = sa.create_engine(database_url)
        try:
            other = sa.Table(fresh_table, sa.MetaData(), sa.Column("id", sa.Integer))
            with engine.begin() as connection:
                other.create(connection)

            created = init_store(database_url, table=fresh_table)

            columns = [column["name"] for column in sa.inspect(engine).get_columns(fresh_table)]
        finally:
            engine.dispose()

        assert ([], ["id"]) == (created, columns)

    def test_async_url_is_refused(self) -> None:
        """An async driver URL is a ConfigurationError naming a synchronous one."""
        with pytest.raises(ConfigurationError) as caught:
            init_store("postgresql+psycopg_async://u@db.example/app")

        assert "init-store needs a synchronous driver URL" in str(caught.value)

    def test_option_in_url_and_keyword_is_refused(self, tmp_path: Path) -> None:
        """An option both in the URL's query and a keyword is a ConfigurationError."""
        url = f"sqlite:///{tmp_path / 'credentials.db'}?table=one"

        with pytest.raises(ConfigurationError):
            init_store(url, table="two")

    @pytest.mark.parametrize("scheme", ["postgresql+psycopg", "mysql+pymysql"])
    def test_closed_port_is_store_unavailable(self, scheme: str, closed_port: int) -> None:
        """A server that refuses the connection raises StoreUnavailable."""
        with pytest.raises(StoreError) as caught:
            init_store(f"{scheme}://credkeeper@127.0.0.1:{closed_port}/app")

        assert StoreUnavailable is type(caught.value)


class TestCreate:
    def test_sync_store_creates_its_table_on_first_use(
        self, database_url: str, fresh_table: str
    ) -> None:
        """With create=True a put into a database without the table creates it first."""
        key = unique_key()
        with opened(database_url, table=fresh_table, create=True) as store:
            stored = store.put(record(key))
            assert stored == store.get(key)

    @pytest.mark.anyio
    async def test_async_store_creates_its_table_on_first_use(
        self, database_url: str, fresh_table: str
    ) -> None:
        """With create=True an async store's first put creates the table too."""
        key = unique_key()
        async with opened_async(async_url(database_url), table=fresh_table, create=True) as store:
            stored = await store.put(record(key))
            assert stored == await store.get(key)

    def test_a_first_scan_creates_the_table_for_good(
        self, database_url: str, fresh_table: str
    ) -> None:
        """With create=True a scan_due as the first call creates a table that outlives it."""
        with opened(database_url, table=fresh_table, create=True) as store:
            list(store.scan_due(NOW))

        assert True is has_table(database_url, fresh_table)

    @pytest.mark.anyio
    async def test_an_async_first_scan_creates_the_table_for_good(
        self, database_url: str, fresh_table: str
    ) -> None:
        """An async store's first scan_due with create=True creates a lasting table too."""
        async with opened_async(async_url(database_url), table=fresh_table, create=True) as store:
            [key async for key in store.scan_due(NOW)]

        assert True is has_table(database_url, fresh_table)

    @pytest.mark.slow
    @pytest.mark.parametrize("repetition", range(3))
    def test_processes_creating_the_table_at_once_all_succeed(
        self, repetition: int, database_url: str, fresh_table: str
    ) -> None:
        """Six processes whose first put, with create=True, races to create one missing table:
        every put succeeds (the losers of the CREATE find the table made)."""
        context = multiprocessing.get_context("spawn")
        with context.Pool(6) as pool:
            outcomes = pool.starmap(
                _first_put, [(database_url, fresh_table, f"k{n}") for n in range(6)]
            )

        assert ["ok"] * 6 == outcomes


def _first_put(url: str, table: str, key: str) -> str:
    """One process's first call on a fresh store: a put; ``ok`` or the error it raised."""
    try:
        with opened(url, table=table, create=True) as store:
            store.put(record(key))
    except StoreError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def has_table(url: str, name: str) -> bool:
    """Whether the database at ``url`` has the table ``name``, seen on a new engine."""
    engine = sa.create_engine(url)
    try:
        return sa.inspect(engine).has_table(name)
    finally:
        engine.dispose()


# -- errors ----------------------------------------------------------------------------------


class TestConnectionFailure:
    @pytest.mark.parametrize("scheme", ["postgresql+psycopg", "mysql+pymysql"])
    def test_sync_store_raises_store_unavailable(self, scheme: str, closed_port: int) -> None:
        """A refused connection is StoreUnavailable itself, not the driver's exception."""
        with (
            opened(f"{scheme}://credkeeper@127.0.0.1:{closed_port}/app") as store,
            pytest.raises(StoreError) as caught,
        ):
            store.get("alice")

        assert StoreUnavailable is type(caught.value)

    @pytest.mark.anyio
    @pytest.mark.parametrize("scheme", ["postgresql+psycopg_async", "mysql+aiomysql"])
    async def test_async_store_raises_store_unavailable(
        self, scheme: str, closed_port: int
    ) -> None:
        """A refused connection through an async driver is StoreUnavailable too."""
        url = f"{scheme}://credkeeper@127.0.0.1:{closed_port}/app"
        async with opened_async(url) as store:
            with pytest.raises(StoreError) as caught:
                await store.get("alice")

        assert StoreUnavailable is type(caught.value)


def secret_tokens() -> tuple[str, str]:
    """An access and a refresh token shaped like Claude's, random for each test."""
    return (
        f"sk-ant-oat01-{secrets.token_urlsafe(48)}",
        f"sk-ant-ort01-{secrets.token_urlsafe(48)}",
    )


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception reachable through ``__cause__`` and ``__context__``."""
    found: list[BaseException] = []
    pending = [exc]
    while pending:
        current = pending.pop()
        if any(current is seen for seen in found):
            continue
        found.append(current)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return found


def leaks(exc: BaseException, *tokens: str) -> list[str]:
    """The type names of the exceptions in ``exc``'s chain whose str() shows a token."""
    return [
        type(link).__name__
        for link in exception_chain(exc)
        if any(token in str(link) for token in tokens)
    ]


class TestNoTokenInErrors:
    @pytest.mark.parametrize("backend", ["postgres", "mysql"])
    def test_rejected_value(self, store_url: str) -> None:
        """A put the server refuses (long subscription_type) shows no token in its chain."""
        tokens = secret_tokens()
        rejected = record(
            unique_key(),
            access_token=tokens[0],
            refresh_token=tokens[1],
            subscription_type="x" * 256,
        )

        with opened(store_url) as store, pytest.raises(StoreError) as caught:
            store.put(rejected)

        assert (StoreError, []) == (type(caught.value), leaks(caught.value, *tokens))

    def test_duplicate_create(self, store_url: str) -> None:
        """A create over an existing key is a ConflictError showing no token in its chain."""
        tokens = secret_tokens()
        key = unique_key()
        with opened(store_url) as store:
            store.put(record(key))
            try:
                with pytest.raises(StoreError) as caught:
                    store.put(record(key, access_token=tokens[0], refresh_token=tokens[1]))
            finally:
                store.delete(key)

        assert (ConflictError, []) == (type(caught.value), leaks(caught.value, *tokens))


class TestDriverValueErrors:
    @pytest.mark.parametrize(
        "backend",
        [
            "sqlite",
            "postgres",
            "mysql",
        ],
    )
    def test_out_of_range_number_is_a_store_error(self, store_url: str) -> None:
        """A failure count no BIGINT holds is refused as a StoreError, not the driver's error."""
        with opened(store_url) as store, pytest.raises(StoreError) as caught:
            store.put(record(unique_key(), failures=2**70))

        assert StoreError is type(caught.value)

    def test_unencodable_token_is_a_store_error(self, store_url: str) -> None:
        """A token holding a lone surrogate (JSON can carry one) is refused as a StoreError."""
        with opened(store_url) as store, pytest.raises(StoreError):
            store.put(record(unique_key(), access_token="sk-ant-oat01-\ud800"))


# -- scan_due ----------------------------------------------------------------------------


def fill_for_paging(url: str, table: str) -> list[str]:
    """50 due and 20 not-due records in ``table``, many sharing an expiry; the due keys.

    Expiries repeat in runs of ten, so pages of 7 end inside runs, and the first run expires
    exactly at NOW, the scan's bound. Keys come in pairs differing only in case, which a
    case-folding collation would merge.
    """
    due = [f"due-{index // 2:02d}-{'A' if index % 2 else 'a'}" for index in range(50)]
    later = [f"later-{index:02d}" for index in range(20)]
    records = [record(key, expires_at=NOW - (index // 10) * MS) for index, key in enumerate(due)]
    records += [
        record(key, expires_at=NOW + (1 + index // 10) * MS) for index, key in enumerate(later)
    ]
    random.Random(7).shuffle(records)
    with opened(url, table=table) as store:
        for item in records:
            store.put(item)
    return due


class TestScanDuePaging:
    def test_sync_store_yields_each_due_key_once(self, database_url: str, table: str) -> None:
        """With page_size=7, every due key comes back exactly once and no other key."""
        due = fill_for_paging(database_url, table)

        with opened(database_url, table=table, page_size=7) as store:
            scanned = list(store.scan_due(NOW))

        assert sorted(due) == sorted(scanned)

    @pytest.mark.anyio
    async def test_async_store_yields_each_due_key_once(
        self, database_url: str, table: str
    ) -> None:
        """The async store's pages of 7 also yield every due key exactly once."""
        due = fill_for_paging(database_url, table)

        async with opened_async(async_url(database_url), table=table, page_size=7) as store:
            scanned = [key async for key in store.scan_due(NOW)]

        assert sorted(due) == sorted(scanned)

    def test_page_size_in_the_url(self, database_url: str, table: str) -> None:
        """page_size given in the URL's query pages the same way."""
        due = fill_for_paging(database_url, table)
        separator = "&" if "?" in database_url else "?"

        with opened(f"{database_url}{separator}page_size=7", table=table) as store:
            scanned = list(store.scan_due(NOW))

        assert sorted(due) == sorted(scanned)


class TestMisuse:
    @pytest.mark.parametrize("backend", ["sqlite"])
    def test_scan_due_refuses_a_naive_time_at_the_call(self, database_url: str) -> None:
        """scan_due(naive) raises when called, before any key is asked for."""
        with opened(database_url) as store, pytest.raises(ConfigurationError) as caught:
            store.scan_due(NOW.replace(tzinfo=None))

        assert "before is a naive datetime" in str(caught.value)

    @pytest.mark.anyio
    @pytest.mark.parametrize("backend", ["sqlite"])
    async def test_async_scan_due_refuses_a_naive_time_at_the_call(self, database_url: str) -> None:
        """The async store's scan_due(naive) raises when called, before iterating too."""
        async with opened_async(async_url(database_url)) as store:
            with pytest.raises(ConfigurationError) as caught:
                store.scan_due(NOW.replace(tzinfo=None))

        assert "before is a naive datetime" in str(caught.value)


# -- engines ---------------------------------------------------------------------------------


def closed_connections(engine: sa.Engine) -> list[object]:
    """A list that grows by one each time ``engine``'s pool closes a DBAPI connection."""
    closed: list[object] = []
    event.listen(engine, "close", lambda connection, _record: closed.append(connection))
    return closed


class TestEngines:
    def test_close_leaves_a_callers_engine_open(self, database_url: str, table: str) -> None:
        """close() neither disposes of nor closes connections of an engine passed in."""
        engine = sa.create_engine(database_url)
        closed = closed_connections(engine)
        try:
            store = SQLStore(engine, table=table)
            store.get("alice")
            store.close()
            closed_by_store = len(closed)
            with engine.connect() as connection:
                answer = connection.execute(sa.text("SELECT 1")).scalar_one()
        finally:
            engine.dispose()

        assert (0, 1) == (closed_by_store, answer)

    def test_close_disposes_an_engine_made_from_a_url(self, database_url: str, table: str) -> None:
        """close() closes the pooled connections of the engine the store made."""
        with opened(database_url, table=table) as store:
            closed = closed_connections(store.engine)
            store.get("alice")

        assert 1 == len(closed)

    def test_an_async_driver_url_for_the_sync_manager_names_the_async_manager(
        self, tmp_path: Path
    ) -> None:
        """TokenManager given an aiosqlite store says to use AsyncTokenManager."""
        store = open_store(f"sqlite+aiosqlite:///{tmp_path / 'creds.db'}")

        with pytest.raises(ConfigurationError, match="AsyncTokenManager"):
            TokenManager(store, Provider.claude_code(), journal=tmp_path / "journal")


# -- lost races --------------------------------------------------------------------------


class TestLostRaces:
    def test_postgres_serialization_failure_is_a_conflict(self, postgres_store_url: str) -> None:
        """A SERIALIZABLE put losing to a concurrent update (40001) is ConflictError."""
        url, table = split_store_url(postgres_store_url)
        name = f"ck-{uuid.uuid4().hex[:8]}"
        engine = sa.create_engine(
            url,
            isolation_level="SERIALIZABLE",
            hide_parameters=True,
            connect_args={"application_name": name},
        )
        other = sa.create_engine(url)
        store = SQLStore(engine, table=table)
        key = unique_key()
        outcome: list[object] = []
        try:
            stored = store.put(record(key))
            rows = sa.Table(table, sa.MetaData(), autoload_with=other)

            def put() -> None:
                try:
                    outcome.append(store.put(stored.replace(failures=2)))
                except StoreError as exc:
                    outcome.append(exc)

            def blocked() -> bool:
                with other.connect() as watcher:
                    query = sa.text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE application_name = :name AND wait_event_type = 'Lock'"
                    )
                    return bool(watcher.execute(query, {"name": name}).scalar_one())

            with other.connect() as holder:
                # Changes the row but not its version: only the isolation level can refuse.
                holder.execute(sa.update(rows).where(rows.c.key == key).values(failures=1))
                writer = threading.Thread(target=put)
                writer.start()
                wait_until(blocked, "the store's put waits for the row lock")
                holder.commit()
            writer.join()
        finally:
            store.delete(key)
            engine.dispose()
            other.dispose()

        error = outcome[0]
        assert isinstance(error, ConflictError)
        assert isinstance(error.__cause__, sa_exc.DBAPIError)
        assert "40001" == getattr(error.__cause__.orig, "sqlstate", None)

    def test_mariadb_deadlock_translates_to_a_conflict(self, mysql_url: str) -> None:
        """A real MariaDB deadlock error (1213) translates to ConflictError for a write."""
        engine = sa.create_engine(mysql_url, hide_parameters=True)
        rows = sa.Table(
            f"ck_deadlock_{uuid.uuid4().hex[:8]}",
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("n", sa.Integer),
            mysql_engine="InnoDB",
        )
        errors: list[sa_exc.DBAPIError] = []
        try:
            with engine.begin() as connection:
                rows.create(connection)
                connection.execute(sa.insert(rows), [{"id": 1, "n": 0}, {"id": 2, "n": 0}])
            errors = lock_cycle(engine, rows)
        finally:
            with engine.begin() as connection:
                rows.drop(connection, checkfirst=True)
            engine.dispose()

        translated = _translate(errors[0], "alice", writing=True, url=engine.url)
        assert (1, ConflictError) == (len(errors), type(translated))

    def test_sqlite_busy_write_is_a_conflict(self, tmp_path: Path) -> None:
        """A put that finds the SQLite file locked by another writer raises ConflictError."""
        path = tmp_path / "credentials.db"
        init_store(f"sqlite:///{path}")
        engine = sa.create_engine(
            f"sqlite:///{path}", hide_parameters=True, connect_args={"timeout": 0.05}
        )
        store = SQLStore(engine)
        try:
            with closing(sqlite3.connect(path, isolation_level=None)) as holder:
                holder.execute("BEGIN EXCLUSIVE")
                with pytest.raises(StoreError) as caught:
                    store.put(record("alice"))
        finally:
            engine.dispose()

        assert ConflictError is type(caught.value)


def lock_cycle(engine: sa.Engine, rows: sa.Table) -> list[sa_exc.DBAPIError]:
    """Two transactions that lock rows 1 and 2 in opposite orders; the errors they got."""
    errors: list[sa_exc.DBAPIError] = []
    first, second = engine.connect(), engine.connect()
    try:
        first_id = first.exec_driver_sql("SELECT connection_id()").scalar_one()
        first.execute(sa.update(rows).where(rows.c.id == 1).values(n=1))
        second.execute(sa.update(rows).where(rows.c.id == 2).values(n=1))

        def cross() -> None:
            try:
                first.execute(sa.update(rows).where(rows.c.id == 2).values(n=2))
            except sa_exc.DBAPIError as exc:
                errors.append(exc)

        def waiting() -> bool:
            with engine.connect() as watcher:
                query = sa.text(
                    "SELECT count(*) FROM information_schema.innodb_trx "
                    "WHERE trx_mysql_thread_id = :id AND trx_state = 'LOCK WAIT'"
                )
                return bool(watcher.execute(query, {"id": first_id}).scalar_one())

        crossing = threading.Thread(target=cross)
        crossing.start()
        wait_until(waiting, "the first transaction waits for row 2")
        try:
            second.execute(sa.update(rows).where(rows.c.id == 1).values(n=2))
        except sa_exc.DBAPIError as exc:
            errors.append(exc)
        crossing.join()
    finally:
        for connection in (first, second):
            connection.rollback()
            connection.close()
    return errors
