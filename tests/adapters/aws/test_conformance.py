"""The Secrets Manager store passes credkeeper's conformance suite against moto's server.

The async suite runs it through the thread-offload wrapper, the one way sync-only stores get
async.
"""

from __future__ import annotations

import functools

import pytest

from credkeeper import AsyncCredentialStore, CredentialStore, as_async_store, open_store
from credkeeper.testing import AsyncStoreConformance, StoreConformance, StoreFactory
from credkeeper_aws import SecretsManagerStore


class TestSecretsManagerConformance(StoreConformance):
    """The sync suite against a SecretsManagerStore on moto's server."""

    # moto's server answers about 200 calls a second on a small machine, and a contended
    # compare-and-swap takes several calls per attempt.
    concurrency_timeout = 120.0

    @pytest.fixture(autouse=True)
    def _backend(self, aws_store_url: str) -> None:
        """Every store of a test opens this session's prefix."""
        self.url = aws_store_url

    def make_store(self) -> CredentialStore:
        """A SecretsManagerStore opened from the URL."""
        store = open_store(self.url)
        assert isinstance(store, SecretsManagerStore)
        return store

    def store_factory(self) -> StoreFactory:
        """Opens the same prefix in a spawned process."""
        return functools.partial(open_store, self.url)


class TestAsyncSecretsManagerConformance(AsyncStoreConformance):
    """The async suite against a SecretsManagerStore behind ThreadOffloadStore."""

    # As above: moto's server is slow, and 50 tasks contend for one record.
    concurrency_timeout = 120.0

    @pytest.fixture(autouse=True)
    def _backend(self, aws_store_url: str) -> None:
        """Every store of a test opens this session's prefix."""
        self.url = aws_store_url

    def make_async_store(self) -> AsyncCredentialStore:
        """The store from the URL, its calls offloaded to worker threads by as_async_store."""
        store = open_store(self.url)
        assert isinstance(store, CredentialStore)
        return as_async_store(store)

    def store_factory(self) -> StoreFactory:
        """Opens the same prefix in a spawned process."""
        return functools.partial(open_store, self.url)
