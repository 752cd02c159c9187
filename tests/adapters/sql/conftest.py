"""The SQL store's backends: SQLite files, and the PostgreSQL and MariaDB servers the suite finds.

Each session gets its own credkeeper table in each database (created with ``init_store``,
dropped at the end), so runs never see each other's rows or a stale schema.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from credkeeper_sql import init_store


def async_url(url: str) -> str:
    """The same database through the async driver credkeeper is tested with."""
    parsed = make_url(url)
    driver = {
        "sqlite": "sqlite+aiosqlite",
        "postgresql": "postgresql+psycopg_async",
        "mysql": "mysql+aiomysql",
        "mariadb": "mariadb+aiomysql",
    }[parsed.get_backend_name()]
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def table_name() -> str:
    """This session's credkeeper table."""
    return f"ck_test_{uuid.uuid4().hex[:8]}"


def _with_table(url: str, table: str) -> Iterator[str]:
    init_store(url, table=table)
    try:
        yield f"{url}{'&' if '?' in url else '?'}table={table}"
    finally:
        engine = sa.create_engine(url)
        try:
            with engine.begin() as connection:
                sa.Table(table, sa.MetaData()).drop(connection, checkfirst=True)
        finally:
            engine.dispose()


@pytest.fixture(scope="session")
def sqlite_store_url(tmp_path_factory: pytest.TempPathFactory, table_name: str) -> Iterator[str]:
    """A SQLite file with this session's table."""
    path: Path = tmp_path_factory.mktemp("sqlite") / "credentials.db"
    yield from _with_table(f"sqlite:///{path}", table_name)


@pytest.fixture(scope="session")
def postgres_store_url(postgres_url: str, table_name: str) -> Iterator[str]:
    """The PostgreSQL server with this session's table."""
    yield from _with_table(postgres_url, table_name)


@pytest.fixture(scope="session")
def mysql_store_url(mysql_url: str, table_name: str) -> Iterator[str]:
    """The MariaDB/MySQL server with this session's table."""
    yield from _with_table(mysql_url, table_name)
