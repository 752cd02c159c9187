"""The sweeper: every due credential refreshed ahead of time, once, with real threads and tasks
against FakeProvider over loopback HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from credkeeper import (
    AsyncSweeper,
    AsyncTokenManager,
    ConfigurationError,
    MemoryStore,
    Record,
    Status,
    StoreUnavailable,
    Sweeper,
    SweepReport,
    TokenManager,
)
from credkeeper.testing import FakeClock, FakeProvider, Fault

HOUR = 3600


class LaggingStore(MemoryStore):
    """A memory store whose scan still lists a key deleted a moment ago, as an index can."""

    def scan_due(self, before: datetime) -> Iterator[str]:
        yield from super().scan_due(before)
        yield "deleted-a-moment-ago"


def fill(manager: TokenManager, fake: FakeProvider, **expiries: int) -> None:
    """Store one credential per keyword: key=seconds until its access token expires."""
    for key, seconds in expiries.items():
        manager.put(key, fake.issue(expires_in=seconds))


def refreshes_by_family(fake: FakeProvider) -> Counter[str | None]:
    return Counter(call.family for call in fake.refresh_calls if call.outcome == "ok")


@pytest.fixture
def manager(
    store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
) -> TokenManager:
    """A manager with the default 15-minute leeway, so the default window is 30 minutes."""
    with TokenManager(store, fake.provider(), journal=tmp_path / "journal", clock=clock) as m:
        yield m  # type: ignore[misc]


class TestRunOnce:
    def test_every_credential_due_within_the_window_is_refreshed_once(
        self, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """Expired, due soon and inside the window are refreshed; an 8-hour one is left alone."""
        fill(manager, fake, expired=-60, soon=60, window=25 * 60, later=8 * HOUR)

        report = Sweeper(manager, jitter=0).run_once()

        assert (3, 3, 0, 0, (), ()) == (
            report.due,
            report.refreshed,
            report.fresh,
            report.by_peer,
            report.needs_reauth,
            report.failed,
        )
        assert 3 == fake.refresh_count
        assert {1} == set(refreshes_by_family(fake).values())
        assert report.ok

    def test_refreshed_credentials_are_fresh_beyond_the_window(
        self, manager: TokenManager, fake: FakeProvider, store: MemoryStore, clock: FakeClock
    ) -> None:
        """After a sweep no stored credential expires within the window."""
        fill(manager, fake, a=-60, b=60, c=600)
        sweeper = Sweeper(manager, jitter=0)

        sweeper.run_once()

        assert [] == sweeper.due()
        assert all(
            record is not None and record.expires_at > clock.now() + sweeper.window
            for record in (store.get(key) for key in "abc")
        )

    def test_needs_reauth_is_reported_and_never_sent(
        self, manager: TokenManager, fake: FakeProvider, store: MemoryStore
    ) -> None:
        """A condemned credential is listed under needs_reauth with no provider call for it."""
        fill(manager, fake, ok=60, dead=60)
        record = store.get("dead")
        assert record is not None
        store.put(record.replace(status=Status.NEEDS_REAUTH))

        report = Sweeper(manager, jitter=0).run_once()

        assert (("dead",), 1, 1) == (report.needs_reauth, report.refreshed, fake.refresh_count)

    def test_a_revoked_credential_is_condemned_and_reported(
        self, manager: TokenManager, fake: FakeProvider, store: MemoryStore
    ) -> None:
        """invalid_grant with nothing newer: needs_reauth in the report and in the store."""
        dead = fake.issue(expires_in=60)
        manager.put("dead", dead)
        fake.revoke(dead)

        report = Sweeper(manager, jitter=0).run_once()
        record = store.get("dead")

        assert (("dead",), Status.NEEDS_REAUTH) == (
            report.needs_reauth,
            record.status if record else None,
        )

    def test_refreshed_tokens_are_the_ones_stored(
        self, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """What the sweep stored is the provider's current pair for that login."""
        old = fake.issue(expires_in=60)
        manager.put("a", old)

        Sweeper(manager, jitter=0).run_once()
        stored = manager.get("a")

        assert ("used", "current", "valid") == (
            fake.refresh_token_state(old.refresh_token),
            fake.refresh_token_state(stored.refresh_token),
            fake.access_token_state(stored.access_token),
        )

    def test_a_key_in_its_own_cooldown_is_deferred_without_pausing(
        self, manager: TokenManager, fake: FakeProvider, store: MemoryStore, clock: FakeClock
    ) -> None:
        """A due but valid token whose refreshes failed before: deferred, no call, no pause."""
        fill(manager, fake, cooling=600, other=60)
        record = store.get("cooling")
        assert record is not None
        store.put(record.replace(failures=5, cooldown_until=clock.now() + timedelta(minutes=10)))

        report = Sweeper(manager, jitter=0, concurrency=1).run_once()

        assert ((("cooling", "cooldown"),), 1, 0, 1) == (
            report.deferred,
            report.refreshed,
            report.throttled,
            fake.refresh_count,
        )
        assert [] == clock.sleeps

    def test_a_peer_holding_the_lease_past_the_deadline_defers_the_key(
        self, manager: TokenManager, fake: FakeProvider, store: MemoryStore, clock: FakeClock
    ) -> None:
        """A peer's live lease until the call's deadline: deferred lease_busy, not failed."""
        fill(manager, fake, busy=600)
        record = store.get("busy")
        assert record is not None
        store.put(record.replace(lease_owner="peer", lease_until=clock.now() + timedelta(hours=1)))

        report = Sweeper(manager, jitter=0).run_once()

        assert ((("busy", "lease_busy"),), (), 0) == (
            report.deferred,
            report.failed,
            fake.refresh_count,
        )

    def test_a_key_deleted_after_the_scan_is_counted_as_deleted(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A store whose index still lists a deleted key: the key counts as deleted."""
        store = LaggingStore()
        with TokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock) as manager:
            fill(manager, fake, a=60)

            report = Sweeper(manager, jitter=0).run_once()

        assert (2, 1, 1, ()) == (report.due, report.refreshed, report.deleted, report.failed)

    def test_concurrency_bounds_the_provider_calls_in_flight(
        self, store: MemoryStore, clock: FakeClock, tmp_path: Path
    ) -> None:
        """20 due credentials, concurrency 4, a provider answering in 50 ms: at most 4 at once."""
        with (
            FakeProvider(clock=clock, latency=0.05) as fake,
            TokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock) as manager,
        ):
            fill(manager, fake, **{f"user-{n}": 60 for n in range(20)})

            report = Sweeper(manager, concurrency=4, jitter=0).run_once()

            assert (20, 20) == (report.refreshed, fake.refresh_count)
            assert 2 <= fake.max_in_flight <= 4

    def test_progress_is_told_each_key(self, manager: TokenManager, fake: FakeProvider) -> None:
        """progress(done, total) from 0 to the number of due keys."""
        fill(manager, fake, a=60, b=60, c=60)
        seen: list[tuple[int, int]] = []
        lock = threading.Lock()

        def progress(done: int, total: int) -> None:
            with lock:
                seen.append((done, total))

        Sweeper(manager, jitter=0).run_once(progress=progress)

        assert [(0, 3), (1, 3), (2, 3), (3, 3)] == sorted(seen)

    def test_the_report_is_json_ready(self, manager: TokenManager, fake: FakeProvider) -> None:
        """as_dict() holds counts and keys, no token."""
        fill(manager, fake, a=60)

        report = Sweeper(manager, jitter=0).run_once().as_dict()

        assert {"due": 1, "refreshed": 1, "failed": [], "needs_reauth": []} == {
            name: report[name] for name in ("due", "refreshed", "failed", "needs_reauth")
        }


DAY = 86400


class CountingStore(MemoryStore):
    """A memory store that counts the scans listing every key, as the keep-alive pass makes."""

    def __init__(self) -> None:
        super().__init__()
        self.full_scans = 0

    def scan_due(self, before: datetime) -> Iterator[str]:
        if before.year > 9000:
            self.full_scans += 1
        return super().scan_due(before)


class UnreadableStore(MemoryStore):
    """A memory store whose reads of one key fail as a store outage would.

    Stands in for a backend that fails one read on demand, which no real server does.
    """

    def __init__(self, broken: str) -> None:
        super().__init__()
        self.broken = broken
        self.failing = False

    def put(self, record: Record) -> Record:
        self.failing = True  # reads fail once the credentials are in
        return super().put(record)

    def get(self, key: str) -> Record | None:
        if self.failing and key == self.broken:
            raise StoreUnavailable("the store is unreachable", key=key)
        return super().get(key)


class RendezvousStore(MemoryStore):
    """A memory store whose reads, once armed, wait until ``parties`` of them are waiting: reads
    made one after another break the barrier at its timeout and raise BrokenBarrierError."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.parties = parties
        self.barrier: threading.Barrier | None = None

    def arm(self) -> None:
        """Make the next ``parties`` reads meet."""
        self.barrier = threading.Barrier(self.parties, timeout=5)

    def get(self, key: str) -> Record | None:
        barrier = self.barrier
        if barrier is not None:
            barrier.wait()
            self.barrier = None  # the keep-alive pass's reads meet; the refreshes' need not
        return super().get(key)


def age(store: MemoryStore, key: str, refreshed_at: datetime | None) -> None:
    """Set when the credential under ``key`` was last refreshed, as a store from before may."""
    record = store.get(key)
    assert record is not None
    store.put(record.replace(refreshed_at=refreshed_at))


class TestKeepAlive:
    def test_an_idle_but_valid_credential_is_refreshed(
        self, manager: TokenManager, fake: FakeProvider, clock: FakeClock
    ) -> None:
        """Last refreshed 31 days ago, valid 29 more: keep_alive=30d refreshes it, counted so."""
        fill(manager, fake, idle=60 * DAY)
        clock.advance(31 * DAY)

        report = Sweeper(manager, jitter=0, keep_alive=timedelta(days=30)).run_once()

        assert (0, 1, 1, 0, 1) == (
            report.due,
            report.idle,
            report.kept_alive,
            report.refreshed,
            fake.refresh_count,
        )

    def test_the_refresh_records_when_it_happened(
        self, manager: TokenManager, fake: FakeProvider, store: MemoryStore, clock: FakeClock
    ) -> None:
        """After the keep-alive refresh, the record's refreshed_at is the sweep's time."""
        fill(manager, fake, idle=60 * DAY)
        swept_at = clock.advance(31 * DAY)

        Sweeper(manager, jitter=0, keep_alive=timedelta(days=30)).run_once()
        record = store.get("idle")

        assert swept_at == (record.refreshed_at if record else None)

    def test_a_recently_refreshed_credential_is_left_alone(
        self, manager: TokenManager, fake: FakeProvider, clock: FakeClock
    ) -> None:
        """Refreshed 29 days ago with keep_alive=30d: no provider call."""
        fill(manager, fake, recent=60 * DAY)
        clock.advance(29 * DAY)

        report = Sweeper(manager, jitter=0, keep_alive=timedelta(days=30)).run_once()

        assert (0, 0, 0) == (report.idle, report.kept_alive, fake.refresh_count)

    def test_an_unknown_last_refresh_is_refreshed_once(
        self, manager: TokenManager, fake: FakeProvider, store: MemoryStore, clock: FakeClock
    ) -> None:
        """A record without refreshed_at is refreshed by the first pass, not by the next."""
        fill(manager, fake, old=60 * DAY)
        age(store, "old", None)
        sweeper = Sweeper(manager, jitter=0, keep_alive=timedelta(days=30))

        first = sweeper.run_once()
        clock.advance(4 * DAY)
        second = sweeper.run_once()

        assert (1, 0, 0) == (first.kept_alive, second.idle, second.kept_alive)

    def test_needs_reauth_is_never_touched(
        self, manager: TokenManager, fake: FakeProvider, store: MemoryStore, clock: FakeClock
    ) -> None:
        """An idle credential whose user must log in again is neither listed nor sent."""
        fill(manager, fake, dead=60 * DAY)
        record = store.get("dead")
        assert record is not None
        store.put(record.replace(status=Status.NEEDS_REAUTH))
        clock.advance(31 * DAY)

        report = Sweeper(manager, jitter=0, keep_alive=timedelta(days=30)).run_once()

        assert (0, (), 0) == (report.idle, report.needs_reauth, fake.refresh_count)

    def test_a_key_due_and_idle_is_refreshed_once_as_due(
        self, manager: TokenManager, fake: FakeProvider, clock: FakeClock
    ) -> None:
        """Expiring within the window and idle: one refresh, counted as due, not as idle."""
        fill(manager, fake, both=31 * DAY + 60)
        clock.advance(31 * DAY)

        report = Sweeper(manager, jitter=0, keep_alive=timedelta(days=30)).run_once()

        assert (1, 1, 0, 1) == (report.due, report.refreshed, report.idle, fake.refresh_count)

    def test_off_by_default(
        self, manager: TokenManager, fake: FakeProvider, clock: FakeClock
    ) -> None:
        """Without keep_alive, a credential idle for a year but still valid is left alone."""
        fill(manager, fake, idle=400 * DAY)
        clock.advance(365 * DAY)

        report = Sweeper(manager, jitter=0).run_once()

        assert (0, 0, 0) == (report.idle, report.kept_alive, fake.refresh_count)

    def test_a_peer_that_refreshed_first_leaves_nothing_to_do(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """Two hosts' sweepers over one store, one after the other: one refresh per idle key."""
        with (
            TokenManager(store, fake.provider(), journal=tmp_path / "a", clock=clock) as first,
            TokenManager(store, fake.provider(), journal=tmp_path / "b", clock=clock) as second,
        ):
            fill(first, fake, a=60 * DAY, b=60 * DAY)
            clock.advance(31 * DAY)
            keep_alive = timedelta(days=30)

            Sweeper(first, jitter=0, keep_alive=keep_alive).run_once()
            report = Sweeper(second, jitter=0, keep_alive=keep_alive).run_once()

        assert (0, 0, 2) == (report.idle, report.kept_alive, fake.refresh_count)

    @pytest.mark.parametrize("repetition", range(3))
    def test_sweepers_in_threads_refresh_each_idle_key_once(
        self, repetition: int, store: MemoryStore, tmp_path: Path
    ) -> None:
        """Three managers keeping one store alive at once: one refresh per idle key.

        On the system clock, as the other many-sweeper cases; idle through their refreshed_at.
        """
        with FakeProvider(latency=0.02, revoke_family_on_reuse=True) as fake:
            managers = [
                TokenManager(store, fake.provider(), journal=tmp_path / f"j{n}") for n in range(3)
            ]
            fill(managers[0], fake, **{f"user-{n}": 8 * HOUR for n in range(20)})
            for n in range(20):
                age(store, f"user-{n}", None)
            reports: list[SweepReport] = []

            def sweep(manager: TokenManager) -> None:
                sweeper = Sweeper(manager, concurrency=4, jitter=0.01, keep_alive=30 * DAY)
                reports.append(sweeper.run_once())

            threads = [threading.Thread(target=sweep, args=(m,)) for m in managers]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for manager in managers:
                manager.close()

            assert 20 == fake.refresh_count
            assert {1} == set(refreshes_by_family(fake).values())
            assert [] == [failed for report in reports for failed in report.failed]

    def test_run_forever_lists_every_key_once_per_tenth_of_keep_alive(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """Sweeps half a day apart with keep_alive=10d: the pass runs in sweeps 1, 3 and 5."""
        store = CountingStore()
        with TokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock) as manager:
            fill(manager, fake, a=60 * DAY)
            sweeper = Sweeper(manager, jitter=0, keep_alive=timedelta(days=10))
            scans: list[int] = []

            def on_report(report: SweepReport) -> None:
                scans.append(store.full_scans)
                clock.advance(DAY / 2)
                if len(scans) == 6:
                    sweeper.stop()

            sweeper.run_forever(interval=0.01, on_report=on_report, handle_signals=False)

        assert [1, 1, 2, 2, 3, 3] == scans

    def test_the_report_counts_idle_keys_in_json(
        self, manager: TokenManager, fake: FakeProvider, clock: FakeClock
    ) -> None:
        """as_dict() holds idle and kept_alive."""
        fill(manager, fake, idle=60 * DAY)
        clock.advance(31 * DAY)

        report = Sweeper(manager, jitter=0, keep_alive=30 * DAY).run_once().as_dict()

        assert {"idle": 1, "kept_alive": 1} == {
            name: report[name] for name in ("idle", "kept_alive")
        }

    def test_progress_counts_idle_keys(
        self, manager: TokenManager, fake: FakeProvider, clock: FakeClock
    ) -> None:
        """progress(done, total) counts the due and the idle keys together."""
        fill(manager, fake, due=31 * DAY + 60, idle=60 * DAY)
        clock.advance(31 * DAY)
        seen: list[tuple[int, int]] = []

        Sweeper(manager, jitter=0, keep_alive=30 * DAY).run_once(
            progress=lambda done, total: seen.append((done, total))
        )

        assert [(0, 2), (1, 2), (2, 2)] == sorted(seen)

    def test_a_key_that_cannot_be_read_does_not_stop_the_sweep(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """One idle key's read fails: it is skipped this time, and the due key is refreshed."""
        store = UnreadableStore("broken")
        with TokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock) as manager:
            fill(manager, fake, broken=60 * DAY)
            clock.advance(31 * DAY)
            fill(manager, fake, due=60)

            report = Sweeper(manager, jitter=0, keep_alive=timedelta(days=30)).run_once()

        assert (1, 0, 0, 1) == (
            report.refreshed,
            report.idle,
            report.kept_alive,
            fake.refresh_count,
        )

    def test_an_idle_key_in_a_cooldown_is_deferred_not_failed(
        self, manager: TokenManager, fake: FakeProvider, store: MemoryStore, clock: FakeClock
    ) -> None:
        """An idle, valid credential whose refreshes are cooling down: deferred, as a due one."""
        fill(manager, fake, idle=60 * DAY)
        clock.advance(31 * DAY)
        record = store.get("idle")
        assert record is not None
        store.put(record.replace(failures=3, cooldown_until=clock.now() + timedelta(minutes=5)))

        report = Sweeper(manager, jitter=0, keep_alive=timedelta(days=30)).run_once()

        assert ((("idle", "cooldown"),), (), 0) == (
            report.deferred,
            report.failed,
            fake.refresh_count,
        )

    def test_the_pass_reads_records_at_the_sweeps_concurrency(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """Four idle records, concurrency 4: their reads overlap (they meet at a barrier)."""
        store = RendezvousStore(parties=4)
        with TokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock) as manager:
            fill(manager, fake, **{f"user-{n}": 60 * DAY for n in range(4)})
            clock.advance(31 * DAY)
            store.arm()

            report = Sweeper(manager, concurrency=4, jitter=0, keep_alive=30 * DAY).run_once()

        assert (4, 4) == (report.idle, report.kept_alive)

    def test_a_stopped_sweeper_reads_no_record(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """stop() before the keep-alive pass: it lists the keys but reads none of them."""
        store = ReadCountingStore()
        with TokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock) as manager:
            fill(manager, fake, a=60 * DAY, b=60 * DAY)
            clock.advance(31 * DAY)
            store.reads = 0
            sweeper = Sweeper(manager, jitter=0, keep_alive=30 * DAY)
            sweeper.stop()

            report = sweeper.run_once()

        assert (0, 0, 0) == (store.reads, report.idle, fake.refresh_count)

    @pytest.mark.anyio
    async def test_the_async_pass_reads_records_at_the_sweeps_concurrency(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """The async twin: four idle records' reads, offloaded to threads, overlap."""
        store = RendezvousStore(parties=4)
        async with AsyncTokenManager(
            store, fake.provider(), journal=tmp_path / "j", clock=clock
        ) as manager:
            for n in range(4):
                await manager.put(f"user-{n}", fake.issue(expires_in=60 * DAY))
            clock.advance(31 * DAY)
            store.arm()

            sweeper = AsyncSweeper(manager, concurrency=4, jitter=0, keep_alive=30 * DAY)
            report = await sweeper.run_once()

        assert (4, 4) == (report.idle, report.kept_alive)

    @pytest.mark.anyio
    async def test_the_async_sweeper_keeps_idle_credentials_alive(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """The async twin: the idle one refreshed, the recent one left alone."""
        async with AsyncTokenManager(
            store, fake.provider(), journal=tmp_path / "journal", clock=clock
        ) as manager:
            await manager.put("idle", fake.issue(expires_in=60 * DAY))
            clock.advance(20 * DAY)
            await manager.put("recent", fake.issue(expires_in=60 * DAY))
            clock.advance(11 * DAY)

            sweeper = AsyncSweeper(manager, jitter=0, keep_alive=timedelta(days=30))
            report = await sweeper.run_once()

        assert (1, 1, 1) == (report.idle, report.kept_alive, fake.refresh_count)


class TestThrottling:
    @pytest.fixture
    def impatient(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> Iterator[TokenManager]:
        """A manager whose calls give up after 1 s, holding one credential due in 10 minutes."""
        with TokenManager(
            store, fake.provider(), journal=tmp_path / "journal", clock=clock, refresh_timeout=1.0
        ) as manager:
            fill(manager, fake, a=600)
            yield manager

    def test_a_throttled_provider_pauses_the_sweep_instead_of_failing_keys(
        self, impatient: TokenManager, fake: FakeProvider, clock: FakeClock
    ) -> None:
        """429s outlasting one key's deadline: the sweep waits out the cooldown, then refreshes."""
        fake.fail_next(*[Fault.status(429, retry_after=5)] * 2)
        report = Sweeper(impatient, jitter=0).run_once()

        assert (1, 0, ()) == (report.refreshed, report.fresh, report.failed)
        assert report.throttled >= 1
        assert sum(clock.sleeps) >= 30  # the cooldown the 429 started, waited out

    def test_a_provider_down_for_every_attempt_fails_the_key(
        self, impatient: TokenManager, fake: FakeProvider
    ) -> None:
        """503 on every try: after max_attempts the key is failed as unavailable."""
        fake.fail_next(*[Fault.status(503)] * 100)
        report = Sweeper(impatient, jitter=0, max_attempts=2).run_once()

        assert ((("a", "unavailable"),), 2, False) == (report.failed, report.throttled, report.ok)


class TestManySweepers:
    @pytest.mark.parametrize("repetition", range(5))
    def test_three_sweepers_in_threads_refresh_each_key_once(
        self, repetition: int, store: MemoryStore, tmp_path: Path
    ) -> None:
        """Three managers sweeping one store at once, beside a caller: one refresh per key.

        On the system clock: a fake clock that every thread's waits advance would run leases
        out in no time.
        """
        with FakeProvider(latency=0.02, revoke_family_on_reuse=True) as fake:
            managers = [
                TokenManager(store, fake.provider(), journal=tmp_path / f"j{n}") for n in range(3)
            ]
            fill(managers[0], fake, **{f"user-{n}": 60 for n in range(30)})
            reports: list[SweepReport] = []

            def sweep(manager: TokenManager) -> None:
                reports.append(Sweeper(manager, concurrency=4, jitter=0.01).run_once())

            threads = [threading.Thread(target=sweep, args=(m,)) for m in managers]
            for thread in threads:
                thread.start()
            managers[0].get("user-7")
            for thread in threads:
                thread.join()
            for manager in managers:
                manager.close()

            assert 30 == fake.refresh_count
            assert {1} == set(refreshes_by_family(fake).values())
            # The caller refreshes user-7 itself when it gets there before the sweepers.
            assert sum(report.refreshed for report in reports) in (29, 30)
            assert [] == [failed for report in reports for failed in report.failed]


class ReadCountingStore(MemoryStore):
    """A memory store that counts its reads and its listings of due keys."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.listings = 0

    def get(self, key: str) -> Record | None:
        self.reads += 1
        return super().get(key)

    def scan_due(self, before: datetime) -> Iterator[str]:
        self.listings += 1
        return super().scan_due(before)


class TestPeerSweeps:
    def test_keys_a_peer_refreshed_after_the_listing_are_passed_over_unread(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A key found fresh makes the sweep list again; the keys a peer refreshed go unread."""
        store = ReadCountingStore()
        with (
            TokenManager(store, fake.provider(), journal=tmp_path / "a", clock=clock) as manager,
            TokenManager(store, fake.provider(), journal=tmp_path / "b", clock=clock) as peer,
        ):
            fill(manager, fake, **{f"user-{n}": 60 for n in range(10)})

            def peer_sweeps_first(done: int, total: int) -> None:
                if done == 0:
                    Sweeper(peer, concurrency=1, jitter=0).run_once()
                    store.reads = 0

            report = Sweeper(manager, concurrency=1, jitter=0).run_once(progress=peer_sweeps_first)

        assert (1, 10, 0) == (store.reads, report.fresh, report.refreshed)

    def test_a_sweep_that_finds_no_key_fresh_lists_the_keys_once(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """Alone, a sweep lists the due keys once, however many it refreshes."""
        store = ReadCountingStore()
        with TokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock) as manager:
            fill(manager, fake, **{f"user-{n}": 60 for n in range(10)})
            report = Sweeper(manager, concurrency=2, jitter=0).run_once()

        assert (1, 10) == (store.listings, report.refreshed)


class TestRunForever:
    def test_sigterm_stops_the_worker_after_its_refresh(self, tmp_path: Path) -> None:
        """SIGTERM during a slow refresh: the refresh is stored, then the process exits 0."""
        script = tmp_path / "sweep.py"
        script.write_text(
            textwrap.dedent(
                """
                import sys
                from credkeeper import Credentials, KeyRing, Sweeper, TokenManager
                from credkeeper.testing import FakeProvider
                from credkeeper_file import FileStore

                with FakeProvider(latency=1.5) as fake:
                    store = FileStore(sys.argv[1])
                    keyring = KeyRing.generate()
                    with TokenManager(store, fake.provider(), keyring=keyring,
                                      journal=sys.argv[2]) as manager:
                        manager.put("a", fake.issue(expires_in=60))
                        print("ready", flush=True)
                        Sweeper(manager, jitter=0).run_forever(interval=0.5)
                        record = store.get("a")
                    print("stopped", fake.refresh_count, flush=True)
                """
            )
        )
        worker = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "store.json"), str(tmp_path / "j")],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert worker.stdout is not None
        assert "ready" == worker.stdout.readline().strip()
        time.sleep(0.7)  # inside the provider's 1.5 s answer
        worker.send_signal(signal.SIGTERM)

        out, _ = worker.communicate(timeout=30)

        assert (0, "stopped 1") == (worker.returncode, out.strip())

    def test_stop_cuts_a_throttling_pause_short(self, store: MemoryStore, tmp_path: Path) -> None:
        """A sweep pausing 30 s for a throttling provider returns soon after stop(), on the
        system clock, without counting the key it did not get to retry."""
        with (
            FakeProvider() as fake,
            TokenManager(store, fake.provider(), journal=tmp_path / "j", refresh_timeout=1.0) as m,
        ):
            fill(m, fake, a=600)
            fake.fail_next(Fault.status(429, retry_after=30))
            sweeper = Sweeper(m, jitter=0)
            threading.Timer(0.5, sweeper.stop).start()
            started = time.monotonic()

            report = sweeper.run_once()

            assert time.monotonic() - started < 5.0
            assert (1, 0, 1, ()) == (
                report.throttled,
                report.refreshed,
                len(fake.refresh_calls),
                report.failed,
            )

    def test_stop_ends_run_forever(self, manager: TokenManager, fake: FakeProvider) -> None:
        """stop() from another thread ends the loop between sweeps."""
        fill(manager, fake, a=60)
        sweeper = Sweeper(manager, jitter=0)
        timer = threading.Timer(0.3, sweeper.stop)
        timer.start()

        sweeper.run_forever(interval=0.05)

        assert (True, 1) == (sweeper.stopping, fake.refresh_count)


class TestAsyncSweeper:
    @pytest.mark.anyio
    async def test_every_due_credential_is_refreshed_once(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """The async twin: due ones refreshed, the rest left alone, counted alike."""
        async with AsyncTokenManager(
            store, fake.provider(), journal=tmp_path / "journal", clock=clock
        ) as manager:
            for key, seconds in {"a": -60, "b": 60, "c": 8 * HOUR}.items():
                await manager.put(key, fake.issue(expires_in=seconds))

            report = await AsyncSweeper(manager, jitter=0, concurrency=2).run_once()

        assert (2, 2, 2) == (report.due, report.refreshed, fake.refresh_count)

    @pytest.mark.anyio
    async def test_needs_reauth_is_reported(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A revoked credential comes back under needs_reauth."""
        async with AsyncTokenManager(
            store, fake.provider(), journal=tmp_path / "journal", clock=clock
        ) as manager:
            dead = fake.issue(expires_in=60)
            await manager.put("dead", dead)
            fake.revoke(dead)

            report = await AsyncSweeper(manager, jitter=0).run_once()

        assert ("dead",) == report.needs_reauth

    def test_sigterm_stops_run_forever_through_the_loop(self, tmp_path: Path) -> None:
        """SIGTERM, taken through the running loop, ends run_forever; the default is put back."""
        script = tmp_path / "sweep.py"
        script.write_text(
            textwrap.dedent(
                """
                import asyncio, signal, sys
                from credkeeper import AsyncSweeper, AsyncTokenManager, MemoryStore
                from credkeeper.testing import FakeProvider

                async def main():
                    with FakeProvider() as fake:
                        async with AsyncTokenManager(
                            MemoryStore(), fake.provider(), journal=sys.argv[1]
                        ) as manager:
                            await manager.put("a", fake.issue(expires_in=60))
                            sweeper = AsyncSweeper(manager, jitter=0)
                            reports = []

                            def on_report(report):
                                if not reports:  # the handlers are in by the first report
                                    print("swept", flush=True)
                                reports.append(report)

                            await sweeper.run_forever(interval=0.05, on_report=on_report)
                        default = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
                        print("stopped", fake.refresh_count, default, flush=True)

                asyncio.run(main())
                """
            )
        )
        worker = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "j")], stdout=subprocess.PIPE, text=True
        )
        assert worker.stdout is not None
        assert "swept" == worker.stdout.readline().strip()
        worker.send_signal(signal.SIGTERM)

        out, _ = worker.communicate(timeout=30)

        assert (0, "stopped 1 True") == (worker.returncode, out.strip())

    @pytest.mark.anyio
    async def test_stop_ends_run_forever(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """stop() from the loop ends run_forever between sweeps; each sweep was reported."""
        reports: list[SweepReport] = []
        async with AsyncTokenManager(
            store, fake.provider(), journal=tmp_path / "journal", clock=clock
        ) as manager:
            await manager.put("a", fake.issue(expires_in=60))
            sweeper = AsyncSweeper(manager, jitter=0)
            asyncio.get_running_loop().call_later(0.3, sweeper.stop)

            await sweeper.run_forever(interval=0.05, on_report=reports.append, handle_signals=False)

        assert (1, 1) == (reports[0].refreshed, fake.refresh_count)
        assert all(report.due == 0 for report in reports[1:])


class TestSettings:
    def test_the_default_window_is_the_leeway_plus_15_minutes(self, manager: TokenManager) -> None:
        """30 minutes for the default 15-minute leeway."""
        assert 1800.0 == Sweeper(manager).window.total_seconds()

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"concurrency": 0}, "concurrency must be a whole number of at least 1"),
            ({"window": 60}, r"window \(60 s\) must be at least the manager's leeway"),
            ({"max_attempts": 0}, "max_attempts must be"),
            ({"jitter": -1}, "jitter must be at least"),
            ({"keep_alive": 0}, "keep_alive must be at least 1 seconds"),
            ({"keep_alive": "30d"}, "keep_alive must be a timedelta"),
        ],
    )
    def test_bad_settings_name_the_option(
        self, manager: TokenManager, options: dict[str, object], message: str
    ) -> None:
        """Each bad setting is a ConfigurationError naming it."""
        with pytest.raises(ConfigurationError, match=message):
            Sweeper(manager, **options)  # type: ignore[arg-type]

    def test_an_async_manager_is_refused(
        self, store: MemoryStore, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """Sweeper takes a TokenManager and says which class takes the other."""
        manager = AsyncTokenManager(store, fake.provider(), journal=tmp_path)
        with pytest.raises(ConfigurationError, match="use AsyncSweeper"):
            Sweeper(manager)  # type: ignore[arg-type]
