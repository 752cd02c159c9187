"""ThreadOffloadStore and as_async_store: how a sync-only store becomes async."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from credkeeper import (
    AsyncCredentialStore,
    MemoryStore,
    Record,
    as_async_store,
)
from credkeeper._store import ThreadOffloadStore
from credkeeper.testing import AsyncStoreConformance

_EXPIRES = datetime(2031, 1, 1, tzinfo=UTC)


class TestThreadOffloadStore(AsyncStoreConformance):
    """Every conformance case, sync and async, through the offload wrapper over MemoryStore."""

    def make_async_store(self) -> AsyncCredentialStore:
        return ThreadOffloadStore(MemoryStore())


class _ThreadRecordingStore(MemoryStore):
    """A MemoryStore that notes the thread each call runs in."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def get(self, key: str) -> Record | None:
        self.threads.add(threading.get_ident())
        return super().get(key)


class TestOffloading:
    @pytest.mark.anyio
    async def test_calls_run_outside_the_event_loop_thread(self) -> None:
        """The sync store's methods never run in the event loop's thread."""
        sync_store = _ThreadRecordingStore()
        await ThreadOffloadStore(sync_store).get("k")
        assert False is (threading.get_ident() in sync_store.threads)

    @pytest.mark.anyio
    async def test_scan_due_is_an_async_iterator_over_the_sync_scan(self) -> None:
        """scan_due() returns an async iterator of the sync store's due keys."""
        sync_store = MemoryStore()
        sync_store.put(Record(key="due", access_token="a", refresh_token="r", expires_at=_EXPIRES))
        scan = ThreadOffloadStore(sync_store).scan_due(_EXPIRES)
        assert (True, ["due"]) == (isinstance(scan, AsyncIterator), [key async for key in scan])

    def test_repr_names_the_wrapped_store(self) -> None:
        """repr() shows the wrapped store's repr."""
        assert "ThreadOffloadStore(MemoryStore(<0 records>))" == repr(
            ThreadOffloadStore(MemoryStore())
        )


class _NativeAsyncStore:
    """A minimal store whose methods are coroutines, as a native async driver's would be."""

    async def get(self, key: str) -> Record | None:
        return None

    async def put(self, record: Record) -> Record:
        return record

    async def delete(self, key: str) -> bool:
        return False

    async def scan_due(self, before: datetime) -> AsyncIterator[str]:
        keys: tuple[str, ...] = ()
        for key in keys:
            yield key

    async def close(self) -> None:
        return None


class TestAsAsyncStore:
    def test_async_store_is_returned_unchanged(self) -> None:
        """A store with coroutine methods comes back as itself, not wrapped."""
        store = _NativeAsyncStore()
        assert store is as_async_store(store)

    def test_offload_store_is_returned_unchanged(self) -> None:
        """A ThreadOffloadStore is already async and is not wrapped twice."""
        store = ThreadOffloadStore(MemoryStore())
        assert store is as_async_store(store)

    def test_sync_store_is_wrapped_in_a_thread_offload_store(self) -> None:
        """A sync store comes back inside a ThreadOffloadStore that wraps that very store."""
        sync_store = MemoryStore()
        wrapped = as_async_store(sync_store)
        assert (ThreadOffloadStore, sync_store) == (
            type(wrapped),
            getattr(wrapped, "sync_store", None),
        )
