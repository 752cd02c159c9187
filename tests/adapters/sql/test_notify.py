"""PostgreSQL announces every write (``NOTIFY``), and callers waiting on a peer's refresh wake.

Against the real PostgreSQL server: stores on one table, managers with the real clock, a
``FakeProvider`` over HTTP. The waits that must end by a notice are given far longer than they
take, so one that ended on its schedule instead fails the test.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from credkeeper import (
    AsyncTokenManager,
    ConflictError,
    Credentials,
    KeyRing,
    Record,
    TokenManager,
    open_store,
)
from credkeeper.testing import FakeProvider
from credkeeper_sql import AsyncSQLStore, SQLStore
from tests.adapters.conftest import record

from .conftest import _with_table, async_url

LONG = 30.0
# The lease a peer took 20 s ago: a waiter with no news re-reads every 0.9-1 s.
PEER = "peer-host"
LEASE_AGE = timedelta(seconds=20)


@pytest.fixture
def notify_url(postgres_url: str) -> Iterator[str]:
    """A table of this test's own, so that no other test's writes reach its listeners."""
    yield from _with_table(postgres_url, f"ck_notify_{uuid.uuid4().hex[:8]}")


def listening(url: str, **options: Any) -> SQLStore:
    """A store on ``url`` whose listener is connected: a write made now is heard."""
    store = open_store(url, **options)
    assert isinstance(store, SQLStore)
    return connected(store, url)


S = TypeVar("S", SQLStore, AsyncSQLStore)


def connected(store: S, url: str) -> S:
    """``store``, once its listener hears writes to ``url``'s table."""
    notices = store.changes()
    assert notices is not None
    probe = f"probe-{uuid.uuid4().hex}"
    with closing(open_store(url)) as writer:
        deadline = time.monotonic() + LONG
        while time.monotonic() < deadline:
            since = time.monotonic()
            writer.delete(probe)
            if notices.wait(probe, since=since, seconds=0.1):
                return store
    raise AssertionError("the store's listener never heard a write")


class TestAnnouncements:
    def test_a_committed_write_is_heard_by_another_store(self, notify_url: str) -> None:
        """A put through one store posts its key on a listening store of the same table."""
        with closing(listening(notify_url)) as listener, closing(open_store(notify_url)) as writer:
            notices = listener.changes()
            assert notices is not None
            since = time.monotonic()
            writer.put(record("alice"))

            assert notices.wait("alice", since=since, seconds=LONG)

    def test_a_delete_is_heard(self, notify_url: str) -> None:
        """Removing a record posts its key too."""
        with closing(listening(notify_url)) as listener, closing(open_store(notify_url)) as writer:
            writer.put(record("alice"))
            notices = listener.changes()
            assert notices is not None
            since = time.monotonic()
            writer.delete("alice")

            assert notices.wait("alice", since=since, seconds=LONG)

    def test_a_lost_compare_and_swap_is_not_heard(self, notify_url: str) -> None:
        """A put refused for a stale version is rolled back, its notice with it."""
        with closing(open_store(notify_url)) as writer:
            stale = writer.put(record("alice"))
            writer.put(stale)
            # Listening only now: the notices of the writes above are heard before it returns.
            with closing(listening(notify_url)) as listener:
                notices = listener.changes()
                assert notices is not None
                since = time.monotonic()
                with pytest.raises(ConflictError):
                    writer.put(stale)

                assert not notices.wait("alice", since=since, seconds=0.3)

    def test_notify_off_announces_nothing(self, notify_url: str) -> None:
        """A store opened with notify=false neither listens nor announces its writes."""
        quiet = open_store(f"{notify_url}&notify=false")
        with closing(listening(notify_url)) as listener, closing(quiet):
            notices = listener.changes()
            assert notices is not None
            since = time.monotonic()
            quiet.put(record("alice"))

            assert (None, False) == (
                quiet.changes(),
                notices.wait("alice", since=since, seconds=0.3),
            )

    def test_an_async_store_announces_and_listens(self, notify_url: str) -> None:
        """The async store's writes are heard, and it has change notices of its own."""

        async def main() -> bool:
            store = open_store(async_url(notify_url))
            assert isinstance(store, AsyncSQLStore)
            with closing(listening(notify_url)) as listener:
                notices = listener.changes()
                assert notices is not None
                since = time.monotonic()
                await store.put(record("alice"))
                heard = notices.wait("alice", since=since, seconds=LONG)
            own = store.changes()
            await store.close()
            return heard and own is not None

        assert asyncio.run(main())


