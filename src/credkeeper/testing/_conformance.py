"""``StoreConformance``: the test suite every credential store passes, first-party or custom.

A store proves it keeps credkeeper's contract (see :class:`~credkeeper.CredentialStore`) by
subclassing the suite in its own tests and saying how to open it, the way keyring's backends
subclass ``BackendBasicTests``::

    import functools

    from credkeeper import open_store
    from credkeeper.testing import StoreConformance

    URL = "mystore://localhost/credentials"


    class TestMyStore(StoreConformance):
        def make_store(self):
            return open_store(URL)

        def store_factory(self):
            # Picklable: the cross-process cases open the same data in spawned processes.
            return functools.partial(open_store, URL)

pytest collects ``TestMyStore`` and runs every ``test_*`` method of the suite against it.
A store with native async methods subclasses :class:`AsyncStoreConformance` and implements
``make_async_store`` instead.

The suite holds two kinds of cases. Functional cases check one behaviour each: compare-and-swap
on the version, every record field surviving a round trip, awkward keys, ``scan_due``.
Concurrency cases race real threads and real spawned processes against one record and check
that no update is lost, that an expired lease goes to exactly one taker and that a key is
created exactly once. Nothing is simulated: a store that passes only because the races did not
happen this time has not passed, so the races are made wide (threads start on a barrier).

Every key a test uses starts with a fresh random prefix and is deleted afterwards, so the suite
can run against a persistent backend shared with other runs or data; it never assumes the
store is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import pickle
import queue
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, ClassVar, ParamSpec, TypeVar, cast

import pytest

from credkeeper._exceptions import ConfigurationError, ConflictError, StoreError
from credkeeper._notices import ChangeNotices
from credkeeper._record import MAX_KEY_LENGTH, Record, Status
from credkeeper._store import AsyncCredentialStore, CredentialStore

from ._storm import process_context

__all__ = ["AsyncStoreConformance", "BlockingStore", "KeySpace", "StoreConformance", "StoreFactory"]

_T = TypeVar("_T")
_P = ParamSpec("_P")

#: A store factory as :meth:`StoreConformance.store_factory` returns it.
StoreFactory = Callable[[], CredentialStore | AsyncCredentialStore]

# Millisecond-precise instants, the precision every store must keep. Some of them do not
# survive a naive float conversion to epoch milliseconds, which is the point.
_EXPIRES_AT = datetime(2039, 6, 13, 18, 17, 20, 686000, tzinfo=UTC)
_LEASE_UNTIL = datetime(2031, 5, 17, 8, 30, 12, 345000, tzinfo=UTC)
_COOLDOWN_UNTIL = datetime(2031, 5, 17, 8, 45, 0, 1000, tzinfo=UTC)
_REFRESHED_AT = datetime(2031, 5, 17, 0, 29, 59, 999000, tzinfo=UTC)
_BEFORE = datetime(2030, 1, 1, 12, 0, 0, 0, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def _new_prefix() -> str:
    return f"ck-{uuid.uuid4().hex[:12]}-"


_PREFIX_LENGTH = len(_new_prefix())
_MAX_SUFFIX = MAX_KEY_LENGTH - _PREFIX_LENGTH

# Key suffixes that break stores which build paths, URLs, SQL, regexes or file names from keys.
_KEY_SHAPES: dict[str, str] = {
    "max-length-ascii": "k" * _MAX_SUFFIX,
    "max-length-unicode": ("ключ-鍵-🔑-é" * _MAX_SUFFIX)[:_MAX_SUFFIX],
    "unicode": "usér-ключ-鍵-🔑",
    "slash": "tenant/user/42",
    "parent-dir": "../../etc/passwd",
    "colon": "user:42:claude",
    "dot": "user.42.json",
    "inner-space": "john smith",
    "percent": "100%25%2F",
    "quotes": 'it\'s "quoted"',
    "backslash": "a\\b\\c",
    "sql": "x'; DROP TABLE credentials; --",
    "glob-and-regex": "*?[a-z].+$^{1}|",
    "json": '{"a": [1, null]}',
    "dollar": "$where.field",
}

# Pairs that a lossy encoding (case folding, percent-decoding, path normalisation, Unicode
# normalisation, truncation) maps to one stored key. Each must stay its own credential.
_LOOKALIKE_KEYS: tuple[str, ...] = (
    "a/b",
    "a%2Fb",
    "a%2fb",
    "a_b",
    "a-b",
    "a:b",
    "a.b",
    "a b",
    "a  b",
    "a+b",
    "a//b",
    "a/./b",
    "a/b/",
    "A/B",
    "a/B",
    "\u00e9",  # é, composed (NFC)
    "e\u0301",  # é, decomposed (NFD)
    "stra\u00dfe",  # straße
    "strasse",
    "x" * (_MAX_SUFFIX - 1) + "1",
    "x" * (_MAX_SUFFIX - 1) + "2",
)

# Keys no store can hold, and must refuse alike (credkeeper.storekit.check_key).
_BAD_KEYS: tuple[object, ...] = (
    42,
    None,
    b"bytes",
    "",
    "k" * (MAX_KEY_LENGTH + 1),
    " padded",
    "line\nbreak",
)
_BAD_KEY_IDS = ("int", "None", "bytes", "empty", "too-long", "padded", "control")

_PROCESSES = 3
_THREADS_PER_PROCESS = 2
_INCREMENTS_PER_PROCESS_THREAD = 20
_THREADS = 8
_INCREMENTS_PER_THREAD = 40
_RACERS = 16
_TASKS = 50
_INCREMENTS_PER_TASK = 10
_SCAN_KEYS = 300
_CLOCK_READINGS = 5


def _record(key: str, **changes: Any) -> Record:
    """A never-stored record under ``key``; ``changes`` override the plain defaults."""
    fields: dict[str, Any] = {
        "key": key,
        "access_token": "access-token",
        "refresh_token": "refresh-token",
        "expires_at": _EXPIRES_AT,
    }
    fields.update(changes)
    return Record(**fields)


class KeySpace:
    """The keys of one test: a random prefix keeps concurrent and repeated runs apart.

    Calling it returns ``prefix + name`` and remembers the key so the ``store`` fixture can
    delete it afterwards. :meth:`own` picks this test's keys out of a ``scan_due`` result,
    since a shared backend may hold any number of other keys.
    """

    def __init__(self) -> None:
        self.prefix = _new_prefix()
        self.issued: dict[str, None] = {}

    def __call__(self, name: str = "key") -> str:
        key = self.prefix + name
        self.issued[key] = None
        return key

    def own(self, keys: Iterable[str]) -> list[str]:
        """This test's keys among ``keys``, sorted, duplicates kept."""
        return sorted(key for key in keys if key.startswith(self.prefix))


