"""Chaos on MongoDB: endless conflicts, hosts with skewed clocks."""

from __future__ import annotations

import pytest

from tests.chaos import ChaosCases


class TestChaosOnMongoDB(ChaosCases):
    @pytest.fixture
    def store_url(self, mongodb_store_url: str) -> str:
        return f"{mongodb_store_url}?collection=chaos"
