"""What the change-notice tests of every store share: a store known to listen, and a caller
waiting on a peer's lease, timed from its last read to the peer's tokens.

The waits that must end by a notice are given far longer than they take, so one that ended on
its schedule instead (0.9-1 s after the last read, for a lease taken 20 s ago) shows.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from credkeeper import (
    AsyncTokenManager,
    ConflictError,
    Credentials,
    CredentialStore,
    KeyRing,
    Record,
    TokenManager,
    open_store,
)
from credkeeper.testing import FakeProvider

from .conftest import record

LONG = 30.0
PEER = "peer-host"
# How long ago the peer took its lease: a waiter with no news re-reads every 0.9-1 s.
LEASE_AGE = timedelta(seconds=20)


def heard_after_a_lost_swap(url: str, listener: Any) -> bool:
    """Whether ``listener`` (listening on ``url``'s data) hears of a put refused for a stale
    version; the writes before it are made before it listens."""
    with closing(open_store(url)) as writer:
        stale = writer.put(record("alice"))
        writer.put(stale)
        with closing(connected(listener, writer)):
            since = time.monotonic()
            with pytest.raises(ConflictError):
                writer.put(stale)
            return bool(listener.changes().wait("alice", since=since, seconds=0.3))


def connected(store: Any, writer: CredentialStore) -> Any:
    """``store``, once its listener hears ``writer``'s writes (a store on the same data)."""
    notices = store.changes()
    assert notices is not None
    probe = f"probe-{uuid.uuid4().hex}"
    deadline = time.monotonic() + LONG
    while time.monotonic() < deadline:
        since = time.monotonic()
        writer.put(record(probe))
        writer.delete(probe)
        if notices.wait(probe, since=since, seconds=0.1):
            return store
    raise AssertionError("the store's listener never heard a write")


class SeesPeer:
    """A store in front of a sync one that notes when a read finds the peer's lease: the
    waiter's last read before it waits. Everything else goes to the store."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.found = threading.Event()
        self.at = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def get(self, key: str) -> Record | None:
        return self._saw(self.store.get(key))

    def _saw(self, current: Record | None) -> Record | None:
        if current is not None and current.lease_owner == PEER:
            self.at = time.monotonic()
            self.found.set()
        return current


class AsyncSeesPeer(SeesPeer):
    """:class:`SeesPeer` in front of an async store."""

    async def get(self, key: str) -> Record | None:  # type: ignore[override]
        return self._saw(await self.store.get(key))


def peer_holds_the_lease(url: str, manager: TokenManager, fake: FakeProvider, key: str) -> None:
    """``key`` expired, its lease taken by a peer 20 s ago (so not yet run out)."""
    manager.put(key, fake.issue(expires_in=-60))
    with closing(open_store(url)) as store:
        current = store.get(key)
        assert current is not None
        ttl = manager.policy.lease_ttl
        store.put(
            current.replace(lease_owner=PEER, lease_until=datetime.now(UTC) - LEASE_AGE + ttl)
        )


def wait_for_peer(
    url: str, waiter: SeesPeer, tmp_path: Path, *, asynchronous: bool = False
) -> tuple[float, bool]:
    """A caller on ``waiter`` (a TokenManager, or an AsyncTokenManager) asks for a credential
    whose lease a peer holds; the peer stores new tokens once the caller found the lease. How
    long after its last read the caller had tokens, and whether they were the peer's."""
    keyring = KeyRing.generate()
    with (
        FakeProvider() as fake,
        TokenManager(
            open_store(url), fake.provider(), keyring=keyring, journal=tmp_path / "peer"
        ) as peer,
    ):
        peer_holds_the_lease(url, peer, fake, "alice")
        options: dict[str, Any] = {"keyring": keyring, "journal": tmp_path / "caller"}
        result: list[tuple[float, Credentials]] = []

        async def get_async() -> None:
            async with AsyncTokenManager(waiter, fake.provider(), **options) as manager:
                credentials = await manager.get("alice")
                result.append((time.monotonic(), credentials))

        def call() -> None:
            if asynchronous:
                asyncio.run(get_async())
                return
            with TokenManager(waiter, fake.provider(), **options) as manager:
                credentials = manager.get("alice")
                result.append((time.monotonic(), credentials))

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        assert waiter.found.wait(LONG), "the caller never found the peer's lease"
        fresh = fake.issue()
        peer.put("alice", fresh)
        thread.join(LONG)
        assert result, "the caller never returned"
        done, credentials = result[0]
        return done - waiter.at, credentials.access_token == fresh.access_token
