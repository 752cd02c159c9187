"""When the tokens were last obtained (``Record.refreshed_at``) in SQL tables: credkeeper's own
tables from before the column, the side table, and an application's own mapped column."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from credkeeper import ConfigurationError, Record
from credkeeper_sql import check_store, credentials_table, leases_table, upgrade_store

from . import apptables
from .apptables import (
    BACKENDS,
    TEXT_KEY,
    TOKENS_INSERT_AND_DELETE,
    TOKENS_MAPPING,
    AppTable,
    MappedTableConformance,
    claude_tokens,
    create_table,
    database_url,
    opened,
)

REFRESHED_AT = datetime(2031, 5, 17, 0, 29, 59, 999000, tzinfo=UTC)
MAPPED = f"{TOKENS_INSERT_AND_DELETE}&refreshed_at_column=refreshed_at"


def new_record(key: str) -> Record:
    """A never-stored credential under ``key``, last refreshed at REFRESHED_AT."""
    return apptables.new_record(key, refreshed_at=REFRESHED_AT)


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
def mapped(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AppTable]:
    """A ``claude_tokens`` table with an epoch-ms ``refreshed_at`` column of its own, mapped,
    on each backend."""
    backend: str = request.param
    server = database_url(request, backend, tmp_path)
    columns = claude_tokens(backend, extra=", refreshed_at BIGINT")
    with create_table(server, backend, columns, options=MAPPED, prefix="tokens") as table:
        yield table


class TestMappedColumn:
    def test_the_application_column_holds_epoch_milliseconds(self, mapped: AppTable) -> None:
        """After a put, the row's own refreshed_at column holds the instant in epoch ms."""
        with opened(mapped.url) as store:
            store.put(new_record("42"))

        assert [(1_936_744_199_999,)] == mapped.select(
            f"SELECT refreshed_at FROM {mapped.name}"  # noqa: S608 - our names
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
    with create_table(
        postgres_url, "postgresql", columns, options=MAPPED, prefix="tokens"
    ) as table:
        with opened(table.url) as store:
            store.put(new_record("42"))
            record = store.get("42")
        [(stored,)] = table.select(f"SELECT refreshed_at FROM {table.name}")  # noqa: S608

    assert (REFRESHED_AT, REFRESHED_AT) == (stored, record and record.refreshed_at)


def test_an_iso_text_column_is_written_as_javascript_does(sqlite_url: str) -> None:
    """A TEXT refreshed_at column with no value yet gets toISOString()'s spelling."""
    columns = claude_tokens("sqlite", extra=", refreshed_at TEXT")
    with create_table(sqlite_url, "sqlite", columns, options=MAPPED, prefix="tokens") as table:
        with opened(table.url) as store:
            store.put(new_record("42"))
        rows = table.select(f"SELECT refreshed_at FROM {table.name}")  # noqa: S608

    assert [("2031-05-17T00:29:59.999Z",)] == rows


def test_a_column_of_another_type_is_refused_naming_it(postgres_url: str) -> None:
    """A BOOLEAN refreshed_at column: ConfigurationError naming the column and its type."""
    columns = claude_tokens("postgresql", extra=", refreshed_at BOOLEAN")
    with (
        create_table(
            postgres_url, "postgresql", columns, options=TOKENS_MAPPING, prefix="tokens"
        ) as table,
        opened(f"{table.url}&refreshed_at_column=refreshed_at") as store,
        pytest.raises(ConfigurationError) as raised,
    ):
        store.get("42")

    assert f"last-refresh column {table.name}.refreshed_at is BOOLEAN" in str(raised.value)


def test_an_old_side_table_works_without_the_column(sqlite_url: str) -> None:
    """A side table from before refreshed_at: the store works, the last refresh reads None."""
    columns = claude_tokens("sqlite", key=TEXT_KEY["sqlite"])
    with create_table(
        sqlite_url, "sqlite", columns, options=TOKENS_INSERT_AND_DELETE, init=False
    ) as table:
        old_table(sqlite_url, table.leases, leases=True)
        with opened(table.url) as store:
            store.put(new_record("alice"))
            record = store.get("alice")

    assert (True, None) == (record is not None, record and record.refreshed_at)


def test_the_side_table_keeps_it_without_a_mapped_column(sqlite_url: str) -> None:
    """Without refreshed_at_column the side row keeps the last refresh; the table is untouched."""
    columns = claude_tokens("sqlite", key=TEXT_KEY["sqlite"])
    with create_table(sqlite_url, "sqlite", columns, options=TOKENS_INSERT_AND_DELETE) as table:
        with opened(table.url) as store:
            store.put(new_record("alice"))
            record = store.get("alice")
        names = table.column_names()

    assert (REFRESHED_AT, False) == (record and record.refreshed_at, "refreshed_at" in names)


def test_a_relogin_by_the_application_voids_the_side_rows_last_refresh(sqlite_url: str) -> None:
    """New tokens the application wrote itself: the side row's refreshed_at reads as None."""
    columns = claude_tokens("sqlite", key=TEXT_KEY["sqlite"])
    with create_table(sqlite_url, "sqlite", columns, options=TOKENS_INSERT_AND_DELETE) as table:
        with opened(table.url) as store:
            store.put(new_record("alice"))
        table.execute(f"UPDATE {table.name} SET refresh_token = 'a new login'")  # noqa: S608
        with opened(table.url) as store:
            record = store.get("alice")

    assert (True, None) == (record is not None, record and record.refreshed_at)


class TestMappedConformance(MappedTableConformance):
    """The whole store contract with refreshed_at in the application's column, every backend."""

    options = MAPPED

    @classmethod
    def columns(cls, backend: str) -> str:
        """A claude_tokens table with a text key and an epoch-ms refreshed_at column."""
        return claude_tokens(backend, key=TEXT_KEY[backend], extra=", refreshed_at BIGINT")
