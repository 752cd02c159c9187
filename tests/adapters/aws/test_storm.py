"""The process storm on Secrets Manager (moto's server): 4 processes x 16 threads, one refresh."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import pytest

from credkeeper import CredentialStore, open_store
from credkeeper.testing import run_storm


def storm(url: str, directory: Path) -> tuple[object, ...]:
    """One storm on a fresh key, deleted afterwards; what the caller checks of its report."""
    key = f"storm-{uuid.uuid4().hex[:8]}"
    try:
        report = run_storm(url, directory=directory, key=key)
    finally:
        store = open_store(url)
        assert isinstance(store, CredentialStore)
        with contextlib.closing(store):
            store.delete(key)
    return (
        report.refreshes,
        report.outcomes,
        report.errors,
        report.callers,
        report.holding_current,
    )


@pytest.mark.slow
@pytest.mark.parametrize("repetition", range(20))
def test_storm_on_secrets_manager_refreshes_once(
    repetition: int, aws_store_url: str, tmp_path: Path
) -> None:
    """64 callers on one due credential in Secrets Manager: 1 refresh, 0 errors, all current."""
    assert (1, ("ok",), (), 64, 64) == storm(aws_store_url, tmp_path)
