"""``ChangeNotices``: a store's listener posts changed keys, waiters on those keys wake.

Real threads and event loops; the waits that must end by a notice are given far longer than
the test takes, so a wait that ended by its timeout shows as ``False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Generator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from credkeeper import Credentials, MemoryStore, Record, TokenManager
from credkeeper.storekit import ChangeListener, ChangeNotices
from credkeeper.testing import FakeClock, FakeProvider

LONG = 30.0


def post_when_waiting(notices: ChangeNotices, key: str) -> threading.Thread:
    """A thread that posts ``key`` once someone waits on it."""

    def post() -> None:
        while not notices.waiting:
            time.sleep(0.001)
        notices.post(key)

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread


def test_a_post_wakes_a_thread_waiting_on_its_key() -> None:
    """A thread waiting on a key wakes when another thread posts that key."""
    notices = ChangeNotices()
    poster = post_when_waiting(notices, "alice")

    assert notices.wait("alice", since=time.monotonic(), seconds=LONG)
    poster.join()


def test_a_post_since_the_last_read_ends_the_wait_at_once() -> None:
    """A key posted after ``since`` and before the wait: the wait returns at once."""
    notices = ChangeNotices()
    since = time.monotonic()
    notices.post("alice")

    assert notices.wait("alice", since=since, seconds=LONG)


def test_a_post_before_the_last_read_does_not_end_the_wait() -> None:
    """A change the waiter's last read already saw does not wake it."""
    notices = ChangeNotices()
    notices.post("alice")

    assert not notices.wait("alice", since=time.monotonic(), seconds=0.05)


def test_another_key_does_not_wake_the_waiter() -> None:
    """A post for bob leaves alice's waiter waiting until its time is up."""
    notices = ChangeNotices()
    since = time.monotonic()
    notices.post("bob")

    assert not notices.wait("alice", since=since, seconds=0.05)


def test_a_finished_wait_leaves_no_waiter_behind() -> None:
    """Woken or timed out, a waiter is gone from the board afterwards."""
    notices = ChangeNotices()
    notices.wait("alice", since=time.monotonic(), seconds=0.01)
    post_when_waiting(notices, "bob")
    notices.wait("bob", since=time.monotonic(), seconds=LONG)

    assert 0 == notices.waiting


def test_every_waiter_on_the_key_wakes() -> None:
    """Eight threads waiting on one key all wake on its one post."""
    notices = ChangeNotices()
    since = time.monotonic()
    woken: list[bool] = []
    waiters = [
        threading.Thread(target=lambda: woken.append(notices.wait("k", since=since, seconds=LONG)))
        for _ in range(8)
    ]
    for waiter in waiters:
        waiter.start()
    while notices.waiting < 8:
        time.sleep(0.001)
    notices.post("k")
    for waiter in waiters:
        waiter.join()

    assert [True] * 8 == woken


@pytest.mark.anyio
async def test_a_post_from_a_thread_wakes_a_task() -> None:
    """A task waiting on a key wakes when a listener thread posts it; the loop runs meanwhile."""
    notices = ChangeNotices()
    poster = post_when_waiting(notices, "alice")

    assert await notices.wait_async("alice", since=time.monotonic(), seconds=LONG)
    poster.join()


@pytest.mark.anyio
async def test_a_task_times_out_without_a_post() -> None:
    """No post: the task's wait ends after its seconds, saying nothing changed."""
    notices = ChangeNotices()

    assert not await notices.wait_async("alice", since=time.monotonic(), seconds=0.05)
    assert 0 == notices.waiting


@pytest.mark.anyio
async def test_a_cancelled_task_leaves_no_waiter_behind() -> None:
    """A waiting task cancelled by its caller is taken off the board."""
    notices = ChangeNotices()
    task = asyncio.ensure_future(notices.wait_async("alice", since=time.monotonic(), seconds=LONG))
    await asyncio.sleep(0)  # the task runs up to its wait
    assert 1 == notices.waiting
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    assert 0 == notices.waiting


def test_a_post_of_the_version_the_waiter_has_does_not_wake_it() -> None:
    """A write the waiter's last read already found, announced late, leaves it waiting."""
    notices = ChangeNotices()
    since = time.monotonic()
    notices.post("alice", "v1")

    assert not notices.wait("alice", since=since, seconds=0.05, seen="v1")


def test_a_post_of_a_newer_version_wakes_the_waiter() -> None:
    """The waiter read v1; a notice of v2 ends its wait."""
    notices = ChangeNotices()
    since = time.monotonic()
    notices.post("alice", "v2")

    assert notices.wait("alice", since=since, seconds=LONG, seen="v1")


def test_a_delete_wakes_every_waiter() -> None:
    """A notice without a version (a delete) wakes a waiter whatever it read."""
    notices = ChangeNotices()
    since = time.monotonic()
    notices.post("alice")

    assert notices.wait("alice", since=since, seconds=LONG, seen="v1")


# -- ChangeListener -------------------------------------------------------------------------