@pytest.mark.parametrize("backend", ["sqlite", "mysql"])
def test_other_databases_have_no_change_notices(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """SQLite and MariaDB cannot announce a write: changes() is None, writes work as before."""
    url = request.getfixturevalue(f"{backend}_store_url")
    with closing(open_store(url)) as store:
        store.put(record(f"alice-{uuid.uuid4().hex[:8]}"))

        assert None is store.changes()


# -- callers waiting on a peer's refresh ----------------------------------------------------


class SeesPeer(SQLStore):
    """A SQL store that notes when a read finds the peer's lease (the waiter's last read)."""

    found: threading.Event
    at: float

    def get(self, key: str) -> Record | None:
        current = super().get(key)
        if current is not None and current.lease_owner == PEER:
            self.at = time.monotonic()
            self.found.set()
        return current


class AsyncSeesPeer(AsyncSQLStore):
    """:class:`SeesPeer` for the async store."""

    found: threading.Event
    at: float

    async def get(self, key: str) -> Record | None:
        current = await super().get(key)
        if current is not None and current.lease_owner == PEER:
            self.at = time.monotonic()
            self.found.set()
        return current


def _table(url: str) -> tuple[str, str]:
    base, _, table = url.partition("?table=")
    return base, table


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
    url: str, tmp_path: Path, call: Callable[[str, Any, KeyRing, FakeProvider], Credentials]
) -> tuple[float, bool]:
    """How long after its last read a caller waiting on a peer got the peer's tokens, and
    whether they were the peer's."""
    keyring = KeyRing.generate()
    with (
        FakeProvider() as fake,
        TokenManager(
            open_store(url), fake.provider(), keyring=keyring, journal=tmp_path / "peer"
        ) as peer,
    ):
        peer_holds_the_lease(url, peer, fake, "alice")
        found = threading.Event()
        result: list[tuple[float, Credentials]] = []
        holder: dict[str, Any] = {}

        def caller() -> None:
            credentials = call(url, holder, keyring, fake)
            result.append((time.monotonic(), credentials))

        holder["found"], holder["journal"] = found, tmp_path / "caller"
        thread = threading.Thread(target=caller, daemon=True)
        thread.start()
        assert found.wait(LONG), "the caller never found the peer's lease"
        fresh = fake.issue()
        peer.put("alice", fresh)
        thread.join(LONG)
        assert result, "the caller never returned"
        done, credentials = result[0]
        return done - holder["store"].at, credentials.access_token == fresh.access_token


def sync_caller(
    url: str, holder: dict[str, Any], keyring: KeyRing, fake: FakeProvider, **options: Any
) -> Credentials:
    base, table = _table(url)
    store = SeesPeer(base, table=table, **options)
    if store.changes() is not None:
        connected(store, url)
    store.found = holder["found"]
    holder["store"] = store
    journal = holder["journal"]
    with TokenManager(store, fake.provider(), keyring=keyring, journal=journal) as manager:
        return manager.get("alice")


def _async_call(
    store: SeesPeer | AsyncSeesPeer,
    url: str,
    holder: dict[str, Any],
    keyring: KeyRing,
    fake: FakeProvider,
) -> Credentials:
    """An AsyncTokenManager's get() on ``store``, once its listener hears the table."""

    async def main() -> Credentials:
        connected(store, url)
        store.found = holder["found"]
        holder["store"] = store
        async with AsyncTokenManager(
            store, fake.provider(), keyring=keyring, journal=holder["journal"]
        ) as manager:
            return await manager.get("alice")

    return asyncio.run(main())


def async_caller(url: str, holder: dict[str, Any], keyring: KeyRing, fake: FakeProvider) -> Any:
    base, table = _table(url)
    return _async_call(AsyncSeesPeer(async_url(base), table=table), url, holder, keyring, fake)


def offloaded_caller(url: str, holder: dict[str, Any], keyring: KeyRing, fake: FakeProvider) -> Any:
    base, table = _table(url)
    return _async_call(SeesPeer(base, table=table), url, holder, keyring, fake)


@pytest.mark.parametrize(
    "call",
    [sync_caller, async_caller, offloaded_caller],
    ids=["TokenManager", "AsyncTokenManager", "AsyncTokenManager-over-sync-store"],
)
def test_a_waiter_wakes_when_the_peer_stores_its_tokens(
    call: Callable[..., Credentials], notify_url: str, tmp_path: Path
) -> None:
    """A caller waiting on a peer's lease returns the peer's tokens well before its next
    scheduled read (0.9-1 s after its last), woken by the peer's write."""
    waited, the_peers = wait_for_peer(notify_url, tmp_path, call)

    assert (True, True) == (the_peers, waited < 0.5)


def test_without_notices_a_waiter_keeps_its_schedule(notify_url: str, tmp_path: Path) -> None:
    """The same wait on a store with notify off ends at the scheduled read, 0.9 s or more
    after the last: what the notices save."""

    def call(url: str, holder: dict[str, Any], keyring: KeyRing, fake: FakeProvider) -> Any:
        return sync_caller(url, holder, keyring, fake, notify=False)

    waited, the_peers = wait_for_peer(notify_url, tmp_path, call)

    assert (True, True) == (the_peers, waited >= 0.9)


# -- processes -------------------------------------------------------------------------------


def _child_hears(store: SQLStore, key: str, ready: Any, heard: Any) -> None:
    notices = store.changes()
    assert notices is not None
    ready.set()
    heard.value = notices.wait(key, since=time.monotonic(), seconds=LONG)


def test_a_forked_child_listens_on_its_own_and_the_parent_keeps_listening(
    notify_url: str,
) -> None:
    """A store forked while listening listens anew in the child; the parent still hears."""
    context = multiprocessing.get_context("fork")
    with closing(listening(notify_url)) as parent, closing(open_store(notify_url)) as writer:
        notices = parent.changes()
        assert notices is not None
        ready, heard = context.Event(), context.Value("b", 0)
        child = context.Process(target=_child_hears, args=(parent, "bob", ready, heard))
        child.start()
        assert ready.wait(LONG)
        while child.is_alive() and not heard.value:
            writer.delete("bob")
            child.join(0.1)
        child.join(LONG)
        since = time.monotonic()
        writer.put(record("carol"))

        assert (0, 1, True) == (
            child.exitcode,
            heard.value,
            notices.wait("carol", since=since, seconds=LONG),
        )
