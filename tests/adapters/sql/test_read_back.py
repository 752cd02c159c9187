"""Reads of credkeeper's own table show the row as it is now, whatever was read before.

The store gives back the record it made of a row it read before while that row has not
changed (``OwnTable.record_of``); these cases pin down that any change to the row, damage
above all, shows in the next read.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from credkeeper import Record, StoreCorrupted, open_store
from credkeeper_sql import SQLStore, credentials_table

NOW = datetime(2031, 5, 17, 8, 30, 12, 345000, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The backend's URL with this session's credkeeper table (``?table=...``)."""
    url: str = request.getfixturevalue(f"{request.param}_store_url")
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[SQLStore]:
    """A synchronous store on the session's table, closed afterwards."""
    opened = open_store(store_url)
    assert isinstance(opened, SQLStore)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def key(store: SQLStore) -> str:
    """A key holding a stored record, which the store has read once."""
    name = f"read-back-{uuid.uuid4().hex[:12]}"
    store.put(
        Record(
            key=name,
            access_token="access-token",
            refresh_token="refresh-token",
            expires_at=NOW + timedelta(hours=8),
            scopes=("user:inference",),
        )
    )
    assert store.get(name) is not None
    return name


def change_row(store: SQLStore, store_url: str, key: str, **values: Any) -> None:
    """Set ``values`` in the row of ``key`` directly, as another program would."""
    table = credentials_table(sa.MetaData(), str(make_url(store_url).query["table"]))
    with store.engine.begin() as connection:
        connection.execute(sa.update(table).where(table.c.key == key).values(**values))


class TestReadBack:
    def test_an_unchanged_row_reads_as_an_equal_record(self, store: SQLStore, key: str) -> None:
        """Reading a row that did not change gives a record equal to the one read before."""
        assert store.get(key) == store.get(key)

    def test_a_row_changed_by_another_program_reads_as_changed(
        self, store: SQLStore, store_url: str, key: str
    ) -> None:
        """A column another program changed since the last read shows in the next read."""
        change_row(store, store_url, key, lease_owner="another-host")

        stored = store.get(key)
        assert stored is not None
        assert "another-host" == stored.lease_owner

    @pytest.mark.parametrize(
        ("values", "reason"),
        [
            ({"failures": -1}, "is not a valid record"),
            ({"status": "paused"}, "has an unknown status"),
            ({"scopes": "user:inference"}, "has a bad 'scopes' column"),
            ({"expires_at": 10**18}, "has an out-of-range 'expires_at' field"),
        ],
    )
    def test_a_row_damaged_after_a_read_is_store_corrupted(
        self, store: SQLStore, store_url: str, key: str, values: dict[str, Any], reason: str
    ) -> None:
        """A row damaged after the store read it is StoreCorrupted naming the key, not the
        record read before."""
        change_row(store, store_url, key, **values)

        with pytest.raises(StoreCorrupted, match=reason) as caught:
            store.get(key)
        assert key == caught.value.key
