"""Chaos on the file store: crashes, a held write lock, a refusing provider, conflicts, skew."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos import ChaosCases, LockOutage, Outage, _hold_flock


class TestChaosOnTheFileStore(ChaosCases):
    backend = "file"

    @pytest.fixture
    def store_url(self, tmp_path: Path) -> str:
        return f"file://{tmp_path / 'credentials.json'}"

    @pytest.fixture
    def outage(self, tmp_path: Path, store_url: str) -> Iterator[Outage]:
        """No server to cut: another process holds the store's write lock for the window."""
        outage = LockOutage(store_url, _hold_flock, f"{tmp_path / 'credentials.json'}.lock")
        yield outage
        outage.end()
