"""Chaos on Secrets Manager: crashes, outages, a refusing provider, conflicts, skewed clocks."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pytest

from tests.chaos import ChaosCases, Outage, ProxyOutage
from tests.faultproxy import FaultProxy


def endpoint_of(store_url: str) -> tuple[str, int]:
    """The host and port of the ``endpoint_url`` in an ``aws-sm://`` store URL."""
    endpoint = urlsplit(dict(parse_qsl(urlsplit(store_url).query))["endpoint_url"])
    assert endpoint.hostname is not None
    assert endpoint.port is not None
    return endpoint.hostname, endpoint.port


def through(store_url: str, port: int) -> str:
    """``store_url`` with its ``endpoint_url`` on ``127.0.0.1:port``."""
    parts = urlsplit(store_url)
    query = dict(parse_qsl(parts.query))
    query["endpoint_url"] = f"http://127.0.0.1:{port}"
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote, safe="")))


class TestChaosOnSecretsManager(ChaosCases):
    backend = "Secrets Manager (moto)"

    @pytest.fixture
    def store_url(self, aws_store_url: str) -> str:
        return aws_store_url

    @pytest.fixture
    def outage(self, store_url: str) -> Iterator[Outage]:
        """moto's server behind a proxy that a test can cut."""
        with FaultProxy(endpoint_of(store_url)) as proxy:
            yield ProxyOutage(store_url, proxy, through(store_url, proxy.port))
