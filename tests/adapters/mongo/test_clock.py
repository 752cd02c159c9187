"""The MongoDB store's ``now()``: the server's own clock, which leases are judged on.

Against the session's real server. The server's clock is read independently through
``hello``'s ``localTime``; a server refusing the ``$$NOW`` pipeline, or unavailable, is made
by the server itself through ``configureFailPoint``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import uuid
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson.codec_options import CodecOptions
from pymongo import MongoClient

from credkeeper import StoreError, StoreUnavailable, open_store
from credkeeper_mongo import AsyncMongoStore, MongoStore

from .conftest import Commands, FailCommand, free_port

# hello's localTime has millisecond precision, like $$NOW.
MS = timedelta(milliseconds=1)
AWARE: CodecOptions[dict[str, Any]] = CodecOptions(tz_aware=True, tzinfo=UTC)
UNRECOGNIZED_STAGE = 40324
NOT_WRITABLE_PRIMARY = 10107


def server_clock(client: MongoClient[dict[str, Any]]) -> datetime:
    """The server's clock, read through hello rather than the store."""
    localtime: datetime = client.admin.command("hello", codec_options=AWARE)["localTime"]
    return localtime


@pytest.fixture
def url(mongodb_store_url: str) -> str:
    """This session's database with a collection of the test's own."""
    return f"{mongodb_store_url}?collection=clock_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def app() -> str:
    """An application name of the test's own, which scopes the server's fail points to it."""
    return f"ck-clock-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def fail(fail_command: FailCommand, app: str) -> Callable[..., None]:
    """Arms ``failCommand`` for ``app``'s next matching command; skips without test commands."""
    return functools.partial(fail_command, app)


class TestServerClock:
    @pytest.mark.parametrize("layout", ["own collection", "embedded"])
    def test_now_is_the_servers_clock(
        self, url: str, mongo_client: MongoClient[dict[str, Any]], layout: str
    ) -> None:
        """now() lies between two readings of the server's clock taken around it."""
        options = {"field_path": "claudeCredentials"} if layout == "embedded" else {}
        with contextlib.closing(open_store(url, **options)) as store:
            assert isinstance(store, MongoStore)
            before = server_clock(mongo_client)
            now = store.now()
            after = server_clock(mongo_client)
        assert (UTC, True, True) == (now.tzinfo, before - MS <= now, now <= after + MS)

    def test_async_now_is_the_servers_clock(
        self, url: str, mongo_client: MongoClient[dict[str, Any]]
    ) -> None:
        """The async store's now() lies between two readings of the server's clock too."""

        async def read() -> datetime:
            store = AsyncMongoStore(url)
            try:
                return await store.now()
            finally:
                await store.close()

        before = server_clock(mongo_client)
        now = asyncio.run(read())
        after = server_clock(mongo_client)
        assert (UTC, True, True) == (now.tzinfo, before - MS <= now, now <= after + MS)

    def test_now_is_one_aggregate_of_now(self, mongodb_url: str, url: str) -> None:
        """now() costs one command, an aggregate ($$NOW), and reads no collection."""
        listener = Commands()
        client: MongoClient[dict[str, Any]] = MongoClient(mongodb_url, event_listeners=[listener])
        with contextlib.closing(client):
            database = url.rsplit("/", 1)[1].split("?", 1)[0]
            MongoStore(client, database=database, collection="clock").now()
            sent = list(listener.names)
        assert ["aggregate"] == sent


class TestOlderServers:
    def test_a_server_refusing_the_pipeline_is_read_through_hello(
        self, url: str, app: str, fail: Any, mongo_client: MongoClient[dict[str, Any]]
    ) -> None:
        """A server that does not know $documents: now() is hello's localTime instead."""
        with contextlib.closing(open_store(f"{url}&appname={app}&retryReads=false")) as store:
            assert isinstance(store, MongoStore)
            fail("aggregate", errorCode=UNRECOGNIZED_STAGE)
            before = server_clock(mongo_client)
            now = store.now()
            after = server_clock(mongo_client)
        assert (True, True) == (before - MS <= now, now <= after + MS)

    def test_after_one_refusal_the_pipeline_is_not_tried_again(
        self, mongodb_url: str, url: str, app: str, fail: Any
    ) -> None:
        """Once refused, later now() calls send hello alone: one round trip each."""
        listener = Commands()
        client: MongoClient[dict[str, Any]] = MongoClient(
            mongodb_url, appname=app, retryReads=False, event_listeners=[listener]
        )
        with contextlib.closing(client):
            database = url.rsplit("/", 1)[1].split("?", 1)[0]
            store = MongoStore(client, database=database, collection="clock")
            fail("aggregate", errorCode=UNRECOGNIZED_STAGE)
            store.now()
            store.now()
            sent = list(listener.names)
        assert ["aggregate", "hello", "hello"] == sent

    def test_async_a_server_refusing_the_pipeline_is_read_through_hello(
        self, url: str, app: str, fail: Any, mongo_client: MongoClient[dict[str, Any]]
    ) -> None:
        """The async store falls back to hello's localTime the same way."""

        async def read() -> datetime:
            store = AsyncMongoStore(f"{url}&appname={app}&retryReads=false")
            try:
                return await store.now()
            finally:
                await store.close()

        fail("aggregate", errorCode=UNRECOGNIZED_STAGE)
        before = server_clock(mongo_client)
        now = asyncio.run(read())
        after = server_clock(mongo_client)
        assert (True, True) == (before - MS <= now, now <= after + MS)


class TestErrors:
    def test_an_unavailable_primary_is_store_unavailable(
        self, url: str, app: str, fail: Any
    ) -> None:
        """NotWritablePrimary on the aggregate is StoreUnavailable, not a reason to use hello."""
        with contextlib.closing(open_store(f"{url}&appname={app}&retryReads=false")) as store:
            assert isinstance(store, MongoStore)
            fail("aggregate", errorCode=NOT_WRITABLE_PRIMARY)
            with pytest.raises(StoreUnavailable):
                store.now()

    def test_a_closed_port_is_store_unavailable(self) -> None:
        """Nothing listening: now() raises StoreUnavailable once server selection gives up."""
        url = f"mongodb://127.0.0.1:{free_port()}/db?serverSelectionTimeoutMS=200"
        with contextlib.closing(open_store(url)) as store:
            assert isinstance(store, MongoStore)
            with pytest.raises(StoreUnavailable):
                store.now()

    def test_async_a_closed_port_is_store_unavailable(self) -> None:
        """The async store translates ServerSelectionTimeoutError the same way."""
        url = f"mongodb://127.0.0.1:{free_port()}/db?serverSelectionTimeoutMS=200"

        async def read() -> None:
            store = AsyncMongoStore(url)
            try:
                await store.now()
            finally:
                await store.close()

        # pymongo's async monitor leaks the socket it is connecting with when close() cancels
        # it; its ResourceWarning is pymongo's, not the store's.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            with pytest.raises(StoreUnavailable):
                asyncio.run(read())
            gc.collect()

    def test_a_closed_store_is_a_store_error(self, url: str) -> None:
        """now() after close() is a StoreError, not pymongo's InvalidOperation."""
        store = open_store(url)
        assert isinstance(store, MongoStore)
        store.close()
        with pytest.raises(StoreError, match="closed"):
            store.now()
