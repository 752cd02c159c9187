"""Fixtures shared by every test: the fake provider and wrapper, a clock, real backend servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from credkeeper.testing import FakeClock, FakeProvider, FakeWrapper

# postgres_url, mysql_url and the rule for unreachable servers: see tests/backends.py.
pytest_plugins = ["tests.backends", "tests.chaos_table"]


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio, the loop credkeeper supports."""
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    """A clock that moves only when told to, or when the engine sleeps."""
    return FakeClock()


@pytest.fixture
def fake(clock: FakeClock) -> Iterator[FakeProvider]:
    """A rotating-token provider on loopback sharing the test's clock."""
    with FakeProvider(clock=clock) as provider:
        yield provider


@pytest.fixture
def wrapper(fake: FakeProvider) -> Iterator[FakeWrapper]:
    """The fake wrapper on loopback, checking tokens against the test's provider."""
    with FakeWrapper(fake) as server:
        yield server
