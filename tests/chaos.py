"""Chaos cases every backend runs: crashes, outages, a refusing provider, skewed clocks.

``ChaosCases`` is subclassed once per backend with a ``store_url`` and an ``outage`` fixture,
the way stores subclass ``StoreConformance``. Every fault is real:

- **Crashes.** A fleet of worker processes (3 processes x 4 threads) asks for one due
  credential; the first process to reach a crash point of the refresh dies there by SIGKILL
  while it holds the lease, and the test, as a supervisor would, starts it again with the same
  rescue journal. Everyone keeps asking until they get a token.
- **Store outages.** The store becomes unreachable while the lease holder waits for the
  provider's answer and comes back a moment later (``Outage``: a TCP proxy cut in front of a
  server, another process holding the file's or the database's write lock).
- **A refusing provider.** The fake provider answers 429 (with ``Retry-After``) or 503 to every
  refresh for a window, while the stored access token is still valid or already expired.
- **Endless conflicts.** A rival *process* with its own connection rewrites the record just
  before each of the engine's writes, so the store itself refuses the engine's
  compare-and-swap every time.
- **Skewed hosts.** Processes whose managers read clocks up to five minutes apart.

Each fleet case measures credentials lost (the store no longer holds the provider's current
tokens), needless ``needs_reauth`` (a re-login asked for although the new tokens were safe on
disk) and provider calls for the one expiry, and adds them to the table ``tests/chaos_table.py``
prints at the end of the run (``docs/reliability.md`` explains each case).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import multiprocessing
import os
import queue
import signal
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit

import pytest
from benchmarks._forwarding import ForwardingStore

from credkeeper import (
    Credentials,
    CredentialStore,
    EventKind,
    KeyRing,
    Provider,
    ReauthRequired,
    Record,
    RefreshEvent,
    Secret,
    Status,
    StoreContention,
    TokenManager,
    open_store,
)
from credkeeper.testing import FakeProvider, Fault, run_storm
from credkeeper.testing._storm import _PRELOAD, process_context
from tests import chaos_table
from tests.backends import with_address
from tests.faultproxy import FaultProxy

# Hosts up to five minutes apart, either side; 61 s is the lease TTL plus one second.
SKEWS = (-300.0, -61.0, 61.0, 300.0)
# Before each call ends at its deadline, the old engine retried without bound; the rival stops
# after this many rewrites so that such an engine ends too, and the test reports the count.
RIVAL_LIMIT = 300


def sync_store(url: str) -> CredentialStore:
    """The synchronous store ``url`` names: every chaos process drives a TokenManager."""
    store = open_store(url)
    assert isinstance(store, CredentialStore), f"{url} opened an asyncio store"
    return store


def _rival(url: str, conn: Connection) -> None:
    """The rival process: rewrite the named record (moving only its version) when asked."""
    store = sync_store(url)
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
        context = process_context()
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


class ContendedStore(ForwardingStore):
    """A real store whose every write first loses to the rival, while ``contended`` is set.

    With ``spare_leases``, writes that take a lease go through, so the engine reaches the
    provider and then cannot store the new tokens.
    """

    def __init__(
        self, store: CredentialStore, rival: RivalWriter, *, spare_leases: bool = False
    ) -> None:
        super().__init__(store)
        self.rival = rival
        self.spare_leases = spare_leases
        self.contended = True
        self.writes = 0

    def put(self, record: Record) -> Record:
        """The real store's compare-and-swap, after the rival's write when contended."""
        spared = self.spare_leases and record.lease_owner is not None
        if self.contended:
            self.writes += 1
            if not spared and self.writes <= RIVAL_LIMIT:
                self.rival.rewrite(record.key)
        return self.store.put(record)


# -- the fleet ---------------------------------------------------------------------------

PROCESSES = 3
THREADS = 4
CALLERS = PROCESSES * THREADS
# Every fleet manager's timeouts. A call gives up after a second, so waiting callers ask again
# (as a worker's retry loop would). The lease is short, so that a dead holder's lease runs out
# within the test, yet longer than a killed worker takes to start again and replay its journal
# on this machine (up to 3 s for a Secrets Manager worker on 2 busy cores): see
# test_a_worker_restarted_after_its_lease_expired_loses_nothing for a restart slower than that.
REFRESH_TIMEOUT = 1.0
PROVIDER_TIMEOUT = 1.0
LEASE_TTL = 5.0
COOLDOWN = 0.5
LEEWAY = timedelta(minutes=15)
# How long a caller keeps asking before it reports that it gave up.
PATIENCE = 30.0
# How long a store outage or a provider's refusals last.
OUTAGE = 2.5
PROVIDER_WINDOW = 1.0
# The crash points of the refresh, in the order a refresh passes them; see ``_Crash``.
LEASE_TAKEN = "lease taken"
ANSWER_IN_MEMORY = "answer in memory"
ANSWER_JOURNALED = "answer journaled"
MID_WRITE = "mid-write"
WRITTEN = "written"
_STORE_POINTS = frozenset({ANSWER_JOURNALED, MID_WRITE, WRITTEN})
# Events the workers pass on to the test, which reports how each fault was survived.
_REPORTED = frozenset(
    {EventKind.REFRESH_FAILED, EventKind.JOURNAL_RESCUE, EventKind.ADOPTED, EventKind.COOLDOWN}
)


def _fingerprint(token: Secret) -> str:
    return hashlib.sha256(token.get_secret_value().encode()).hexdigest()


@dataclass(frozen=True)
class Fleet:
    """What every worker process of a fleet is told: where, whom to ask, where to die."""

    store_url: str
    token_url: str
    keys: str
    journal: str
    key: str
    # A fresh credential each worker serves first, as workers already running would.
    warm_key: str
    crash: str | None = None
    # The file whose creation elects the one process that dies at ``crash``.
    victim: str = ""
    # Seconds after the write of new tokens begins that a ``MID_WRITE`` crash is sent.
    kill_delay: float = 0.0


class _Crash:
    """The fleet's crash point, reached through the events hook and the store's ``put``.

    The first process of the fleet to reach the point (elected by creating the ``victim``
    file) kills itself with SIGKILL there; every later one goes on. ``started`` is set when
    any worker takes the lease, for tests that strike while a refresh is under way.
    """

    def __init__(self, fleet: Fleet, started: Any, results: Any) -> None:
        self.point = fleet.crash
        self.victim = fleet.victim
        self.kill_delay = fleet.kill_delay
        self.started = started
        self.results = results
        self._answered = threading.local()

    def hook(self, event: RefreshEvent) -> None:
        """The manager's events hook: note the lease and the provider's answer, or die there."""
        if event.kind in _REPORTED:
            self.results.put((None, "event", f"{event.kind.value}:{event.outcome or ''}"))
        if event.kind is EventKind.REFRESH_SUCCEEDED and event.duration is not None:
            self.results.put((None, "refresh took", event.duration))
        if event.kind is EventKind.REFRESH_STARTED:
            self.started.set()
            if self.point == LEASE_TAKEN:
                self.die()
        elif event.kind is EventKind.PROVIDER_CALL and event.outcome == "ok":
            # Emitted in the thread that holds the answer, before it is journaled.
            if self.point == ANSWER_IN_MEMORY:
                self.die()
            self._answered.value = True

    def writing_new_tokens(self) -> bool:
        """Whether this thread's next store write is the one of the provider's new tokens."""
        answered = getattr(self._answered, "value", False)
        self._answered.value = False
        return bool(answered)

    def die(self) -> None:
        """SIGKILL this process, if no other process of the fleet died at this point yet."""
        try:
            os.close(os.open(self.victim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


class DyingStore(ForwardingStore):
    """A real store whose process dies around the write of freshly refreshed tokens.

    ``ANSWER_JOURNALED``: killed as the write is asked for, before the real store sees it (the
    tokens are in the rescue journal only). ``WRITTEN``: killed as soon as the real store
    acknowledged the write, before the journal entry is discarded; the engine releases the
    lease in that same write, so no point exists where the tokens are stored and the lease
    still held. ``MID_WRITE``: a second thread, woken as the real write begins, sleeps
    ``kill_delay`` seconds and sends SIGKILL when it next holds the GIL, which the writing
    thread gives up at its first blocking I/O: the kill lands while the write is in flight
    (the SQL statement or commit, the MongoDB update, the Secrets Manager HTTP calls, the
    file store's SQLite commit and fsync under its lock), or, when the store is faster than
    the delay, just after it (noted in ``<victim>.after-write``, and the writing thread waits
    for the kill); either way the server may or may not have applied it.
    """

    def __init__(self, store: CredentialStore, crash: _Crash) -> None:
        super().__init__(store)
        self.crash = crash

    def put(self, record: Record) -> Record:
        """The real store's compare-and-swap, with a death around the new tokens' write."""
        if not self.crash.writing_new_tokens():
            return self.store.put(record)
        if self.crash.point == ANSWER_JOURNALED:
            self.crash.die()
        elif self.crash.point == MID_WRITE:
            begun = threading.Event()

            def kill() -> None:
                begun.wait()
                time.sleep(self.crash.kill_delay)
                self.crash.die()

            killer = threading.Thread(target=kill, daemon=True)
            killer.start()
            begun.set()
            stored = self.store.put(record)
            # The store was faster than the kill: note it, and let the kill land now.
            Path(f"{self.crash.victim}.after-write").touch()
            killer.join()
            return stored
        stored = self.store.put(record)
        if self.crash.point == WRITTEN:
            self.crash.die()
        return stored


def _ask(manager: TokenManager, key: str, caller: tuple[int, int], results: Any) -> None:
    """One caller: ask for ``key`` until it holds a token valid beyond the leeway.

    Errors are reported and retried after a pause, as an application's retry loop would;
    ``needs_reauth`` ends the caller, as it would wait for the user. A due token served while
    the provider cannot refresh it (soft refresh) is reported as ``stale`` and asked again.
    """
    give_up = time.monotonic() + PATIENCE
    while time.monotonic() < give_up:
        try:
            credentials = manager.get(key)
        except ReauthRequired:
            results.put((caller, "reauth", ""))
            return
        except Exception as exc:  # noqa: BLE001 - reported to the supervisor, then retried
            results.put((caller, "error", type(exc).__name__))
            time.sleep(0.05)
            continue
        if credentials.expires_within(LEEWAY, now=datetime.now(UTC)):
            results.put((caller, "stale", ""))
            time.sleep(0.1)
            continue
        results.put((caller, "token", _fingerprint(credentials.access_token)))
        return
    results.put((caller, "gave up", ""))


def _worker(fleet: Fleet, number: int, started: Any, results: Any, ready: Any) -> None:
    """One worker process: ``THREADS`` callers on one manager, crashing where ``fleet`` says.

    Unless restarted, it first serves another, fresh credential (so its manager has read the
    rescue journal, as a long-running worker's has), then waits for the fleet at ``ready``.
    """
    crash = _Crash(fleet, started, results)
    store: CredentialStore = sync_store(fleet.store_url)
    if fleet.crash in _STORE_POINTS:
        store = DyingStore(store, crash)
    manager = TokenManager(
        store,
        Provider.claude_code(token_url=fleet.token_url, timeout=PROVIDER_TIMEOUT),
        keyring=KeyRing.parse(fleet.keys),
        journal=fleet.journal,
        refresh_timeout=REFRESH_TIMEOUT,
        lease_ttl=LEASE_TTL,
        cooldown=COOLDOWN,
        events=crash.hook,
    )
    if ready is not None:
        manager.get(fleet.warm_key)
        ready.wait(PATIENCE)
    callers = [
        threading.Thread(target=_ask, args=(manager, fleet.key, (number, index), results))
        for index in range(THREADS)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    manager.close()


@dataclass
class FleetReport:
    """What a fleet run did to the credential, as the chaos table counts it."""

    lost: int
    needless_reauth: int
    refreshes: int
    refused: int
    holding_current: int
    killed: int = 0
    # For a MID_WRITE crash: whether the store acknowledged the write before the kill landed.
    killed_after_write: bool = False
    finals: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    # Seconds from taking the lease to storing the tokens, for the slowest successful refresh.
    longest_refresh: float = 0.0

    @property
    def verdict(self) -> tuple[int, int, int, int]:
        """Credentials lost, needless re-auths, refreshes and callers holding current tokens."""
        return (self.lost, self.needless_reauth, self.refreshes, self.holding_current)


def run_fleet(
    store_url: str,
    fake: FakeProvider,
    key: str,
    directory: Path,
    *,
    login: Credentials,
    crash: str | None = None,
    kill_delay: float = 0.0,
    restart_after: float = 0.0,
    during: Callable[[Any], None] | None = None,
    check_url: str | None = None,
) -> FleetReport:
    """Run a fleet asking for ``login`` stored under ``key``; supervise it; measure the result.

    A worker killed by SIGKILL is started again with the same journal ``restart_after``
    seconds later. ``during(started)`` runs beside the fleet from the moment its callers start
    asking (``started`` is set once a worker holds the lease), for the faults a test injects.
    The result is judged on the store at ``check_url`` (default ``store_url``) and the
    provider's own records.
    """
    ring = KeyRing.generate()
    journal = directory / "journal"
    with TokenManager(
        sync_store(check_url or store_url), fake.provider(), keyring=ring, journal=journal
    ) as setup:
        setup.delete(key)
        setup.put(key, login)
        setup.put(f"{key}-warm", fake.issue())
    family = fake.family_of(login)
    assert family is not None
    fleet = Fleet(
        store_url,
        fake.token_url,
        ring.export(),
        str(journal),
        key,
        f"{key}-warm",
        crash,
        str(directory / "victim"),
        kill_delay,
    )
    context = process_context()
    # Worker processes start (and restart) faster with this module and boto3 imported once by
    # the fork server; this takes effect only if no storm has started the fork server yet.
    context.set_forkserver_preload([*_PRELOAD, "boto3", "tests.chaos"])
    started = context.Event()
    results = context.Queue()
    # The workers and the test's side thread, which starts ``during`` as the fleet starts asking.
    ready = context.Barrier(PROCESSES + 1)

    def launch(number: int, *, restart: bool = False) -> multiprocessing.process.BaseProcess:
        process: multiprocessing.process.BaseProcess = context.Process(
            target=_worker,
            args=(fleet, number, started, results, None if restart else ready),
            daemon=True,
        )
        process.start()
        return process

    def beside() -> None:
        ready.wait(PATIENCE)
        if during is not None:
            during(started)

    workers = {number: launch(number) for number in range(PROCESSES)}
    side = threading.Thread(target=beside, daemon=True)
    side.start()
    finals: dict[tuple[int, int], tuple[str, str]] = {}
    errors: Counter[str] = Counter()
    events: Counter[str] = Counter()
    longest = 0.0
    # A re-login is needed only when the new refresh token existed nowhere but in the killed
    # process's memory; at every other crash point, and with no crash, it is needless.
    persisted = crash != ANSWER_IN_MEMORY
    restarts: dict[int, float] = {}
    end = time.monotonic() + PATIENCE + 15
    try:
        while len(finals) < CALLERS and time.monotonic() < end:
            try:
                caller, kind, value = results.get(timeout=0.05)
            except queue.Empty:
                pass
            else:
                if kind == "event":
                    events[value] += 1
                elif kind == "refresh took":
                    longest = max(longest, value)
                elif kind in ("error", "stale"):
                    errors[value or kind] += 1
                else:
                    finals[caller] = (kind, value)
            for number, process in workers.items():
                if process.exitcode == -signal.SIGKILL and number not in restarts:
                    restarts[number] = time.monotonic() + restart_after
            for number, at in restarts.items():
                if at <= time.monotonic() and workers[number].exitcode == -signal.SIGKILL:
                    workers[number] = launch(number, restart=True)
        for process in workers.values():
            process.join(PATIENCE)
    finally:
        for process in workers.values():
            if process.is_alive():
                process.kill()
                process.join(5)
        side.join(PATIENCE)
    report = _judge(
        check_url or store_url, fake, family, ring, key, finals, errors, persisted=persisted
    )
    report.killed = len(restarts)
    report.events = events
    report.longest_refresh = longest
    report.killed_after_write = Path(f"{fleet.victim}.after-write").exists()
    return report


def _judge(
    store_url: str,
    fake: FakeProvider,
    family: str,
    ring: KeyRing,
    key: str,
    finals: dict[tuple[int, int], tuple[str, str]],
    errors: Counter[str],
    *,
    persisted: bool,
) -> FleetReport:
    """Compare the store's credential with the provider's current tokens of ``family``."""
    store = sync_store(store_url)
    try:
        record = store.get(key)
    finally:
        store.close()
    kept = False
    if record is not None and record.status is Status.ACTIVE:
        access = ring.unseal(record.access_token, key=key, field="access_token")
        refresh = ring.unseal(record.refresh_token, key=key, field="refresh_token")
        kept = (fake.access_token_state(access), fake.refresh_token_state(refresh)) == (
            "valid",
            "current",
        )
    reauths = sum(kind == "reauth" for kind, _ in finals.values())
    if record is not None and record.status is Status.NEEDS_REAUTH:
        reauths += 1
    calls = fake.refresh_calls
    current = _fingerprint(fake.current_credentials(family).access_token)
    return FleetReport(
        lost=0 if kept else 1,
        needless_reauth=reauths if persisted else 0,
        refreshes=fake.refresh_count,
        refused=len(calls) - fake.refresh_count,
        holding_current=sum(finals.get(caller) == ("token", current) for caller in _callers()),
        finals=Counter(kind for kind, _ in finals.values()),
        errors=errors,
    )


def _callers() -> list[tuple[int, int]]:
    return [(number, index) for number in range(PROCESSES) for index in range(THREADS)]


# -- store outages -------------------------------------------------------------------------


class Outage(Protocol):
    """A way to make the store unreachable for a while: the fleet opens ``url``."""

    url: str

    def begin(self) -> None:
        """Make the store unreachable."""

    def end(self) -> None:
        """Make it reachable again."""


class ProxyOutage:
    """The server behind a TCP proxy that is cut: connections torn down, new ones refused."""

    def __init__(self, store_url: str, proxy: FaultProxy, url: str | None = None) -> None:
        self.proxy = proxy
        self.url = url or with_address(store_url, "127.0.0.1", proxy.port)

    @classmethod
    @contextlib.contextmanager
    def in_front_of(
        cls, store_url: str, upstream: tuple[str, int] | None = None
    ) -> Iterator[ProxyOutage]:
        """A proxy in front of the server ``store_url`` names (or ``upstream``), closed after."""
        if upstream is None:
            parts = urlsplit(store_url)
            assert parts.hostname is not None
            assert parts.port is not None
            upstream = (parts.hostname, parts.port)
        with FaultProxy(upstream) as proxy:
            yield cls(store_url, proxy)

    def begin(self) -> None:
        """Cut the proxy."""
        self.proxy.cut()

    def end(self) -> None:
        """Restore the proxy."""
        self.proxy.restore()


def _hold_flock(path: str, take: Any, held: Any, release: Any) -> None:
    """Once ``take`` is set, hold an exclusive ``flock`` on ``path`` until ``release`` is."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        take.wait(PATIENCE)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.set()
        release.wait(PATIENCE)
    finally:
        os.close(fd)


def _hold_exclusive(path: str, take: Any, held: Any, release: Any) -> None:
    """Once ``take`` is set, hold an exclusive SQLite transaction on ``path`` until ``release``."""
    db = sqlite3.connect(path, isolation_level=None, timeout=PATIENCE)
    try:
        take.wait(PATIENCE)
        db.execute("BEGIN EXCLUSIVE")
        held.set()
        release.wait(PATIENCE)
        db.execute("ROLLBACK")
    finally:
        db.close()


class LockOutage:
    """Another process of the host holds the store's write lock for the window.

    For stores without a server to cut: the file store's ``flock`` on ``<path>.lock``
    (``_hold_flock``), a SQLite database's exclusive transaction (``_hold_exclusive``). Writers
    wait for the lock, for as long as their call's budget allows, then get
    ``StoreUnavailable``, as they would behind a process stuck holding it; readers of a WAL
    database still read. The holder process is started beforehand, so that the lock is taken
    within milliseconds of :meth:`begin`.
    """

    def __init__(self, url: str, holder: Callable[[str, Any, Any, Any], None], path: str) -> None:
        self.url = url
        context = process_context()
        self._take = context.Event()
        self._held = context.Event()
        self._release = context.Event()
        self._process = context.Process(
            target=holder, args=(path, self._take, self._held, self._release), daemon=True
        )
        self._process.start()

    def begin(self) -> None:
        """Have the holder take the lock; return once it holds it."""
        self._take.set()
        assert self._held.wait(PATIENCE), "the lock holder never got the lock"

    def end(self) -> None:
        """Let the holder release the lock and exit."""
        self._take.set()
        self._release.set()
        self._process.join(PATIENCE)


class ChaosCases:
    """No fault of the process, the store or the provider loses a credential or logs a user out.

    Subclasses name the ``backend`` (a column of the chaos table) and provide ``store_url``;
    ``outage`` defaults to a proxy cut in front of the server ``store_url`` names.
    """

    backend: ClassVar[str]

    @pytest.fixture
    def store_url(self) -> str:
        """The URL of a store on the backend under test; subclasses provide it."""
        raise NotImplementedError

    @pytest.fixture
    def outage(self, store_url: str) -> Iterator[Outage]:
        """The store behind a proxy that a test can cut."""
        with ProxyOutage.in_front_of(store_url) as outage:
            yield outage

    def record(self, case: str, report: FleetReport, *, note: str | None = None) -> None:
        """Add ``report`` to the chaos table under ``case``."""
        chaos_table.record(
            self.backend,
            case,
            note=note,
            lost=report.lost,
            needless_reauth=report.needless_reauth,
            refreshes=report.refreshes,
            refused=report.refused,
        )

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
        store = ContendedStore(sync_store(store_url), rival, spare_leases=spare_leases)
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
            with self.manager(sync_store(store_url), fake, tmp_path / "journal") as later:
                credentials = later.get(key)

            assert (["ok"], "valid", "current") == (
                [call.outcome for call in fake.refresh_calls],
                fake.access_token_state(credentials.access_token),
                fake.refresh_token_state(credentials.refresh_token),
            )
            assert writes <= 30, f"{writes} writes before giving up"

    def crash(
        self,
        store_url: str,
        key: str,
        directory: Path,
        point: str,
        *,
        kill_delay: float = 0.0,
        restart_after: float = 0.0,
    ) -> FleetReport:
        """A fleet on a due credential whose first worker at ``point`` dies and is restarted."""
        with FakeProvider(latency=0.05, revoke_family_on_reuse=True) as fake:
            return run_fleet(
                store_url,
                fake,
                key,
                directory,
                login=fake.issue(expires_in=0),
                crash=point,
                kill_delay=kill_delay,
                restart_after=restart_after,
            )

    @pytest.mark.slow
    @pytest.mark.parametrize("point", [LEASE_TAKEN, ANSWER_JOURNALED, WRITTEN])
    def test_a_worker_killed_at_a_crash_point_and_restarted_loses_nothing(
        self, point: str, store_url: str, key: str, tmp_path: Path
    ) -> None:
        """SIGKILL of the lease holder, restarted at once: 0 lost, 0 re-logins, 1 refresh."""
        report = self.crash(store_url, key, tmp_path, point)
        self.record(f"SIGKILL: {point}", report)

        assert (1, 0, 0, 1, CALLERS) == (report.killed, *report.verdict), report

    @pytest.mark.slow
    @pytest.mark.parametrize("kill_delay", [0.0, 0.001, 0.003])
    def test_a_worker_killed_mid_write_and_restarted_loses_nothing(
        self, kill_delay: float, store_url: str, key: str, tmp_path: Path
    ) -> None:
        """SIGKILL while the new tokens' write is in flight: 0 lost, 0 re-logins, 1 refresh."""
        report = self.crash(store_url, key, tmp_path, MID_WRITE, kill_delay=kill_delay)
        landed = "after the store answered" if report.killed_after_write else "write in flight"
        self.record(f"SIGKILL: {MID_WRITE} ({landed})", report)

        assert (1, 0, 0, 1, CALLERS) == (report.killed, *report.verdict), report

    @pytest.mark.slow
    @pytest.mark.xfail(
        reason="the provider has rotated the refresh token and the new one exists only in the "
        "killed process's memory, before any write: no client can keep it (see "
        "docs/reliability.md)",
        strict=True,
    )
    def test_a_worker_killed_with_the_answer_in_memory_only_loses_nothing(
        self, store_url: str, key: str, tmp_path: Path
    ) -> None:
        """SIGKILL between the provider's answer and the journal: 0 lost (not achievable)."""
        report = self.crash(store_url, key, tmp_path, ANSWER_IN_MEMORY)
        self.record(f"SIGKILL: {ANSWER_IN_MEMORY}", report)

        assert (1, 0, 0, 1, CALLERS) == (report.killed, *report.verdict), report

    @pytest.mark.slow
    def test_a_worker_restarted_after_its_lease_expired_loses_nothing(
        self, store_url: str, key: str, tmp_path: Path
    ) -> None:
        """Killed with the answer journaled, back after its lease ran out: 0 lost, 1 refresh."""
        report = self.crash(
            store_url, key, tmp_path, ANSWER_JOURNALED, restart_after=LEASE_TTL + 1.0
        )
        self.record(f"SIGKILL: {ANSWER_JOURNALED}, restarted after the lease expired", report)

        assert (1, 0, 0, 1, CALLERS) == (report.killed, *report.verdict), report

    @pytest.mark.slow
    @pytest.mark.parametrize("repetition", range(2))
    def test_a_store_outage_while_the_provider_answers_loses_nothing(
        self, repetition: int, store_url: str, outage: Outage, key: str, tmp_path: Path
    ) -> None:
        """The store unreachable from the lease until after the answer: 0 lost, 1 refresh."""

        def window(started: Any) -> None:
            assert started.wait(PATIENCE), "no worker took the lease"
            outage.begin()
            time.sleep(OUTAGE)
            outage.end()

        with FakeProvider(latency=0.2, revoke_family_on_reuse=True) as fake:
            report = run_fleet(
                outage.url,
                fake,
                key,
                tmp_path,
                login=fake.issue(expires_in=0),
                during=window,
                check_url=store_url,
            )
        if report.events["journal_rescue:"]:
            how = "replayed from the journal"
        elif report.longest_refresh >= OUTAGE:
            how = "written once the store was back"
        else:
            how = "written before the outage began"
        self.record("store outage while the provider answers", report, note=how)

        assert (0, 0, 1, CALLERS) == report.verdict, report
        assert how != "written before the outage began", "the outage came too late to test"

    @pytest.mark.slow
    @pytest.mark.parametrize("status", [429, 503])
    @pytest.mark.parametrize("expires_in", [120.0, 0.0], ids=["token-valid", "token-expired"])
    def test_a_provider_refusing_for_a_while_costs_one_refresh(
        self, status: int, expires_in: float, store_url: str, key: str, tmp_path: Path
    ) -> None:
        """429 or 503 to every refresh for a while: 0 lost, 0 re-logins, then 1 refresh."""

        fault = Fault.status(status, retry_after=1 if status == 429 else None)

        def window(started: Any) -> None:
            fake.fail_next(*[fault] * 1000)
            time.sleep(PROVIDER_WINDOW)
            fake.clear_faults()

        with FakeProvider(latency=0.05, revoke_family_on_reuse=True) as fake:
            report = run_fleet(
                store_url,
                fake,
                key,
                tmp_path,
                login=fake.issue(expires_in=expires_in),
                during=window,
            )
        state = "still valid" if expires_in else "expired"
        self.record(f"provider {status} window, token {state}", report)

        assert (0, 0, 1, CALLERS) == report.verdict, report
        assert report.refused >= 1, "no refresh met the window: the fault was not tested"

    @pytest.mark.slow
    @pytest.mark.parametrize("repetition", range(5))
    def test_hosts_with_clocks_five_minutes_apart_refresh_once(
        self, repetition: int, store_url: str, key: str, tmp_path: Path
    ) -> None:
        """4 processes whose clocks differ by up to 10 minutes: 1 refresh, 0 errors, no reuse."""
        report = run_storm(store_url, directory=tmp_path, key=key, threads=8, clock_skews=SKEWS)
        # The storm's provider is gone when it returns: a credential counts as kept when every
        # caller holds the provider's current access token and no refresh token was refused.
        kept = report.holding_current == report.callers and "invalid_grant" not in report.outcomes
        chaos_table.record(
            self.backend,
            "clocks up to 5 min apart (storm, 4 x 8)",
            lost=0 if kept else 1,
            needless_reauth=sum("ReauthRequired" in error for error in report.errors),
            refreshes=report.refreshes,
            refused=len(report.outcomes) - report.refreshes,
        )

        assert (1, ("ok",), (), 32, 32) == (
            report.refreshes,
            report.outcomes,
            report.errors,
            report.callers,
            report.holding_current,
        )
