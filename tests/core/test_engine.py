"""The refresh engine, end to end against FakeProvider over loopback HTTP."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from credkeeper import (
    ConfigurationError,
    CredentialNotFound,
    Credentials,
    KeyRing,
    MemoryStore,
    ProviderError,
    ProviderUnavailable,
    ReauthRequired,
    Record,
    RefreshTimeout,
    Status,
    StoreUnavailable,
    TokenManager,
)
from credkeeper.testing import FakeClock, FakeProvider, Fault

KEY = "user-1"


def stored(store: MemoryStore, key: str = KEY) -> Record:
    record = store.get(key)
    assert record is not None
    return record


class TestGet:
    def test_valid_token_is_returned_without_a_refresh(
        self, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """A token valid beyond the leeway comes back as stored, with no provider call."""
        credentials = fake.issue()
        manager.put(KEY, credentials)

        assert credentials == manager.get(KEY)
        assert 0 == len(fake.refresh_calls)

    def test_due_token_is_refreshed_once_and_stored(
        self, manager: TokenManager, store: MemoryStore, fake: FakeProvider
    ) -> None:
        """A token inside the leeway is refreshed, and the store holds the new tokens."""
        manager.put(KEY, fake.issue(expires_in=60))

        fresh = manager.get(KEY)

        assert 1 == fake.refresh_count
        assert fresh.access_token.get_secret_value() == stored(store).access_token
        assert fresh.refresh_token.get_secret_value() == stored(store).refresh_token
        assert "valid" == fake.access_token_state(fresh.access_token)

    def test_default_leeway_is_fifteen_minutes(
        self, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """A token expiring in 14 minutes is refreshed; one expiring in 16 minutes is not."""
        manager.put("soon", fake.issue(expires_in=14 * 60))
        manager.put("later", fake.issue(expires_in=16 * 60))

        manager.get("soon")
        manager.get("later")

        assert 1 == fake.refresh_count

    def test_unknown_key_raises_credential_not_found(self, manager: TokenManager) -> None:
        """get() of a key never stored names the key."""
        with pytest.raises(CredentialNotFound, match="nobody"):
            manager.get("nobody")

    def test_subscription_type_survives_a_refresh(
        self, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """The token response has no subscription_type, so the stored one is kept."""
        manager.put(KEY, fake.issue(expires_in=0, subscription_type="pro"))

        assert "pro" == manager.get(KEY).subscription_type

    def test_cache_answers_without_a_store_read(
        self, manager: TokenManager, store: MemoryStore, fake: FakeProvider
    ) -> None:
        """Once fetched, a valid credential is served from memory even if the store is gone."""
        manager.put(KEY, fake.issue())
        first = manager.get(KEY)
        store.delete(KEY)

        assert first == manager.get(KEY)

    def test_min_valid_refreshes_a_token_valid_for_less(
        self, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """get(min_valid=2h) refreshes a token valid 1 more hour; the default leeway would not."""
        manager.put(KEY, fake.issue(expires_in=3600))
        manager.get(KEY)
        assert 0 == fake.refresh_count

        fresh = manager.get(KEY, min_valid=timedelta(hours=2))

        assert (1, "valid") == (fake.refresh_count, fake.access_token_state(fresh.access_token))

    def test_min_valid_shorter_than_the_leeway_changes_nothing(
        self, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """min_valid=60 s asks less than the 15-minute leeway: a due token is still refreshed."""
        manager.put(KEY, fake.issue(expires_in=600))

        manager.get(KEY, min_valid=60)

        assert 1 == fake.refresh_count

    def test_min_valid_is_answered_from_the_cache_when_it_allows(
        self, manager: TokenManager, store: MemoryStore, fake: FakeProvider
    ) -> None:
        """A cached token valid for 8 hours answers min_valid=1h without the store."""
        manager.put(KEY, fake.issue())
        first = manager.get(KEY)
        store.delete(KEY)

        assert first == manager.get(KEY, min_valid=3600)

    def test_a_negative_min_valid_is_refused(self, manager: TokenManager) -> None:
        """min_valid=-1: a ConfigurationError naming it."""
        with pytest.raises(ConfigurationError, match="min_valid"):
            manager.get(KEY, min_valid=-1)


class TestRefresh:
    def test_failed_token_still_stored_is_refreshed(
        self, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """After an auth failure, the stored access token that failed is replaced."""
        credentials = fake.issue()
        manager.put(KEY, credentials)

        fresh = manager.refresh(KEY, failed=credentials.access_token)

        assert 1 == fake.refresh_count
        assert credentials.access_token != fresh.access_token

    def test_failed_token_already_replaced_costs_no_provider_call(
        self, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """When a peer already replaced the failed token, its tokens come back as they are."""
        old = fake.issue()
        manager.put(KEY, old)
        newer = fake.rotate(old)
        assert newer is not None
        manager.put(KEY, newer)
        fake.reset_log()

        assert newer == manager.refresh(KEY, failed=old.access_token)
        assert 0 == len(fake.refresh_calls)

    def test_failed_may_be_the_plain_string_the_wrapper_refused(
        self, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """refresh(key, failed=str) works as with the Secret: the stored token is replaced."""
        credentials = fake.issue()
        manager.put(KEY, credentials)

        fresh = manager.refresh(KEY, failed=credentials.access_token.get_secret_value())

        assert (1, False) == (fake.refresh_count, credentials.access_token == fresh.access_token)

    def test_refresh_without_failed_forces_one(
        self, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """refresh(key) refreshes even a token that is far from expiry."""
        credentials = fake.issue()
        manager.put(KEY, credentials)

        assert credentials.refresh_token != manager.refresh(KEY).refresh_token
        assert 1 == fake.refresh_count


class TestInvalidGrant:
    def test_genuine_invalid_grant_marks_needs_reauth_and_keeps_tokens(
        self, manager: TokenManager, store: MemoryStore, fake: FakeProvider
    ) -> None:
        """A revoked credential is marked needs_reauth, its tokens kept, ReauthRequired raised."""
        credentials = fake.issue(expires_in=0)
        manager.put(KEY, credentials)
        fake.revoke(credentials)

        with pytest.raises(ReauthRequired, match=KEY):
            manager.get(KEY)

        record = stored(store)
        assert Status.NEEDS_REAUTH == record.status
        assert credentials.refresh_token.get_secret_value() == record.refresh_token

    def test_needs_reauth_raises_without_calling_the_provider(
        self, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """Later get() calls on a condemned credential never reach the provider."""
        credentials = fake.issue(expires_in=0)
        manager.put(KEY, credentials)
        fake.revoke(credentials)
        with pytest.raises(ReauthRequired):
            manager.get(KEY)
        calls = len(fake.refresh_calls)

        for _ in range(3):
            with pytest.raises(ReauthRequired):
                manager.get(KEY)
        assert calls == len(fake.refresh_calls)

    def test_put_after_reauth_makes_the_key_active(
        self, manager: TokenManager, store: MemoryStore, fake: FakeProvider
    ) -> None:
        """Storing a new login clears needs_reauth."""
        credentials = fake.issue(expires_in=0)
        manager.put(KEY, credentials)
        fake.revoke(credentials)
        with pytest.raises(ReauthRequired):
            manager.get(KEY)

        login = fake.issue()
        manager.put(KEY, login)

        assert login == manager.get(KEY)
        assert Status.ACTIVE == stored(store).status

    def test_lost_race_adopts_the_peer_tokens(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """invalid_grant while the store already holds a newer token: adopt it, stay active."""
        old = fake.issue(expires_in=0)
        peer = TokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock)
        peer.put(KEY, old)

        def peer_wins_first(request: httpx.Request) -> httpx.Response:
            # While this manager's request is on its way, a peer refreshes and stores its tokens.
            newer = fake.rotate(old)
            assert newer is not None
            peer.put(KEY, newer)
            return fake.handler(request)

        with httpx.Client(transport=httpx.MockTransport(peer_wins_first)) as http:
            manager = TokenManager(
                store, fake.provider(), journal=tmp_path / "j", clock=clock, http=http
            )
            adopted = manager.get(KEY)

        assert stored(store).refresh_token == adopted.refresh_token.get_secret_value()
        assert Status.ACTIVE == stored(store).status
        assert ["ok", "invalid_grant"] == [call.outcome for call in fake.refresh_calls]


class TestProviderFailures:
    def test_retry_after_is_honoured_then_the_refresh_succeeds(
        self, manager: TokenManager, fake: FakeProvider, clock: FakeClock
    ) -> None:
        """A 429 with Retry-After is waited out, then the refresh goes through."""
        manager.put(KEY, fake.issue(expires_in=0))
        fake.fail_next(Fault.status(429, retry_after=7))

        manager.get(KEY)

        assert 1 == fake.refresh_count
        assert max(clock.sleeps) >= 7

    def test_soft_refresh_returns_the_still_valid_token(
        self, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """With the provider down, a token inside the leeway but unexpired is still served."""
        credentials = fake.issue(expires_in=120)
        manager.put(KEY, credentials)
        fake.fail_next(*[Fault.status(503)] * 50)

        assert credentials == manager.get(KEY)

    def test_failure_records_a_cooldown_for_the_fleet(
        self, manager: TokenManager, store: MemoryStore, fake: FakeProvider
    ) -> None:
        """After a failed refresh, other workers leave the provider alone during the cooldown."""
        manager.put(KEY, fake.issue(expires_in=120))
        fake.fail_next(*[Fault.status(500)] * 50)
        manager.get(KEY)
        calls = len(fake.refresh_calls)
        other = TokenManager(
            store, fake.provider(), journal=manager.journal, clock=manager.policy.clock
        )

        other.get(KEY)

        assert calls == len(fake.refresh_calls)
        assert stored(store).cooldown_until is not None
        assert "HTTP 500" == stored(store).last_error

    def test_expired_token_and_provider_down_raises_provider_unavailable(
        self, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """With no usable token to fall back on, the provider's failure reaches the caller."""
        manager.put(KEY, fake.issue(expires_in=-10))
        fake.fail_next(*[Fault.status(502)] * 50)

        with pytest.raises(ProviderUnavailable):
            manager.get(KEY)

    def test_timeout_is_retried(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A request that times out is retried with the same refresh token."""
        manager = TokenManager(
            store, fake.provider(timeout=0.3), journal=tmp_path / "j", clock=clock
        )
        manager.put(KEY, fake.issue(expires_in=0))
        fake.fail_next(Fault.timeout(1.0))

        manager.get(KEY)

        assert 1 == fake.refresh_count

    def test_malformed_body_raises_provider_error(
        self, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """A 200 that is not a token response is an error carrying the status."""
        manager.put(KEY, fake.issue(expires_in=-10))
        fake.fail_next(Fault.malformed())

        with pytest.raises(ProviderError) as caught:
            manager.get(KEY)
        assert 200 == caught.value.status


class TestOptions:
    def test_a_duration_that_is_no_number_names_the_option(
        self, store: MemoryStore, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """leeway="15m" is a ConfigurationError saying what leeway takes."""
        with pytest.raises(ConfigurationError, match="leeway must be a timedelta or a number"):
            TokenManager(store, fake.provider(), journal=tmp_path / "j", leeway="15m")  # type: ignore[arg-type]

    def test_a_duration_below_its_minimum_names_the_minimum(
        self, store: MemoryStore, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """lease_ttl=0.5 is refused, naming the one-second minimum."""
        with pytest.raises(ConfigurationError, match="lease_ttl must be at least 1 seconds"):
            TokenManager(store, fake.provider(), journal=tmp_path / "j", lease_ttl=0.5)

    def test_a_lease_shorter_than_a_refresh_is_refused(
        self, store: MemoryStore, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """lease_ttl must outlast refresh_timeout plus the provider's timeout (45 s here)."""
        with pytest.raises(ConfigurationError, match=r"exceed refresh_timeout .*\(45 s\)"):
            TokenManager(store, fake.provider(), journal=tmp_path / "j", lease_ttl=45)

    def test_a_provider_that_is_no_provider_is_refused(
        self, store: MemoryStore, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """A token URL where the Provider goes is a ConfigurationError showing how to build one."""
        with pytest.raises(ConfigurationError, match=r"Provider\.claude_code\(\)"):
            TokenManager(store, fake.token_url, journal=tmp_path / "j")  # type: ignore[arg-type]

    def test_a_keyring_that_is_no_key_ring_is_refused(
        self, store: MemoryStore, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """keyring= takes a KeyRing, not the text of one."""
        with pytest.raises(ConfigurationError, match=r"keyring must be a credkeeper\.KeyRing"):
            TokenManager(
                store,
                fake.provider(),
                journal=tmp_path / "j",
                keyring=KeyRing.generate().export(),  # type: ignore[arg-type]
            )

    def test_put_says_whether_it_created_the_credential(
        self, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """put() returns True when the key was new, False when it replaced a credential."""
        assert [True, False] == [manager.put(KEY, fake.issue()) for _ in range(2)]

    def test_put_of_something_not_credentials_is_refused(self, manager: TokenManager) -> None:
        """put() takes Credentials, not the wrapper's JSON of them."""
        with pytest.raises(ConfigurationError, match=r"must be a credkeeper\.Credentials"):
            manager.put(KEY, {"accessToken": "sk-ant-oat01-x"})  # type: ignore[arg-type]


class TestLease:
    def test_expired_lease_is_taken_over(
        self, manager: TokenManager, store: MemoryStore, fake: FakeProvider, clock: FakeClock
    ) -> None:
        """A lease left by a dead worker past its TTL does not block the refresh."""
        manager.put(KEY, fake.issue(expires_in=0))
        record = stored(store)
        store.put(record.replace(lease_owner="dead", lease_until=clock.now() - timedelta(1)))

        manager.get(KEY)

        assert 1 == fake.refresh_count
        assert stored(store).lease_owner is None

    def test_live_lease_with_expired_token_times_out(
        self, manager: TokenManager, store: MemoryStore, fake: FakeProvider, clock: FakeClock
    ) -> None:
        """Waiting on another worker's lease ends with RefreshTimeout when nothing usable exists."""
        manager.put(KEY, fake.issue(expires_in=-10))
        record = stored(store)
        store.put(record.replace(lease_owner="busy", lease_until=clock.now() + timedelta(hours=1)))

        with pytest.raises(RefreshTimeout, match=KEY):
            manager.get(KEY)
        assert 0 == len(fake.refresh_calls)

    def test_live_lease_with_valid_token_serves_it(
        self, manager: TokenManager, store: MemoryStore, fake: FakeProvider, clock: FakeClock
    ) -> None:
        """While another worker refreshes too slowly, the still-valid token is served."""
        credentials = fake.issue(expires_in=300)
        manager.put(KEY, credentials)
        record = stored(store)
        store.put(record.replace(lease_owner="busy", lease_until=clock.now() + timedelta(hours=1)))

        assert credentials == manager.get(KEY)


class TestClose:
    def test_close_lets_a_refresh_in_flight_store_its_tokens(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """close() from one thread waits for another thread's refresh to store its tokens."""
        store = MemoryStore()
        arrived, release = threading.Event(), threading.Event()

        def held(request: httpx.Request) -> httpx.Response:
            arrived.set()
            release.wait(timeout=30)
            return fake.handler(request)

        with httpx.Client(transport=httpx.MockTransport(held)) as http:
            manager = TokenManager(
                store, fake.provider(), journal=tmp_path / "j", clock=clock, http=http
            )
            manager.put(KEY, fake.issue(expires_in=0))
            caller = threading.Thread(target=manager.get, args=(KEY,))
            caller.start()
            assert arrived.wait(timeout=30)
            closing = threading.Thread(target=manager.close)
            closing.start()
            closing.join(timeout=0.2)
            waited = closing.is_alive()
            release.set()
            closing.join(timeout=30)
            caller.join(timeout=30)

        record = stored(store)
        assert (True, "current", 1) == (
            waited,
            fake.refresh_token_state(record.refresh_token),
            fake.refresh_count,
        )


class FailingStore(MemoryStore):
    """A memory store whose next puts that carry new tokens raise StoreUnavailable.

    Stands in for a database going down between the provider's answer and the store write,
    a fault no real server produces on demand at that exact moment.
    """

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    def put(self, record: Record) -> Record:
        current = self.get(record.key)
        new_tokens = current is not None and current.refresh_token != record.refresh_token
        if new_tokens and self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("the database went away", key=record.key)
        return super().put(record)


class LeakyStore(MemoryStore):
    """A custom store that lets its driver's own exception escape from get()."""

    def get(self, key: str) -> Record | None:
        raise RuntimeError("connection reset by peer")


class TestStoreDown:
    def test_a_driver_error_a_store_lets_escape_is_store_unavailable(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A custom store's own exception reaches the caller as StoreUnavailable naming its type."""
        manager = TokenManager(LeakyStore(), fake.provider(), journal=tmp_path / "j", clock=clock)

        with pytest.raises(StoreUnavailable, match=r"on key 'user-1' \(RuntimeError\)") as caught:
            manager.get(KEY)
        assert RuntimeError is type(caught.value.__cause__)

    def test_store_down_on_the_write_raises_store_unavailable_naming_the_key(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """The caller learns the store did not take the tokens."""
        store = FailingStore()
        manager = TokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock)
        manager.put(KEY, fake.issue(expires_in=0))
        store.failures = 100

        with pytest.raises(StoreUnavailable, match=KEY) as caught:
            manager.get(KEY)
        assert KEY == caught.value.key

    def test_next_get_restores_from_the_journal_without_a_provider_call(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """Tokens the store refused are written from the rescue journal on the next get()."""
        store = FailingStore()
        manager = TokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock)
        manager.put(KEY, fake.issue(expires_in=0))
        store.failures = 100
        with pytest.raises(StoreUnavailable):
            manager.get(KEY)
        store.failures = 0

        fresh = manager.get(KEY)

        assert 1 == fake.refresh_count
        assert "valid" == fake.access_token_state(fresh.access_token)
        assert fresh.refresh_token.get_secret_value() == stored(store).refresh_token
        assert [] == list((tmp_path / "j").glob("*.json"))

    def test_a_brief_outage_is_ridden_out(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """One failed write is retried and the caller never notices."""
        store = FailingStore()
        manager = TokenManager(store, fake.provider(), journal=tmp_path / "j", clock=clock)
        manager.put(KEY, fake.issue(expires_in=0))
        store.failures = 1

        fresh = manager.get(KEY)

        assert fresh.refresh_token.get_secret_value() == stored(store).refresh_token


class TestEncryption:
    def test_store_sees_only_sealed_tokens(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """With a key ring, neither token reaches the store in clear, before or after a refresh."""
        ring = KeyRing.generate()
        manager = TokenManager(
            store, fake.provider(), keyring=ring, journal=tmp_path / "j", clock=clock
        )
        manager.put(KEY, fake.issue(expires_in=0))

        fresh = manager.get(KEY)

        record = stored(store)
        assert KeyRing.is_sealed(record.access_token)
        assert KeyRing.is_sealed(record.refresh_token)
        assert fresh.access_token.get_secret_value() not in repr(record.to_document())
        assert fresh.refresh_token.get_secret_value() not in repr(record.to_document())


class TestDelete:
    def test_delete_removes_the_credential(self, manager: TokenManager, fake: FakeProvider) -> None:
        """After delete(), get() raises CredentialNotFound and delete() reports nothing left."""
        manager.put(KEY, fake.issue())
        manager.get(KEY)

        assert manager.delete(KEY)
        with pytest.raises(CredentialNotFound):
            manager.get(KEY)
        assert not manager.delete(KEY)


class TestThreads:
    def test_fifty_threads_through_an_expiry_refresh_once(
        self, store: MemoryStore, tmp_path: Path
    ) -> None:
        """Fifty threads asking for a due credential cause one provider refresh."""
        with FakeProvider(latency=0.2) as slow:
            manager = TokenManager(store, slow.provider(), journal=tmp_path / "j")
            manager.put(KEY, slow.issue(expires_in=0))
            results: list[Credentials] = []
            barrier = threading.Barrier(50)

            def worker() -> None:
                barrier.wait()
                results.append(manager.get(KEY))

            threads = [threading.Thread(target=worker) for _ in range(50)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)

            assert 1 == slow.refresh_count
            assert 50 == len(results)
            assert 1 == len({c.access_token.get_secret_value() for c in results})
