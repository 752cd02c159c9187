"""Time as a parameter: the engine asks a ``Clock``, tests pass ``FakeClock``."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    """**Protocol:** where the engine reads the time and waits."""

    def now(self) -> datetime:
        """The current time, aware, in UTC."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for ``seconds``."""
        ...

    async def asleep(self, seconds: float) -> None:
        """Suspend the calling task for ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        """``datetime.now(UTC)``."""
        return datetime.now(UTC)

    def sleep(self, seconds: float) -> None:
        """``time.sleep``."""
        time.sleep(max(0.0, seconds))

    async def asleep(self, seconds: float) -> None:
        """``asyncio.sleep``."""
        await asyncio.sleep(max(0.0, seconds))
