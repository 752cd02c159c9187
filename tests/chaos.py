"""Chaos cases every backend runs: endless write conflicts and hosts whose clocks disagree.

``ChaosCases`` is subclassed once per backend with a ``store_url`` fixture, the way stores
subclass ``StoreConformance``. The conflicts are real: a rival *process* with its own
connection rewrites the record just before each of the engine's writes, so the store itself
refuses the engine's compare-and-swap every time. The skewed hosts are processes whose managers
read clocks up to five minutes apart.
"""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import Iterator
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from credkeeper import (
    Credentials,
    CredentialStore,
    Record,
    StoreContention,
    TokenManager,
    open_store,
)
from credkeeper.testing import FakeProvider, run_storm

# Hosts up to five minutes apart, either side; 61 s is the lease TTL plus one second.
SKEWS = (-300.0, -61.0, 61.0, 300.0)
# Before each call ends at its deadline, the old engine retried without bound; the rival stops
# after this many rewrites so that such an engine ends too, and the test reports the count.
RIVAL_LIMIT = 300


def _rival(url: str, conn: Connection) -> None:
    """The rival process: rewrite the named record (moving only its version) when asked."""
    store = open_store(url)
    try:
        while (key := conn.recv()) is not None:
            try:
                record = store.get(key)
                if record is not None:
                    store.put(record)
                conn.send("ok")
            except Exception as exc:  # noqa: BLE001 - reported to the test process
                conn.send(f"{type(exc).__name__}: {exc}")
    finally:
        store.close()


