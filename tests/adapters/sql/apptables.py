"""Tables as applications declare them, written and read back with plain SQL, never through
credkeeper, so a test sees exactly what the application's other programs would see; and
:class:`MappedTableConformance`, the store contract on such a table on every backend."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa

from credkeeper import CredentialStore, Record, open_store
from credkeeper_sql import init_store

from .test_conformance import _Sync

#: The backends every format and insert test runs on.
BACKENDS = ["sqlite", "postgresql", "mariadb"]

#: credkeeper's options mapping the guide's column names, as the tests' tables spell them.
MAPPING = (
    "key_column=id&access_token_column=access_token&refresh_token_column=refresh_token"
    "&expires_at_column=expires_at"
)

#: credkeeper's options mapping the columns of :func:`claude_tokens`.
TOKENS_MAPPING = (
    "key_column=user_id&access_token_column=access_token&refresh_token_column=refresh_token"
    "&expires_at_column=expires_at&scopes_column=scopes&subscription_type_column=plan"
)
#: :data:`TOKENS_MAPPING` for rows credkeeper creates at login and deletes at logout.
TOKENS_INSERT_AND_DELETE = f"{TOKENS_MAPPING}&insert=true&delete_rows=true"

#: A key column holding any credkeeper key byte for byte, as each backend declares it.
TEXT_KEY = {
    "sqlite": "TEXT NOT NULL PRIMARY KEY",
    "postgresql": "VARCHAR(255) NOT NULL PRIMARY KEY",
    "mariadb": "VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY",
}
_NOW = {"sqlite": "CURRENT_TIMESTAMP", "postgresql": "now()", "mariadb": "CURRENT_TIMESTAMP"}


def claude_tokens(backend: str, *, extra: str = "", key: str | None = None) -> str:
    """The columns of a ``claude_tokens`` table as an application declares it: a row exists
    only for a logged-in user, so its token columns are NOT NULL."""
    return (
        f"user_id {key or 'INTEGER NOT NULL PRIMARY KEY'}, access_token TEXT NOT NULL, "
        "refresh_token TEXT NOT NULL, expires_at BIGINT NOT NULL, scopes TEXT NOT NULL, "
        "plan VARCHAR(20), source VARCHAR(20) NOT NULL DEFAULT 'web-login', "
        f"created_at TIMESTAMP NOT NULL DEFAULT {_NOW[backend]}{extra}"
    )


def new_record(key: str, **changes: Any) -> Record:
    """A never-stored credential under ``key``, with ``changes``."""
    fields: dict[str, Any] = {
        "key": key,
        "access_token": "access-token",
        "refresh_token": "refresh-token",
        "expires_at": datetime(2031, 5, 17, 8, 30, 12, 345000, tzinfo=UTC),
        "scopes": ("user:inference", "user:profile"),
        "subscription_type": "max",
    }
    return Record(**{**fields, **changes})


@contextlib.contextmanager
def opened(url: str) -> Iterator[CredentialStore]:
    """A sync store on ``url``, closed afterwards."""
    store = open_store(url)
    assert isinstance(store, CredentialStore)
    with contextlib.closing(store):
        yield store


def database_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    """The database URL of ``backend`` (without credkeeper's options)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    url: str = request.getfixturevalue("postgres_url" if backend == "postgresql" else "mysql_url")
    return url


def _as_text(backend: str, column: str) -> str:
    """SQL reading ``column`` as the database's own text: exactly what it stores."""
    if backend == "postgresql":
        return f"CAST({column} AS TEXT)"
    if backend == "mariadb":
        return f"CAST({column} AS CHAR)"
    # SQLite: quote() shows the storage class too ('1' is text, 1 an integer).
    return f"quote({column})"


@dataclass
class AppTable:
    """One application table, its credkeeper side table and the store URL mapping onto it.

    As a context manager, it drops both tables on leaving the block.
    """

    server: str
    backend: str
    name: str
    leases: str
    options: str
    key: str = "id"

    @property
    def url(self) -> str:
        """The store URL: this table, its side table, and ``options``."""
        separator = "&" if "?" in self.server else "?"
        return f"{self.server}{separator}table={self.name}&lease_table={self.leases}&{self.options}"

    def execute(self, sql: str, **values: Any) -> None:
        """Run one statement as the application would, in a transaction of its own."""
        engine = sa.create_engine(self.server)
        try:
            with engine.begin() as connection:
                connection.execute(sa.text(sql), values)
        finally:
            engine.dispose()

    def select(self, sql: str) -> list[tuple[Any, ...]]:
        """The rows of one query, read as the application would."""
        engine = sa.create_engine(self.server)
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.execute(sa.text(sql))]
        finally:
            engine.dispose()

    def insert(self, **values: Any) -> None:
        """``INSERT`` one row of ``values``, as the application writes it."""
        names = ", ".join(values)
        slots = ", ".join(f":{name}" for name in values)
        self.execute(f"INSERT INTO {self.name} ({names}) VALUES ({slots})", **values)  # noqa: S608

    def column_names(self) -> list[str]:
        """The table's columns, in their order."""
        engine = sa.create_engine(self.server)
        try:
            with engine.connect() as connection:
                return [c["name"] for c in sa.inspect(connection).get_columns(self.name)]
        finally:
            engine.dispose()

    def dump(self) -> dict[Any, tuple[str | None, ...]]:
        """Every row: its key, to every column (the key too) as the database's own text."""
        shown = ", ".join(_as_text(self.backend, name) for name in self.column_names())
        engine = sa.create_engine(self.server)
        try:
            with engine.connect() as connection:
                query = f"SELECT {self.key}, {shown} FROM {self.name}"  # noqa: S608 - our names
                return {row[0]: tuple(row[1:]) for row in connection.execute(sa.text(query))}
        finally:
            engine.dispose()

    def drop(self) -> None:
        """Drop the table and its side table."""
        engine = sa.create_engine(self.server)
        try:
            with engine.begin() as connection:
                for table in (self.name, self.leases):
                    sa.Table(table, sa.MetaData()).drop(connection, checkfirst=True)
        finally:
            engine.dispose()

    def __enter__(self) -> AppTable:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.drop()


