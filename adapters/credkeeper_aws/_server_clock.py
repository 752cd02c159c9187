"""AWS's clock, learnt from the ``Date`` header of its answers; no I/O.

Secrets Manager has no clock API, but every answer, errors included, carries an HTTP ``Date``
header: AWS's time, truncated to the second. The header of an answer sent at ``sent`` and
received at ``received`` (both on the store's clock) was written at some moment between the
two, so the offset of AWS's clock from the store's lies in
``[date - received, date + 1 s - sent]``. :class:`ServerClock` intersects those intervals as
answers arrive, which narrows the estimate well below the header's one-second resolution, and
reads AWS's time as the store's clock plus the middle of the interval.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

from credkeeper import Clock

__all__ = ["ServerClock", "date_header"]

_SECOND = timedelta(seconds=1)
# How far two clocks may drift apart per second between answers: 100 ppm, a free-running
# quartz oscillator's worst case. An interval older than this allows for is widened to match.
_DRIFT = 1e-4


def date_header(response: object) -> str | None:
    """The ``Date`` header of a botocore response (or of a ``ClientError``'s), if it has one."""
    if not isinstance(response, Mapping):
        return None
    metadata = response.get("ResponseMetadata")
    headers = metadata.get("HTTPHeaders") if isinstance(metadata, Mapping) else None
    value = headers.get("date") if isinstance(headers, Mapping) else None
    return value if isinstance(value, str) else None


class ServerClock:
    """An estimate of a server's clock, read on ``clock``, from the ``Date`` of its answers.

    When two answers' intervals no longer overlap, a clock was stepped (NTP, a resumed VM):
    the estimate starts over from the newer answer. :meth:`now` never goes backwards, so a
    new estimate slightly behind an older one holds the time still instead. Thread-safe.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._low: timedelta | None = None
        self._high = timedelta(0)
        self._observed_at: datetime | None = None
        self._last: datetime | None = None

    def observe(self, date: str | None, *, sent: datetime, received: datetime) -> None:
        """Narrow the estimate with an answer carrying ``date``, sent and received as given.

        A missing or unreadable header is ignored.
        """
        if date is None:
            return
        try:
            moment = parsedate_to_datetime(date)
        except (TypeError, ValueError):
            return
        if moment.utcoffset() is None:
            return
        low, high = moment - received, moment + _SECOND - sent
        with self._lock:
            if self._low is not None and self._observed_at is not None:
                slack = abs(received - self._observed_at) * _DRIFT
                narrowed = max(low, self._low - slack), min(high, self._high + slack)
                if narrowed[0] <= narrowed[1]:
                    low, high = narrowed
            self._low, self._high, self._observed_at = low, high, received

    def uncertainty(self) -> timedelta | None:
        """How far :meth:`now` may be off the server's clock at most; ``None`` before answers."""
        with self._lock:
            return None if self._low is None else (self._high - self._low) / 2

    def age(self) -> timedelta | None:
        """Time on the clock since the last answer read; ``None`` before any answer."""
        with self._lock:
            observed_at = self._observed_at
        return None if observed_at is None else self._clock.now() - observed_at

    def now(self) -> datetime | None:
        """The server's time now, aware, in UTC; ``None`` before any answer."""
        with self._lock:
            if self._low is None:
                return None
            moment = (self._clock.now() + (self._low + self._high) / 2).astimezone(UTC)
            if self._last is not None and moment < self._last:
                moment = self._last
            self._last = moment
            return moment
