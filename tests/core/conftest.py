"""Fixtures of the core tests: a store, a manager on it, wrapper clients, stored credentials."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from credkeeper import (
    AsyncTokenManager,
    AsyncWrapperClient,
    Credentials,
    MemoryStore,
    TokenManager,
    WrapperClient,
)
from credkeeper.testing import FakeClock, FakeProvider, FakeWrapper

KEY = "alice"


@pytest.fixture
def store() -> MemoryStore:
    """One in-process store shared by the test's managers."""
    return MemoryStore()


@pytest.fixture
def manager(
    store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
) -> Iterator[TokenManager]:
    """A token manager with the default 15-minute leeway."""
    with TokenManager(store, fake.provider(), journal=tmp_path / "journal", clock=clock) as m:
        yield m


@pytest.fixture
def client(manager: TokenManager, wrapper: FakeWrapper) -> Iterator[WrapperClient]:
    """The client under test, pointed at the fake wrapper."""
    with WrapperClient(manager, base_url=wrapper.url) as c:
        yield c


@pytest.fixture
def alice(manager: TokenManager, fake: FakeProvider) -> Credentials:
    """Valid credentials for KEY, eight hours from expiry, already stored."""
    credentials = fake.issue()
    manager.put(KEY, credentials)
    return credentials


@pytest.fixture
async def aclient(
    store: MemoryStore, fake: FakeProvider, clock: FakeClock, wrapper: FakeWrapper, tmp_path: Path
) -> AsyncIterator[AsyncWrapperClient]:
    """An async client on an async manager over the same store, valid credentials stored."""
    async with (
        AsyncTokenManager(store, fake.provider(), journal=tmp_path / "aj", clock=clock) as m,
        AsyncWrapperClient(m, base_url=wrapper.url) as c,
    ):
        await m.put(KEY, fake.issue())
        yield c
