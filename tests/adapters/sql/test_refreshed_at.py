"""When the tokens were last obtained (``Record.refreshed_at``) in SQL tables: credkeeper's own
tables from before the column, the side table, and an application's own mapped column."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from credkeeper import ConfigurationError, CredentialStore, Record, open_store
from credkeeper_sql import check_store, credentials_table, leases_table, upgrade_store

from .apptables import BACKENDS, AppTable, create_table, database_url
from .test_conformance import _Sync
from .test_insert import INSERT_AND_DELETE, MAPPING, claude_tokens, conformance_columns, select

REFRESHED_AT = datetime(2031, 5, 17, 0, 29, 59, 999000, tzinfo=UTC)
MAPPED = f"{INSERT_AND_DELETE}&refreshed_at_column=refreshed_at"


def new_record(key: str, **changes: Any) -> Record:
    """A never-stored credential under ``key``, last refreshed at REFRESHED_AT."""
    fields: dict[str, Any] = {
        "key": key,
        "access_token": "access-token",
        "refresh_token": "refresh-token",
        "expires_at": datetime(2031, 5, 17, 8, 30, 12, 345000, tzinfo=UTC),
        "refreshed_at": REFRESHED_AT,
    }
    return Record(**{**fields, **changes})


@contextlib.contextmanager
def opened(url: str) -> Iterator[CredentialStore]:
    """A sync store on ``url``, closed afterwards."""
    store = open_store(url)
    assert isinstance(store, CredentialStore)
    with contextlib.closing(store):
        yield store


def old_table(url: str, name: str, *, leases: bool = False) -> None:
    """credkeeper's table ``name`` as a release before ``refreshed_at`` created it."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            make = leases_table if leases else credentials_table
            make(sa.MetaData(), name, refreshed_at=False).create(connection)
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file that does not exist yet."""
    return f"sqlite:///{tmp_path / 'app.db'}"


class TestOldOwnTable:
    def test_the_store_works_and_the_last_refresh_reads_none(self, sqlite_url: str) -> None:
        """A table without the column stores and reads credentials; refreshed_at is None."""
        old_table(sqlite_url, "credkeeper_credentials")

        with opened(sqlite_url) as store:
            stored = store.put(new_record("alice"))
            read = store.get("alice")

        assert stored.replace(refreshed_at=None) == read

    def test_the_store_warns_naming_the_fix(
        self, sqlite_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """First use logs one warning naming the table, the column and init-store."""
        old_table(sqlite_url, "credkeeper_credentials")

        with opened(sqlite_url) as store:
            store.get("alice")

        [message] = [r.getMessage() for r in caplog.records if "refreshed_at" in r.getMessage()]
        assert (True, True) == (
            "'credkeeper_credentials'" in message,
            "credkeeper init-store URL" in message,
        )

    def test_upgrade_adds_the_column_once(self, sqlite_url: str) -> None:
        """upgrade_store adds the column, then finds nothing to add."""
        old_table(sqlite_url, "credkeeper_credentials")

        assert (["credkeeper_credentials.refreshed_at"], []) == (
            upgrade_store(sqlite_url),
            upgrade_store(sqlite_url),
        )

    def test_a_record_stored_before_the_upgrade_reads_none_after_it(self, sqlite_url: str) -> None:
        """Rows written without the column read refreshed_at None once it exists."""
        old_table(sqlite_url, "credkeeper_credentials")
        with opened(sqlite_url) as store:
            store.put(new_record("alice"))
        upgrade_store(sqlite_url)

        with opened(sqlite_url) as store:
            record = store.get("alice")

        assert (True, None) == (record is not None, record and record.refreshed_at)

    def test_check_lists_the_missing_column(self, sqlite_url: str) -> None:
        """check_store names the column and both fixes."""
        old_table(sqlite_url, "credkeeper_credentials")

        report = check_store(sqlite_url)

        assert [
            "table 'credkeeper_credentials' has no column 'refreshed_at', which this credkeeper "
            "keeps the last refresh in: run `credkeeper init-store URL` to add it (or ALTER "
            "TABLE credkeeper_credentials ADD COLUMN refreshed_at BIGINT)"
        ] == list(report.problems)


@pytest.fixture(params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend's database URL (without credkeeper's options)."""
    return database_url(request, request.param, tmp_path)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The backend ``server`` is on."""
    name: str = request.node.callspec.params["server"]
    return name


@pytest.fixture
def mapped(server: str, backend: str) -> Iterator[AppTable]:
    """A ``claude_tokens`` table with an epoch-ms ``refreshed_at`` column of its own, mapped."""
    columns = claude_tokens(backend, extra=", refreshed_at BIGINT")
    table = create_table(server, backend, columns, options=MAPPED, prefix="tokens")
    try:
        yield table
    finally:
        table.drop()


class TestMappedColumn:
    def test_the_application_column_holds_epoch_milliseconds(self, mapped: AppTable) -> None:
        """After a put, the row's own refreshed_at column holds the instant in epoch ms."""
        with opened(mapped.url) as store:
            store.put(new_record("42"))

        assert [(1_936_744_199_999,)] == select(
            mapped,
            f"SELECT refreshed_at FROM {mapped.name}",  # noqa: S608 - our names
        )

    def test_a_value_the_application_wrote_is_read(self, mapped: AppTable) -> None:
        """A login the application stored itself, with its own refreshed_at, reads as such."""
        mapped.insert(
            user_id=7,
            access_token="a",
            refresh_token="r",
            expires_at=1_936_830_599_999,
            scopes="",
            refreshed_at=1_936_000_000_000,
        )

        with opened(mapped.url) as store:
            record = store.get("7")

        assert datetime(2031, 5, 8, 9, 46, 40, tzinfo=UTC) == (record and record.refreshed_at)

    def test_the_side_table_is_not_needed_for_it(self, mapped: AppTable) -> None:
        """A NULL in the application's column reads None, whatever the side row holds."""
        with opened(mapped.url) as store:
            store.put(new_record("42"))
        mapped.execute(f"UPDATE {mapped.name} SET refreshed_at = NULL")  # noqa: S608

        with opened(mapped.url) as store:
            record = store.get("42")

        assert (True, None) == (record is not None, record and record.refreshed_at)


