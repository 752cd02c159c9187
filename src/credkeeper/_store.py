"""The store interfaces, and the thread-offload wrapper that gives async to sync-only stores."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Protocol, runtime_checkable

from ._notices import ChangeNotices, notices_of
from ._record import Record

__all__ = [
    "AsyncCredentialStore",
    "CredentialStore",
    "ThreadOffloadStore",
    "as_async_store",
    "declares_plaintext",
    "is_async_store",
    "reported_damage",
]


@runtime_checkable
class CredentialStore(Protocol):
    """**Protocol:** a synchronous credential store, one :class:`Record` per key.

    A store knows nothing of OAuth; it keeps records and offers compare-and-swap on their
    ``version``. Every method raises only credkeeper's ``StoreError`` family: driver exceptions
    are translated at the store's boundary. Implementations must be safe to share between threads.

    Optional: a store that has a clock of its own (a database server's) offers ``now()``,
    returning that clock's aware UTC time (``None`` when it cannot tell). The engine then
    judges leases and cooldowns on it, so hosts whose clocks disagree still agree on when a
    lease ends. A store without one is judged on the manager's clock; its documentation says
    what bound on skew holds.

    Optional: a store whose ``scan_due`` skips records it cannot read offers
    ``damaged_records() -> dict[str, str]`` (key to reason), so that ``status`` and ``rekey``
    can name them instead of passing over them in silence.

    Optional: a store whose database announces changes offers ``changes()``, returning a
    :class:`~credkeeper.storekit.ChangeNotices` its listener posts each changed key to (or
    ``None`` when it cannot listen now); it must not raise, nor block for long. Callers waiting
    on a peer's refresh then read the record again as soon as it changes.
    """

    def get(self, key: str) -> Record | None:
        """The record stored under ``key``, or ``None``."""
        ...

    def put(self, record: Record) -> Record:
        """Store ``record`` if the stored version is still ``record.version``; return it stored.

        ``record.version is None`` means *create*: it fails with ``ConflictError`` when the key
        exists. Otherwise the write succeeds only if the stored version equals ``record.version``
        and raises ``ConflictError`` when it moved or the record was deleted.
        """
        ...

    def delete(self, key: str) -> bool:
        """Remove the record under ``key``; whether there was one."""
        ...

    def scan_due(self, before: datetime) -> Iterator[str]:
        """Keys whose ``expires_at`` is at or before ``before``, streamed, in no set order."""
        ...

    def close(self) -> None:
        """Release connections and handles; the store is unusable afterwards."""
        ...


@runtime_checkable
class AsyncCredentialStore(Protocol):
    """**Protocol:** the asynchronous twin of :class:`CredentialStore`, with the same contract.

    Optional, as for the sync protocol: ``async def now()``, the store's own clock, and
    ``changes()`` (a plain method: it does no I/O), its change notices.
    """

    async def get(self, key: str) -> Record | None:
        """The record stored under ``key``, or ``None``."""
        ...

    async def put(self, record: Record) -> Record:
        """Compare-and-swap ``record`` on its ``version``; see :meth:`CredentialStore.put`."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove the record under ``key``; whether there was one."""
        ...

    def scan_due(self, before: datetime) -> AsyncIterator[str]:
        """Keys whose ``expires_at`` is at or before ``before``, streamed."""
        ...

    async def close(self) -> None:
        """Release connections and handles."""
        ...


class ThreadOffloadStore:
    """An :class:`AsyncCredentialStore` running a sync store's calls in worker threads.

    The one way sync-only stores become async: each call goes through ``asyncio.to_thread``,
    so the event loop never blocks on the store's I/O.
    """

    def __init__(self, store: CredentialStore) -> None:
        self.sync_store = store

    def __repr__(self) -> str:
        return f"ThreadOffloadStore({self.sync_store!r})"

    async def get(self, key: str) -> Record | None:
        """See :meth:`CredentialStore.get`."""
        return await asyncio.to_thread(self.sync_store.get, key)

    async def put(self, record: Record) -> Record:
        """See :meth:`CredentialStore.put`."""
        return await asyncio.to_thread(self.sync_store.put, record)

    async def delete(self, key: str) -> bool:
        """See :meth:`CredentialStore.delete`."""
        return await asyncio.to_thread(self.sync_store.delete, key)

    async def scan_due(self, before: datetime) -> AsyncIterator[str]:
        """See :meth:`CredentialStore.scan_due`; each key is fetched in a worker thread."""
        iterator = await asyncio.to_thread(self.sync_store.scan_due, before)
        done = object()
        while (key := await asyncio.to_thread(next, iterator, done)) is not done:
            yield key  # type: ignore[misc]

    async def close(self) -> None:
        """See :meth:`CredentialStore.close`."""
        await asyncio.to_thread(self.sync_store.close)

    async def now(self) -> datetime | None:
        """The sync store's own clock, or ``None`` when it has none."""
        clock = getattr(self.sync_store, "now", None)
        return None if clock is None else await asyncio.to_thread(clock)

    def changes(self) -> ChangeNotices | None:
        """The sync store's change notices, or ``None`` when it posts none."""
        return notices_of(self.sync_store)


def as_async_store(store: CredentialStore | AsyncCredentialStore) -> AsyncCredentialStore:
    """``store`` itself when it is async, else ``store`` behind a :class:`ThreadOffloadStore`."""
    if isinstance(store, AsyncCredentialStore) and is_async_store(store):
        return store
    return ThreadOffloadStore(store)  # type: ignore[arg-type]


def is_async_store(store: object) -> bool:
    """Whether ``store``'s methods are coroutines (runtime_checkable only checks names)."""
    return asyncio.iscoroutinefunction(getattr(store, "get", None))


def reported_damage(store: object) -> dict[str, str]:
    """The damaged records ``store`` names through its optional ``damaged_records()``, or {}."""
    listing = getattr(store, "damaged_records", None)
    return dict(listing()) if callable(listing) else {}


def declares_plaintext(store: object) -> bool:
    """Whether ``store`` (or the sync store a :class:`ThreadOffloadStore` wraps) keeps tokens
    as the application writes them, by its ``plaintext`` option."""
    if isinstance(store, ThreadOffloadStore):
        store = store.sync_store
    return getattr(store, "plaintext", False) is True