def create_table(
    server: str,
    backend: str,
    columns: str,
    *,
    options: str = MAPPING,
    prefix: str = "app",
    key: str = "id",
    init: bool = True,
) -> AppTable:
    """``CREATE TABLE`` with the ``columns`` SQL as the application declares it, and unless
    ``init`` is false credkeeper's side table for it (``init_store``)."""
    suffix = uuid.uuid4().hex[:8]
    table = AppTable(server, backend, f"{prefix}_{suffix}", f"ck_leases_{suffix}", options, key)
    table.execute(f"CREATE TABLE {table.name} ({columns})")
    if not init:
        return table
    try:
        init_store(table.url)
    except BaseException:
        table.drop()
        raise
    return table


class MappedTableConformance(_Sync):
    """The store conformance suite on an application's own table, once on every backend.

    A subclass declares the table (:meth:`columns`) and how credkeeper maps it (``options``).
    Each backend gets one such table, with its side table, for all of the subclass's cases;
    both are dropped after them.
    """

    #: The store options mapping the table, after its ``table`` and ``lease_table``.
    options: ClassVar[str]

    @classmethod
    def columns(cls, backend: str) -> str:
        """The table's columns, as ``CREATE TABLE`` on ``backend`` takes them."""
        raise NotImplementedError(f"{cls.__name__} must implement columns()")

    @pytest.fixture(scope="class", params=BACKENDS)
    @classmethod
    def mapped_table(
        cls, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[AppTable]:
        """This backend's table, shared by the class's cases on it."""
        backend: str = request.param
        server = database_url(request, backend, tmp_path_factory.mktemp(backend))
        columns = cls.columns(backend)
        with create_table(
            server, backend, columns, options=cls.options, prefix="conformance"
        ) as table:
            yield table

    @pytest.fixture(autouse=True)
    def table_url(self, mapped_table: AppTable) -> None:
        """The store URL of this backend's table, for make_store and store_factory."""
        self.url = mapped_table.url
