"""Engine hardening: a broken journal, endless conflicts, planted plain text, skewed clocks."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from credkeeper import (
    AsyncTokenManager,
    ConfigurationError,
    Credentials,
    KeyRing,
    MemoryStore,
    ProviderError,
    ProviderUnavailable,
    Record,
    RefreshTimeout,
    Secret,
    StoreContention,
    StoreCorrupted,
    TokenManager,
    time_remaining,
)
from credkeeper._journal import RescueEntry, RescueJournal
from credkeeper.testing import FakeClock, FakeProvider, Fault
from tests.core.test_engine import stored

KEY = "user-hardening"


def plain_store(credentials: Credentials) -> MemoryStore:
    """A store holding ``credentials`` under ``KEY`` with unsealed tokens, as if planted."""
    store = MemoryStore()
    store.put(
        Record(
            key=KEY,
            access_token=credentials.access_token.get_secret_value(),
            refresh_token=credentials.refresh_token.get_secret_value(),
            expires_at=credentials.expires_at,
        )
    )
    return store


class RivalMemoryStore(MemoryStore):
    """A memory store where another writer moves the record just before each contended put.

    In-process stand-in for a busy peer, so that backoff and deadlines can be read off a
    FakeClock; tests/chaos.py runs the same race against real servers and a rival process.
    """

    def __init__(self) -> None:
        super().__init__()
        self.contended = False
        self.spare_leases = False
        self.writes = 0

    def put(self, record: Record) -> Record:
        """Let the rival move the record first, while contended, then compare-and-swap."""
        spared = self.spare_leases and record.lease_owner is not None
        if self.contended and not spared:
            self.writes += 1
            current = super().get(record.key)
            if current is not None:
                super().put(current)
        return super().put(record)


class BrokenJournal(RescueJournal):
    """A journal whose listing fails with something other than an OSError.

    Stands in for a bug or a damaged journal raising an unexpected error: no real directory
    makes ``pending`` raise on demand now that the journal skips what it cannot read.
    """

    def pending(self, key: str, *, rescan: bool = False) -> list[RescueEntry]:
        raise ConfigurationError("the journal broke")

    def has_pending(self, key: str) -> bool:
        raise ConfigurationError("the journal broke")


class ClockedStore(MemoryStore):
    """A memory store with a clock of its own, like a database server's."""

    def __init__(self, offset: timedelta = timedelta(0)) -> None:
        super().__init__()
        self.offset = offset
        self.budgets: list[float | None] = []
        self.clock_reads = 0

    def now(self) -> datetime:
        """The store's clock: the system's, plus the offset."""
        self.clock_reads += 1
        return datetime.now(UTC) + self.offset

    def put(self, record: Record) -> Record:
        """Remember the budget the write ran under, then write."""
        self.budgets.append(time_remaining())
        return super().put(record)


