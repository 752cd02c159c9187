"""`credkeeper init-store --check URL`: the mapping the store will use, and what to fix first."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from click.testing import Result

from credkeeper.cli._errors import ExitCode

from .conftest import Cli, error_line

MAPPING = (
    "key_column=user_id&access_token_column=access_token&refresh_token_column=refresh_token"
    "&expires_at_column=expires_at&scopes_column=scopes"
)


def check(url: str) -> Result:
    """Run ``credkeeper init-store --check URL`` with no global options."""
    return Cli([])("init-store", "--check", url)


def tables(url: str) -> list[str]:
    """The names of the tables in the database at ``url``."""
    engine = sa.create_engine(url)
    try:
        return sorted(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.fixture
def claude_tokens(postgres_url: str) -> Iterator[str]:
    """An application's claude_tokens table (integer ids, epoch ms, space-separated scopes)."""
    name = f"claude_tokens_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(postgres_url)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            f"CREATE TABLE {name} (user_id BIGINT PRIMARY KEY, access_token TEXT, "
            "refresh_token TEXT, expires_at BIGINT, scopes TEXT, nickname TEXT)"
        )
    yield name
    with engine.begin() as connection:
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS {name}_leases")
    engine.dispose()


def url_of(postgres_url: str, table: str, extra: str = "") -> str:
    """The store URL mapping ``table``'s columns, with its own lease table."""
    return f"{postgres_url}?table={table}&lease_table={table}_leases&{MAPPING}{extra}"


class TestCheck:
    def test_prints_each_field_with_its_column_type_and_format(
        self, postgres_url: str, claude_tokens: str
    ) -> None:
        """Every mapped field is listed with how the store will keep it."""
        result = check(url_of(postgres_url, claude_tokens, "&plaintext=true"))

        lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
        assert "integer; keys spelled canonically" in lines["key"]
        assert "epoch milliseconds" in lines["expires_at"]
        assert "text as the row has it (space when it has none)" in lines["scopes"]
        assert "as written (plaintext=true)" in lines["refresh_token"]

    def test_a_missing_lease_table_and_index_exit_2_with_the_fixes(
        self, postgres_url: str, claude_tokens: str
    ) -> None:
        """Before init-store, the side table and the expiry index are named with their fixes."""
        result = check(url_of(postgres_url, claude_tokens))

        assert ExitCode.USAGE == result.exit_code
        assert f"table {claude_tokens}_leases: missing" in result.stdout
        assert "credkeeper init-store URL" in result.stderr
        assert f"CREATE INDEX ix_{claude_tokens}_expires_at" in result.stderr

    def test_a_ready_store_exits_0(self, postgres_url: str, claude_tokens: str) -> None:
        """With the side table and the index in place, the check passes."""
        url = url_of(postgres_url, claude_tokens)
        Cli([])("init-store", url)
        engine = sa.create_engine(postgres_url)
        with engine.begin() as connection:
            connection.exec_driver_sql(f"CREATE INDEX ON {claude_tokens} (expires_at)")
        engine.dispose()

        result = check(url)

        assert (ExitCode.OK, "ready: nothing to fix") == (
            result.exit_code,
            result.stdout.splitlines()[-1],
        )

    def test_a_missing_column_is_named_with_the_fix(
        self, postgres_url: str, claude_tokens: str
    ) -> None:
        """A mapped column the table lacks exits 2, naming it and the option to correct."""
        url = url_of(postgres_url, claude_tokens).replace(
            "scopes_column=scopes", "scopes_column=scope_list"
        )

        result = check(url)

        assert ExitCode.USAGE == result.exit_code
        assert "no column 'scope_list'" in error_line(result)

    def test_writes_nothing(self, postgres_url: str, claude_tokens: str) -> None:
        """--check creates no table."""
        before = tables(postgres_url)

        check(url_of(postgres_url, claude_tokens))

        assert before == tables(postgres_url)

    def test_the_own_table_is_checked_too(self, tmp_path: object) -> None:
        """A fresh SQLite file reports credkeeper's own table as missing, then ready."""
        url = f"sqlite:///{tmp_path}/credentials.db"

        missing = check(url)
        Cli([])("init-store", url)
        ready = check(url)

        assert (ExitCode.USAGE, ExitCode.OK) == (missing.exit_code, ready.exit_code)
        assert "epoch milliseconds" in ready.stdout


