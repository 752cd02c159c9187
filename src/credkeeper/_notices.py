"""``ChangeNotices``: how a store that hears of changes wakes the callers waiting on a peer.

A caller that finds a peer's lease on a credential waits for that peer's refresh and reads
the record again; it cannot have the new tokens before they are in the store, and without
news from the store it can only guess when they are (``Policy.wait_delay``). A store whose
database announces changes (PostgreSQL's ``LISTEN``/``NOTIFY``, a change stream, a pub/sub
channel) posts each changed key here, from any thread; a waiter's sleep then ends as soon
as the key it waits on changes, and its next read finds the tokens. The schedule stays as
the fallback: a notice that never comes (the listener down, a store that cannot listen)
costs what waiting cost without notices, never correctness.

A waiter passes ``since``, the ``time.monotonic()`` taken just before its last read began,
and ``seen``, the version that read found: a notice posted after that moment and before the
wait began still ends the wait at once, unless it announces the very version the waiter has
(a write committed just before the read, whose notice arrived just after it), which would
only cost a read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

__all__ = ["ChangeListener", "ChangeNotices", "Feed", "notices_of"]

logger = logging.getLogger("credkeeper")

# Notices older than this are forgotten: no waiter's last read is that old.
_MEMORY = 60.0


def notices_of(store: object) -> ChangeNotices | None:
    """``store``'s change notices: what its optional ``changes()`` returns, or ``None`` when it
    has none. A ``changes()`` that raises, against its contract, is logged once per store type
    and counts as ``None``: waiters keep their schedule."""
    changes = getattr(store, "changes", None)
    if changes is None:
        return None
    try:
        notices: ChangeNotices | None = changes()
    except Exception as exc:  # noqa: BLE001 - a store's bug must not fail its callers' waits
        kind = type(store).__name__
        if kind not in _FAILED_CHANGES:
            _FAILED_CHANGES.add(kind)
            logger.warning(
                "%s.changes() raised %s; its callers wait on their schedule",
                kind,
                type(exc).__name__,
            )
        return None
    return notices


_FAILED_CHANGES: set[str] = set()


class ChangeNotices:
    """A board of "this key's record changed" notices, posted by a store's listener and
    waited on by managers; thread-safe, and usable from any number of event loops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # The last notice of each key: when it was posted, and the version it announced.
        self._posted: dict[str, tuple[float, str | None]] = {}
        self._pruned = time.monotonic()
        self._waiters: dict[str, list[_Event | _Wakeup]] = {}

    def __repr__(self) -> str:
        return f"ChangeNotices(waiting={self.waiting})"

    @property
    def waiting(self) -> int:
        """How many waits are in progress."""
        with self._lock:
            return sum(len(waiters) for waiters in self._waiters.values())

    def post(self, key: str, version: str | None = None) -> None:
        """Tell the waiters on ``key`` that its record changed, to ``version`` if the store
        knows it (``None``: deleted, or not said); callable from any thread."""
        now = time.monotonic()
        with self._lock:
            self._posted[key] = (now, version)
            waiters = self._waiters.get(key, [])
            woken = [w for w in waiters if version is None or w.seen != version]
            if woken:
                left = [w for w in waiters if w not in woken]
                if left:
                    self._waiters[key] = left
                else:
                    del self._waiters[key]
            if now - self._pruned > _MEMORY:
                self._posted = {
                    k: (at, v) for k, (at, v) in self._posted.items() if now - at < _MEMORY
                }
                self._pruned = now
        for waiter in woken:
            waiter.set()

    def wait(self, key: str, *, since: float, seconds: float, seen: str | None = None) -> bool:
        """Block until ``key`` changes after ``since`` (``time.monotonic()``) to a version other
        than ``seen``, or for ``seconds``; whether it changed."""
        event = _Event(seen)
        if self._enlist(key, since, event):
            return True
        try:
            return event.wait(max(0.0, seconds))
        finally:
            self._discharge(key, event)

    async def wait_async(
        self, key: str, *, since: float, seconds: float, seen: str | None = None
    ) -> bool:
        """The asyncio form of :meth:`wait`: the task waits, its loop does not."""
        wakeup = _Wakeup(asyncio.get_running_loop(), seen)
        if self._enlist(key, since, wakeup):
            return True
        try:
            async with asyncio.timeout(max(0.0, seconds)):
                await wakeup.future
        except TimeoutError:
            return False
        finally:
            self._discharge(key, wakeup)
        return True

    def _enlist(self, key: str, since: float, waiter: _Event | _Wakeup) -> bool:
        """Whether ``key`` already changed after ``since`` to a version the waiter has not
        seen; if not, ``waiter`` is enlisted."""
        with self._lock:
            at, version = self._posted.get(key, (float("-inf"), None))
            if at > since and (version is None or version != waiter.seen):
                return True
            self._waiters.setdefault(key, []).append(waiter)
            return False

    def _discharge(self, key: str, waiter: _Event | _Wakeup) -> None:
        with self._lock:
            waiters = self._waiters.get(key)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[key]


