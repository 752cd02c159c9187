"""Chaos on MongoDB: crashes, outages, a refusing provider, conflicts, skewed clocks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chaos import ChaosCases, Outage, ProxyOutage


class TestChaosOnMongoDB(ChaosCases):
    backend = "MongoDB (SecantusDB)"

    @pytest.fixture
    def store_url(self, mongodb_store_url: str) -> str:
        return f"{mongodb_store_url}?collection=chaos"

    @pytest.fixture
    def outage(self, store_url: str) -> Iterator[Outage]:
        """The server behind a proxy that a test can cut.

        ``directConnection``: the server names its own address as a replica set member, and the
        driver would otherwise move its connections there, past the proxy.
        """
        with ProxyOutage.in_front_of(store_url) as outage:
            outage.url = f"{outage.url}&directConnection=true"
            yield outage
