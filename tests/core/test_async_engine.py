"""AsyncTokenManager drives the same flow as TokenManager, with asyncio I/O."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from credkeeper import (
    AsyncTokenManager,
    ConfigurationError,
    Credentials,
    KeyRing,
    MemoryStore,
    ReauthRequired,
    Status,
    StoreUnavailable,
)
from credkeeper._journal import RescueEntry, RescueJournal, fingerprint
from credkeeper._store import ThreadOffloadStore
from credkeeper.testing import FakeClock, FakeProvider
from tests.core.test_engine import FailingStore, LeakyStore

pytestmark = pytest.mark.anyio

KEY = "user-async"


class TestAsyncTokenManager:
    async def test_due_token_is_refreshed_and_stored(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A due credential is refreshed once, and the store holds the new tokens."""
        store = MemoryStore()
        async with AsyncTokenManager(
            store, fake.provider(), journal=tmp_path / "j", clock=clock
        ) as manager:
            await manager.put(KEY, fake.issue(expires_in=0))

            fresh = await manager.get(KEY)

        record = store.get(KEY)
        assert record is not None
        assert fresh.refresh_token.get_secret_value() == record.refresh_token
        assert 1 == fake.refresh_count

    async def test_min_valid_refreshes_a_token_valid_for_less(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """get(min_valid=2h) refreshes a token valid one more hour, once."""
        async with AsyncTokenManager(
            MemoryStore(), fake.provider(), journal=tmp_path / "j", clock=clock
        ) as manager:
            await manager.put(KEY, fake.issue(expires_in=3600))
            await manager.get(KEY)
            await manager.get(KEY, min_valid=7200)
            await manager.get(KEY, min_valid=7200)

        assert 1 == fake.refresh_count

    async def test_sync_stores_are_offloaded_to_threads(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """A sync store given to the async manager runs behind ThreadOffloadStore."""
        manager = AsyncTokenManager(MemoryStore(), fake.provider(), journal=tmp_path / "j")

        assert isinstance(manager.store, ThreadOffloadStore)
        await manager.aclose()

    async def test_revoked_credential_raises_reauth_required(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """invalid_grant with nothing newer stored marks needs_reauth and raises."""
        store = MemoryStore()
        async with AsyncTokenManager(
            store,
            fake.provider(),
            keyring=KeyRing.generate(),
            journal=tmp_path / "j",
            clock=clock,
        ) as manager:
            credentials = fake.issue(expires_in=0)
            await manager.put(KEY, credentials)
            fake.revoke(credentials)

            with pytest.raises(ReauthRequired, match=KEY):
                await manager.get(KEY)

        record = store.get(KEY)
        assert record is not None
        assert Status.NEEDS_REAUTH == record.status

    async def test_cancelled_caller_does_not_abandon_the_refresh(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A caller cancelled mid-refresh leaves the refresh to finish and store its tokens."""
        store = MemoryStore()
        arrived, release = asyncio.Event(), asyncio.Event()
        sent: list[httpx.Request] = []

        async def held(request: httpx.Request) -> httpx.Response:
            sent.append(request)
            arrived.set()
            await release.wait()
            return fake.handler(request)

        async with (
            httpx.AsyncClient(transport=httpx.MockTransport(held)) as http,
            AsyncTokenManager(
                store, fake.provider(), journal=tmp_path / "j", clock=clock, http=http
            ) as manager,
        ):
            await manager.put(KEY, fake.issue(expires_in=0))
            caller = asyncio.ensure_future(manager.get(KEY))
            await arrived.wait()
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            release.set()

            fresh = await manager.get(KEY)

        record = store.get(KEY)
        assert record is not None
        assert fresh.refresh_token.get_secret_value() == record.refresh_token
        assert (1, 1) == (len(sent), fake.refresh_count)
        assert "valid" == fake.access_token_state(fresh.access_token)

    async def test_aclose_lets_a_refresh_in_flight_store_its_tokens(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """aclose() waits for a refresh whose caller gave up, so its new tokens are stored."""
        store = MemoryStore()
        arrived, release = asyncio.Event(), asyncio.Event()

        async def held(request: httpx.Request) -> httpx.Response:
            arrived.set()
            await release.wait()
            return fake.handler(request)

        async with httpx.AsyncClient(transport=httpx.MockTransport(held)) as http:
            manager = AsyncTokenManager(
                store, fake.provider(), journal=tmp_path / "j", clock=clock, http=http
            )
            await manager.put(KEY, fake.issue(expires_in=0))
            caller = asyncio.ensure_future(manager.get(KEY))
            await arrived.wait()
            caller.cancel()
            closing = asyncio.ensure_future(manager.aclose())
            for _ in range(10):
                await asyncio.sleep(0)
            waited = not closing.done()
            release.set()
            await closing

        record = store.get(KEY)
        assert record is not None
        assert (True, "current", 1) == (
            waited,
            fake.refresh_token_state(record.refresh_token),
            fake.refresh_count,
        )


class TestAsyncDriver:
    """The async driver performs each effect as the sync one does; these mirror test_engine."""

    async def test_repr_names_the_store_and_the_provider(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """repr() shows the store and the provider profile, nothing more."""
        async with AsyncTokenManager(
            MemoryStore(), fake.provider(), journal=tmp_path / "j"
        ) as manager:
            expected = f"AsyncTokenManager(store={manager.store!r}, provider='claude-code')"

            assert expected == repr(manager)

    async def test_put_says_whether_it_created_the_credential(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """put() returns True when the key was new, False when it replaced a credential."""
        async with AsyncTokenManager(
            MemoryStore(), fake.provider(), journal=tmp_path / "j"
        ) as manager:
            assert [True, False] == [await manager.put(KEY, fake.issue()) for _ in range(2)]

    async def test_put_of_something_not_credentials_is_refused(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """put() takes Credentials, not the wrapper's JSON of them."""
        async with AsyncTokenManager(
            MemoryStore(), fake.provider(), journal=tmp_path / "j"
        ) as manager:
            with pytest.raises(ConfigurationError, match=r"must be a credkeeper\.Credentials"):
                await manager.put(KEY, {"accessToken": "sk-ant-oat01-x"})  # type: ignore[arg-type]

    async def test_delete_removes_the_credential(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """After delete(), the store holds nothing and a second delete() reports nothing left."""
        store = MemoryStore()
        async with AsyncTokenManager(
            store, fake.provider(), journal=tmp_path / "j", clock=clock
        ) as manager:
            await manager.put(KEY, fake.issue())

            removed = (await manager.delete(KEY), await manager.delete(KEY))

        assert ((True, False), None) == (removed, store.get(KEY))

    async def test_delete_leaves_another_store_rescue_entry_on_disk(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A rescue entry replacing a token this store never held is forgotten, not deleted."""
        journal = tmp_path / "j"
        login = fake.issue()
        RescueJournal(journal).write(
            RescueEntry(
                id=RescueJournal.new_id(),
                key=KEY,
                credentials=login,
                replaces=fingerprint(fake.issue().refresh_token),
                created_at=clock.now(),
            )
        )
        async with AsyncTokenManager(
            MemoryStore(), fake.provider(), journal=journal, clock=clock
        ) as manager:
            await manager.put(KEY, login)

            await manager.delete(KEY)

        assert 1 == len(list(journal.glob("*.json")))

    async def test_a_brief_store_outage_is_ridden_out(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """One failed write of the new tokens is retried and the caller never notices."""
        store = FailingStore()
        async with AsyncTokenManager(
            store, fake.provider(), journal=tmp_path / "j", clock=clock
        ) as manager:
            await manager.put(KEY, fake.issue(expires_in=0))
            store.failures = 1

            fresh = await manager.get(KEY)

        record = store.get(KEY)
        assert record is not None
        assert fresh.refresh_token.get_secret_value() == record.refresh_token

    async def test_a_driver_error_a_store_lets_escape_is_store_unavailable(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A custom store's own exception reaches the caller as StoreUnavailable naming its type."""
        async with AsyncTokenManager(
            LeakyStore(), fake.provider(), journal=tmp_path / "j", clock=clock
        ) as manager:
            with pytest.raises(
                StoreUnavailable, match=r"on key 'user-async' \(RuntimeError\)"
            ) as caught:
                await manager.get(KEY)

        assert RuntimeError is type(caught.value.__cause__)

    async def test_refresh_with_failed_as_a_string_replaces_the_stored_token(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """refresh(key, failed=str) refreshes while the store still holds that access token."""
        credentials: Credentials = fake.issue()
        async with AsyncTokenManager(
            MemoryStore(), fake.provider(), journal=tmp_path / "j", clock=clock
        ) as manager:
            await manager.put(KEY, credentials)

            fresh = await manager.refresh(KEY, failed=credentials.access_token.get_secret_value())

        assert (1, False) == (fake.refresh_count, credentials.access_token == fresh.access_token)
