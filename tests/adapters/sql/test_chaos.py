"""Chaos on PostgreSQL, MariaDB and SQLite: crashes, outages, a refusing provider, conflicts,
skewed clocks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import make_url

from tests.chaos import ChaosCases, LockOutage, Outage, _hold_exclusive


class TestChaosOnPostgres(ChaosCases):
    backend = "PostgreSQL"

    @pytest.fixture
    def store_url(self, postgres_store_url: str) -> str:
        return postgres_store_url


class TestChaosOnMariaDB(ChaosCases):
    backend = "MariaDB"

    @pytest.fixture
    def store_url(self, mysql_store_url: str) -> str:
        return mysql_store_url


class TestChaosOnSQLite(ChaosCases):
    backend = "SQLite"

    @pytest.fixture
    def store_url(self, sqlite_store_url: str) -> str:
        return sqlite_store_url

    @pytest.fixture
    def outage(self, store_url: str) -> Iterator[Outage]:
        """No server to cut: another process holds an exclusive transaction for the window."""
        path = make_url(store_url).database
        assert path is not None
        outage = LockOutage(store_url, _hold_exclusive, path)
        yield outage
        outage.end()