def test_a_timestamptz_column_holds_the_instant(postgres_url: str) -> None:
    """On PostgreSQL a timestamptz refreshed_at column gets the very instant, to the ms."""
    columns = claude_tokens("postgresql", extra=", refreshed_at TIMESTAMPTZ")
    table = create_table(postgres_url, "postgresql", columns, options=MAPPED, prefix="tokens")
    try:
        with opened(table.url) as store:
            store.put(new_record("42"))
            record = store.get("42")
        [(stored,)] = select(table, f"SELECT refreshed_at FROM {table.name}")  # noqa: S608
    finally:
        table.drop()

    assert (REFRESHED_AT, REFRESHED_AT) == (stored, record and record.refreshed_at)


def test_an_iso_text_column_is_written_as_javascript_does(sqlite_url: str) -> None:
    """A TEXT refreshed_at column with no value yet gets toISOString()'s spelling."""
    columns = claude_tokens("sqlite", extra=", refreshed_at TEXT")
    table = create_table(sqlite_url, "sqlite", columns, options=MAPPED, prefix="tokens")
    try:
        with opened(table.url) as store:
            store.put(new_record("42"))
        rows = select(table, f"SELECT refreshed_at FROM {table.name}")  # noqa: S608
    finally:
        table.drop()

    assert [("2031-05-17T00:29:59.999Z",)] == rows


