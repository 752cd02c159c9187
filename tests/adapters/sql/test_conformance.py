"""The SQL store passes credkeeper's conformance suite on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import functools

import pytest

from credkeeper import AsyncCredentialStore, CredentialStore, open_store
from credkeeper.testing import AsyncStoreConformance, StoreConformance, StoreFactory

from .conftest import async_url


class _Sync(StoreConformance):
    url: str

    def make_store(self) -> CredentialStore:
        store = open_store(self.url)
        assert isinstance(store, CredentialStore)
        return store

    def store_factory(self) -> StoreFactory:
        return functools.partial(open_store, self.url)


class _Async(AsyncStoreConformance):
    url: str

    def make_async_store(self) -> AsyncCredentialStore:
        store = open_store(self.url)
        assert isinstance(store, AsyncCredentialStore)
        return store

    def store_factory(self) -> StoreFactory:
        return functools.partial(open_store, self.url)


class TestSQLite(_Sync):
    @pytest.fixture(autouse=True)
    def backend(self, sqlite_store_url: str) -> None:
        """A SQLite file."""
        self.url = sqlite_store_url


class TestPostgres(_Sync):
    @pytest.fixture(autouse=True)
    def backend(self, postgres_store_url: str) -> None:
        """PostgreSQL through psycopg."""
        self.url = postgres_store_url


class TestMariaDB(_Sync):
    @pytest.fixture(autouse=True)
    def backend(self, mysql_store_url: str) -> None:
        """MariaDB through PyMySQL."""
        self.url = mysql_store_url


class TestAsyncSQLite(_Async):
    @pytest.fixture(autouse=True)
    def backend(self, sqlite_store_url: str) -> None:
        """A SQLite file through aiosqlite."""
        self.url = async_url(sqlite_store_url)


class TestAsyncPostgres(_Async):
    @pytest.fixture(autouse=True)
    def backend(self, postgres_store_url: str) -> None:
        """PostgreSQL through psycopg's async connection."""
        self.url = async_url(postgres_store_url)


class TestAsyncMariaDB(_Async):
    @pytest.fixture(autouse=True)
    def backend(self, mysql_store_url: str) -> None:
        """MariaDB through aiomysql."""
        self.url = async_url(mysql_store_url)
