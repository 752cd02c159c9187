"""The process storm on MongoDB: 4 processes x 16 threads, exactly one refresh, 20 times over."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from credkeeper.testing import run_storm


@pytest.mark.slow
@pytest.mark.parametrize("repetition", range(20))
def test_storm_on_mongodb_refreshes_once(
    repetition: int, mongodb_store_url: str, tmp_path: Path
) -> None:
    """64 callers on credkeeper's own collection: 1 refresh, 0 errors, all hold the new token."""
    url = f"{mongodb_store_url}?collection=storm"
    report = run_storm(url, directory=tmp_path, key=f"storm-{uuid.uuid4().hex[:8]}")

    assert (1, ("ok",), (), 64, 64) == (
        report.refreshes,
        report.outcomes,
        report.errors,
        report.callers,
        report.holding_current,
    )
