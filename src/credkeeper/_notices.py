"""``ChangeNotices``: how a store that hears of changes wakes the callers waiting on a peer.

A caller that finds a peer's lease on a credential waits for that peer's refresh and reads
the record again; it cannot have the new tokens before they are in the store, and without
news from the store it can only guess when they are (``Policy.wait_delay``). A store whose
database announces changes (PostgreSQL's ``LISTEN``/``NOTIFY``, a change stream, a pub/sub
channel) posts each changed key here, from any thread; a waiter's sleep then ends as soon
as the key it waits on changes, and its next read finds the tokens. The schedule stays as
the fallback: a notice that never comes (the listener down, a store that cannot listen)
costs what waiting cost without notices, never correctness.

A waiter passes ``since``, the ``time.monotonic()`` of its last read, and ``seen``, the
version that read found: a notice posted after that read and before the wait began still ends
the wait at once, unless it announces the very version the waiter has (a write committed just
before the read, whose notice arrived just after it), which would only cost a read.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

__all__ = ["ChangeNotices"]

# Notices older than this are forgotten: no waiter's last read is that old.
_MEMORY = 60.0


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
                self._waiters[key] = [w for w in waiters if w not in woken]
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
