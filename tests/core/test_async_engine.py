"""AsyncTokenManager drives the same flow as TokenManager, with asyncio I/O."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from credkeeper import (
    AsyncTokenManager,
    KeyRing,
    MemoryStore,
    ReauthRequired,
    Status,
    ThreadOffloadStore,
)
from credkeeper.testing import FakeClock, FakeProvider

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

    async def test_sync_stores_are_offloaded_to_threads(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """A sync store given to the async manager runs behind ThreadOffloadStore."""
        manager = AsyncTokenManager(MemoryStore(), fake.provider(), journal=tmp_path / "j")

        assert isinstance(manager.store, ThreadOffloadStore)
        await manager.close()

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

    async def test_cancelled_caller_does_not_abandon_the_refresh(self, tmp_path: Path) -> None:
        """A caller cancelled mid-refresh leaves the refresh to finish and store its tokens."""
        store = MemoryStore()
        with FakeProvider(latency=0.3) as slow:
            async with AsyncTokenManager(store, slow.provider(), journal=tmp_path / "j") as manager:
                await manager.put(KEY, slow.issue(expires_in=0))
                caller = asyncio.ensure_future(manager.get(KEY))
                await asyncio.sleep(0.1)
                caller.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await caller

                fresh = await manager.get(KEY)

            record = store.get(KEY)
            assert record is not None
            assert fresh.refresh_token.get_secret_value() == record.refresh_token
            assert 1 == slow.refresh_count
            assert "valid" == slow.access_token_state(fresh.access_token)