def _increment(store: CredentialStore, key: str, times: int, deadline: float) -> int:
    """Add one to ``failures`` ``times`` times by read-modify-CAS; the number of conflicts."""
    conflicts = 0
    for _ in range(times):
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"increments of {key!r} did not finish in time")
            current = store.get(key)
            if current is None:
                raise AssertionError(f"the record under {key!r} vanished")
            try:
                store.put(current.replace(failures=current.failures + 1))
            except ConflictError:
                conflicts += 1
            else:
                break
    return conflicts


async def _increment_async(
    store: AsyncCredentialStore, key: str, times: int, deadline: float
) -> int:
    """The async twin of :func:`_increment`."""
    conflicts = 0
    for _ in range(times):
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"increments of {key!r} did not finish in time")
            current = await store.get(key)
            if current is None:
                raise AssertionError(f"the record under {key!r} vanished")
            try:
                await store.put(current.replace(failures=current.failures + 1))
            except ConflictError:
                conflicts += 1
            else:
                break
    return conflicts


@contextlib.contextmanager
def _frequent_thread_switches() -> Iterator[None]:
    """Make CPython hand the GIL over every few microseconds while a race runs.

    With the default 5 ms interval a thread usually finishes all its calls to a fast store
    before another one runs, and the race under test never happens.
    """
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, 1e-5))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _in_threads(calls: Sequence[Callable[[], _T]], *, timeout: float) -> list[_T | BaseException]:
    """Run each call in its own thread, released together; each result or exception, in order.

    A thread still running after ``timeout`` seconds fails the test instead of hanging it.
    """
    start = threading.Barrier(len(calls))
    outcomes: dict[int, _T | BaseException] = {}

    def run(index: int, call: Callable[[], _T]) -> None:
        try:
            start.wait(timeout)
            outcomes[index] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread below
            outcomes[index] = exc

    threads = [
        threading.Thread(target=run, args=(index, call), name=f"conformance-{index}", daemon=True)
        for index, call in enumerate(calls)
    ]
    with _frequent_thread_switches():
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    hung = sum(thread.is_alive() for thread in threads)
    if hung:
        pytest.fail(
            f"{hung} of {len(threads)} threads did not finish within {timeout} s: "
            "the store hangs or deadlocks under concurrent calls",
            pytrace=False,
        )
    return [outcomes[index] for index in range(len(calls))]


