"""`credkeeper init-store URL`: creates the SQL store's missing tables, and says which."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import Result
from sqlalchemy.engine import make_url

from credkeeper import Record, open_store
from credkeeper.cli._errors import PREFIX, ExitCode
from credkeeper_sql import SQLStore, credentials_table, leases_table

from .conftest import Cli, error_line

RECORD = Record(
    key="alice",
    access_token="access-token",
    refresh_token="refresh-token",
    expires_at=datetime(2026, 1, 1, 20, 0, tzinfo=UTC),
)


def init_store(url: str) -> Result:
    """Run ``credkeeper init-store URL`` with no global options."""
    return Cli([])("init-store", url)


def tables(url: str) -> list[str]:
    """The names of the tables in the database at ``url``."""
    engine = sa.create_engine(url)
    try:
        return sorted(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file that does not exist yet."""
    return f"sqlite:///{tmp_path / 'credentials.db'}"


@pytest.fixture
def postgres_table(postgres_url: str) -> Iterator[str]:
    """A table name unused in the PostgreSQL database; dropped after the test."""
    name = f"ck_cli_{uuid.uuid4().hex[:10]}"
    yield name
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as connection:
            sa.Table(name, sa.MetaData()).drop(connection, checkfirst=True)
    finally:
        engine.dispose()


class TestSQLite:
    def test_creates_the_default_table(self, sqlite_url: str) -> None:
        """A new database gets credkeeper's table, and the output names it."""
        result = init_store(sqlite_url)

        assert (0, f"created table credkeeper_credentials in {sqlite_url}\n", "") == (
            result.exit_code,
            result.stdout,
            result.stderr,
        )
        assert ["credkeeper_credentials"] == tables(sqlite_url)

    def test_second_run_creates_nothing(self, sqlite_url: str) -> None:
        """Run again, it exits 0 and says that every table already exists."""
        init_store(sqlite_url)

        result = init_store(sqlite_url)

        assert (0, f"credkeeper's tables already exist in {sqlite_url}; nothing to create\n") == (
            result.exit_code,
            result.stdout,
        )

    def test_second_run_keeps_stored_credentials(self, sqlite_url: str) -> None:
        """Running it over a table holding records leaves them as they are."""
        init_store(sqlite_url)
        store = open_store(sqlite_url)
        assert isinstance(store, SQLStore)
        try:
            stored = store.put(
                Record(
                    key="alice",
                    access_token="access-token",
                    refresh_token="refresh-token",
                    expires_at=datetime(2026, 1, 1, 20, 0, tzinfo=UTC),
                )
            )
            init_store(sqlite_url)
            assert stored == store.get("alice")
        finally:
            store.close()

    def test_table_option_in_the_url(self, sqlite_url: str) -> None:
        """?table=NAME in the URL names the table to create."""
        result = init_store(f"{sqlite_url}?table=oauth_credentials")

        assert (0, ["oauth_credentials"]) == (result.exit_code, tables(sqlite_url))

    def test_existing_table_mapping_creates_only_the_lease_table(self, sqlite_url: str) -> None:
        """With an existing-table mapping in the URL, only the lease side table is created."""
        engine = sa.create_engine(sqlite_url)
        try:
            with engine.begin() as connection:
                connection.exec_driver_sql(
                    "CREATE TABLE users (id TEXT PRIMARY KEY, access TEXT, refresh TEXT, "
                    "expires BIGINT)"
                )
        finally:
            engine.dispose()
        url = (
            f"{sqlite_url}?table=users&key_column=id&access_token_column=access"
            "&refresh_token_column=refresh&expires_at_column=expires&lease_table=user_leases"
        )

        result = init_store(url)

        assert (0, f"created table user_leases in {url}\n", ["user_leases", "users"]) == (
            result.exit_code,
            result.stdout,
            tables(sqlite_url),
        )


