"""``GET /metrics``: the engine's Prometheus metrics plus the service's requests.

The refresh counters and histograms come from :class:`~credkeeper.metrics.RefreshMetrics`,
subscribed to the manager's events; requests are counted by method, route template and status
as they end. The store-wide gauges (credentials by status, due soon) need every record read, so
a scrape refreshes them at most once per :data:`STORE_EVERY`: every replica of a fleet reports
them alike, to aggregate with ``max``. No label ever carries a credential key or a token: a
route is labelled by its template (``/v1/users/{key}/credentials``), an unknown path as
``unmatched``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from credkeeper._exceptions import CredkeeperError
from credkeeper._manager import AsyncTokenManager
from credkeeper._record import END_OF_TIME, Record
from credkeeper._store import AsyncCredentialStore
from credkeeper.metrics import RefreshMetrics

from ._asgi import ASGIApp, HTTPMiddleware, Receive, Scope, Send

__all__ = ["CONTENT_TYPE_LATEST", "MeasureRequests", "ServiceMetrics", "read_records"]

logger = logging.getLogger("credkeeper.server")

#: How long the store gauges of one scrape stand before a scrape reads the store again.
STORE_EVERY = 60.0
#: How long a scrape waits for the store before answering with the gauges it had.
STORE_TIMEOUT = 10.0
# The gauge of credentials due counts those expiring within this window past the leeway.
_DUE_WINDOW = timedelta(minutes=15)
#: How many records one read of many asks the store for at once: enough to keep a connection
#: pool busy, few enough that neither the event loop nor a thread pool is flooded.
READ_BATCH = 64
# The methods a label names; any other is "other", so a client cannot make new series.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# Service answers take milliseconds; a wrapper call up to minutes.
_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0, 120.0)


class ServiceMetrics:
    """The service's registry: the engine's metrics, its requests, and the store's gauges."""

    def __init__(self, manager: AsyncTokenManager) -> None:
        self.manager = manager
        self.engine = RefreshMetrics()
        self.registry = self.engine.registry
        self.requests = Counter(
            "credkeeper_http_requests",
            "Requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "credkeeper_http_request_duration_seconds",
            "From a request's arrival to the end of its answer (a stream's last line).",
            ["method", "route"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self._observed: float | None = None
        self._observing = asyncio.Lock()

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(method=method, route=route, status=str(status)).inc()
        self.latency.labels(method=method, route=route).observe(seconds)

    async def exposition(self) -> bytes:
        """The registry in Prometheus's text format, the store gauges read if they are stale."""
        await self._observe_store()
        journal = self.manager.journal
        await asyncio.to_thread(self.engine.observe_journal, journal)
        return generate_latest(self.registry)

    async def _observe_store(self) -> None:
        async with self._observing:
            now = time.monotonic()
            if self._observed is not None and now - self._observed < STORE_EVERY:
                return
            # Tried again only after STORE_EVERY, failed or not: a store too slow to answer
            # one scrape must not be asked for every record again by the next.
            self._observed = now
            store = self.manager.store
            try:
                records = await asyncio.wait_for(read_records(store, None), STORE_TIMEOUT)
            except (TimeoutError, CredkeeperError) as exc:
                # The gauges keep their last values.
                logger.warning("metrics: could not read the store's records (%s)", exc)
                return
            policy = self.manager.policy
            self.engine.observe_store(records, now=policy.now(), window=policy.leeway + _DUE_WINDOW)


class MeasureRequests(HTTPMiddleware):
    """ASGI middleware counting each HTTP request into :class:`ServiceMetrics` as it ends.

    The matched route is read from the scope once the request is answered: the router writes
    it there, so every middleware between must pass the same scope on, not a copy.
    """

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 500

        async def watched(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.request(method, template, status, time.perf_counter() - started)


async def read_records(
    store: AsyncCredentialStore, keys: Sequence[str] | None
) -> list[Record | None]:
    """The records under ``keys`` (every key the store lists, for ``None``), in that order,
    read :data:`READ_BATCH` at a time."""
    if keys is None:
        keys = [key async for key in store.scan_due(END_OF_TIME)]
    records: list[Record | None] = []
    for start in range(0, len(keys), READ_BATCH):
        batch = keys[start : start + READ_BATCH]
        records += await asyncio.gather(*(store.get(key) for key in batch))
    return records
