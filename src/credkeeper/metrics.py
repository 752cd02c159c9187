"""Prometheus metrics from the refresh engine's events (the ``metrics`` extra).

A :class:`RefreshMetrics` is an events hook: give it to a manager and expose its registry::

    metrics = RefreshMetrics()
    manager = TokenManager(store, provider, keyring=keyring, events=metrics)
    prometheus_client.start_http_server(9464, registry=metrics.registry)

What the engine decides becomes counters and histograms as it happens. What only the store knows
(credentials by status, how many are due soon) is set by :meth:`RefreshMetrics.observe_store`,
for whoever reads the records on a schedule; the rescue journal's entry files by
:meth:`RefreshMetrics.observe_journal`. Every replica of a fleet reports the same store-wide
gauges: aggregate them with ``max``, not ``sum``. No metric carries a token or a key: a label
per user would grow without bound.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable
from datetime import datetime, timedelta

from ._events import EventKind, RefreshEvent
from ._exceptions import ConfigurationError
from ._journal import RescueJournal
from ._record import Record, Status

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "credkeeper.metrics needs prometheus-client: pip install 'credkeeper[metrics]'"
    ) from exc

__all__ = ["RefreshMetrics"]

# Provider round trips: tens of milliseconds to the 15 s default timeout.
_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0)
# A whole refresh adds retries, backoff and the store writes to that.
_REFRESH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Events counted as they are, by kind; the refresh's own and the provider's have their metrics.
_COUNTED = (
    EventKind.ADOPTED,
    EventKind.REAUTH_REQUIRED,
    EventKind.COOLDOWN,
    EventKind.JOURNAL_RESCUE,
    EventKind.REFRESH_DEFERRED,
    EventKind.RECOVERED,
    EventKind.DELETED,
)


class RefreshMetrics:
    """The engine's Prometheus metrics, fed by its events; call it as a manager's ``events``.

    ``registry`` defaults to a new :class:`~prometheus_client.CollectorRegistry` of its own, so
    that two instances (two managers in one test, say) never clash; pass
    ``prometheus_client.REGISTRY`` to publish in the process-wide default.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        on = self.registry
        self.refreshes = Counter(
            "credkeeper_refreshes",
            "Refreshes ended, by result (succeeded, failed) and outcome.",
            ["result", "outcome"],
            registry=on,
        )
        self.refresh_seconds = Histogram(
            "credkeeper_refresh_duration_seconds",
            "From taking the lease to the refresh's end.",
            ["result"],
            buckets=_REFRESH_BUCKETS,
            registry=on,
        )
        self.provider_seconds = Histogram(
            "credkeeper_provider_request_duration_seconds",
            "Token endpoint round trips, by outcome (ok, invalid_grant, throttled, ...).",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=on,
        )
        self.in_flight = Gauge(
            "credkeeper_refreshes_in_flight", "Refreshes started and not yet ended.", registry=on
        )
        self.events = Counter(
            "credkeeper_events",
            "Engine events by kind: adopted, reauth_required, cooldown, journal_rescue, "
            "refresh_deferred, recovered, deleted.",
            ["kind"],
            registry=on,
        )
        self.lease_conflicts = Counter(
            "credkeeper_lease_conflicts",
            "Lease compare-and-swaps lost to another writer.",
            registry=on,
        )
        self.credentials = Gauge(
            "credkeeper_credentials",
            "Credentials in the store by status, at the last observe_store().",
            ["status"],
            registry=on,
        )
        self.due = Gauge(
            "credkeeper_credentials_due",
            "Credentials due within the window, at the last observe_store().",
            registry=on,
        )
        self.journal_pending = Gauge(
            "credkeeper_journal_entries_pending",
            "Rescue-journal entries waiting to be written to the store.",
            registry=on,
        )
        for kind in _COUNTED:
            self.events.labels(kind=kind.value)
        for status in Status:
            self.credentials.labels(status=status.value)

    def __repr__(self) -> str:
        return f"RefreshMetrics(registry={self.registry!r})"

    def __call__(self, event: RefreshEvent) -> None:
        """Record one event (the events hook)."""
        kind = event.kind
        if kind is EventKind.REFRESH_STARTED:
            self.in_flight.inc()
        elif kind in (EventKind.REFRESH_SUCCEEDED, EventKind.REFRESH_FAILED):
            result = "succeeded" if kind is EventKind.REFRESH_SUCCEEDED else "failed"
            self.in_flight.dec()
            self.refreshes.labels(result=result, outcome=event.outcome or "unknown").inc()
            if event.duration is not None:
                self.refresh_seconds.labels(result=result).observe(event.duration)
        elif kind is EventKind.PROVIDER_CALL:
            if event.duration is not None:
                self.provider_seconds.labels(outcome=event.outcome or "unknown").observe(
                    event.duration
                )
        elif kind is EventKind.LEASE_CONFLICT:
            self.lease_conflicts.inc()
        else:
            self.events.labels(kind=kind.value).inc()

    def observe_store(
        self, records: Iterable[Record | None], *, now: datetime, window: timedelta
    ) -> None:
        """Set the store gauges from ``records`` (every credential, read once by the caller):
        how many hold each status, and how many active ones expire within ``window`` of ``now``.
        """
        if now.utcoffset() is None:
            raise ConfigurationError("now must be an aware datetime (use datetime.now(UTC))")
        statuses: Tally[Status] = Tally()
        due = 0
        horizon = now + window
        for record in records:
            if record is None:
                continue
            statuses[record.status] += 1
            due += record.status is Status.ACTIVE and record.expires_at <= horizon
        for status in Status:
            self.credentials.labels(status=status.value).set(statuses[status])
        self.due.set(due)

    def observe_journal(self, journal: RescueJournal) -> None:
        """Set the pending-entries gauge from ``journal``."""
        self.journal_pending.set(journal.count_pending())
