"""FileStore passes the store conformance suite, directly and behind ThreadOffloadStore."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from credkeeper import AsyncCredentialStore, CredentialStore
from credkeeper._store import ThreadOffloadStore
from credkeeper.testing import (
    AsyncStoreConformance,
    StoreConformance,
    StoreFactory,
)
from credkeeper_file import FileStore


class TestFileStoreConformance(StoreConformance):
    """The sync suite against a FileStore in a fresh directory."""

    @pytest.fixture(autouse=True)
    def _file(self, tmp_path: Path) -> None:
        """Each test gets its own file, shared by every store the test opens."""
        self.path = tmp_path / "creds.json"

    def make_store(self) -> CredentialStore:
        """A FileStore on this test's file."""
        return FileStore(self.path)

    def store_factory(self) -> StoreFactory:
        """Opens the same file in a spawned process."""
        return functools.partial(FileStore, str(self.path))


class TestAsyncFileStoreConformance(AsyncStoreConformance):
    """The async suite against a FileStore behind ThreadOffloadStore."""

    @pytest.fixture(autouse=True)
    def _file(self, tmp_path: Path) -> None:
        """Each test gets its own file, shared by every store the test opens."""
        self.path = tmp_path / "creds.json"

    def make_async_store(self) -> AsyncCredentialStore:
        """A FileStore on this test's file, its calls offloaded to worker threads."""
        return ThreadOffloadStore(FileStore(self.path))

    def store_factory(self) -> StoreFactory:
        """Opens the same file in a spawned process."""
        return functools.partial(FileStore, str(self.path))
