"""Chaos on the file store: endless conflicts, processes with skewed clocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import ChaosCases


class TestChaosOnTheFileStore(ChaosCases):
    @pytest.fixture
    def store_url(self, tmp_path: Path) -> str:
        return f"file://{tmp_path / 'credentials.json'}"