def _results(
    outcomes: Sequence[_T | BaseException], *expected: type[BaseException]
) -> list[_T | BaseException]:
    """``outcomes`` unchanged, after raising the first exception not of an ``expected`` type."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, expected):
            raise outcome
    return list(outcomes)


def _values(outcomes: Sequence[_T | BaseException]) -> list[_T]:
    """The results of ``outcomes``, after raising the first exception among them."""
    return cast("list[_T]", _results(outcomes))


def _is_async(store: object) -> bool:
    return inspect.iscoroutinefunction(getattr(store, "get", None))


def _open(factory: StoreFactory, *, timeout: float) -> CredentialStore:
    """A blocking store from ``factory``, wrapped in a :class:`BlockingStore` when async."""
    store = factory()
    if _is_async(store):
        opened: Any = store
        return BlockingStore(lambda: opened, timeout=timeout)
    return store  # type: ignore[return-value]


def _process_worker(
    factory: StoreFactory,
    key: str,
    timeout: float,
    start: multiprocessing.synchronize.Barrier,
    results: multiprocessing.queues.Queue[tuple[str, str]],
) -> None:
    """Body of one spawned process: several threads incrementing ``key``; reports to ``results``.

    Module-level so that it can be pickled into a fresh process. Reports ``("ok", conflicts)`` or
    ``("error", traceback)``; it never raises, so the parent always hears back.
    """
    try:
        store = _open(factory, timeout=timeout)
        try:
            start.wait(timeout)
            deadline = time.monotonic() + timeout
            work = functools.partial(
                _increment, store, key, _INCREMENTS_PER_PROCESS_THREAD, deadline
            )
            conflicts = _values(_in_threads([work] * _THREADS_PER_PROCESS, timeout=timeout))
            results.put(("ok", str(sum(conflicts))))
        finally:
            store.close()
    except BaseException:  # noqa: BLE001 - reported to the parent instead
        results.put(("error", traceback.format_exc()))


class BlockingStore:
    """A :class:`CredentialStore` over an :class:`AsyncCredentialStore`, for the sync suite.

    It owns a private event loop in a daemon thread. Every method runs the async store's own
    coroutine on that loop and waits for it, so the sync suite's cases (threads included)
    exercise the async methods themselves, never a sync store hidden behind them. ``run``
    executes any coroutine function on the loop, for async-native cases.
    """

    def __init__(self, make: Callable[[], AsyncCredentialStore], *, timeout: float) -> None:
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="conformance-event-loop", daemon=True
        )
        self._thread.start()
        try:
            # Made on the loop, for drivers that look for a running loop when constructed.
            self.async_store: AsyncCredentialStore = self.run(_call_async, make)
        except BaseException:
            self._stop()
            raise
        if not _is_async(self.async_store):
            self._stop()
            raise TypeError(
                f"make_async_store() returned {self.async_store!r}, whose get() is not a "
                "coroutine function; test a sync store with StoreConformance instead"
            )

    def __repr__(self) -> str:
        return f"BlockingStore({self.async_store!r})"

    def run(self, function: Callable[_P, Awaitable[_T]], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Call ``function`` on the event loop, await its result there and return it."""
        if self._loop.is_closed():
            raise RuntimeError("this BlockingStore is closed")
        future = asyncio.run_coroutine_threadsafe(_await(function, *args, **kwargs), self._loop)
        try:
            return future.result(self.timeout)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"{getattr(function, '__qualname__', function)} did not finish within "
                f"{self.timeout} s on the event loop"
            ) from None

    def get(self, key: str) -> Record | None:
        """Await the async store's ``get``."""
        return self.run(self.async_store.get, key)

    def put(self, record: Record) -> Record:
        """Await the async store's ``put``."""
        return self.run(self.async_store.put, record)

    def delete(self, key: str) -> bool:
        """Await the async store's ``delete``."""
        return self.run(self.async_store.delete, key)

    def scan_due(self, before: datetime) -> Iterator[str]:
        """Drive the async store's ``scan_due`` one key at a time; close it if left early."""
        iterator = self.run(_open_scan, self.async_store, before)
        try:
            while (key := self.run(_next_key, iterator)) is not None:
                yield key
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None and not self._loop.is_closed():
                self.run(aclose)

    def changes(self) -> ChangeNotices | None:
        """The async store's change notices, or ``None`` when it gives none."""
        changes = getattr(self.async_store, "changes", None)
        return None if changes is None else changes()

    def close(self) -> None:
        """Await the async store's ``close``, then stop the event loop."""
        if self._loop.is_closed():
            return
        try:
            self.run(self.async_store.close)
        finally:
            self._stop()

    def _stop(self) -> None:
        with contextlib.suppress(TimeoutError, RuntimeError):
            self.run(_shutdown_loop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.timeout)
        if not self._thread.is_alive():
            self._loop.close()


