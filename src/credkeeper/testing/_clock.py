"""``FakeClock``: a :class:`~credkeeper.Clock` that moves only when a test moves it."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from datetime import UTC, datetime, timedelta

__all__ = ["FakeClock", "SkewedClock"]

_DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)


class FakeClock:
    """A clock for tests: ``now()`` moves only by :meth:`advance`, :meth:`sleep` or :meth:`asleep`.

    Sleeping advances the clock at once instead of waiting, and the amounts asked for are kept in
    :attr:`sleeps`, so a test can check a backoff schedule without spending the time. Every method
    is safe to call from several threads.
    """

    def __init__(self, start: datetime | None = None) -> None:
        if start is None:
            start = _DEFAULT_START
        elif not isinstance(start, datetime):
            raise TypeError(f"start must be a datetime, not {type(start).__name__}")
        elif start.tzinfo is None or start.utcoffset() is None:
            raise ValueError(
                "FakeClock start is a naive datetime; pass an aware one, "
                "e.g. datetime(2026, 1, 1, tzinfo=timezone.utc)"
            )
        self._now = start.astimezone(UTC)
        self._lock = threading.Lock()
        #: Every amount passed to :meth:`sleep` or :meth:`asleep`, in order (negatives as 0.0).
        self.sleeps: list[float] = []

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now().isoformat()!r})"

    def now(self) -> datetime:
        """The fake current time, aware, in UTC."""
        with self._lock:
            return self._now

    def advance(self, seconds: float | timedelta) -> datetime:
        """Move the clock forward by ``seconds`` (a number or a ``timedelta``); return the new time.

        Time never goes backwards: a negative or non-finite amount is refused.
        """
        if isinstance(seconds, timedelta):
            delta = seconds
        else:
            if isinstance(seconds, bool) or not isinstance(seconds, int | float):
                raise TypeError(
                    f"seconds must be a number or a timedelta, not {type(seconds).__name__}"
                )
            if not math.isfinite(seconds):
                raise ValueError(f"seconds must be finite, got {seconds!r}")
            delta = timedelta(seconds=seconds)
        if delta < timedelta(0):
            raise ValueError(
                f"a FakeClock only moves forward; got {delta.total_seconds()!r} seconds, "
                "create a new FakeClock to start over"
            )
        with self._lock:
            self._now += delta
            return self._now

    def sleep(self, seconds: float) -> None:
        """Advance by ``seconds`` at once and record the amount in :attr:`sleeps`.

        A negative amount counts as zero, as with :class:`~credkeeper.SystemClock`.
        """
        amount = max(0.0, float(seconds))
        if not math.isfinite(amount):
            raise ValueError(f"seconds must be finite, got {seconds!r}")
        with self._lock:
            self._now += timedelta(seconds=amount)
            self.sleeps.append(amount)

    async def asleep(self, seconds: float) -> None:
        """Like :meth:`sleep`, then yield to the event loop once so other tasks can run."""
        self.sleep(seconds)
        await asyncio.sleep(0)


class SkewedClock:
    """The real clock, off by ``offset`` seconds: a host whose clock runs ahead (or behind).

    ``now()`` is the system's time plus ``offset``; sleeping waits for real. Give managers in
    different processes different offsets to test that hosts whose clocks disagree still
    refresh once per expiry.
    """

    def __init__(self, offset: float | timedelta) -> None:
        delta = offset if isinstance(offset, timedelta) else timedelta(seconds=offset)
        self.offset = delta

    def __repr__(self) -> str:
        return f"SkewedClock(offset={self.offset.total_seconds():+g})"

    def now(self) -> datetime:
        """The system's time plus the offset, aware, in UTC."""
        return datetime.now(UTC) + self.offset

    def sleep(self, seconds: float) -> None:
        """``time.sleep``."""
        time.sleep(max(0.0, seconds))

    async def asleep(self, seconds: float) -> None:
        """``asyncio.sleep``."""
        await asyncio.sleep(max(0.0, seconds))
