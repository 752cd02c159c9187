"""Chaos on Secrets Manager: endless conflicts, hosts with skewed clocks."""

from __future__ import annotations

import pytest

from tests.chaos import ChaosCases


class TestChaosOnSecretsManager(ChaosCases):
    @pytest.fixture
    def store_url(self, aws_store_url: str) -> str:
        return aws_store_url
