"""One budget per call: pymongo's own waits end with the credkeeper call that started them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import warnings

import pytest

from credkeeper import StoreUnavailable, open_store
from credkeeper._budget import budget
from credkeeper_mongo import AsyncMongoStore, MongoStore
from tests.chaos import ProxyOutage

from .conftest import free_port


def unreachable() -> str:
    """A URL with nothing listening, and pymongo's default 10 s of server selection."""
    return f"mongodb://127.0.0.1:{free_port()}/db"


class TestCallBudget:
    def test_server_selection_gives_up_at_the_calls_deadline(self) -> None:
        """With nothing listening, get() inside a 0.3 s budget fails long before 10 s."""
        with contextlib.closing(open_store(unreachable())) as store:
            assert isinstance(store, MongoStore)
            start = time.monotonic()
            with budget(0.3), pytest.raises(StoreUnavailable, match="'alice'"):
                store.get("alice")

            assert time.monotonic() - start < 5

    def test_the_async_store_gives_up_at_the_calls_deadline(self) -> None:
        """The async store's put() inside a 0.3 s budget fails long before 10 s."""

        async def read() -> float:
            store = AsyncMongoStore(unreachable())
            start = time.monotonic()
            try:
                with budget(0.3), pytest.raises(StoreUnavailable):
                    await store.get("alice")
                return time.monotonic() - start
            finally:
                await store.close()

        # pymongo's async monitor leaks the socket it is connecting with when close() cancels
        # it; its ResourceWarning is pymongo's, not the store's.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            assert asyncio.run(read()) < 5
            gc.collect()

    def test_now_gives_up_at_the_calls_deadline(self) -> None:
        """Reading the server's clock is bound by the same budget."""
        with contextlib.closing(open_store(unreachable())) as store:
            assert isinstance(store, MongoStore)
            start = time.monotonic()
            with budget(0.3), pytest.raises(StoreUnavailable):
                store.now()

            assert time.monotonic() - start < 5

    def test_a_spent_budget_still_allows_one_ordinary_round_trip(
        self, mongodb_store_url: str
    ) -> None:
        """With nothing left of the call's budget, a live server answering in about 100 ms
        still answers: the last operation gets a round trip's time, as the other stores let
        their last statement finish, instead of failing the call as if the server were down."""
        with ProxyOutage.in_front_of(mongodb_store_url) as slow:
            # directConnection: the server names its own address as a replica set member, and
            # the driver would otherwise move its connections there, past the proxy.
            url = f"{slow.url}?directConnection=true"
            with contextlib.closing(open_store(url)) as store:
                assert isinstance(store, MongoStore)
                assert store.get("warm-up") is None  # connected outside the budget
                slow.proxy.latency = 0.05
                with budget(0.0):
                    assert store.get("alice") is None