class Feed:
    """A change feed that fails ``failures`` times, then listens: it posts each key put in
    ``heard`` and notes when it is closed."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.opened = 0
        self.heard: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self.closed = threading.Event()

    def __call__(self) -> Generator[tuple[str, str | None] | None, None, None]:
        self.opened += 1
        if self.opened <= self.failures:
            raise ConnectionError("the server went away")
        try:
            while True:
                yield None
                with contextlib.suppress(queue.Empty):
                    yield self.heard.get(timeout=0.05)
        finally:
            self.closed.set()


def test_a_listener_posts_what_its_feed_hears() -> None:
    """A key the feed hears reaches the waiters of the listener's notices."""
    feed = Feed()
    listener = ChangeListener("test feed", feed)
    notices = listener.notices()
    since = time.monotonic()
    feed.heard.put(("alice", "v2"))
    try:
        assert notices.wait("alice", since=since, seconds=LONG, seen="v1")
    finally:
        listener.close()


def test_close_stops_the_thread_and_closes_the_feed() -> None:
    """After close() the feed is closed: nothing is left listening."""
    feed = Feed()
    listener = ChangeListener("test feed", feed)
    listener.notices()
    while not feed.opened:
        time.sleep(0.001)
    listener.close()

    assert feed.closed.wait(LONG)


def test_a_failing_feed_is_opened_again_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """Two failures in a row: one warning naming the error's type, then 'resumed' once it
    listens, and what it hears is posted."""
    feed = Feed(failures=2)
    listener = ChangeListener("test feed", feed)
    with caplog.at_level(logging.INFO, logger="credkeeper"):
        notices = listener.notices()
        since = time.monotonic()
        feed.heard.put(("alice", None))
        try:
            heard = notices.wait("alice", since=since, seconds=LONG)
        finally:
            listener.close()
    messages = [r.getMessage() for r in caplog.records if "test feed" in r.getMessage()]

    assert (True, 3) == (heard, feed.opened)
    assert [
        "change notices of test feed stopped (ConnectionError); waiting callers read on their "
        "schedule until they resume",
        "change notices of test feed resumed",
    ] == messages


# -- managers waiting on a peer ---------------------------------------------------------------

PEER = "peer-host"


class Announcing(MemoryStore):
    """A memory store that posts each write, notes the read that finds the peer's lease, and
    counts how often it is asked for its notices."""

    def __init__(self) -> None:
        super().__init__()
        self.notices = ChangeNotices()
        self.asked = 0
        self.found = threading.Event()
        self.found_at = 0.0

    def changes(self) -> ChangeNotices:
        self.asked += 1
        return self.notices

    def get(self, key: str) -> Record | None:
        current = super().get(key)
        if current is not None and current.lease_owner == PEER:
            self.found_at = time.monotonic()
            self.found.set()
        return current

    def put(self, record: Record) -> Record:
        stored = super().put(record)
        self.notices.post(stored.key, stored.version)
        return stored


def peer_lease(
    store: MemoryStore, key: str, now: datetime, ttl: timedelta, *, age: float = 20.0
) -> None:
    """``key``'s lease taken by a peer ``age`` seconds before ``now``, not yet run out."""
    current = store.get(key)
    assert current is not None
    began = now - timedelta(seconds=age)
    store.put(current.replace(lease_owner=PEER, lease_until=began + ttl))


def test_a_manager_on_the_real_clock_wakes_when_the_peer_writes(tmp_path: Path) -> None:
    """A caller waiting on a peer's lease returns the peer's tokens as soon as they are
    stored, well before its next scheduled read (0.9-1 s after its last)."""
    store = Announcing()
    with (
        FakeProvider() as fake,
        TokenManager(store, fake.provider(), journal=tmp_path / "journal") as manager,
    ):
        manager.put("alice", fake.issue(expires_in=-60))
        peer_lease(store, "alice", datetime.now(UTC), manager.policy.lease_ttl)
        result: list[tuple[float, Credentials]] = []

        def call() -> None:
            credentials = manager.get("alice")
            result.append((time.monotonic(), credentials))

        caller = threading.Thread(target=call)
        caller.start()
        assert store.found.wait(LONG)
        fresh = fake.issue()
        current = store.get("alice")
        assert current is not None
        store.put(manager.policy.record("alice", fresh, base=current))
        caller.join(LONG)
        done, credentials = result[0]

        assert (fresh.access_token, True) == (
            credentials.access_token,
            done - store.found_at < 0.5,
        )


def test_a_manager_on_a_test_clock_never_asks_for_notices(clock: FakeClock, tmp_path: Path) -> None:
    """Waits on a FakeClock stay the clock's: the store's notices are never asked for, and the
    peer's lease, 5 s from its end, is waited out on the clock (then taken over)."""
    store = Announcing()
    with (
        FakeProvider(clock=clock) as fake,
        TokenManager(store, fake.provider(), journal=tmp_path / "journal", clock=clock) as manager,
    ):
        manager.put("alice", fake.issue(expires_in=-60))
        ttl = manager.policy.lease_ttl
        peer_lease(store, "alice", clock.now(), ttl, age=ttl.total_seconds() - 5)

        manager.get("alice")

        assert (0, 1) == (store.asked, fake.refresh_count)
