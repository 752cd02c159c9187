"""Events and Prometheus metrics from a real manager refreshing against FakeProvider over HTTP."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from credkeeper import (
    ConfigurationError,
    EventHook,
    KeyRing,
    MemoryStore,
    ReauthRequired,
    RefreshEvent,
    RescueJournal,
    Status,
    TokenManager,
)
from credkeeper.metrics import RefreshMetrics
from credkeeper.testing import FakeClock, FakeProvider, Fault

KEY = "user-1"
LATENCY_COUNT = "credkeeper_provider_request_duration_seconds_count"


def manager_with(
    store: MemoryStore,
    fake: FakeProvider,
    clock: FakeClock,
    tmp_path: Path,
    events: EventHook | None,
) -> TokenManager:
    return TokenManager(
        store, fake.provider(), journal=tmp_path / "journal", clock=clock, events=events
    )


def sample(metrics: RefreshMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class TestEvents:
    def test_a_refresh_tells_the_hook_its_start_call_and_success(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A due credential refreshed once: started, provider_call ok, succeeded ok, in order."""
        seen: list[RefreshEvent] = []
        with manager_with(store, fake, clock, tmp_path, seen.append) as manager:
            manager.put(KEY, fake.issue(expires_in=60))
            manager.get(KEY)

        assert [
            ("refresh_started", KEY, None),
            ("provider_call", KEY, "ok"),
            ("refresh_succeeded", KEY, "ok"),
        ] == [(event.kind, event.key, event.outcome) for event in seen]

    def test_no_event_carries_a_token(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """Neither the old nor the new tokens appear in any event, its repr or its fields."""
        seen: list[RefreshEvent] = []
        old = fake.issue(expires_in=60)
        with manager_with(store, fake, clock, tmp_path, seen.append) as manager:
            manager.put(KEY, old)
            new = manager.get(KEY)
        tokens = [
            secret.get_secret_value()
            for credentials in (old, new)
            for secret in (credentials.access_token, credentials.refresh_token)
        ]

        text = " ".join(repr(event) for event in seen)
        assert seen
        assert [] == [token for token in tokens if token in text]

    def test_a_failing_hook_does_not_fail_the_refresh(
        self,
        store: MemoryStore,
        fake: FakeProvider,
        clock: FakeClock,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A hook raising on every event: the refresh still succeeds, with warnings logged."""

        def broken(event: RefreshEvent) -> None:
            raise RuntimeError("exporter down")

        with manager_with(store, fake, clock, tmp_path, broken) as manager:
            manager.put(KEY, fake.issue(expires_in=60))
            with caplog.at_level(logging.WARNING, logger="credkeeper"):
                fresh = manager.get(KEY)

        assert "valid" == fake.access_token_state(fresh.access_token)
        assert "events hook raised RuntimeError" in caplog.text

    def test_events_are_logged_at_debug_with_structured_fields(
        self,
        store: MemoryStore,
        fake: FakeProvider,
        clock: FakeClock,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Without any hook, each event is a DEBUG record carrying its fields as attributes."""
        with manager_with(store, fake, clock, tmp_path, None) as manager:
            manager.put(KEY, fake.issue(expires_in=60))
            with caplog.at_level(logging.DEBUG, logger="credkeeper"):
                manager.get(KEY)

        fields = [
            (record.credkeeper_event, record.credkeeper_key, record.credkeeper_outcome)
            for record in caplog.records
            if hasattr(record, "credkeeper_event")
        ]
        assert [
            ("refresh_started", KEY, None),
            ("provider_call", KEY, "ok"),
            ("refresh_succeeded", KEY, "ok"),
        ] == fields

    def test_a_hook_that_is_not_callable_is_refused(
        self, store: MemoryStore, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """events=42: a ConfigurationError naming the option."""
        with pytest.raises(ConfigurationError, match="events must be a callable"):
            TokenManager(store, fake.provider(), journal=tmp_path, events=42)  # type: ignore[arg-type]

    def test_a_subscribed_hook_hears_events_beside_the_first(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """subscribe() adds a hook: both it and the constructor's hear the same refresh."""
        first: list[RefreshEvent] = []
        later: list[RefreshEvent] = []
        with manager_with(store, fake, clock, tmp_path, first.append) as manager:
            manager.subscribe(later.append)
            manager.put(KEY, fake.issue(expires_in=60))
            manager.get(KEY)

        assert (3, first) == (len(first), later)

    def test_an_unsubscribed_hook_hears_nothing_more(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """The function subscribe() returns stops the hook; calling it twice is harmless."""
        seen: list[RefreshEvent] = []
        with manager_with(store, fake, clock, tmp_path, None) as manager:
            stop = manager.subscribe(seen.append)
            manager.put(KEY, fake.issue(expires_in=60))
            manager.get(KEY)
            stop()
            stop()
            manager.refresh(KEY)

        assert 3 == len(seen)

    def test_a_hook_already_told_is_refused(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """Subscribing the constructor's hook again: ConfigurationError, not double events."""
        seen: list[RefreshEvent] = []
        with (
            manager_with(store, fake, clock, tmp_path, seen.append) as manager,
            pytest.raises(ConfigurationError, match="twice"),
        ):
            manager.subscribe(seen.append)

    def test_a_failing_subscriber_does_not_silence_the_others(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """One hook raising on every event: the next one still hears each of them."""
        seen: list[RefreshEvent] = []

        def broken(event: RefreshEvent) -> None:
            raise RuntimeError("exporter down")

        with manager_with(store, fake, clock, tmp_path, broken) as manager:
            manager.subscribe(seen.append)
            manager.put(KEY, fake.issue(expires_in=60))
            manager.get(KEY)

        assert ["refresh_started", "provider_call", "refresh_succeeded"] == [
            event.kind for event in seen
        ]

    def test_a_login_over_a_dead_credential_and_a_delete_are_reported(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """needs_reauth, then a new login (recovered), then delete (deleted), in that order."""
        seen: list[RefreshEvent] = []
        with manager_with(store, fake, clock, tmp_path, seen.append) as manager:
            dead = fake.issue(expires_in=60)
            fake.revoke(dead)
            manager.put(KEY, dead)
            with pytest.raises(ReauthRequired):
                manager.get(KEY)
            manager.put(KEY, fake.issue())
            manager.delete(KEY)
            manager.delete(KEY)

        wanted = {"reauth_required", "recovered", "deleted"}
        assert ["reauth_required", "recovered", "deleted"] == [
            event.kind for event in seen if event.kind in wanted
        ]


class TestRefreshMetrics:
    def test_refreshes_are_counted_by_outcome_with_their_latency(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A success and a re-auth: each counted under its outcome, both provider calls timed."""
        metrics = RefreshMetrics()
        with manager_with(store, fake, clock, tmp_path, metrics) as manager:
            manager.put(KEY, fake.issue(expires_in=60))
            manager.get(KEY)
            dead = fake.issue(expires_in=60)
            fake.revoke(dead)
            manager.put("user-2", dead)
            with pytest.raises(ReauthRequired):
                manager.get("user-2")

        assert (1.0, 1.0, 1.0, 1.0, 2.0, 0.0) == (
            sample(metrics, "credkeeper_refreshes_total", result="succeeded", outcome="ok"),
            sample(metrics, "credkeeper_refreshes_total", result="failed", outcome="invalid_grant"),
            sample(metrics, "credkeeper_events_total", kind="reauth_required"),
            sample(
                metrics,
                "credkeeper_provider_request_duration_seconds_count",
                outcome="invalid_grant",
            ),
            sample(metrics, "credkeeper_refresh_duration_seconds_count", result="succeeded")
            + sample(metrics, "credkeeper_refresh_duration_seconds_count", result="failed"),
            sample(metrics, "credkeeper_refreshes_in_flight"),
        )

    def test_a_throttled_provider_is_a_cooldown_and_a_throttled_call(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """429s past the deadline: throttled calls, one failed refresh, one cooldown."""
        metrics = RefreshMetrics()
        with TokenManager(
            store,
            fake.provider(),
            journal=tmp_path / "journal",
            clock=clock,
            events=metrics,
            refresh_timeout=1.0,
            lease_ttl=60.0,
        ) as manager:
            manager.put(KEY, fake.issue(expires_in=600))
            fake.fail_next(*[Fault.status(429, retry_after=5)] * 5)
            manager.get(KEY)

        assert (1.0, 1.0) == (
            sample(metrics, "credkeeper_refreshes_total", result="failed", outcome="unavailable"),
            sample(metrics, "credkeeper_events_total", kind="cooldown"),
        )
        assert (
            sample(
                metrics, "credkeeper_provider_request_duration_seconds_count", outcome="throttled"
            )
            >= 1.0
        )

    def test_the_exposition_holds_no_key_and_no_token(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """The text Prometheus scrapes names no user and no token."""
        metrics = RefreshMetrics()
        with manager_with(store, fake, clock, tmp_path, metrics) as manager:
            manager.put(KEY, fake.issue(expires_in=60))
            fresh = manager.get(KEY)

        text = generate_latest(metrics.registry).decode()
        assert "credkeeper_refreshes_total" in text
        assert [] == [
            secret for secret in (KEY, fresh.access_token.get_secret_value()) if secret in text
        ]

    def test_store_gauges_count_statuses_and_credentials_due(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """Two active (one due within the window), one needing re-auth."""
        metrics = RefreshMetrics()
        with manager_with(store, fake, clock, tmp_path, None) as manager:
            manager.put("a", fake.issue(expires_in=600))
            manager.put("b", fake.issue(expires_in=8 * 3600))
            manager.put("c", fake.issue(expires_in=600))
        condemned = store.get("c")
        assert condemned is not None
        store.put(condemned.replace(status=Status.NEEDS_REAUTH))

        metrics.observe_store(
            (store.get(key) for key in ("a", "b", "c", "gone")),
            now=clock.now(),
            window=timedelta(hours=1),
        )

        assert (2.0, 1.0, 1.0) == (
            sample(metrics, "credkeeper_credentials", status="active"),
            sample(metrics, "credkeeper_credentials", status="needs_reauth"),
            sample(metrics, "credkeeper_credentials_due"),
        )

    def test_journal_gauge_counts_entry_files(self, tmp_path: Path) -> None:
        """Entry files waiting in the journal directory are counted without being opened."""
        journal = RescueJournal(tmp_path / "journal", keyring=KeyRing.generate())
        (tmp_path / "journal").mkdir(mode=0o700)
        for name in ("1-a.json", "2-b.json", "journal.key"):
            (tmp_path / "journal" / name).write_text("{}")
        metrics = RefreshMetrics()

        metrics.observe_journal(journal)

        assert 2.0 == sample(metrics, "credkeeper_journal_entries_pending")

    def test_instances_do_not_clash(self) -> None:
        """Two RefreshMetrics in one process each have their own registry."""
        first, second = RefreshMetrics(), RefreshMetrics()

        assert first.registry is not second.registry

    def test_a_naive_now_is_refused(self) -> None:
        """observe_store(now=naive): a ConfigurationError naming the fix."""
        with pytest.raises(ConfigurationError, match="aware datetime"):
            RefreshMetrics().observe_store([], now=datetime(2026, 1, 1), window=timedelta(0))