class RivalWriter:
    """A separate process, with its own store connection, that rewrites records on request."""

    def __init__(self, url: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self._process = context.Process(target=_rival, args=(url, theirs), daemon=True)
        self._process.start()

    def rewrite(self, key: str) -> None:
        """Have the rival write ``key`` now; returns once its write is acknowledged."""
        self._conn.send(key)
        answer = self._conn.recv()
        if answer != "ok":
            raise AssertionError(f"the rival process failed: {answer}")

    def close(self) -> None:
        """Stop the rival process."""
        self._conn.send(None)
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()


class ContendedStore:
    """A real store whose every write first loses to the rival, while ``contended`` is set.

    With ``spare_leases``, writes that take a lease go through, so the engine reaches the
    provider and then cannot store the new tokens.
    """

    def __init__(
        self, store: CredentialStore, rival: RivalWriter, *, spare_leases: bool = False
    ) -> None:
        self.store = store
        self.rival = rival
        self.spare_leases = spare_leases
        self.contended = True
        self.writes = 0
        if hasattr(store, "now"):
            self.now = store.now

    def get(self, key: str) -> Record | None:
        """The real store's record."""
        return self.store.get(key)

    def put(self, record: Record) -> Record:
        """The real store's compare-and-swap, after the rival's write when contended."""
        spared = self.spare_leases and record.lease_owner is not None
        if self.contended:
            self.writes += 1
            if not spared and self.writes <= RIVAL_LIMIT:
                self.rival.rewrite(record.key)
        return self.store.put(record)

    def delete(self, key: str) -> bool:
        """The real store's delete."""
        return self.store.delete(key)

    def scan_due(self, before: datetime) -> Iterator[str]:
        """The real store's scan."""
        return self.store.scan_due(before)

    def close(self) -> None:
        """Close the real store."""
        self.store.close()


class ChaosCases:
    """Endless conflicts end at the deadline without losing tokens; skewed hosts refresh once."""

    @pytest.fixture
    def store_url(self) -> str:
        """The URL of a store on the backend under test; subclasses provide it."""
        raise NotImplementedError

    @pytest.fixture
    def key(self) -> str:
        """A key no other test uses, since backends keep records between tests."""
        return f"chaos-{uuid.uuid4().hex[:10]}"

    @pytest.fixture
    def rival(self, store_url: str) -> Iterator[RivalWriter]:
        """A rival process on the store under test, stopped after the test."""
        rival = RivalWriter(store_url)
        yield rival
        rival.close()

    def manager(
        self, store: CredentialStore, fake: FakeProvider, journal: Path, **options: Any
    ) -> TokenManager:
        """A manager whose calls end within a second, with a lease of 5 s."""
        return TokenManager(
            store,
            fake.provider(timeout=2.0),
            journal=journal,
            refresh_timeout=1.0,
            lease_ttl=5.0,
            **options,
        )

    def contended(
        self,
        store_url: str,
        rival: RivalWriter,
        fake: FakeProvider,
        journal: Path,
        key: str,
        login: Credentials,
        *,
        spare_leases: bool = False,
    ) -> tuple[ContendedStore, TokenManager]:
        """A manager on a store holding ``login`` under ``key``, every later write contended."""
        store = ContendedStore(open_store(store_url), rival, spare_leases=spare_leases)
        manager = self.manager(store, fake, journal)
        store.contended = False
        manager.put(key, login)
        store.contended = True
        return store, manager

    def test_get_under_endless_conflicts_ends_at_the_deadline_naming_the_key(
        self, store_url: str, rival: RivalWriter, key: str, tmp_path: Path
    ) -> None:
        """A lease that can never be taken ends in StoreContention after a few backed-off tries."""
        with FakeProvider() as fake:
            store, manager = self.contended(
                store_url, rival, fake, tmp_path / "journal", key, fake.issue(expires_in=0)
            )

            with pytest.raises(StoreContention, match=key) as caught:
                manager.get(key)

            assert "taking the refresh lease" in str(caught.value)
            assert 0 == fake.refresh_count
            assert store.writes <= 20, f"{store.writes} writes before giving up"
            manager.close()

    def test_put_under_endless_conflicts_ends_at_the_deadline_naming_the_key(
        self, store_url: str, rival: RivalWriter, key: str, tmp_path: Path
    ) -> None:
        """Storing a login that always loses its compare-and-swap ends in StoreContention."""
        with FakeProvider() as fake:
            store, manager = self.contended(
                store_url, rival, fake, tmp_path / "journal", key, fake.issue()
            )

            with pytest.raises(StoreContention, match=key):
                manager.put(key, fake.issue())

            assert store.writes <= 20, f"{store.writes} writes before giving up"
            manager.close()

    def test_new_tokens_that_never_win_the_store_survive_in_the_journal(
        self, store_url: str, rival: RivalWriter, key: str, tmp_path: Path
    ) -> None:
        """New tokens the store keeps refusing stay in the journal and are stored next time."""
        with FakeProvider() as fake:
            store, manager = self.contended(
                store_url,
                rival,
                fake,
                tmp_path / "journal",
                key,
                fake.issue(expires_in=0),
                spare_leases=True,
            )

            with pytest.raises(StoreContention, match="rescue journal"):
                manager.get(key)
            writes = store.writes
            manager.close()
            with self.manager(open_store(store_url), fake, tmp_path / "journal") as later:
                credentials = later.get(key)

            assert (["ok"], "valid", "current") == (
                [call.outcome for call in fake.refresh_calls],
                fake.access_token_state(credentials.access_token),
                fake.refresh_token_state(credentials.refresh_token),
            )
            assert writes <= 30, f"{writes} writes before giving up"

    @pytest.mark.slow
    @pytest.mark.parametrize("repetition", range(5))
    def test_hosts_with_clocks_five_minutes_apart_refresh_once(
        self, repetition: int, store_url: str, key: str, tmp_path: Path
    ) -> None:
        """4 processes whose clocks differ by up to 10 minutes: 1 refresh, 0 errors, no reuse."""
        report = run_storm(store_url, directory=tmp_path, key=key, threads=8, clock_skews=SKEWS)

        assert (1, ("ok",), (), 32, 32) == (
            report.refreshes,
            report.outcomes,
            report.errors,
            report.callers,
            report.holding_current,
        )
