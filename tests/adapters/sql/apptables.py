"""Tables as applications declare them, written and read back with plain SQL, never through
credkeeper, so a test sees exactly what the application's other programs would see."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from credkeeper_sql import init_store

#: The backends every format and insert test runs on.
BACKENDS = ["sqlite", "postgresql", "mariadb"]

#: credkeeper's options mapping the guide's column names, as the tests' tables spell them.
MAPPING = (
    "key_column=id&access_token_column=access_token&refresh_token_column=refresh_token"
    "&expires_at_column=expires_at"
)


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
    """One application table, its credkeeper side table and the store URL mapping onto it."""

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