class TestJournalFailures:
    def test_an_unusable_journal_key_does_not_lose_the_providers_answer(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A journal.key the journal refuses (mode 0640) still lets new tokens reach the store."""
        journal = tmp_path / "journal"
        journal.mkdir(mode=0o700)
        (journal / "journal.key").write_text(KeyRing.generate().export())
        (journal / "journal.key").chmod(0o640)
        store = MemoryStore()
        manager = TokenManager(store, fake.provider(), journal=journal, clock=clock)
        manager.put(KEY, fake.issue(expires_in=0))

        with caplog.at_level(logging.WARNING, logger="credkeeper"):
            credentials = manager.get(KEY)

        assert ("valid", "current") == (
            fake.access_token_state(credentials.access_token),
            fake.refresh_token_state(stored(store, KEY).refresh_token),
        )
        assert any("rescue journal unwritable" in r.getMessage() for r in caplog.records)

    def test_a_journal_that_fails_to_list_its_entries_does_not_fail_a_get(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """Whatever a journal raises when asked for entries, the call goes on to the store."""
        store = MemoryStore()
        journal = BrokenJournal(tmp_path / "journal")
        manager = TokenManager(store, fake.provider(), journal=journal, clock=clock)
        manager.put(KEY, fake.issue(expires_in=0))

        credentials = manager.get(KEY)

        assert "current" == fake.refresh_token_state(credentials.refresh_token)


class TestSalvagedAnswer:
    @pytest.mark.anyio
    @pytest.mark.parametrize("access_token", [None, "", 42, ["x"], "tok\ud800en"])
    async def test_a_new_refresh_token_is_stored_though_the_access_token_is_unusable(
        self, access_token: object, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """The call fails typed; the store holds the rotated refresh token, already due."""
        store = MemoryStore()
        manager = AsyncTokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock)
        await manager.put(KEY, fake.issue(expires_in=0))
        fake.fail_next(Fault.reshape(lambda answer: {**answer, "access_token": access_token}))

        with pytest.raises(ProviderError, match="access_token"):
            await manager.get(KEY)
        kept = stored(store, KEY)
        kept_state = fake.refresh_token_state(Secret(kept.refresh_token))
        credentials = await manager.get(KEY)

        assert ("current", True) == (kept_state, kept.expires_at <= clock.now())
        assert ("fault:reshape", "ok") == tuple(call.outcome for call in fake.refresh_calls)
        assert "valid" == fake.access_token_state(credentials.access_token)
        await manager.aclose()

    @pytest.mark.parametrize(
        ("field", "value"),
        [("expires_in", None), ("expires_in", "soon"), ("expires_in", 1e400), ("scope", 42)],
    )
    def test_an_answer_of_unknown_lifetime_is_stored_and_not_handed_out(
        self, field: str, value: object, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """An answer whose expiry (or scope) is there but unreadable (null included): its
        tokens are stored, due at once,
        and get() fails typed instead of handing out an access token said to expire now (sent
        to the wrapper, its CLI would refresh by itself and spend the stored refresh token)."""
        store = MemoryStore()
        manager = TokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock)
        manager.put(KEY, fake.issue(expires_in=0))
        fake.fail_next(Fault.reshape(lambda answer: {**answer, field: value}))

        with pytest.raises(ProviderError, match=field):
            manager.get(KEY)
        kept = stored(store, KEY)
        kept_state = fake.refresh_token_state(Secret(kept.refresh_token))
        credentials = manager.get(KEY)

        assert ("current", True) == (kept_state, kept.expires_at <= clock.now())
        assert ("fault:reshape", "ok") == tuple(call.outcome for call in fake.refresh_calls)
        assert credentials.expires_at > clock.now() + timedelta(minutes=15)
        manager.close()


class TestDeadlines:
    def manager(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp: Path
    ) -> TokenManager:
        return TokenManager(
            store, fake.provider(), journal=tmp / "journal", clock=clock, refresh_timeout=5.0
        )

    def contended(
        self, fake: FakeProvider, clock: FakeClock, tmp: Path, login: Credentials
    ) -> tuple[RivalMemoryStore, TokenManager]:
        """A manager on a store holding ``login``, every later write losing to a rival."""
        store = RivalMemoryStore()
        manager = self.manager(store, fake, clock, tmp)
        manager.put(KEY, login)
        store.contended = True
        return store, manager

    def test_a_lease_never_won_ends_in_store_contention_at_the_deadline(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """Endless lease conflicts end after refresh_timeout of backed-off retries, named."""
        store, manager = self.contended(fake, clock, tmp_path, fake.issue(expires_in=0))
        start = clock.now()

        with pytest.raises(StoreContention, match=f"taking the refresh lease for key '{KEY}'"):
            manager.get(KEY)

        assert clock.now() - start <= timedelta(seconds=5)
        assert 0 == fake.refresh_count
        assert store.writes <= 15

    def test_retries_after_a_conflict_back_off_with_jitter(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """The first retry is immediate, later ones wait longer and longer, never the same twice."""
        store, manager = self.contended(fake, clock, tmp_path, fake.issue(expires_in=0))

        with pytest.raises(StoreContention):
            manager.get(KEY)

        assert 4 <= len(clock.sleeps)
        assert store.writes == len(clock.sleeps) + 2  # one retry without a wait, one refused
        assert len(clock.sleeps) == len(set(clock.sleeps))
        assert clock.sleeps[0] < clock.sleeps[-1] <= 1.0

    def test_a_put_never_won_ends_in_store_contention(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """Storing a login against endless conflicts gives up at the deadline, naming the key."""
        _, manager = self.contended(fake, clock, tmp_path, fake.issue())

        with pytest.raises(StoreContention, match=f"storing the credentials for key '{KEY}'"):
            manager.put(KEY, fake.issue())

    def test_a_usable_token_is_served_when_the_lease_is_never_won(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """Within the leeway but unexpired, the current token is served instead of an error."""
        credentials = fake.issue(expires_in=300)
        _, manager = self.contended(fake, clock, tmp_path, credentials)

        assert credentials.access_token == manager.get(KEY).access_token

    def test_tokens_the_store_never_takes_are_kept_for_the_next_call(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A store write that keeps conflicting ends typed; the journal gives the tokens back."""
        store, manager = self.contended(fake, clock, tmp_path, fake.issue(expires_in=0))
        store.spare_leases = True

        with pytest.raises(StoreContention, match="kept in the rescue journal"):
            manager.get(KEY)
        store.contended = False
        credentials = manager.get(KEY)

        assert (["ok"], "current") == (
            [call.outcome for call in fake.refresh_calls],
            fake.refresh_token_state(credentials.refresh_token),
        )

    def test_the_store_sees_the_calls_remaining_budget(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """Every store write of a call runs under a budget no longer than refresh_timeout."""
        store = ClockedStore()
        manager = TokenManager(
            store, fake.provider(), journal=tmp_path / "journal", refresh_timeout=5.0
        )
        manager.put(KEY, fake.issue(expires_in=0))
        store.budgets.clear()
        manager.get(KEY)
        lease, *_, new_tokens = store.budgets

        assert 0 < (lease or 0) <= 5.0
        # Storing new tokens may use the lease's rest: lease_ttl minus the provider's timeout.
        assert 0 < (new_tokens or 0) <= 60.0 - 15.0
        assert None is time_remaining()


class TestPlaintextDowngrade:
    def test_a_plain_token_under_a_key_ring_is_refused_naming_the_key(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """With a key ring, a planted plain-text token is refused as StoreCorrupted."""
        planted = fake.issue(expires_in=3600)
        store = plain_store(planted)
        manager = TokenManager(
            store, fake.provider(), keyring=KeyRing.generate(), journal=tmp_path / "j", clock=clock
        )

        with pytest.raises(StoreCorrupted, match=f"key '{KEY}' is stored in plain text"):
            manager.get(KEY)

    def test_accept_plaintext_serves_plain_tokens_and_warns_once_per_key(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """accept_plaintext=True serves a plain token and logs one WARNING for the key."""
        plain = fake.issue(expires_in=3600)
        store = plain_store(plain)
        manager = TokenManager(
            store,
            fake.provider(),
            keyring=KeyRing.generate(),
            journal=tmp_path / "j",
            clock=clock,
            cache=False,
            accept_plaintext=True,
        )

        with caplog.at_level(logging.WARNING, logger="credkeeper"):
            first, second = manager.get(KEY), manager.get(KEY)

        assert (plain.access_token, plain.access_token) == (first.access_token, second.access_token)
        assert 1 == sum("plain-text" in r.getMessage() for r in caplog.records)

    def test_a_planted_plain_record_can_be_deleted(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """delete() removes a record whose plain tokens a key ring refuses, without an error."""
        store = plain_store(fake.issue())
        manager = TokenManager(
            store, fake.provider(), keyring=KeyRing.generate(), journal=tmp_path / "j", clock=clock
        )

        assert (True, None) == (manager.delete(KEY), store.get(KEY))

    def test_accept_plaintext_must_be_a_bool(self, fake: FakeProvider, tmp_path: Path) -> None:
        """A string such as "false" is refused rather than read as true."""
        with pytest.raises(ConfigurationError, match="accept_plaintext must be True or False"):
            TokenManager(
                MemoryStore(),
                fake.provider(),
                journal=tmp_path / "j",
                accept_plaintext="false",  # type: ignore[arg-type]
            )


class TestMisuse:
    def test_an_async_store_given_to_the_sync_manager_names_the_async_manager(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """TokenManager refuses an asyncio store, naming AsyncTokenManager."""
        async_store = AsyncTokenManager(MemoryStore(), fake.provider(), journal=tmp_path).store

        with pytest.raises(ConfigurationError, match="AsyncTokenManager"):
            TokenManager(async_store, fake.provider(), journal=tmp_path)  # type: ignore[arg-type]

    def test_a_key_ring_of_none_is_a_configuration_error(self) -> None:
        """KeyRing(None) names the ways to build a key ring instead of a bare TypeError."""
        with pytest.raises(ConfigurationError, match=r"KeyRing\.parse"):
            KeyRing(None)  # type: ignore[arg-type]


class TestStoreClock:
    def test_a_host_ahead_of_the_store_does_not_take_over_a_live_lease(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """A manager 5 minutes ahead judges a 60 s lease on the store's clock: it waits."""
        store = ClockedStore()
        credentials = fake.issue(expires_in=0)
        ahead = TokenManager(
            store,
            fake.provider(),
            journal=tmp_path / "j",
            clock=FakeClock(datetime.now(UTC) + timedelta(minutes=5)),
            refresh_timeout=1.0,
        )
        ahead.put(KEY, credentials)
        live = stored(store, KEY).replace(
            lease_owner="peer", lease_until=store.now() + timedelta(seconds=60)
        )
        store.put(live)

        with pytest.raises(RefreshTimeout):
            ahead.get(KEY)

        assert 0 == fake.refresh_count

    def test_a_cooldown_holds_for_a_host_whose_clock_runs_ahead(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """A cooldown written in store time pauses a host 5 minutes ahead for its real length."""
        store = ClockedStore()
        first = TokenManager(
            store,
            fake.provider(),
            journal=tmp_path / "j",
            clock=FakeClock(datetime.now(UTC)),
            refresh_timeout=1.0,  # the provider's 15 s timeout leaves no time for a retry
        )
        first.put(KEY, fake.issue(expires_in=-600))
        fake.fail_next(Fault.status(503))
        with pytest.raises(ProviderUnavailable):
            first.get(KEY)
        ahead = TokenManager(
            store,
            fake.provider(),
            journal=tmp_path / "j",
            clock=FakeClock(datetime.now(UTC) + timedelta(minutes=5)),
        )

        with pytest.raises(ProviderUnavailable) as caught:
            ahead.get(KEY)

        assert 1 == len(fake.refresh_calls)
        assert 0 < (caught.value.retry_after or 0) <= 31

    def test_refreshes_close_together_read_the_store_clock_once(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A reading of the store's clock serves the refreshes of the next 30 seconds."""
        store = ClockedStore()
        manager = TokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock)
        for key in ("alice", "bob"):
            manager.put(key, fake.issue(expires_in=0))

        manager.get("alice")
        manager.get("bob")

        assert (2, 1) == (fake.refresh_count, store.clock_reads)

    def test_a_host_clock_step_after_a_reading_does_not_take_over_a_live_lease(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """The store's clock is carried on the monotonic clock: a host step of 5 minutes
        after reading it does not end a live lease early."""
        store = ClockedStore()
        clock = FakeClock(datetime.now(UTC))
        manager = TokenManager(
            store, fake.provider(), journal=tmp_path / "j", clock=clock, refresh_timeout=1.0
        )
        for key in ("alice", "bob"):
            manager.put(key, fake.issue(expires_in=0))
        manager.get("alice")
        store.put(
            stored(store, "bob").replace(
                lease_owner="peer", lease_until=store.now() + timedelta(seconds=60)
            )
        )
        clock.advance(timedelta(minutes=5))

        with pytest.raises(RefreshTimeout):
            manager.get("bob")

        assert 1 == fake.refresh_count

    def test_a_lease_past_its_end_on_the_store_clock_is_taken_over(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """A manager 5 minutes behind still takes over a lease the store's clock says has ended."""
        store = ClockedStore()
        behind = TokenManager(
            store,
            fake.provider(),
            journal=tmp_path / "j",
            clock=FakeClock(datetime.now(UTC) - timedelta(minutes=5)),
        )
        behind.put(KEY, fake.issue(expires_in=-600))
        store.put(
            stored(store, KEY).replace(
                lease_owner="crashed", lease_until=store.now() - timedelta(seconds=1)
            )
        )

        credentials = behind.get(KEY)

        assert (1, "current") == (
            fake.refresh_count,
            fake.refresh_token_state(credentials.refresh_token),
        )
