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

import pytest

from credkeeper.storekit import ChangeListener, ChangeNotices

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
    messages = [record.getMessage() for record in caplog.records]

    assert (True, 3) == (heard, feed.opened)
    assert [
        "change notices of test feed stopped (ConnectionError); waiting callers read on their "
        "schedule until they resume",
        "change notices of test feed resumed",
    ] == messages