WALL_TIME = "replace(substr(expires_at, 1, 19), 'T', ' ')"


def text_expiry_table(server: str) -> str:
    """An application table keeping ``expires_at`` as ISO-8601 text, with a plain index on it
    (which scan_due cannot use); its name."""
    name = f"iso_tokens_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(server)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            f"CREATE TABLE {name} (user_id BIGINT PRIMARY KEY, access_token TEXT, "
            "refresh_token TEXT, expires_at VARCHAR(40), scopes TEXT)"
        )
        connection.exec_driver_sql(f"CREATE INDEX ix_{name}_plain ON {name} (expires_at)")
    engine.dispose()
    return name


def run_fix(server: str, problem: str) -> None:
    """Execute the CREATE INDEX a problem line ends with, exactly as the check printed it."""
    engine = sa.create_engine(server)
    with engine.begin() as connection:
        connection.exec_driver_sql(problem[problem.index("CREATE INDEX") :])
    engine.dispose()


def drop(server: str, *tables: str) -> None:
    """Drop ``tables`` where they exist."""
    engine = sa.create_engine(server)
    with engine.begin() as connection:
        for table in tables:
            connection.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    engine.dispose()


@pytest.fixture
def sqlite_server(tmp_path: object) -> str:
    """A SQLite file's URL."""
    return f"sqlite:///{tmp_path}/app.db"


class TestTextExpiryIndex:
    @pytest.mark.parametrize("server_fixture", ["postgres_url", "sqlite_server"])
    def test_an_index_on_the_column_itself_is_reported_missing_with_the_expression_index(
        self, server_fixture: str, request: pytest.FixtureRequest
    ) -> None:
        """scan_due compares the text's wall time: only an index on that expression serves it."""
        server: str = request.getfixturevalue(server_fixture)
        table = text_expiry_table(server)
        try:
            url = url_of(server, table)
            Cli([])("init-store", url)
            result = check(url)
        finally:
            drop(server, table, f"{table}_leases")

        assert (ExitCode.USAGE, f"index on {table}({WALL_TIME}): missing") == (
            result.exit_code,
            result.stdout.splitlines()[-1],
        )
        assert error_line(result).endswith(
            f"CREATE INDEX ix_{table}_expires_at_wall ON {table} (({WALL_TIME}))"
        )

    @pytest.mark.parametrize("server_fixture", ["postgres_url", "sqlite_server"])
    def test_the_expression_index_it_names_makes_the_store_ready(
        self, server_fixture: str, request: pytest.FixtureRequest
    ) -> None:
        """Creating the index the check prints, verbatim, passes the check."""
        server: str = request.getfixturevalue(server_fixture)
        table = text_expiry_table(server)
        try:
            url = url_of(server, table)
            Cli([])("init-store", url)
            run_fix(server, error_line(check(url)))
            result = check(url)
        finally:
            drop(server, table, f"{table}_leases")

        assert (ExitCode.OK, f"index on {table}({WALL_TIME}): exists") == (
            result.exit_code,
            result.stdout.splitlines()[-2],
        )

    def test_mariadb_is_told_no_index_can_serve_text(self, mysql_url: str) -> None:
        """MariaDB cannot index the expression: the fix is a BIGINT or DATETIME column."""
        table = text_expiry_table(mysql_url)
        try:
            url = url_of(mysql_url, table)
            Cli([])("init-store", url)
            result = check(url)
        finally:
            drop(mysql_url, table, f"{table}_leases")

        assert (ExitCode.USAGE, True) == (
            result.exit_code,
            error_line(result).endswith(
                "MariaDB cannot index that expression: keep the expiry in a BIGINT (epoch "
                "milliseconds) or DATETIME column for an index to serve scan_due"
            ),
        )
