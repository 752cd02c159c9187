"""Errors that say what is wrong: a bad database, login, privilege, table or column is a
ConfigurationError naming the database and the server's reason; what may pass stays
StoreUnavailable.

Every case is produced on the real servers: the tests create the roles, users and tables they
need under unique names and drop them afterwards.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.engine import URL, make_url

from credkeeper import (
    AsyncCredentialStore,
    ConfigurationError,
    CredentialStore,
    CredkeeperError,
    Record,
    StoreError,
    StoreUnavailable,
    open_store,
)
from credkeeper.cli import cli
from credkeeper.cli._errors import PREFIX, ExitCode  # not yet public: the CLI's exit codes
from credkeeper_sql import init_store
from credkeeper_sql._store import _reason

from .conftest import async_url
from .test_existing_table import MAPPING, UsersTable, drop, make_users


def changed(url: str, **parts: str | None) -> str:
    """``url`` with some of its parts (database, username, password, query) replaced."""
    return make_url(url).set(**parts).render_as_string(hide_password=False)  # type: ignore[arg-type]


def with_query(url: str, query: str) -> str:
    """``url`` with ``query`` added to its query string."""
    return f"{url}{'&' if '?' in url else '?'}{query}"


def where(url: str) -> str:
    """How a message names the server, database and user of ``url``."""
    parsed: URL = make_url(url)
    name = {"postgresql": "PostgreSQL", "mysql": "MySQL/MariaDB"}[parsed.get_backend_name()]
    return (
        f"{name} server {parsed.host}:{parsed.port}, "
        f"database {parsed.database!r}, user {parsed.username!r}"
    )


def record(key: str) -> Record:
    """A credential to write."""
    return Record(
        key=key,
        access_token="access",
        refresh_token="refresh",
        expires_at=datetime(2030, 1, 1, tzinfo=UTC),
    )


def failure(url: str, *, write: bool = False) -> CredkeeperError:
    """What a get (or a put) on a store opened on ``url`` raised."""
    store = open_store(url)
    assert isinstance(store, CredentialStore)
    try:
        operation = (
            (lambda: store.put(record(f"k-{uuid.uuid4().hex[:8]}")))
            if write
            else (lambda: store.get("alice"))
        )
        with pytest.raises(CredkeeperError) as caught:
            operation()
    finally:
        store.close()
    return caught.value


async def async_failure(url: str) -> CredkeeperError:
    """What a get on an async store opened on ``url`` raised."""
    store = open_store(url)
    assert isinstance(store, AsyncCredentialStore)
    try:
        with pytest.raises(CredkeeperError) as caught:
            await store.get("alice")
    finally:
        await store.close()
    return caught.value


def chain_text(exc: BaseException) -> str:
    """The text of ``exc`` and of every exception it was raised from."""
    texts = []
    current: BaseException | None = exc
    while current is not None:
        texts.append(str(current))
        current = current.__cause__ or current.__context__
    return "\n".join(texts)


def execute(url: str, *statements: str) -> None:
    """Run ``statements`` as the server's administrator, in one transaction."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            for statement in statements:
                connection.execute(sa.text(statement))
    finally:
        engine.dispose()


@pytest.fixture
def missing_database() -> str:
    """A database name no server has."""
    return f"ck_missing_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def postgres_role(postgres_url: str) -> Iterator[tuple[str, str]]:
    """A PostgreSQL login role with a password and no privilege on any table; dropped after."""
    name, password = f"ck_role_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    execute(postgres_url, f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    try:
        yield name, password
    finally:
        execute(postgres_url, f"DROP ROLE IF EXISTS {name}")


@pytest.fixture
def mariadb_user(mysql_url: str) -> Iterator[tuple[str, str]]:
    """A MariaDB user with a password and no privilege yet; dropped after."""
    name, password = f"ck_user_{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    execute(mysql_url, f"CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'")
    try:
        yield name, password
    finally:
        execute(mysql_url, f"DROP USER IF EXISTS '{name}'@'%'")


@contextlib.contextmanager
def users_table(server: str) -> Iterator[UsersTable]:
    """The application's users table with credkeeper's side table; both dropped after."""
    table = make_users(server)
    try:
        init_store(table.url)
        yield table
    finally:
        drop(table)


