"""scan_due over ISO-8601 text in any UTC offset: every due row found, no row found early.

An application writing ``date('c')`` in Tokyo or New York keeps the wall time of its own offset
in the expiry column. The database can only compare that wall time, so credkeeper widens its
bound by the widest offset and reads each candidate's real instant before yielding its key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from credkeeper import AsyncCredentialStore, CredentialStore, StoreCorrupted, open_store

from .apptables import BACKENDS, AppTable, create_table, database_url
from .conftest import async_url

BEFORE = datetime(2030, 1, 1, 12, tzinfo=UTC)

# Each row's expiry as the application spelled it; the "-due" rows expire at or before BEFORE.
EXPIRIES = {
    "tokyo-due": "2030-01-01T20:59:59+09:00",
    "tokyo-later": "2030-01-01T21:00:01+09:00",
    "new-york-due": "2030-01-01T06:59:59-05:00",
    "new-york-later": "2030-01-01T07:00:01-05:00",
    "kiribati-due": "2030-01-02T01:59:59+14:00",
    "kiribati-later": "2030-01-02T02:00:01+14:00",
    "utc-due": "2030-01-01T12:00:00.000Z",
    "utc-later": "2030-01-01T12:00:00.001Z",
    "naive-due": "2030-01-01 11:59:59",
    "naive-later": "2030-01-01 12:00:01",
}
DUE = sorted(key for key in EXPIRIES if key.endswith("-due"))


COLUMNS = (
    "id VARCHAR(64) NOT NULL PRIMARY KEY, access_token TEXT, refresh_token TEXT, "
    "expires_at VARCHAR(40)"
)


@contextlib.contextmanager
def text_table(server: str, backend: str, expiries: dict[str, str]) -> Iterator[AppTable]:
    """An application table of one credential row per key of ``expiries``, its expiry that
    text; dropped afterwards."""
    created = create_table(server, backend, COLUMNS)
    try:
        for key, expiry in expiries.items():
            created.insert(id=key, access_token="a", refresh_token="r", expires_at=expiry)
        yield created
    finally:
        created.drop()


@pytest.fixture(params=BACKENDS)
def table(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AppTable]:
    """The rows of EXPIRIES in each backend."""
    backend: str = request.param
    with text_table(database_url(request, backend, tmp_path), backend, EXPIRIES) as created:
        yield created


@pytest.fixture
def sqlite_server(tmp_path: Path) -> str:
    """A SQLite file's URL."""
    return f"sqlite:///{tmp_path / 'app.db'}"


@contextlib.contextmanager
def opened(url: str) -> Iterator[CredentialStore]:
    """A sync store on ``url``, closed afterwards."""
    store = open_store(url)
    assert isinstance(store, CredentialStore)
    with contextlib.closing(store):
        yield store


@pytest.mark.parametrize("page_size", [1, 3, 500])
def test_scan_due_yields_exactly_the_due_rows_whatever_their_offset(
    table: AppTable, page_size: int
) -> None:
    """Rows at +09:00, -05:00, +14:00, Z and without a zone are yielded when due, and only then."""
    with opened(f"{table.url}&page_size={page_size}") as store:
        found = sorted(store.scan_due(BEFORE))

    assert DUE == found


@pytest.mark.anyio
async def test_the_async_store_yields_exactly_the_due_rows(table: AppTable) -> None:
    """AsyncSQLStore widens and filters alike, across pages."""
    store = open_store(f"{async_url(table.url)}&page_size=2")
    assert isinstance(store, AsyncCredentialStore)
    try:
        found = sorted([key async for key in store.scan_due(BEFORE)])
    finally:
        await store.close()

    assert DUE == found


def test_a_page_of_rows_not_due_yet_does_not_end_the_scan(sqlite_server: str) -> None:
    """A full page of candidates not due yet is followed by the next, where a due row waits."""
    # New York's wall time sorts first, yet it expires after Tokyo's.
    expiries = {
        "a": EXPIRIES["new-york-later"],
        "b": EXPIRIES["new-york-later"],
        "c": EXPIRIES["tokyo-due"],
    }
    with (
        text_table(sqlite_server, "sqlite", expiries) as table,
        opened(f"{table.url}&page_size=2") as store,
    ):
        found = list(store.scan_due(BEFORE))

    assert ["c"] == found


def test_text_that_is_not_iso_8601_is_still_yielded(sqlite_server: str) -> None:
    """A candidate whose text reads as no instant is yielded, so that reading it reports it."""
    with (
        text_table(sqlite_server, "sqlite", {"odd": "2030-01-01"}) as table,
        opened(table.url) as store,
    ):
        found = list(store.scan_due(BEFORE))

    assert ["odd"] == found


def test_an_offset_wider_than_any_zone_is_no_expiry(sqlite_server: str) -> None:
    """ISO text at +15:00, beyond every zone's offset, reads as no usable expiry."""
    with (
        text_table(sqlite_server, "sqlite", {"far": "2030-01-01T12:00:00+15:00"}) as table,
        opened(table.url) as store,
        pytest.raises(StoreCorrupted, match="no usable expiry"),
    ):
        store.get("far")
