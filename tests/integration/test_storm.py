"""The storm: one due credential, many processes and threads, exactly one refresh."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from credkeeper import AsyncTokenManager, Credentials, MemoryStore
from credkeeper.testing import FakeProvider, run_storm


@pytest.mark.slow
@pytest.mark.parametrize("repetition", range(20))
def test_process_storm_on_the_file_store_refreshes_once(repetition: int, tmp_path: Path) -> None:
    """4 processes x 16 threads on one file store: 1 refresh, 0 errors, all hold the new token."""
    report = run_storm(f"file://{tmp_path / 'credentials.json'}", directory=tmp_path)

    assert (1, ("ok",), (), 64, 64) == (
        report.refreshes,
        report.outcomes,
        report.errors,
        report.callers,
        report.holding_current,
    )


@pytest.mark.anyio
async def test_two_hundred_tasks_refresh_once(tmp_path: Path) -> None:
    """200 asyncio tasks asking for one due credential cause a single provider refresh."""
    with FakeProvider(latency=0.2, revoke_family_on_reuse=True) as fake:
        async with AsyncTokenManager(
            MemoryStore(), fake.provider(), journal=tmp_path / "journal"
        ) as manager:
            await manager.put("user", fake.issue(expires_in=0))

            results: list[Credentials] = await asyncio.gather(
                *(manager.get("user") for _ in range(200))
            )

        assert 1 == fake.refresh_count
        assert ("ok",) == tuple(call.outcome for call in fake.refresh_calls)
        assert {"valid"} == {fake.access_token_state(c.access_token) for c in results}
        assert 1 == len({c.access_token for c in results})
