"""The time budget of one engine call, shared by every retry loop beneath it.

A manager call (``get``, ``refresh``, ``put``, ``delete``) runs under one budget, its
``refresh_timeout``. The flow's own retries stop at it, and a store that retries by itself
(throttling, a lock held by a peer) reads :func:`time_remaining` and stops there too, so one call
has one deadline rather than a store's budget nested inside the engine's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["budget", "time_remaining"]

# A monotonic instant: the store's retries wait on real time, whatever clock the flow reads.
_DEADLINE: ContextVar[float | None] = ContextVar("credkeeper_deadline", default=None)


def time_remaining() -> float | None:
    """Seconds left in the budget of the credkeeper call in progress; ``None`` outside one.

    A store that retries on its own (throttling, contention) should stop retrying, and raise
    its ``StoreUnavailable``, once this reaches zero. The value is never negative.
    """
    deadline = _DEADLINE.get()
    return None if deadline is None else max(0.0, deadline - time.monotonic())


@contextmanager
def budget(seconds: float) -> Iterator[None]:
    """Run the block under a budget of ``seconds``; an enclosing, tighter budget still wins."""
    deadline = time.monotonic() + seconds
    outer = _DEADLINE.get()
    if outer is not None:
        deadline = min(deadline, outer)
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)