async def _await(function: Callable[_P, Awaitable[_T]], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    # Called here, on the loop, so the store's method starts in the loop's thread.
    return await function(*args, **kwargs)


async def _call_async(function: Callable[[], _T]) -> _T:
    return function()


async def _open_scan(store: AsyncCredentialStore, before: datetime) -> AsyncIterator[str]:
    iterator = store.scan_due(before)
    if not isinstance(iterator, AsyncIterator):
        raise TypeError(
            f"{type(store).__name__}.scan_due() returned {type(iterator).__name__}, "
            "not an async iterator"
        )
    return iterator


async def _next_key(iterator: AsyncIterator[str]) -> str | None:
    try:
        return await anext(iterator)
    except StopAsyncIteration:
        return None


async def _shutdown_loop() -> None:
    loop = asyncio.get_running_loop()
    await loop.shutdown_asyncgens()
    await loop.shutdown_default_executor()


def _clock_report(
    readings: Sequence[object], before: datetime, after: datetime, tolerance: timedelta
) -> dict[str, bool]:
    """Which of ``now()``'s promises ``readings``, taken between ``before`` and ``after``, keep."""
    aware = [
        reading
        for reading in readings
        if isinstance(reading, datetime) and reading.utcoffset() == timedelta(0)
    ]
    return {
        "aware, in UTC": len(aware) == len(readings),
        "near the host's clock": all(
            before - tolerance <= reading <= after + tolerance for reading in aware
        ),
        "never going backwards": all(
            earlier <= later for earlier, later in itertools.pairwise(aware)
        ),
    }


class StoreConformance:
    """The conformance suite for :class:`~credkeeper.CredentialStore` implementations.

    Subclass it as ``TestSomething`` and implement :meth:`make_store`; implement
    :meth:`store_factory` too when the store's data can be reached from other processes.
    The class has no ``Test`` prefix, so pytest collects only the subclasses.

    Capability flags, class attributes a subclass may override (the way SQLAlchemy's suite
    reads a dialect's ``Requirements``), decide which cases apply instead of the store's name.
    """

    #: Whether several processes can share the store's data. ``False`` skips the
    #: cross-process cases even when :meth:`store_factory` returns a factory.
    supports_processes: ClassVar[bool] = True

    #: Seconds a concurrency case (threads, processes, one store call through
    #: :class:`BlockingStore`) may take before it fails as hung. Raise it for slow backends.
    concurrency_timeout: ClassVar[float] = 60.0

    #: How far a store's own clock (``now()``) may be from the test host's. Its servers and the
    #: test host are expected to keep time with NTP; widen it for a server that does not.
    clock_tolerance: ClassVar[timedelta] = timedelta(seconds=5)

    # -- hooks ------------------------------------------------------------------------------

    def make_store(self) -> CredentialStore:
        """A new connection to the backend under test; the suite closes it after each test.

        Successive calls may share data (a database) or not (an in-memory store); the suite
        relies on neither.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement make_store()")

    def store_factory(self) -> StoreFactory | None:
        """A picklable, zero-argument callable opening the same data from another process.

        For example ``functools.partial(open_store, url)``. The cross-process cases call it in
        fresh processes (forked from a server that has credkeeper imported, or spawned where
        the platform has none); it may return a sync or an async store. ``None``, the default,
        means the store is process-local and those cases skip.
        """
        return None

    # -- fixtures ---------------------------------------------------------------------------

    @pytest.fixture
    def keys(self) -> KeySpace:
        """Unique keys for this test."""
        return KeySpace()

    @pytest.fixture
    def store(self, keys: KeySpace) -> Iterator[CredentialStore]:
        """The store under test; this test's keys are deleted and the store closed after."""
        store = self.make_store()
        try:
            yield store
            for key in keys.issued:
                with contextlib.suppress(StoreError):
                    store.delete(key)
        finally:
            store.close()

    # -- get, put, delete -------------------------------------------------------------------

    def test_get_of_a_missing_key_returns_none(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """get() of a key that was never stored returns None."""
        assert None is store.get(keys("missing"))

    def test_create_then_get_returns_every_field_of_a_minimal_record(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """A record with empty scopes and every optional field None round trips."""
        record = _record(keys(), scopes=())
        stored = store.put(record)
        assert record.replace(version=stored.version) == store.get(record.key)

    def test_create_then_get_returns_every_field_of_a_full_record(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """A record with every field set, status needs_reauth and long tokens round trips."""
        record = _record(
            keys(),
            access_token="sk-ant-oat01-" + "Ab3+/x=._-" * 150,
            refresh_token="sk-ant-ort01-" + "Zy9-_." * 40,
            expires_at=_EXPIRES_AT,
            scopes=("user:inference", "user:profile", "org:create_api_key"),
            subscription_type="max",
            status=Status.NEEDS_REAUTH,
            lease_owner="host-7:pid-4242:thread-1",
            lease_until=_LEASE_UNTIL,
            failures=7,
            cooldown_until=_COOLDOWN_UNTIL,
            last_error='HTTP 503 from the provider: "upstream unavailable", réessayer ✓',
            refreshed_at=_REFRESHED_AT,
        )
        stored = store.put(record)
        assert record.replace(version=stored.version) == store.get(record.key)

    def test_create_returns_the_record_with_a_version(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """put() of a new record returns it unchanged but for a version that is not None."""
        record = _record(keys())
        stored = store.put(record)
        assert (record, True) == (stored.replace(version=None), stored.version is not None)

    def test_update_returns_a_new_version(self, store: CredentialStore, keys: KeySpace) -> None:
        """put() of a changed record returns a version that differs from the one it replaced."""
        created = store.put(_record(keys()))
        updated = store.put(created.replace(failures=1))
        assert (True, True) == (updated.version is not None, updated.version != created.version)

    def test_get_returns_the_version_put_returned(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """get() after an update returns exactly the record put() returned, version included."""
        created = store.put(_record(keys()))
        updated = store.put(created.replace(access_token="new-access-token"))
        assert updated == store.get(created.key)

    def test_create_over_an_existing_key_conflicts_and_keeps_it(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """Creating (version None) an existing key raises ConflictError and changes nothing."""
        original = store.put(_record(keys()))
        with pytest.raises(ConflictError):
            store.put(_record(original.key, access_token="intruder"))
        assert original == store.get(original.key)

    def test_update_with_a_stale_version_conflicts_and_keeps_the_winner(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """put() from a version that has since moved raises ConflictError and changes nothing."""
        created = store.put(_record(keys()))
        winner = store.put(created.replace(access_token="winner"))
        with pytest.raises(ConflictError):
            store.put(created.replace(access_token="loser"))
        assert winner == store.get(created.key)

    def test_update_of_a_deleted_key_conflicts_and_does_not_recreate_it(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """put() with the version of a record deleted since raises ConflictError, stores nothing."""
        created = store.put(_record(keys()))
        store.delete(created.key)
        with pytest.raises(ConflictError):
            store.put(created.replace(failures=1))
        assert None is store.get(created.key)

    def test_version_read_before_delete_does_not_match_the_recreated_record(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """A version from before a delete and re-create raises ConflictError (no ABA)."""
        old = store.put(_record(keys()))
        store.delete(old.key)
        recreated = store.put(_record(old.key, access_token="recreated"))
        with pytest.raises(ConflictError):
            store.put(old.replace(access_token="stale writer"))
        assert recreated == store.get(old.key)

    def test_conflict_error_names_the_key(self, store: CredentialStore, keys: KeySpace) -> None:
        """ConflictError.key is the key whose write lost."""
        created = store.put(_record(keys()))
        with pytest.raises(ConflictError) as raised:
            store.put(_record(created.key))
        assert created.key == raised.value.key

    def test_delete_returns_true_then_false(self, store: CredentialStore, keys: KeySpace) -> None:
        """delete() says whether there was a record to remove."""
        key = store.put(_record(keys())).key
        assert [True, False] == [store.delete(key), store.delete(key)]

    def test_get_after_delete_returns_none(self, store: CredentialStore, keys: KeySpace) -> None:
        """A deleted record is gone."""
        key = store.put(_record(keys())).key
        store.delete(key)
        assert None is store.get(key)

    def test_delete_of_a_missing_key_returns_false(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """delete() of a key that was never stored returns False."""
        assert False is store.delete(keys("missing"))

    def test_create_after_delete_succeeds(self, store: CredentialStore, keys: KeySpace) -> None:
        """A deleted key can be created again with version None."""
        key = store.put(_record(keys())).key
        store.delete(key)
        recreated = store.put(_record(key, access_token="again"))
        assert recreated == store.get(key)

    def test_delete_leaves_other_keys_alone(self, store: CredentialStore, keys: KeySpace) -> None:
        """Deleting one key keeps every other record."""
        kept = store.put(_record(keys("kept")))
        store.put(_record(keys("deleted")))
        store.delete(keys("deleted"))
        assert kept == store.get(kept.key)

    def test_datetimes_come_back_aware_utc(self, store: CredentialStore, keys: KeySpace) -> None:
        """Every datetime field of a read record is timezone-aware with a zero UTC offset."""
        key = store.put(
            _record(
                keys(),
                lease_until=_LEASE_UNTIL,
                cooldown_until=_COOLDOWN_UNTIL,
                refreshed_at=_REFRESHED_AT,
            )
        ).key
        got = store.get(key)
        assert got is not None
        moments = (got.expires_at, got.lease_until, got.cooldown_until, got.refreshed_at)
        assert [timedelta(0)] * 4 == [moment and moment.utcoffset() for moment in moments]

    def test_refreshed_at_follows_an_update(self, store: CredentialStore, keys: KeySpace) -> None:
        """An update that sets, moves or clears refreshed_at reads back as written each time."""
        created = store.put(_record(keys(), refreshed_at=_REFRESHED_AT))
        later = _REFRESHED_AT + timedelta(days=89, milliseconds=1)
        moved = store.put(created.replace(access_token="new-access-token", refreshed_at=later))
        read_moved = store.get(created.key)
        cleared = store.put(moved.replace(refreshed_at=None))
        assert [later, None] == [
            read_moved and read_moved.refreshed_at,
            (store.get(cleared.key) or created).refreshed_at,
        ]

    # -- keys -------------------------------------------------------------------------------

    @pytest.mark.parametrize("suffix", list(_KEY_SHAPES.values()), ids=list(_KEY_SHAPES))
    def test_key_round_trips(self, store: CredentialStore, keys: KeySpace, suffix: str) -> None:
        """A key of this shape (up to 255 characters) stores and reads back under itself."""
        record = _record(keys(suffix), access_token=f"token for {suffix}")
        stored = store.put(record)
        assert (record.replace(version=stored.version), True) == (
            store.get(record.key),
            record.key in keys.own(store.scan_due(_EXPIRES_AT + timedelta(days=1))),
        )

    def test_lookalike_keys_stay_distinct(self, store: CredentialStore, keys: KeySpace) -> None:
        """Keys differing only in case, encoding, normalisation or a last character never merge."""
        suffixes = [*_LOOKALIKE_KEYS, *_KEY_SHAPES.values()]
        expected = {keys(suffix): f"token-{index}" for index, suffix in enumerate(suffixes)}
        for key, token in expected.items():
            store.put(_record(key, access_token=token))
        stored = {key: store.get(key) for key in expected}
        assert expected == {key: record and record.access_token for key, record in stored.items()}

    # -- scan_due ---------------------------------------------------------------------------

    def test_scan_due_yields_keys_expiring_at_or_before(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """scan_due(before) yields the keys whose expires_at <= before, and no others."""
        offsets = {"hour-ago": -3600_000, "ms-before": -1, "ms-after": 1, "hour-after": 3600_000}
        for name, offset in offsets.items():
            store.put(_record(keys(name), expires_at=_BEFORE + offset * _MS))
        expected = sorted([keys("hour-ago"), keys("ms-before")])
        assert expected == keys.own(store.scan_due(_BEFORE))

    def test_scan_due_includes_the_boundary(self, store: CredentialStore, keys: KeySpace) -> None:
        """A key expiring exactly at ``before`` is due."""
        key = store.put(_record(keys(), expires_at=_BEFORE)).key
        assert [key] == keys.own(store.scan_due(_BEFORE))

    def test_scan_due_skips_deleted_keys(self, store: CredentialStore, keys: KeySpace) -> None:
        """A deleted record is never due."""
        kept = store.put(_record(keys("kept"), expires_at=_BEFORE - _MS)).key
        deleted = store.put(_record(keys("deleted"), expires_at=_BEFORE - _MS)).key
        store.delete(deleted)
        assert [kept] == keys.own(store.scan_due(_BEFORE))

    def test_scan_due_follows_an_updated_expiry(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """A record whose expires_at was moved past ``before`` is no longer due."""
        created = store.put(_record(keys(), expires_at=_BEFORE - _MS))
        store.put(created.replace(expires_at=_BEFORE + timedelta(hours=8)))
        assert [] == keys.own(store.scan_due(_BEFORE))

    def test_scan_due_yields_each_of_many_due_keys_once(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """With hundreds of records, every due key comes back exactly once, none of the others."""
        expected = []
        for index in range(_SCAN_KEYS):
            due = index % 2 == 0
            key = keys(f"many-{index:04d}")
            store.put(_record(key, expires_at=_BEFORE + (-index - 1 if due else index + 1) * _MS))
            if due:
                expected.append(key)
        assert sorted(expected) == keys.own(store.scan_due(_BEFORE))

    def test_scan_due_returns_an_iterator(self, store: CredentialStore, keys: KeySpace) -> None:
        """scan_due() returns an iterator that next() can consume."""
        store.put(_record(keys(), expires_at=_BEFORE - _MS))
        result = store.scan_due(_BEFORE)
        assert isinstance(result, Iterator)
        assert [keys()] == keys.own(result)

    # -- the store's clock -----------------------------------------------------------------

    def test_now_is_aware_utc_near_the_hosts_clock_and_never_goes_back(
        self, store: CredentialStore
    ) -> None:
        """A store's now(), if it has one, is aware UTC, near the host's clock, never going back."""
        now = getattr(store, "now", None)
        if now is None:
            pytest.skip(
                f"{type(store).__name__} has no now(): leases are judged on the manager's clock"
            )
        before = datetime.now(UTC)
        readings = [now() for _ in range(_CLOCK_READINGS)]
        after = datetime.now(UTC)
        if readings[0] is None:
            pytest.skip(f"{type(store).__name__}.now() returned None: the store has no clock")
        report = _clock_report(readings, before, after, self.clock_tolerance)
        assert dict.fromkeys(report, True) == report

    # -- change notices ---------------------------------------------------------------------

    def test_changes_post_every_write_and_delete(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """A store's changes(), if it gives notices, posts the key of each put and delete, a
        write's notice never naming the version the write replaced (that would wake no one)."""
        changes = getattr(store, "changes", None)
        notices: ChangeNotices | None = None if changes is None else changes()
        if notices is None:
            pytest.skip(f"{type(store).__name__} posts no change notices")
        deadline = time.monotonic() + self.concurrency_timeout
        for attempt in itertools.count():  # until the listener hears: it may start late
            since, probe = time.monotonic(), keys(f"probe-{attempt}")
            store.put(_record(probe))
            if notices.wait(probe, since=since, seconds=0.1):
                break
            assert time.monotonic() < deadline, "changes() never posted a write"
        heard = []
        stored: Record | None = None
        for write in ("create", "update", "delete"):
            since, replaced = time.monotonic(), None if stored is None else stored.version
            if write == "delete":
                store.delete(keys())
            else:
                stored = store.put(stored or _record(keys()))
            seconds = self.concurrency_timeout
            heard.append(notices.wait(keys(), since=since, seconds=seconds, seen=replaced))
        assert [True, True, True] == heard

    # -- misuse ---------------------------------------------------------------------------
    # What every store refuses alike, with ConfigurationError (credkeeper.storekit's checks),
    # and with nothing stored or changed: a store must not answer a wrong call in its own way.

    @pytest.mark.parametrize("key", _BAD_KEYS, ids=_BAD_KEY_IDS)
    @pytest.mark.parametrize("method", ["get", "delete"])
    def test_a_bad_key_is_a_configuration_error(
        self, store: CredentialStore, method: str, key: Any
    ) -> None:
        """get() and delete() refuse a key no store can hold (not a str, empty, too long, ...)."""
        with pytest.raises(ConfigurationError):
            getattr(store, method)(key)

    @pytest.mark.parametrize("record", ["x", None, {"key": "x"}], ids=["str", "None", "dict"])
    def test_put_of_something_not_a_record_is_a_configuration_error(
        self, store: CredentialStore, record: Any
    ) -> None:
        """put() of anything but a Record refuses it."""
        with pytest.raises(ConfigurationError):
            store.put(record)

    @pytest.mark.parametrize(
        "before", [_BEFORE.replace(tzinfo=None), "2030-01-01", 0], ids=["naive", "str", "int"]
    )
    def test_scan_due_of_a_naive_or_non_datetime_is_a_configuration_error(
        self, store: CredentialStore, keys: KeySpace, before: Any
    ) -> None:
        """scan_due() of a naive datetime, or of something not a datetime, refuses it."""
        store.put(_record(keys(), expires_at=_BEFORE - _MS))
        with pytest.raises(ConfigurationError):
            list(store.scan_due(before))

    def test_scan_due_of_another_zone_means_the_same_instant(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """scan_due() of an aware datetime in another zone compares instants, not wall clocks."""
        store.put(_record(keys("due"), expires_at=_BEFORE - _MS))
        store.put(_record(keys("later"), expires_at=_BEFORE + _MS))
        tokyo = timezone(timedelta(hours=9))
        assert [keys("due")] == keys.own(store.scan_due(_BEFORE.astimezone(tokyo)))

    def test_a_refused_call_changes_nothing_stored(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """After refused calls, the stored record is exactly as it was."""
        stored = store.put(_record(keys(), refreshed_at=_REFRESHED_AT))
        misuse: Any = store  # the wrong types are the point
        calls: list[Callable[[], object]] = [
            lambda: misuse.put("x"),
            lambda: misuse.delete(""),
            lambda: misuse.get(1),
        ]
        for call in calls:
            with pytest.raises(ConfigurationError):
                call()
        assert stored == store.get(stored.key)

    # -- lifecycle --------------------------------------------------------------------------

    def test_close_can_be_called(self, keys: KeySpace) -> None:
        """close() of a used store returns without error."""
        store = self.make_store()
        store.get(keys("missing"))
        store.close()

    # -- concurrency ------------------------------------------------------------------------

    def test_threads_compare_and_swap_loses_no_update(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """8 threads each adding 1 forty times by get-then-put, retrying conflicts, reach 320."""
        key = store.put(_record(keys())).key
        deadline = time.monotonic() + self.concurrency_timeout
        work = functools.partial(_increment, store, key, _INCREMENTS_PER_THREAD, deadline)
        _values(_in_threads([work] * _THREADS, timeout=self.concurrency_timeout))
        final = store.get(key)
        assert _THREADS * _INCREMENTS_PER_THREAD == (final and final.failures)

    def test_processes_compare_and_swap_loses_no_update(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """3 spawned processes, 2 threads each, 20 CAS increments on one record lose none."""
        factory = self._cross_process_factory()
        key = store.put(_record(keys())).key
        _in_processes(factory, key, timeout=self.concurrency_timeout)
        final = store.get(key)
        expected = _PROCESSES * _THREADS_PER_PROCESS * _INCREMENTS_PER_PROCESS_THREAD
        assert expected == (final and final.failures)

    def test_expired_lease_is_taken_over_by_exactly_one_thread(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """16 threads that read one expired lease and CAS their own owner in: one wins."""
        key = store.put(_record(keys(), lease_owner="crashed-worker", lease_until=_LEASE_UNTIL)).key
        read = threading.Barrier(_RACERS)

        def take_over(owner: str) -> Record:
            current = store.get(key)
            if current is None or current.lease_owner != "crashed-worker":
                raise AssertionError(f"expected the crashed worker's lease, read {current!r}")
            read.wait(self.concurrency_timeout)  # every racer holds the same version now
            return store.put(
                current.replace(lease_owner=owner, lease_until=_LEASE_UNTIL + timedelta(hours=1))
            )

        calls = [functools.partial(take_over, f"worker-{index}") for index in range(_RACERS)]
        outcomes = _results(_in_threads(calls, timeout=self.concurrency_timeout), ConflictError)
        assert ({"won": 1, "conflict": _RACERS - 1}, [store.get(key)]) == _tally(outcomes)

    def test_one_key_created_from_many_threads_is_created_once(
        self, store: CredentialStore, keys: KeySpace
    ) -> None:
        """16 threads creating the same new key: exactly one succeeds and its record is stored."""
        key = keys()
        calls = [
            functools.partial(store.put, _record(key, access_token=f"token-{index}"))
            for index in range(_RACERS)
        ]
        outcomes = _results(_in_threads(calls, timeout=self.concurrency_timeout), ConflictError)
        assert ({"won": 1, "conflict": _RACERS - 1}, [store.get(key)]) == _tally(outcomes)

    def _cross_process_factory(self) -> StoreFactory:
        """The store factory for the cross-process cases, or skip them with the reason."""
        if not self.supports_processes:
            pytest.skip(f"{type(self).__name__}.supports_processes is False")
        factory = self.store_factory()
        if factory is None:
            pytest.skip("this store is process-local: store_factory() returns None")
        try:
            pickle.dumps(factory)
        except Exception as exc:  # noqa: BLE001 - any pickling failure means the same fix
            pytest.fail(
                f"store_factory() must return a picklable callable, such as "
                f"functools.partial(open_store, url); pickling {factory!r} failed: {exc}",
                pytrace=False,
            )
        return factory


def _tally(outcomes: Sequence[object]) -> tuple[dict[str, int], list[Record]]:
    """How many racers won and how many conflicted; the first winner's record."""
    kinds = ["conflict" if isinstance(outcome, ConflictError) else "won" for outcome in outcomes]
    winners = [outcome for outcome in outcomes if isinstance(outcome, Record)]
    return dict(Counter(kinds)), winners[:1]


def _in_processes(factory: StoreFactory, key: str, *, timeout: float) -> list[tuple[str, str]]:
    """Run :func:`_process_worker` in spawned processes; their reports, failing on any error."""
    context = process_context()
    results: multiprocessing.queues.Queue[tuple[str, str]] = context.Queue()
    start = context.Barrier(_PROCESSES)
    processes = [
        context.Process(
            target=_process_worker,
            args=(factory, key, timeout, start, results),
            name=f"conformance-process-{index}",
            daemon=True,
        )
        for index in range(_PROCESSES)
    ]
    reports: list[tuple[str, str]] = []
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout
        while len(reports) < _PROCESSES:
            try:
                reports.append(results.get(timeout=0.2))
            except queue.Empty:
                silent = [p.exitcode for p in processes if not p.is_alive()]
                if len(silent) == _PROCESSES and results.empty():
                    pytest.fail(
                        f"worker processes exited without reporting (exit codes {silent})",
                        pytrace=False,
                    )
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"{_PROCESSES - len(reports)} worker processes did not finish within "
                        f"{timeout} s: the store hangs or deadlocks across processes",
                        pytrace=False,
                    )
        for process in processes:
            process.join(max(1.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
        results.close()
        results.join_thread()
    errors = [detail for status, detail in reports if status != "ok"]
    if errors:
        pytest.fail("a worker process failed:\n" + "\n".join(errors), pytrace=False)
    return reports


class AsyncStoreConformance(StoreConformance):
    """The conformance suite for :class:`~credkeeper.AsyncCredentialStore` implementations.

    Implement :meth:`make_async_store` (and :meth:`store_factory` for the cross-process
    cases). Every case of :class:`StoreConformance` runs against the async store through a
    :class:`BlockingStore`, which awaits the store's own coroutines on a private event loop;
    the async-native cases below add many tasks on one loop and ``async for`` over
    ``scan_due``. No async pytest plugin is needed.
    """

    def make_async_store(self) -> AsyncCredentialStore:
        """A new connection to the backend under test; called on the suite's event loop."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_async_store()")

    def make_store(self) -> CredentialStore:
        """The async store behind a :class:`BlockingStore`; override make_async_store instead."""
        return BlockingStore(self.make_async_store, timeout=self.concurrency_timeout)

    @pytest.fixture
    def portal(self, store: CredentialStore) -> BlockingStore:
        """The ``store`` fixture as a :class:`BlockingStore`: its ``async_store`` and ``run``."""
        if not isinstance(store, BlockingStore):
            pytest.fail(
                "AsyncStoreConformance needs make_store() to return a BlockingStore; "
                "implement make_async_store() and leave make_store() alone",
                pytrace=False,
            )
        return store

    def test_tasks_compare_and_swap_loses_no_update(
        self, portal: BlockingStore, keys: KeySpace
    ) -> None:
        """50 tasks on one event loop each adding 1 ten times by CAS reach 500."""
        key = portal.put(_record(keys())).key
        deadline = time.monotonic() + self.concurrency_timeout

        async def race() -> None:
            await asyncio.gather(
                *(
                    _increment_async(portal.async_store, key, _INCREMENTS_PER_TASK, deadline)
                    for _ in range(_TASKS)
                )
            )

        portal.run(race)
        final = portal.get(key)
        assert _TASKS * _INCREMENTS_PER_TASK == (final and final.failures)

    def test_scan_due_is_an_async_iterator(self, portal: BlockingStore, keys: KeySpace) -> None:
        """scan_due() returns an async iterator that ``async for`` consumes."""
        due = portal.put(_record(keys("due"), expires_at=_BEFORE - _MS)).key
        portal.put(_record(keys("later"), expires_at=_BEFORE + _MS))

        async def scan() -> tuple[bool, list[str]]:
            result = portal.async_store.scan_due(_BEFORE)
            return isinstance(result, AsyncIterator), [key async for key in result]

        is_async_iterator, scanned = portal.run(scan)
        assert (True, [due]) == (is_async_iterator, keys.own(scanned))

    def test_now_is_aware_utc_near_the_hosts_clock_and_never_goes_back(  # type: ignore[override]
        self, portal: BlockingStore
    ) -> None:
        """An async store's ``now()``, if it has one, keeps the same promises as a sync one's."""
        now = getattr(portal.async_store, "now", None)
        if now is None:
            pytest.skip(
                f"{type(portal.async_store).__name__} has no now(): leases are judged on the "
                "manager's clock"
            )

        async def read() -> tuple[datetime, list[object], datetime]:
            before = datetime.now(UTC)
            readings = [await now() for _ in range(_CLOCK_READINGS)]
            return before, readings, datetime.now(UTC)

        before, readings, after = portal.run(read)
        if readings[0] is None:
            pytest.skip(f"{type(portal.async_store).__name__}.now() returned None: no clock")
        report = _clock_report(readings, before, after, self.clock_tolerance)
        assert dict.fromkeys(report, True) == report