def make_old_table(url: str, *, name: str = "credkeeper_credentials", leases: bool = False) -> None:
    """Create credkeeper's table as a release before ``refreshed_at`` made it."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            make = leases_table if leases else credentials_table
            make(sa.MetaData(), name, refreshed_at=False).create(connection)
    finally:
        engine.dispose()


def columns(url: str, table: str) -> list[str]:
    """The column names of ``table`` in the database at ``url``."""
    engine = sa.create_engine(url)
    try:
        return [column["name"] for column in sa.inspect(engine).get_columns(table)]
    finally:
        engine.dispose()


class TestUpgrade:
    def test_adds_the_refreshed_at_column_to_an_old_table(self, sqlite_url: str) -> None:
        """A table from before refreshed_at gets the column, and the output says so."""
        make_old_table(sqlite_url)

        result = init_store(sqlite_url)

        assert (0, f"added column credkeeper_credentials.refreshed_at in {sqlite_url}\n") == (
            result.exit_code,
            result.stdout,
        )
        assert "refreshed_at" in columns(sqlite_url, "credkeeper_credentials")

    def test_the_upgraded_table_keeps_the_last_refresh(self, sqlite_url: str) -> None:
        """After the upgrade, a record's refreshed_at round trips through the store."""
        make_old_table(sqlite_url)
        init_store(sqlite_url)
        moment = datetime(2026, 1, 1, 12, 0, 0, 123000, tzinfo=UTC)
        store = open_store(sqlite_url)
        assert isinstance(store, SQLStore)
        try:
            stored = store.put(RECORD.replace(refreshed_at=moment))
            assert stored == store.get("alice")
        finally:
            store.close()

    def test_an_old_table_works_without_the_column(self, sqlite_url: str) -> None:
        """Before the upgrade the store still works, the last refresh reading as None."""
        make_old_table(sqlite_url)
        store = open_store(sqlite_url)
        assert isinstance(store, SQLStore)
        try:
            store.put(RECORD.replace(refreshed_at=datetime(2026, 1, 1, tzinfo=UTC)))
            record = store.get("alice")
        finally:
            store.close()

        assert (RECORD.access_token, None) == (
            record and record.access_token,
            record and record.refreshed_at,
        )

    def test_check_names_the_missing_column_and_the_fix(self, sqlite_url: str) -> None:
        """--check on an old table exits 2 naming refreshed_at and init-store."""
        make_old_table(sqlite_url)

        result = Cli([])("init-store", "--check", sqlite_url)

        assert ExitCode.USAGE == result.exit_code
        assert "has no column 'refreshed_at'" in result.stderr
        assert "credkeeper init-store URL" in result.stderr

    def test_adds_the_column_to_an_old_side_table_only(self, sqlite_url: str) -> None:
        """With an existing-table mapping, the side table gets it; the application's table not."""
        engine = sa.create_engine(sqlite_url)
        try:
            with engine.begin() as connection:
                connection.exec_driver_sql(
                    "CREATE TABLE users (id TEXT PRIMARY KEY, access TEXT, refresh TEXT, "
                    "expires BIGINT)"
                )
        finally:
            engine.dispose()
        make_old_table(sqlite_url, name="user_leases", leases=True)
        url = (
            f"{sqlite_url}?table=users&key_column=id&access_token_column=access"
            "&refresh_token_column=refresh&expires_at_column=expires&lease_table=user_leases"
        )

        result = init_store(url)

        assert (0, True, ["id", "access", "refresh", "expires"]) == (
            result.exit_code,
            "refreshed_at" in columns(sqlite_url, "user_leases"),
            columns(sqlite_url, "users"),
        )

    def test_postgres_old_table_gets_the_column(
        self, postgres_url: str, postgres_table: str
    ) -> None:
        """On PostgreSQL too, an old table gets the nullable column, once."""
        url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}table={postgres_table}"
        make_old_table(postgres_url, name=postgres_table)

        first = init_store(url)
        again = init_store(url)

        assert (
            f"added column {postgres_table}.refreshed_at in {url}\n",
            f"credkeeper's tables already exist in {url}; nothing to create\n",
        ) == (first.stdout, again.stdout)


class TestPostgres:
    def test_creates_the_table(self, postgres_url: str, postgres_table: str) -> None:
        """The PostgreSQL database gets the table the URL names."""
        url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}table={postgres_table}"

        result = init_store(url)

        assert (0, f"created table {postgres_table} in {url}\n") == (
            result.exit_code,
            result.stdout,
        )
        assert postgres_table in tables(postgres_url)

    def test_second_run_creates_nothing(self, postgres_url: str, postgres_table: str) -> None:
        """Run again on PostgreSQL, it exits 0 and creates nothing."""
        url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}table={postgres_table}"
        init_store(url)

        result = init_store(url)

        assert (0, f"credkeeper's tables already exist in {url}; nothing to create\n") == (
            result.exit_code,
            result.stdout,
        )

    def test_password_is_masked(self, postgres_url: str, postgres_table: str) -> None:
        """The URL's password never shows; the output masks it as ***."""
        parsed = make_url(postgres_url).update_query_dict({"table": postgres_table})
        if parsed.password is None:
            # The test server trusts its clients; a password it never asks for is harmless.
            parsed = parsed.set(password=f"pw{secrets.token_hex(8)}")
        password = str(parsed.password)

        first = init_store(parsed.render_as_string(hide_password=False))
        again = init_store(parsed.render_as_string(hide_password=False))

        shown = parsed.render_as_string(hide_password=True)
        assert (
            f"created table {postgres_table} in {shown}\n",
            f"credkeeper's tables already exist in {shown}; nothing to create\n",
        ) == (first.stdout, again.stdout)
        assert [] == [r for r in (first, again) if password in r.stdout + r.stderr]


class TestErrors:
    def test_non_sql_url_is_a_usage_error(self, tmp_path: Path) -> None:
        """A URL of a store that is not SQL exits 2 with one line saying init-store is SQL's."""
        result = init_store((tmp_path / "credentials.json").as_uri())

        assert ExitCode.USAGE == result.exit_code
        assert error_line(result).startswith("init-store sets up SQL stores only")

    def test_async_driver_is_a_usage_error(self) -> None:
        """An async driver URL exits 2, naming a synchronous one to use."""
        result = init_store("postgresql+psycopg_async://u@db.example/app")

        assert ExitCode.USAGE == result.exit_code
        assert error_line(result).startswith("init-store needs a synchronous driver URL")

    def test_unreachable_server_is_a_store_error(self) -> None:
        """A server refusing the connection exits 4, one line, without the password."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"postgresql+psycopg://app:hunter2secret@127.0.0.1:{port}/app"

        result = init_store(url)

        assert ExitCode.STORE == result.exit_code
        assert "hunter2secret" not in error_line(result)

    def test_without_sqlalchemy_names_the_extra(self) -> None:
        """SQLAlchemy None in sys.modules (as if absent): exit 2, one line naming the extra."""
        script = (
            "import sys\n"
            "sys.modules['sqlalchemy'] = None\n"
            "from credkeeper.__main__ import main\n"
            "sys.exit(main(['init-store', 'postgresql://app:hunter2secret@db.example/app']))\n"
        )
        completed = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )

        assert (
            ExitCode.USAGE,
            "",
            [
                f"{PREFIX}the SQL store failed to import (sqlalchemy); "
                "install it with pip install 'credkeeper[sql]'"
            ],
        ) == (completed.returncode, completed.stdout, completed.stderr.splitlines())