def test_a_column_of_another_type_is_refused_naming_it(postgres_url: str) -> None:
    """A BOOLEAN refreshed_at column: ConfigurationError naming the column and its type."""
    columns = claude_tokens("postgresql", extra=", refreshed_at BOOLEAN")
    table = create_table(postgres_url, "postgresql", columns, options=MAPPING, prefix="tokens")
    try:
        with (
            opened(f"{table.url}&refreshed_at_column=refreshed_at") as store,
            pytest.raises(ConfigurationError) as raised,
        ):
            store.get("42")
    finally:
        table.drop()

    assert f"last-refresh column {table.name}.refreshed_at is BOOLEAN" in str(raised.value)


def test_an_old_side_table_works_without_the_column(sqlite_url: str) -> None:
    """A side table from before refreshed_at: the store works, the last refresh reads None."""
    columns = claude_tokens("sqlite", key="TEXT NOT NULL PRIMARY KEY")
    table = create_table(sqlite_url, "sqlite", columns, options=INSERT_AND_DELETE, init=False)
    old_table(sqlite_url, table.leases, leases=True)
    try:
        with opened(table.url) as store:
            store.put(new_record("alice"))
            record = store.get("alice")
    finally:
        table.drop()

    assert (True, None) == (record is not None, record and record.refreshed_at)


def test_the_side_table_keeps_it_without_a_mapped_column(sqlite_url: str) -> None:
    """Without refreshed_at_column the side row keeps the last refresh; the table is untouched."""
    columns = claude_tokens("sqlite", key="TEXT NOT NULL PRIMARY KEY")
    table = create_table(sqlite_url, "sqlite", columns, options=INSERT_AND_DELETE)
    try:
        with opened(table.url) as store:
            store.put(new_record("alice"))
            record = store.get("alice")
        names = table.column_names()
    finally:
        table.drop()

    assert (REFRESHED_AT, False) == (record and record.refreshed_at, "refreshed_at" in names)


def test_a_relogin_by_the_application_voids_the_side_rows_last_refresh(sqlite_url: str) -> None:
    """New tokens the application wrote itself: the side row's refreshed_at reads as None."""
    columns = claude_tokens("sqlite", key="TEXT NOT NULL PRIMARY KEY")
    table = create_table(sqlite_url, "sqlite", columns, options=INSERT_AND_DELETE)
    try:
        with opened(table.url) as store:
            store.put(new_record("alice"))
        table.execute(f"UPDATE {table.name} SET refresh_token = 'a new login'")  # noqa: S608
        with opened(table.url) as store:
            record = store.get("alice")
    finally:
        table.drop()

    assert (True, None) == (record is not None, record and record.refreshed_at)


@pytest.fixture(scope="module")
def mapped_tables(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """One claude_tokens table per backend with a mapped refreshed_at column; each store URL."""
    made: dict[str, AppTable] = {}
    try:
        for backend in BACKENDS:
            directory = tmp_path_factory.mktemp("refreshed")
            server = database_url(request, backend, directory)
            columns = conformance_columns(backend) + ", refreshed_at BIGINT"
            made[backend] = create_table(server, backend, columns, options=MAPPED, prefix="rt")
        yield {backend: table.url for backend, table in made.items()}
    finally:
        for table in made.values():
            table.drop()


class _MappedConformance(_Sync):
    backend: str

    @pytest.fixture(autouse=True)
    def table(self, mapped_tables: dict[str, str]) -> None:
        """This backend's table with its own refreshed_at column."""
        self.url = mapped_tables[self.backend]


class TestMappedConformanceSQLite(_MappedConformance):
    """The whole store contract with refreshed_at in the application's column, on SQLite."""

    backend = "sqlite"


class TestMappedConformancePostgres(_MappedConformance):
    """The whole store contract with refreshed_at in the application's column, on PostgreSQL."""

    backend = "postgresql"


class TestMappedConformanceMariaDB(_MappedConformance):
    """The whole store contract with refreshed_at in the application's column, on MariaDB."""

    backend = "mariadb"