class TestUnknownDatabase:
    def test_postgres_names_the_database_and_the_reason(
        self, postgres_url: str, missing_database: str
    ) -> None:
        """A database PostgreSQL does not have: ConfigurationError with host, port and reason."""
        url = changed(postgres_url, database=missing_database)

        error = failure(url)

        assert (
            ConfigurationError,
            f"cannot use the {where(url)}: the database does not exist (the server says: "
            f'database "{missing_database}" does not exist); create it, or correct the database '
            "in the store URL",
        ) == (type(error), str(error))

    def test_mariadb_names_the_database_and_the_reason(
        self, mysql_url: str, missing_database: str
    ) -> None:
        """A database MariaDB does not have: ConfigurationError with host, port and reason."""
        url = changed(mysql_url, database=missing_database)

        error = failure(url)

        assert (
            ConfigurationError,
            f"cannot use the {where(url)}: the database does not exist (the server says: "
            f"Unknown database '{missing_database}'); create it, or correct the database in the "
            "store URL",
        ) == (type(error), str(error))

    @pytest.mark.anyio
    @pytest.mark.parametrize("backend", ["postgres_url", "mysql_url"])
    async def test_async_drivers_say_the_same(
        self, request: pytest.FixtureRequest, backend: str, missing_database: str
    ) -> None:
        """psycopg async and aiomysql report a missing database as a ConfigurationError too."""
        url = async_url(changed(request.getfixturevalue(backend), database=missing_database))

        error = await async_failure(url)

        assert (ConfigurationError, True) == (
            type(error),
            "the database does not exist" in str(error) and missing_database in str(error),
        )

    def test_password_is_never_shown(
        self, postgres_url: str, postgres_role: tuple[str, str], missing_database: str
    ) -> None:
        """A URL with a password: the message names the user and hides the password."""
        name, password = postgres_role
        url = changed(postgres_url, username=name, password=password, database=missing_database)

        error = failure(url)

        assert (ConfigurationError, True, False) == (
            type(error),
            f"user {name!r}" in str(error),
            password in chain_text(error),
        )


class TestLogin:
    def test_mariadb_wrong_password(self, mysql_url: str, mariadb_user: tuple[str, str]) -> None:
        """A password MariaDB refuses: ConfigurationError quoting the refusal, no password."""
        name, password = mariadb_user
        url = changed(mysql_url, username=name, password="not-" + password)

        error = failure(url)

        assert str(error).startswith(
            f"cannot use the {where(url)}: the server refused the login (the server says: "
            f"Access denied for user '{name}'@"
        )
        assert (ConfigurationError, False) == (type(error), password in chain_text(error))

    def test_postgres_unknown_role(self, postgres_url: str) -> None:
        """A user PostgreSQL does not know: ConfigurationError quoting the server's refusal."""
        name = f"ck_nobody_{uuid.uuid4().hex[:8]}"
        url = changed(postgres_url, username=name)

        error = failure(url)

        assert (
            ConfigurationError,
            f"cannot use the {where(url)}: the server refused the login (the server says: "
            f'role "{name}" does not exist); check the user and password in the store URL, and '
            "that the server lets that user in from this host",
        ) == (type(error), str(error))


class TestPrivilege:
    def test_postgres_table_without_privilege(
        self, postgres_store_url: str, postgres_role: tuple[str, str]
    ) -> None:
        """A role with no privilege on credkeeper's table: ConfigurationError naming the grant."""
        name, password = postgres_role
        url = changed(postgres_store_url, username=name, password=password)
        table = dict(make_url(url).query)["table"]

        error = failure(url)

        assert (
            ConfigurationError,
            f"cannot use the {where(url)}: the user lacks a privilege (the server says: "
            f"permission denied for table {table}); grant it SELECT, INSERT, UPDATE and DELETE "
            "on credkeeper's tables, and SELECT and UPDATE on a mapped table (INSERT too with "
            "insert=true, DELETE with delete_rows=true)",
        ) == (type(error), str(error))

    def test_mariadb_table_without_privilege(
        self, mysql_store_url: str, mariadb_user: tuple[str, str]
    ) -> None:
        """A user who may read but not write the table: ConfigurationError quoting the denial."""
        name, password = mariadb_user
        table = dict(make_url(mysql_store_url).query)["table"]
        database = make_url(mysql_store_url).database
        execute(
            mysql_store_url.partition("?")[0], f"GRANT SELECT ON {database}.{table} TO '{name}'@'%'"
        )
        url = changed(mysql_store_url, username=name, password=password)

        error = failure(url, write=True)

        assert str(error).startswith(
            f"cannot use the {where(url)}: the user lacks a privilege (the server says: "
            f"INSERT command denied to user '{name}'@"
        )
        assert ConfigurationError is type(error)

    @pytest.mark.anyio
    async def test_mariadb_database_without_privilege_async(
        self, mysql_url: str, mariadb_user: tuple[str, str]
    ) -> None:
        """aiomysql: a user with no access to the database gets a ConfigurationError."""
        name, password = mariadb_user
        url = async_url(changed(mysql_url, username=name, password=password))

        error = await async_failure(url)

        assert (ConfigurationError, True) == (
            type(error),
            "the user lacks a privilege" in str(error),
        )


