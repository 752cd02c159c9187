"""The MongoDB store passes credkeeper's conformance suite, sync and async."""

from __future__ import annotations

import functools

import pytest

from credkeeper import AsyncCredentialStore, CredentialStore, open_store
from credkeeper.testing import AsyncStoreConformance, StoreConformance, StoreFactory
from credkeeper_mongo import AsyncMongoStore, MongoStore

# SecantusDB, a Python server, retries same-document write conflicts with 5-20 ms sleeps, and
# on a loaded 2-core machine its concurrency cases take a few times longer than on mongod.
TIMEOUT = 180.0


class TestMongoStore(StoreConformance):
    concurrency_timeout = TIMEOUT
    url: str

    @pytest.fixture(autouse=True)
    def backend(self, mongodb_store_url: str) -> None:
        """This session's database, credkeeper's own collection, with change notices."""
        self.url = f"{mongodb_store_url}?collection=conformance&notify=true"

    def make_store(self) -> CredentialStore:
        store = open_store(self.url)
        assert isinstance(store, MongoStore)
        return store

    def store_factory(self) -> StoreFactory:
        return functools.partial(open_store, self.url)


class TestAsyncMongoStore(AsyncStoreConformance):
    concurrency_timeout = TIMEOUT
    url: str

    @pytest.fixture(autouse=True)
    def backend(self, mongodb_store_url: str) -> None:
        """This session's database through AsyncMongoClient, four connections per store.

        The 50 tasks of the async case still race on one record through four connections the
        server runs concurrently; with one connection per task SecantusDB spends minutes in
        its write-conflict retry sleeps.
        """
        self.url = f"{mongodb_store_url}?collection=conformance_async&async=true&maxPoolSize=4"

    def make_async_store(self) -> AsyncCredentialStore:
        store = open_store(self.url)
        assert isinstance(store, AsyncMongoStore)
        return store

    def store_factory(self) -> StoreFactory:
        return functools.partial(open_store, self.url)
