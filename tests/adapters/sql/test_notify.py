"""PostgreSQL announces every write (``NOTIFY``), and callers waiting on a peer's refresh wake.

Against the real PostgreSQL server: stores on one table, managers with the real clock, a
``FakeProvider`` over HTTP. The waits that must end by a notice are given far longer than they
take, so one that ended on its schedule instead fails the test.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from credkeeper import open_store
from credkeeper_sql import AsyncSQLStore, SQLStore
from tests.adapters.conftest import record
from tests.adapters.notices import (
    LONG,
    AsyncSeesPeer,
    SeesPeer,
    connected,
    heard_after_a_lost_swap,
    wait_for_peer,
)

from .conftest import _with_table, async_url


@pytest.fixture
def notify_url(postgres_url: str) -> Iterator[str]:
    """A table of this test's own, so that no other test's writes reach its listeners."""
    yield from _with_table(postgres_url, f"ck_notify_{uuid.uuid4().hex[:8]}")


def listening(url: str, **options: Any) -> SQLStore:
    """A store on ``url`` whose listener is connected: a write made now is heard."""
    store = open_store(url, **options)
    assert isinstance(store, SQLStore)
    with closing(open_store(url)) as writer:
        return connected(store, writer)  # type: ignore[no-any-return]


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
        assert not heard_after_a_lost_swap(notify_url, open_store(notify_url))

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


@pytest.mark.parametrize(
    ("asynchronous", "store"),
    [(False, "sync"), (True, "async"), (True, "sync")],
    ids=["TokenManager", "AsyncTokenManager", "AsyncTokenManager-over-sync-store"],
)
def test_a_waiter_wakes_when_the_peer_stores_its_tokens(
    asynchronous: bool, store: str, notify_url: str, tmp_path: Path
) -> None:
    """A caller waiting on a peer's lease returns the peer's tokens well before its next
    scheduled read (0.9-1 s after its last), woken by the peer's write."""
    with closing(open_store(notify_url)) as writer:
        if store == "async":
            waiter: SeesPeer = connected(AsyncSeesPeer(open_store(async_url(notify_url))), writer)
        else:
            waiter = connected(SeesPeer(open_store(notify_url)), writer)
    waited, the_peers = wait_for_peer(notify_url, waiter, tmp_path, asynchronous=asynchronous)

    assert (True, True) == (the_peers, waited < 0.5)


def test_without_notices_a_waiter_keeps_its_schedule(notify_url: str, tmp_path: Path) -> None:
    """The same wait on a store with notify off ends at the scheduled read, 0.9 s or more
    after the last: what the notices save."""
    waiter = SeesPeer(open_store(f"{notify_url}&notify=false"))

    waited, the_peers = wait_for_peer(notify_url, waiter, tmp_path)

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