@pytest.fixture(params=["sqlite", "postgres_url", "mysql_url"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend's database URL, without credkeeper's options."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    url: str = request.getfixturevalue(request.param)
    return url


class TestMissingObjects:
    @pytest.mark.anyio
    async def test_missing_own_table_async(self, server: str) -> None:
        """An async store on a database without credkeeper's table names init-store."""
        table = f"ck_absent_{uuid.uuid4().hex[:8]}"

        error = await async_failure(with_query(async_url(server), f"table={table}"))

        assert (ConfigurationError, True, True) == (
            type(error),
            table in str(error),
            "`credkeeper init-store URL`" in str(error),
        )

    def test_missing_application_table(self, server: str) -> None:
        """A mapping onto a table the database does not have names the table and the option."""
        url = with_query(server, f"table=ck_absent&{MAPPING}")

        error = failure(url)

        assert (ConfigurationError, True) == (
            type(error),
            str(error).endswith(
                "table 'ck_absent' does not exist; the existing-table mapping needs the "
                "application's own table: check the table and schema options"
            ),
        )

    def test_missing_mapped_column_lists_the_tables_columns(self, server: str) -> None:
        """A mapped column the table lacks: named, with every column the table does have."""
        with users_table(server) as users:
            url = users.url.replace(
                "access_token_column=claude_access_token", "access_token_column=claude_token"
            )

            error = failure(url)

        assert (ConfigurationError, True) == (
            type(error),
            str(error).endswith(
                f"table {users.name!r} has no column 'claude_token' (mapped to access_token); "
                "its columns are id, name, email, plan, claude_access_token, "
                "claude_refresh_token, claude_expires_at, last_seen: correct the "
                "access_token_column option"
            ),
        )

    def test_column_dropped_after_first_use(self, server: str) -> None:
        """A mapped column dropped under a running store: ConfigurationError from the server."""
        with users_table(server) as users:
            store = open_store(users.url)
            assert isinstance(store, CredentialStore)
            try:
                store.get("alice")
                users.execute(f"ALTER TABLE {users.name} DROP COLUMN claude_expires_at")
                with pytest.raises(CredkeeperError) as caught:
                    store.get("bob")
            finally:
                store.close()

        assert (ConfigurationError, True) == (
            type(caught.value),
            "a column does not exist" in str(caught.value)
            and "claude_expires_at" in str(caught.value),
        )

    def test_sqlite_file_that_cannot_be_opened(self, tmp_path: Path) -> None:
        """A SQLite path in a directory that does not exist: ConfigurationError naming the path."""
        path = tmp_path / "no-such-directory" / "credentials.db"

        error = failure(f"sqlite:///{path}")

        assert (
            ConfigurationError,
            f"cannot use the SQLite database '{path}': the database file cannot be opened or "
            "written (SQLite says: unable to open database file); check that its directory "
            "exists and that this process may read and write the file there",
        ) == (type(error), str(error))


class TestRefusals:
    def test_a_sqlite_file_opened_read_only_is_a_configuration_error(self, tmp_path: Path) -> None:
        """A write to a read-only SQLite file is not 'retry later': retrying cannot help."""
        path = tmp_path / "credentials.db"
        init_store(f"sqlite:///{path}")

        error = failure(f"sqlite:///file:{path}?mode=ro&uri=true", write=True)

        assert (ConfigurationError, False) == (type(error), "retry later" in str(error))

    def test_a_check_constraint_on_mariadb_is_a_store_error(self, mysql_url: str) -> None:
        """MariaDB reports CHECK failures as OperationalError; they are refusals, not outages."""
        table = f"ck_check_{uuid.uuid4().hex[:8]}"
        execute(
            mysql_url,
            f"CREATE TABLE {table} (id INT PRIMARY KEY, access_token TEXT, refresh_token TEXT "
            "CHECK (refresh_token IS NULL OR refresh_token LIKE 'ok%'), expires_at BIGINT)",
            f"INSERT INTO {table} (id) VALUES (7)",  # noqa: S608 - a generated test table name
        )
        url = with_query(
            mysql_url,
            f"table={table}&lease_table={table}_leases&create=true&key_column=id"
            "&access_token_column=access_token&refresh_token_column=refresh_token"
            "&expires_at_column=expires_at",
        )
        store = open_store(url)
        try:
            with pytest.raises(CredkeeperError) as caught:
                store.put(record("7"))
        finally:
            store.close()
            execute(mysql_url, f"DROP TABLE {table}", f"DROP TABLE IF EXISTS {table}_leases")

        assert (StoreError, False) == (type(caught.value), "retry later" in str(caught.value))

    def test_a_detail_line_quoting_the_row_is_left_out(self) -> None:
        """A server message's DETAIL (asyncpg puts the failing row there) is never quoted."""
        error = Exception(
            'null value in column "x" violates not-null constraint\n'
            "DETAIL:  Failing row contains (42, sk-ant-oat01-secret, sk-ant-ort01-secret)."
        )

        reason = _reason(error, make_url("postgresql://u@h/db"))

        assert ('null value in column "x" violates not-null constraint', False) == (
            reason,
            "secret" in reason,
        )


class TestWhatMayPass:
    @pytest.mark.parametrize(
        ("backend", "read_only"),
        [
            ("postgres_store_url", "options=-c default_transaction_read_only=on"),
            ("mysql_store_url", "init_command=SET SESSION TRANSACTION READ ONLY"),
        ],
    )
    def test_read_only_server_is_unavailable(
        self, request: pytest.FixtureRequest, backend: str, read_only: str
    ) -> None:
        """A write refused as read-only (a standby after a failover) may pass: StoreUnavailable."""
        url = with_query(request.getfixturevalue(backend), read_only)

        error = failure(url, write=True)

        assert (StoreUnavailable, True) == (type(error), "retry later" in str(error))


class TestCommandLine:
    @pytest.fixture(autouse=True)
    def isolated(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """No credkeeper variable, a private HOME, as tests/cli gives every command."""
        for name in ("CREDKEEPER_STORE", "CREDKEEPER_KEYS", "CREDKEEPER_JOURNAL"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))

    def status(self, url: str, tmp_path: Path) -> tuple[int, str]:
        """``credkeeper --store URL status``: the exit code and stderr."""
        result = CliRunner().invoke(
            cli, ["--store", url, "--journal", str(tmp_path / "journal"), "status"]
        )
        return result.exit_code, result.stderr

    def test_unknown_database_exits_2(
        self, postgres_url: str, missing_database: str, tmp_path: Path
    ) -> None:
        """status on a database that does not exist: exit 2, one line naming it, no retry."""
        url = changed(postgres_url, database=missing_database)

        code, stderr = self.status(url, tmp_path)

        assert (ExitCode.USAGE, True, False) == (
            code,
            stderr.startswith(f"{PREFIX}cannot use the {where(url)}: the database does not exist"),
            "retry" in stderr,
        )

    def test_wrong_password_exits_2_without_the_password(
        self, mysql_url: str, mariadb_user: tuple[str, str], tmp_path: Path
    ) -> None:
        """status with a refused password: exit 2, the refusal, and never the password."""
        name, password = mariadb_user
        wrong = f"wrong-{password}"
        url = changed(mysql_url, username=name, password=wrong)

        code, stderr = self.status(url, tmp_path)

        assert (ExitCode.USAGE, True, False, False) == (
            code,
            "the server refused the login" in stderr,
            wrong in stderr,
            password in stderr,
        )

    def test_store_unavailable_still_exits_4(self, tmp_path: Path) -> None:
        """A server that refuses connections may come back: exit 4, as before."""
        code, _ = self.status("postgresql+psycopg://credkeeper@127.0.0.1:1/app", tmp_path)

        assert ExitCode.STORE == code
