"""FakeClock: time that moves only when a test moves it."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest

from credkeeper import Clock
from credkeeper.testing import FakeClock

START = datetime(2026, 1, 1, tzinfo=UTC)


class TestCreation:
    def test_default_start_is_new_year_2026_utc(self) -> None:
        """Without a start the clock reads 2026-01-01T00:00:00Z."""
        assert START == FakeClock().now()

    def test_now_is_aware_utc(self) -> None:
        """now() returns an aware datetime in UTC."""
        assert UTC == FakeClock().now().tzinfo

    def test_start_in_another_zone_is_converted_to_utc(self) -> None:
        """An aware start in another zone reads back as the same instant in UTC."""
        start = datetime(2026, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))

        now = FakeClock(start).now()

        assert (START, UTC) == (now, now.tzinfo)

    def test_naive_start_is_refused_with_the_fix(self) -> None:
        """A naive start raises ValueError that says to pass an aware datetime."""
        with pytest.raises(ValueError, match="naive datetime; pass an aware one"):
            FakeClock(datetime(2026, 1, 1))

    def test_satisfies_the_clock_protocol(self) -> None:
        """A FakeClock can be used wherever a Clock is expected."""
        clock: Clock = FakeClock()

        clock.sleep(1)

        assert START + timedelta(seconds=1) == clock.now()


class TestAdvance:
    def test_advance_by_seconds(self) -> None:
        """advance(seconds) moves now() forward by that many seconds."""
        clock = FakeClock()

        clock.advance(90.5)

        assert START + timedelta(seconds=90.5) == clock.now()

    def test_advance_by_timedelta(self) -> None:
        """advance(timedelta) moves now() forward by that delta."""
        clock = FakeClock()

        clock.advance(timedelta(hours=8))

        assert START + timedelta(hours=8) == clock.now()

    def test_advance_returns_the_new_time(self) -> None:
        """advance() returns the time it moved to."""
        assert START + timedelta(minutes=1) == FakeClock().advance(60)

    def test_advance_backwards_is_refused(self) -> None:
        """A negative advance raises ValueError; time only moves forward."""
        with pytest.raises(ValueError, match="only moves forward"):
            FakeClock().advance(-1)

    def test_advance_by_infinity_is_refused(self) -> None:
        """A non-finite advance raises ValueError."""
        with pytest.raises(ValueError, match="finite"):
            FakeClock().advance(float("inf"))

    def test_advance_does_not_record_a_sleep(self) -> None:
        """advance() leaves sleeps empty; only sleeping is recorded."""
        clock = FakeClock()

        clock.advance(5)

        assert [] == clock.sleeps

    def test_advance_is_thread_safe(self) -> None:
        """Concurrent advances from many threads all count."""
        clock = FakeClock()

        def work() -> None:
            for _ in range(1000):
                clock.advance(0.001)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert START + timedelta(seconds=8) == clock.now()


class TestSleep:
    def test_sleep_advances_at_once(self) -> None:
        """sleep(seconds) moves now() forward by that amount without waiting."""
        clock = FakeClock()

        clock.sleep(3600)

        assert START + timedelta(hours=1) == clock.now()

    def test_sleep_records_each_amount_in_order(self) -> None:
        """Every sleep amount is appended to sleeps."""
        clock = FakeClock()

        clock.sleep(1)
        clock.sleep(2.5)

        assert [1.0, 2.5] == clock.sleeps

    def test_negative_sleep_counts_as_zero(self) -> None:
        """A negative sleep does not move the clock and is recorded as 0.0."""
        clock = FakeClock()

        clock.sleep(-5)

        assert (START, [0.0]) == (clock.now(), clock.sleeps)

    def test_asleep_advances_and_records(self) -> None:
        """asleep(seconds) moves now() forward and records the amount."""
        clock = FakeClock()

        asyncio.run(clock.asleep(30))

        assert (START + timedelta(seconds=30), [30.0]) == (clock.now(), clock.sleeps)

    def test_asleep_yields_to_other_tasks(self) -> None:
        """asleep() lets other ready tasks run before it returns."""
        clock = FakeClock()
        order: list[str] = []

        async def sleeper() -> None:
            await clock.asleep(1)
            order.append("sleeper")

        async def other() -> None:
            order.append("other")

        async def main() -> None:
            task = asyncio.create_task(other())
            await sleeper()
            await task

        asyncio.run(main())

        assert ["other", "sleeper"] == order

    def test_repr_shows_the_time(self) -> None:
        """repr() names the current fake time."""
        assert "FakeClock(now='2026-01-01T00:00:00+00:00')" == repr(FakeClock())
