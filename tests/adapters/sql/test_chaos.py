"""Chaos on PostgreSQL, MariaDB and SQLite: endless conflicts, hosts with skewed clocks."""

from __future__ import annotations

import pytest

from tests.chaos import ChaosCases


class TestChaosOnPostgres(ChaosCases):
    @pytest.fixture
    def store_url(self, postgres_store_url: str) -> str:
        return postgres_store_url


class TestChaosOnMariaDB(ChaosCases):
    @pytest.fixture
    def store_url(self, mysql_store_url: str) -> str:
        return mysql_store_url


class TestChaosOnSQLite(ChaosCases):
    @pytest.fixture
    def store_url(self, sqlite_store_url: str) -> str:
        return sqlite_store_url
