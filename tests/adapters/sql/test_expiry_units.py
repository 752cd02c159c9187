"""An integer expiry column's unit, checked against what the column can hold and what rows hold.

Seconds read as milliseconds put every expiry in January 1970, so every call would refresh;
milliseconds read as seconds put them tens of thousands of years ahead, so none would. Either
is a wrong mapping, refused with the option that fixes it rather than acted on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from credkeeper import ConfigurationError, CredentialStore, Record, open_store

from .apptables import BACKENDS, MAPPING, AppTable, create_table, database_url

ACCESS_TOKEN = "sk-ant-oat01-the-access-token"
REFRESH_TOKEN = "sk-ant-ort01-the-refresh-token"
# 2030-01-01T00:00:00Z in each unit.
SECONDS = 1_893_456_000
MILLISECONDS = SECONDS * 1000


@contextlib.contextmanager
def integer_table(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, expiry_type: str, options: str
) -> Iterator[AppTable]:
    """An application table whose expiry column is ``expiry_type``, mapped with ``options``;
    no side table, so nothing is created before the first use. Dropped afterwards."""
    table = create_table(
        database_url(request, backend, tmp_path),
        backend,
        "id VARCHAR(64) NOT NULL PRIMARY KEY, access_token TEXT, refresh_token TEXT, "
        f"expires_at {expiry_type}",
        options=f"{MAPPING}{options}",
        init=False,
    )
    try:
        yield table
    finally:
        table.drop()


@contextlib.contextmanager
def opened(url: str) -> Iterator[CredentialStore]:
    """A sync store on ``url`` that creates its side table, closed afterwards."""
    store = open_store(f"{url}&create=true")
    assert isinstance(store, CredentialStore)
    with contextlib.closing(store):
        yield store


def insert(table: AppTable, expires_at: int) -> None:
    """The application's row for ``ada``, expiring at ``expires_at``."""
    table.insert(
        id="ada", access_token=ACCESS_TOKEN, refresh_token=REFRESH_TOKEN, expires_at=expires_at
    )


@pytest.mark.parametrize(
    ("backend", "expiry_type", "reflected"),
    [
        ("postgresql", "INTEGER", "INTEGER"),
        ("postgresql", "SMALLINT", "SMALLINT"),
        ("mariadb", "INT", "INTEGER"),
        ("mariadb", "INT UNSIGNED", "INTEGER"),
        ("mariadb", "MEDIUMINT", "MEDIUMINT"),
    ],
)
def test_a_32_bit_column_is_refused_for_milliseconds(
    backend: str, expiry_type: str, reflected: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """INTEGER and narrower cannot hold epoch milliseconds: refused at first use, with the fixes."""
    with integer_table(request, tmp_path, backend, expiry_type, "") as table:
        expected = (
            f"expiry column {table.name}.expires_at is {reflected}, a 32-bit integer or smaller, "
            "which cannot hold epoch milliseconds: set expires_at_unit=s if it holds epoch "
            "seconds, or widen it to BIGINT"
        )
        with opened(table.url) as store, pytest.raises(ConfigurationError) as raised:
            store.get("ada")

    assert str(raised.value).endswith(expected)


@pytest.mark.parametrize(
    ("backend", "expiry_type"), [("postgresql", "INTEGER"), ("mariadb", "INT")]
)
def test_a_32_bit_column_holds_seconds(
    backend: str, expiry_type: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """With expires_at_unit=s an INTEGER column is used, read in seconds."""
    with integer_table(request, tmp_path, backend, expiry_type, "&expires_at_unit=s") as table:
        insert(table, SECONDS)
        with opened(table.url) as store:
            record = store.get("ada")

    assert record is not None
    assert datetime(2030, 1, 1, tzinfo=UTC) == record.expires_at


@pytest.mark.parametrize(
    ("backend", "expiry_type"), [("postgresql", "SMALLINT"), ("mariadb", "TINYINT")]
)
def test_a_column_narrower_than_32_bits_is_refused_for_seconds(
    backend: str, expiry_type: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """SMALLINT and TINYINT cannot hold epoch seconds either: widen to BIGINT."""
    with (
        integer_table(request, tmp_path, backend, expiry_type, "&expires_at_unit=s") as table,
        opened(table.url) as store,
        pytest.raises(ConfigurationError, match="cannot hold epoch seconds: widen it to BIGINT"),
    ):
        store.get("ada")


def test_sqlite_integer_holds_milliseconds(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """SQLite's INTEGER is 64-bit whatever its declaration: milliseconds are kept."""
    with integer_table(request, tmp_path, "sqlite", "INT", "") as table:
        insert(table, MILLISECONDS)
        with opened(table.url) as store:
            record = store.get("ada")

    assert record is not None
    assert datetime(2030, 1, 1, tzinfo=UTC) == record.expires_at


@pytest.mark.parametrize("backend", BACKENDS)
def test_seconds_read_as_milliseconds_are_refused_on_get(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A row holding epoch seconds under expires_at_unit=ms names the column and the fix."""
    with integer_table(request, tmp_path, backend, "BIGINT", "") as table:
        insert(table, SECONDS)
        with opened(table.url) as store, pytest.raises(ConfigurationError) as raised:
            store.get("ada")

    assert (
        f"the expiry of key 'ada' in column {table.name}.expires_at is {SECONDS}, which is epoch "
        "seconds (as milliseconds it would fall in 1970-1973), but expires_at_unit=ms reads it "
        "as milliseconds: set expires_at_unit=s"
    ) == str(raised.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_milliseconds_read_as_seconds_are_refused_on_get(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A row holding epoch milliseconds under expires_at_unit=s names the column and the fix."""
    with integer_table(request, tmp_path, backend, "BIGINT", "&expires_at_unit=s") as table:
        insert(table, MILLISECONDS)
        with opened(table.url) as store, pytest.raises(ConfigurationError) as raised:
            store.get("ada")

    assert (
        f"the expiry of key 'ada' in column {table.name}.expires_at is {MILLISECONDS}, which is "
        "epoch milliseconds (as seconds it would fall after the year 5000), but "
        "expires_at_unit=s reads it as seconds: set expires_at_unit=ms"
    ) == str(raised.value)


def test_a_wrong_unit_refuses_a_write_too(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """A put over a row in the other unit is refused, and the row is left as it was."""
    record = Record(
        key="ada",
        access_token="new access",
        refresh_token="new refresh",
        expires_at=datetime(2030, 1, 1, tzinfo=UTC),
    )
    with integer_table(request, tmp_path, "sqlite", "BIGINT", "") as table:
        insert(table, SECONDS)
        before = table.dump()
        with opened(table.url) as store, pytest.raises(ConfigurationError):
            store.put(record)
        after = table.dump()

    assert before == after


def test_the_refusal_never_shows_a_token(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The message names the key, column and value, never the row's tokens."""
    with integer_table(request, tmp_path, "sqlite", "BIGINT", "") as table:
        insert(table, SECONDS)
        with opened(table.url) as store, pytest.raises(ConfigurationError) as raised:
            store.get("ada")

    assert (False, False) == (ACCESS_TOKEN in str(raised.value), REFRESH_TOKEN in str(raised.value))


@pytest.mark.parametrize("options", ["", "&expires_at_unit=s"])
def test_zero_still_reads_as_expired(
    options: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """0, which programs write for "expired", reads as the epoch in either unit."""
    with integer_table(request, tmp_path, "sqlite", "BIGINT", options) as table:
        insert(table, 0)
        with opened(table.url) as store:
            record = store.get("ada")

    assert record is not None
    assert datetime(1970, 1, 1, tzinfo=UTC) == record.expires_at