class _Event(threading.Event):
    """A waiting thread's event, with the version its last read found."""

    def __init__(self, seen: str | None) -> None:
        super().__init__()
        self.seen = seen


class _Wakeup:
    """A future on one loop that any thread can complete; ``seen`` as for :class:`_Event`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, seen: str | None) -> None:
        self.loop = loop
        self.seen = seen
        self.future: asyncio.Future[None] = loop.create_future()

    def set(self) -> None:
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future)
        except RuntimeError:
            return  # the loop is closed: no one is waiting any more


def _resolve(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)


#: A store's change feed, for :class:`ChangeListener`: a generator function, called in the
#: listener's thread, that connects, yields ``None`` once it listens, then each
#: ``(key, version)`` it hears (``None`` as the version when the store cannot tell) and
#: ``None`` at least every second so that a stop is seen; it raises when the connection fails,
#: and is closed when the listener stops.
Feed = Callable[[], Generator[tuple[str, str | None] | None, None, None]]

_MAX_BACKOFF = 30.0
# What listeners a forked child inherited were feeding from, kept referenced so that nothing
# ever closes them there: closing a connection the parent still uses would end the parent's
# session on the shared socket.
_INHERITED: list[object] = []


class ChangeListener:
    """One thread per process that feeds a :class:`ChangeNotices` from a store's ``feed``.

    Started by the first :meth:`notices` in a process (so a store that never has a caller
    waiting holds no connection for it), and started again in a forked child. A feed that
    fails is logged once as a warning (its exception's type, never its text, which may quote a
    connection string) and opened again with backoff up to 30 s; meanwhile waiters keep their
    schedule. ``name`` shows in the thread's name and the log.
    """

    def __init__(self, name: str, feed: Feed) -> None:
        self.name = name
        self._feed = feed
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._notices = ChangeNotices()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The feed being read, if any: what a forked child must leave alone.
        self._feeding: object = None

    def __repr__(self) -> str:
        return f"ChangeListener({self.name!r})"

    def notices(self) -> ChangeNotices:
        """The board this process's thread posts to, starting the thread if need be (not once
        the listener is closed: then nothing is posted, and waiters keep their schedule)."""
        if self._pid != os.getpid() and not self._stop.is_set():
            with self._lock:
                if self._pid != os.getpid():
                    if self._pid is not None:
                        self._leave_to_parent()
                    self._start()
        return self._notices

    def close(self) -> None:
        """Stop listening: the thread closes the feed at its next yield, within about a
        second, without holding up the caller."""
        self._stop.set()

    def _leave_to_parent(self) -> None:
        """In a forked child: keep the parent's feed from ever being closed here, start anew."""
        _INHERITED.append(self._feeding)
        self._notices, self._thread, self._feeding = ChangeNotices(), None, None

    def _start(self) -> None:
        self._pid = os.getpid()
        self._thread = threading.Thread(
            target=self._run, name=f"credkeeper-listen:{self.name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        backoff, failing = 0.5, False
        while not self._stop.is_set():
            try:
                self._feeding = feed = self._feed()
                with contextlib.closing(feed):
                    for notice in feed:
                        if failing:
                            logger.info("change notices of %s resumed", self.name)
                        backoff, failing = 0.5, False
                        if self._stop.is_set():
                            return
                        if notice is not None:
                            self._notices.post(*notice)
            except Exception as exc:  # noqa: BLE001 - any driver's failure: listen again later
                if self._stop.is_set():
                    return  # the store closed what the feed was reading
                if not failing:
                    logger.warning(
                        "change notices of %s stopped (%s); waiting callers read on their "
                        "schedule until they resume",
                        self.name,
                        type(exc).__name__,
                    )
                failing = True
            self._stop.wait(backoff)
            backoff = min(_MAX_BACKOFF, backoff * 2)
