"""Engine hazards: races, outages and odd answers that must not cost a refresh token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from credkeeper import (
    AsyncTokenManager,
    CredentialNotFound,
    Credentials,
    MemoryStore,
    ProviderError,
    ProviderUnavailable,
    Record,
    Status,
    StoreUnavailable,
    TokenManager,
)
from credkeeper._journal import RescueEntry, RescueJournal, fingerprint
from credkeeper.testing import FakeClock, FakeProvider, Fault
from tests.core.test_engine import FailingStore

KEY = "user-review"


def stored(store: MemoryStore, key: str = KEY) -> Record:
    record = store.get(key)
    assert record is not None
    return record


def journal(
    directory: Path, credentials: Credentials, replaces: Credentials, *, days_old: float = 0
) -> Path:
    """Leave in the rescue journal at ``directory`` what a worker on this host journalled
    ``days_old`` days ago (the file's time too) and never wrote: ``credentials``, replacing
    ``replaces``. The entry's file."""
    created = datetime.now(UTC) - timedelta(days=days_old)
    entry_id = RescueJournal.new_id()
    RescueJournal(directory).write(
        RescueEntry(
            id=entry_id,
            key=KEY,
            credentials=credentials,
            replaces=fingerprint(replaces.refresh_token),
            created_at=created,
        )
    )
    path = directory / f"{entry_id}.json"
    os.utime(path, (created.timestamp(), created.timestamp()))
    return path


# Races are staged with events, never with sleeps: a request to the provider is held until the
# test releases it, and a waiter's poll is held until the test lets its time pass.
PATIENCE = 10.0  # real seconds an event may take before the test fails instead of hanging


class HeldClock(FakeClock):
    """A FakeClock whose sleeps wait for the test: ``sleeping`` is set, then ``go`` awaited."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeping = threading.Event()
        self.go = threading.Event()

    def sleep(self, seconds: float) -> None:
        self.sleeping.set()
        assert self.go.wait(PATIENCE), "the test never let the sleeper go on"
        super().sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        self.sleeping.set()
        assert await asyncio.to_thread(self.go.wait, PATIENCE), "the sleeper was never let go"
        await super().asleep(seconds)


class TestSameProcessLease:
    def test_get_and_forced_refresh_in_one_process_refresh_once(self, tmp_path: Path) -> None:
        """A get() and a refresh() racing in one manager present the refresh token once."""
        store = MemoryStore()
        clock = HeldClock()
        arrived, release = threading.Event(), threading.Event()
        with FakeProvider(clock=clock, revoke_family_on_reuse=True) as fake:

            def held(request: httpx.Request) -> httpx.Response:
                arrived.set()
                assert release.wait(PATIENCE), "the test never released the refresh"
                return fake.handler(request)

            with httpx.Client(transport=httpx.MockTransport(held)) as http:
                manager = TokenManager(
                    store, fake.provider(), journal=tmp_path / "j", clock=clock, http=http
                )
                manager.put(KEY, fake.issue(expires_in=0))
                with ThreadPoolExecutor(2) as pool:
                    got = pool.submit(manager.get, KEY)
                    assert arrived.wait(PATIENCE), "the get() never reached the provider"
                    forced = pool.submit(manager.refresh, KEY)
                    # The forced refresh finds the get()'s lease and polls; then the get() ends.
                    assert clock.sleeping.wait(PATIENCE), "the refresh() never met the lease"
                    release.set()
                    first = got.result(PATIENCE)
                    clock.go.set()
                    second = forced.result(PATIENCE)

            assert ["ok"] == [call.outcome for call in fake.refresh_calls]
            assert first == second
            assert "current" == fake.refresh_token_state(stored(store).refresh_token)

    @pytest.mark.anyio
    async def test_async_get_and_failed_refresh_in_one_manager_refresh_once(
        self, tmp_path: Path
    ) -> None:
        """An async get() and refresh(failed=...) racing present the refresh token once."""
        store = MemoryStore()
        clock = HeldClock()
        arrived, release = asyncio.Event(), asyncio.Event()
        with FakeProvider(clock=clock, revoke_family_on_reuse=True) as fake:

            async def held(request: httpx.Request) -> httpx.Response:
                arrived.set()
                await release.wait()
                return fake.handler(request)

            async with (
                httpx.AsyncClient(transport=httpx.MockTransport(held)) as http,
                AsyncTokenManager(
                    store, fake.provider(), journal=tmp_path / "j", clock=clock, http=http
                ) as m,
            ):
                old = fake.issue(expires_in=0)
                await m.put(KEY, old)
                got = asyncio.ensure_future(m.get(KEY))
                await arrived.wait()
                failed = asyncio.ensure_future(m.refresh(KEY, failed=old.access_token))
                assert await asyncio.to_thread(clock.sleeping.wait, PATIENCE)
                release.set()
                first = await got
                clock.go.set()
                second = await failed

            assert ["ok"] == [call.outcome for call in fake.refresh_calls]
            assert first == second
            assert "current" == fake.refresh_token_state(stored(store).refresh_token)


class TestRotatedTokenKept:
    def test_unwritable_journal_does_not_lose_the_rotated_token(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """With the journal directory unusable (read-only or full disk), the store still gets
        the rotated refresh token the provider has already answered with."""
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("")
        store = MemoryStore()
        manager = TokenManager(store, fake.provider(), journal=blocker / "j", clock=clock)
        manager.put(KEY, fake.issue(expires_in=0))

        manager.get(KEY)

        assert 1 == fake.refresh_count
        assert "current" == fake.refresh_token_state(stored(store).refresh_token)

    def test_rotating_answer_with_string_expires_in_keeps_the_new_refresh_token(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A 200 that rotated the token but sends expires_in as a string (as Azure AD v1 does)
        must not leave the consumed refresh token as the only one stored."""
        store = MemoryStore()
        manager = TokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock)
        old = fake.issue(expires_in=0)
        manager.put(KEY, old)
        # The provider rotates server-side and answers with a body credkeeper refuses to parse.
        rotated = fake.rotate(old)
        assert rotated is not None
        body = json.dumps(
            {
                "access_token": rotated.access_token.get_secret_value(),
                "refresh_token": rotated.refresh_token.get_secret_value(),
                "expires_in": "28800",
                "token_type": "Bearer",
            }
        )
        fake.fail_next(Fault.status(200, body=body))

        with contextlib.suppress(ProviderError):
            manager.get(KEY)

        assert "current" == fake.refresh_token_state(stored(store).refresh_token)

    def test_rotating_answer_with_an_unreadable_scope_keeps_the_new_refresh_token(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """Whatever field of a rotating 200 is off, its new refresh token reaches the store."""
        store = MemoryStore()
        manager = TokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock)
        old = fake.issue(expires_in=0)
        manager.put(KEY, old)
        rotated = fake.rotate(old)
        assert rotated is not None
        body = json.dumps(
            {
                "access_token": rotated.access_token.get_secret_value(),
                "refresh_token": rotated.refresh_token.get_secret_value(),
                "expires_in": 28800,
                "scope": {"inference": True},
            }
        )
        fake.fail_next(Fault.status(200, body=body))

        with contextlib.suppress(ProviderError):
            manager.get(KEY)

        assert "current" == fake.refresh_token_state(stored(store).refresh_token)

    def test_unwritable_journal_still_returns_the_stored_refresh(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """When the store took the new tokens, get() returns them even if the journal is
        unusable; no raw OSError escapes the API."""
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("")
        store = MemoryStore()
        manager = TokenManager(store, fake.provider(), journal=blocker / "j", clock=clock)
        manager.put(KEY, fake.issue(expires_in=0))

        fresh = manager.get(KEY)

        assert fresh.refresh_token.get_secret_value() == stored(store).refresh_token


class TestRescuedTokensAreFresh:
    def test_rescue_found_on_invalid_grant_is_refreshed_before_use(self, tmp_path: Path) -> None:
        """A journal entry left by a crashed sibling process hours ago is applied, and get()
        still returns an access token valid beyond the leeway."""
        # The journal's retention is judged on the wall clock: start the fake clock there.
        clock = FakeClock(datetime.now(UTC))
        with FakeProvider(clock=clock) as fake:
            store = MemoryStore()
            journal_dir = tmp_path / "j"
            manager = TokenManager(store, fake.provider(), journal=journal_dir, clock=clock)
            old = fake.issue(expires_in=60)
            manager.put(KEY, old)
            manager.put("other", fake.issue())
            manager.get("other")  # this process has now scanned the journal

            # A sibling process on this host refreshed, journalled the answer, and crashed.
            rotated = fake.rotate(old)
            assert rotated is not None
            journal(journal_dir, rotated, old)
            clock.advance(timedelta(hours=9))

            fresh = manager.get(KEY)

            assert fresh.expires_at > clock.now() + timedelta(minutes=15)
            assert Status.ACTIVE == stored(store).status


class TestJournalRetention:
    def test_an_entry_older_than_retention_is_still_applied(self, tmp_path: Path) -> None:
        """A host back after 31 days replays its journalled tokens, whatever their age: they
        may be the only copy of the user's refresh token."""
        with FakeProvider() as fake:
            store = MemoryStore()
            journal_dir = tmp_path / "j"
            old = fake.issue(expires_in=60)
            TokenManager(store, fake.provider(), journal=journal_dir).put(KEY, old)
            rotated = fake.rotate(old)  # a worker refreshed, journalled, then the host went down
            assert rotated is not None
            journal(journal_dir, rotated, old, days_old=31)

            with TokenManager(store, fake.provider(), journal=journal_dir) as manager:
                manager.get(KEY)

            assert (rotated.refresh_token.get_secret_value(), ["ok"], []) == (
                stored(store).refresh_token,
                [call.outcome for call in fake.refresh_calls],
                list(journal_dir.glob("*.json")),
            )

    @pytest.mark.parametrize(("days", "kept"), [(31, False), (29, True)])
    def test_an_entry_that_does_not_apply_is_removed_past_retention_only(
        self, tmp_path: Path, days: float, kept: bool
    ) -> None:
        """An entry whose replaced token this store does not hold (another store's, or a
        credential replaced since) stays for whoever it belongs to, for 30 days."""
        with FakeProvider() as fake:
            store = MemoryStore()
            journal_dir = tmp_path / "j"
            manager = TokenManager(store, fake.provider(), journal=journal_dir)
            manager.put(KEY, fake.issue())
            entry = journal(journal_dir, fake.issue(), replaces=fake.issue(), days_old=days)

            manager.get(KEY)
            manager.close()

            assert kept == entry.exists()


class TestClassification:
    def test_absurd_retry_after_is_a_provider_unavailable(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A 429 with an out-of-range Retry-After surfaces as ProviderUnavailable, not
        OverflowError, and the lease is released."""
        store = MemoryStore()
        manager = TokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock)
        manager.put(KEY, fake.issue(expires_in=-10))
        fake.fail_next(Fault.status(429, retry_after=10**15))

        with pytest.raises(ProviderUnavailable):
            manager.get(KEY)
        assert stored(store).lease_owner is None


class SlowestJitter(random.Random):
    """Jitter that always picks the longest delay, so the backoff schedule is fixed."""

    def uniform(self, a: float, b: float) -> float:
        return b


class TestLeaseCoversTheWrite:
    def test_store_retries_stop_before_the_lease_ends(
        self, clock: FakeClock, tmp_path: Path
    ) -> None:
        """The holder gives its store write up to the journal before its lease can expire."""
        store = FailingStore()
        with FakeProvider(clock=clock, revoke_family_on_reuse=True) as fake:

            def slow(request: httpx.Request) -> httpx.Response:
                clock.advance(0.2)  # the provider takes 0.2 s to answer
                return fake.handler(request)

            with httpx.Client(transport=httpx.MockTransport(slow)) as http:
                holder = TokenManager(
                    store,
                    fake.provider(timeout=0.8),
                    journal=tmp_path / "a",
                    lease_ttl=1.5,
                    refresh_timeout=0.1,
                    rng=SlowestJitter(),
                    clock=clock,
                    http=http,
                )
                holder.put(KEY, fake.issue(expires_in=0))
                store.failures = 10
                started = clock.now()

                with pytest.raises(StoreUnavailable):
                    holder.get(KEY)
                spent = clock.now() - started
                store.failures = 0
                fresh = holder.get(KEY)

            assert spent < timedelta(seconds=1.5)
            assert ["ok"] == [call.outcome for call in fake.refresh_calls]
            assert "current" == fake.refresh_token_state(fresh.refresh_token)


class TestJournalBelongsToItsStore:
    def test_a_manager_on_another_store_does_not_delete_a_rescue_entry(
        self, tmp_path: Path
    ) -> None:
        """Two stores on one host share the default journal directory; a get() of a key absent
        from one store must not delete the other store's only copy of a rotated token."""
        # The journal's retention is judged on the wall clock: start the fake clock there.
        clock = FakeClock(datetime.now(UTC))
        with FakeProvider(clock=clock) as fake:
            self._scenario(fake, clock, tmp_path / "shared-journal")

    def _scenario(self, fake: FakeProvider, clock: FakeClock, journal_dir: Path) -> None:
        prod = FailingStore()
        prod_manager = TokenManager(prod, fake.provider(), journal=journal_dir, clock=clock)
        prod_manager.put(KEY, fake.issue(expires_in=0))
        prod.failures = 100
        with pytest.raises(StoreUnavailable):
            prod_manager.get(KEY)  # rotated; the new tokens are only in the journal now
        prod.failures = 0

        staging = TokenManager(MemoryStore(), fake.provider(), journal=journal_dir, clock=clock)
        with pytest.raises(CredentialNotFound):
            staging.get(KEY)

        assert 1 == len(list(journal_dir.glob("*.json")))
        restarted = TokenManager(prod, fake.provider(), journal=journal_dir, clock=clock)
        fresh = restarted.get(KEY)

        assert 1 == fake.refresh_count
        assert "current" == fake.refresh_token_state(fresh.refresh_token)
