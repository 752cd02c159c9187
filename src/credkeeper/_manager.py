"""``TokenManager`` and ``AsyncTokenManager``: the drivers of the refresh flow.

Each manager performs the effects ``_flow`` yields with its own kind of I/O, keeps an in-process
cache of valid credentials, and merges concurrent refreshes of one key into one (single-flight).
No policy lives here: a branch added to one driver would have to be added to the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Hashable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx

from ._budget import budget
from ._clock import Clock, SystemClock
from ._closing import AsyncClosing, Closing
from ._codec import TokenCodec, probe_codec
from ._credentials import Credentials
from ._events import EventHook, Subscribers
from ._exceptions import ConfigurationError, ReauthRequired, StoreUnavailable
from ._flow import (
    Deadline,
    Effect,
    Flow,
    JournalDiscard,
    JournalForget,
    JournalPending,
    JournalWrite,
    Load,
    Policy,
    Remove,
    Save,
    Send,
    Sleep,
    StoreNow,
    delete_flow,
    get_flow,
    put_flow,
    refresh_flow,
)
from ._journal import RescueJournal, default_journal_dir
from ._keyring import KeyRing
from ._notices import ChangeNotices, notices_of
from ._provider import Provider
from ._record import check_key
from ._secret import Secret
from ._store import (
    AsyncCredentialStore,
    CredentialStore,
    as_async_store,
    declares_plaintext,
    is_async_store,
)
from .storekit import error_boundary

__all__ = ["AsyncTokenManager", "TokenManager"]

T = TypeVar("T")
S = TypeVar("S")
H = TypeVar("H")

DEFAULT_LEEWAY = timedelta(minutes=15)

# Seconds a reading of the store's clock is carried forward on this host's monotonic clock
# before the store is asked again: every refresh judges leases on the store's clock, and a
# round trip per refresh to read it cost a quarter of a sweep's store calls.
STORE_CLOCK_REUSE = 30.0


def _duration(value: timedelta | float, name: str, *, minimum: float = 0.0) -> timedelta:
    if isinstance(value, bool) or not isinstance(value, timedelta | int | float):
        raise ConfigurationError(f"{name} must be a timedelta or a number of seconds")
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum:g} seconds, got {seconds:g}")
    return timedelta(seconds=seconds)


def _min_valid(value: timedelta | float | None) -> timedelta | None:
    return None if value is None else _duration(value, "min_valid")


def concrete_signature(init: Callable[..., None], **types: str) -> inspect.Signature:
    """``init``'s signature without ``self``, with the type variables in it replaced by
    ``types``, so that ``help()`` and API docs show each class's own types."""
    signature = inspect.signature(init)
    parameters = [
        parameter.replace(annotation=types.get(name, parameter.annotation))
        for name, parameter in list(signature.parameters.items())[1:]
    ]
    return signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty)


class _Base(Generic[S, H]):
    """Settings and state shared by both managers, and their one constructor; no I/O."""

    store: Any

    def __init__(
        self,
        store: S,
        provider: Provider,
        *,
        keyring: KeyRing | None = None,
        leeway: timedelta | float = DEFAULT_LEEWAY,
        lease_ttl: timedelta | float = 60.0,
        refresh_timeout: timedelta | float = 30.0,
        cooldown: timedelta | float = 30.0,
        journal: RescueJournal | str | os.PathLike[str] | None = None,
        cache: bool = True,
        http: H | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        owner: str | None = None,
        accept_plaintext: bool = False,
        codec: TokenCodec | None = None,
        events: EventHook | None = None,
    ) -> None:
        plaintext_store = declares_plaintext(store)
        if not isinstance(provider, Provider):
            raise ConfigurationError(
                "provider must be a credkeeper.Provider, e.g. Provider.claude_code()"
            )
        if keyring is not None and not isinstance(keyring, KeyRing):
            raise ConfigurationError("keyring must be a credkeeper.KeyRing or None")
        if codec is not None and not isinstance(codec, TokenCodec):
            raise ConfigurationError(
                "codec must have seal(value, *, key, field) and unseal(value, *, key, field) "
                "methods (credkeeper.TokenCodec)"
            )
        if plaintext_store and codec is not None:
            raise ConfigurationError(
                "the store is declared plaintext (its plaintext option), so it keeps tokens as "
                "they are; drop codec=, or drop the store's plaintext option to seal with it"
            )
        if events is not None and not callable(events):
            raise ConfigurationError(
                "events must be a callable taking a credkeeper.RefreshEvent, or None"
            )
        if not isinstance(accept_plaintext, bool):
            raise ConfigurationError(
                f"accept_plaintext must be True or False, not {type(accept_plaintext).__name__}"
            )
        refresh = _duration(refresh_timeout, "refresh_timeout", minimum=0.1)
        lease = _duration(lease_ttl, "lease_ttl", minimum=1.0)
        if lease.total_seconds() <= refresh.total_seconds() + provider.timeout:
            raise ConfigurationError(
                "lease_ttl must exceed refresh_timeout plus the provider's timeout "
                f"({refresh.total_seconds() + provider.timeout:g} s), or a slow refresh "
                "could be taken over while it is still running"
            )
        if codec is not None:
            # Last, once everything cheap is checked: a codec may call a key service.
            probe_codec(codec)
        if isinstance(journal, RescueJournal):
            self.journal = journal
        else:
            directory = Path(journal) if journal is not None else default_journal_dir()
            self.journal = RescueJournal(directory, keyring=keyring)
        self._nonce = secrets.token_hex(4)
        self._subscribers = Subscribers(events)
        # The store's clock as last read, and this host's monotonic clock then.
        self._store_clock: tuple[datetime, float] | None = None
        self._owner = owner
        self._cache: dict[str, Credentials] | None = {} if cache else None
        self.policy = Policy(
            provider=provider,
            # A key ring given as the codec also opens what it sealed.
            keyring=codec if isinstance(codec, KeyRing) else keyring,
            codec=None if plaintext_store else (codec if codec is not None else keyring),
            clock=clock or SystemClock(),
            rng=rng or random.Random(),  # noqa: S311 - jitter, not secrecy
            owner="",
            leeway=_duration(leeway, "leeway"),
            lease_ttl=lease,
            refresh_timeout=refresh,
            cooldown=_duration(cooldown, "cooldown", minimum=0.0),
            max_cooldown=timedelta(minutes=10),
            accept_plaintext=accept_plaintext,
            events=self._subscribers,
        )
        self._open(store, http)

    def _open(self, store: S, http: H | None) -> None:
        """Take the store and the HTTP client: the one part of construction that differs."""
        raise NotImplementedError  # pragma: no cover

    def subscribe(self, hook: EventHook) -> Callable[[], None]:
        """Tell ``hook`` of every :class:`RefreshEvent` from now on, besides the ``events``
        given at construction; returns a function that stops telling it.

        For consumers that arrive after the manager was made: the service's webhooks and
        metrics subscribe while it runs and leave as it stops.
        """
        return self._subscribers.add(hook)

    @property
    def owner(self) -> str:
        """This manager's lease owner id: host, process and a random suffix."""
        return self._owner or f"{socket.gethostname()}:{os.getpid()}:{self._nonce}"

    def _policy(self) -> Policy:
        # The pid is read per call so a manager inherited through fork leases as its new process.
        return self.policy if self.policy.owner == self.owner else self._bind_owner()

    def _bind_owner(self) -> Policy:
        self.policy = dataclasses.replace(self.policy, owner=self.owner)
        return self.policy

    def _ahead(self, leeway: timedelta | None, events: EventHook | None = None) -> Policy:
        """The policy of a call wanting credentials valid ``leeway`` ahead (the manager's own
        leeway when that is longer, or ``None``), its events told to ``events`` if given."""
        policy = self._policy()
        changes: dict[str, Any] = {}
        if leeway is not None and leeway > policy.leeway:
            changes["leeway"] = leeway
        if events is not None:
            changes["events"] = events
        return dataclasses.replace(policy, **changes) if changes else policy

    def _cached(self, key: str, leeway: timedelta | None) -> Credentials | None:
        if self._cache is None:
            return None
        credentials = self._cache.get(key)
        if credentials is None:
            return None
        # The plain policy on the hot path: binding the owner reads the host name.
        policy = self.policy if leeway is None else self._ahead(leeway)
        if not policy.fresh(credentials):
            return None
        return credentials

    def _notices(self) -> ChangeNotices | None:
        """The store's change notices, which end a wait for a peer's refresh early; ``None``
        when the store posts none, or when waits are a test clock's (which must stay its own).
        """
        if type(self.policy.clock) is not SystemClock:
            return None
        return notices_of(self.store)

    def _budget(self, until: datetime | None) -> contextlib.AbstractContextManager[None]:
        """The budget the store's own retries share with the flow, up to ``until``."""
        if until is None:
            return contextlib.nullcontext()
        return budget((until - self.policy.now()).total_seconds())

    def _carried_store_clock(self) -> datetime | None:
        """The store's clock carried forward from a recent reading, or ``None`` to read it.

        Carried on the monotonic clock, so a step of this host's wall clock cannot skew it.
        """
        reading = self._store_clock
        if reading is None:
            return None
        value, at = reading
        elapsed = time.monotonic() - at
        if not 0.0 <= elapsed <= STORE_CLOCK_REUSE:
            return None
        return value + timedelta(seconds=elapsed)

    def _read_store_clock(self, value: object, asked: float) -> object:
        """Keep ``value``, the store's clock just read, for :meth:`_carried_store_clock`.

        ``asked`` is the monotonic time the read began: the store read its clock somewhere
        between then and now, so the reading is taken as of the middle, not as of its arrival.
        """
        if isinstance(value, datetime) and value.utcoffset() is not None:
            self._store_clock = (value, (asked + time.monotonic()) / 2)
        return value

    def _remember(self, key: str, credentials: Credentials | None) -> None:
        if self._cache is None:
            return
        if credentials is None:
            self._cache.pop(key, None)
        else:
            self._cache[key] = credentials


def _failed(failed: str | Secret | None) -> Secret | None:
    if failed is None or isinstance(failed, Secret):
        return failed
    return Secret(failed)


class _Flight:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class TokenManager(Closing, _Base[CredentialStore, httpx.Client]):
    """Keeps credentials fresh for many keys in one :class:`CredentialStore`, from threads.

    ``get(key)`` returns credentials valid for at least ``leeway`` (15 minutes by default, well
    beyond the 5 minutes at which the wrapper's CLI would refresh by itself). A refresh happens
    once per expiry across the threads of a process (single-flight) and across processes and
    hosts (a compare-and-swap lease in the store). New tokens go to the rescue journal and the
    store before any caller sees them.

    Each call runs under one deadline, ``refresh_timeout``, which the store's own retries share.

    Token fields are sealed with ``keyring``, or with the application's own ``codec`` (a
    :class:`TokenCodec`) when other code reads them; a store declared ``plaintext`` keeps them
    as they are (``keyring`` then seals only the rescue journal, and opens values sealed before).
    With a ``keyring`` as the codec, a token stored in plain text is refused (anyone able to
    write the store could plant one) unless ``accept_plaintext`` is set. A ``codec`` is tried
    once here, on a test value: one that cannot seal and unseal is a ConfigurationError before
    any provider call.

    ``events`` is called with a :class:`RefreshEvent` for each decision the refresh makes
    (started, succeeded or failed, a provider round trip, a lost race adopted, re-auth required,
    a lease conflict, a cooldown, a rescue); it never receives a token. ``credkeeper.metrics``
    turns them into Prometheus metrics.
    """

    __signature__ = concrete_signature(
        _Base.__init__, store="CredentialStore", http="httpx.Client | None"
    )
    store: CredentialStore

    def _open(self, store: CredentialStore, http: httpx.Client | None) -> None:
        if is_async_store(store):
            raise ConfigurationError(
                f"{store!r} is an asyncio store; use AsyncTokenManager with it, or open the "
                "store with a synchronous driver for TokenManager"
            )
        self.store = store
        self._own_http = http is None
        self._http = http or httpx.Client()
        self._flights: dict[Hashable, _Flight] = {}
        self._flights_lock = threading.Lock()

    @classmethod
    def from_env(cls, **options: Any) -> TokenManager:
        """A manager on what the ``CREDKEEPER_*`` variables name, as the command line reads them.

        :class:`~credkeeper.Settings` reads the store, key ring or codec, provider and journal;
        ``options`` (``leeway``, ``clock``, ...) go to the constructor.
        """
        from ._settings import Settings  # noqa: PLC0415 - it imports this module

        return Settings.from_env().manager(**options)

    def __repr__(self) -> str:
        return f"TokenManager(store={self.store!r}, provider={self.policy.provider.name!r})"

    def get(self, key: str, *, min_valid: timedelta | float | None = None) -> Credentials:
        """Credentials for ``key`` valid beyond the leeway, refreshing them if needed.

        ``min_valid`` (a timedelta or seconds) asks for credentials valid at least that long
        when it is longer than the leeway. Keep it well under the tokens' lifetime (about 8
        hours): credentials that can never be valid that long are refreshed on every call.
        """
        check_key(key)
        leeway = _min_valid(min_valid)
        cached = self._cached(key, leeway)
        if cached is not None:
            return cached
        return self._once(
            ("get", key, leeway),
            lambda: self._run_cached(key, get_flow(self._ahead(leeway), key)),
        )

    def _refresh_ahead(
        self, key: str, leeway: timedelta, events: EventHook, stale: Secret | None = None
    ) -> Credentials:
        """The sweeper's turn on ``key``: :meth:`get` with ``leeway`` (and ``stale``, see
        :func:`get_flow`), its flow alone, sharing no caller's flight, its events told to
        ``events`` too."""
        return self._run_cached(key, get_flow(self._ahead(leeway, events), key, stale=stale))

    def refresh(self, key: str, *, failed: str | Secret | None = None) -> Credentials:
        """Refresh ``key`` now; with ``failed``, only if the store still holds that access token.

        Pass the access token the wrapper refused as ``failed`` after an auth failure: when
        another worker has refreshed meanwhile, its tokens are returned without a provider call.
        """
        check_key(key)
        bad = _failed(failed)
        return self._once(
            ("refresh", key, bad),
            lambda: self._run_cached(key, refresh_flow(self._policy(), key, failed=bad)),
        )

    def put(self, key: str, credentials: Credentials) -> bool:
        """Store ``credentials`` under ``key`` (a login or re-login), replacing what is there;
        whether there was nothing to replace (of writers racing to create a key, one is told
        so)."""
        check_key(key)
        if not isinstance(credentials, Credentials):
            raise ConfigurationError("credentials must be a credkeeper.Credentials")
        self._remember(key, None)
        return self._drive(put_flow(self._policy(), key, credentials))

    def delete(self, key: str) -> bool:
        """Remove the credential under ``key``; whether there was one."""
        check_key(key)
        self._remember(key, None)
        return self._drive(delete_flow(self._policy(), key))

    def close(self) -> None:
        """Close the HTTP client if the manager made it, and the store.

        Refreshes other threads have in flight finish first (for at most ``lease_ttl``): one
        cut off between the provider's answer and the store write would leave the new refresh
        token in the journal only, and the store with the one the provider just consumed.
        """
        with self._flights_lock:
            flights = list(self._flights.values())
        until = time.monotonic() + self.policy.lease_ttl.total_seconds()
        for flight in flights:
            flight.done.wait(max(0.0, until - time.monotonic()))
        if self._own_http:
            self._http.close()
        self.store.close()

    def _run_cached(self, key: str, flow: Flow[Credentials]) -> Credentials:
        try:
            credentials = self._drive(flow)
        except ReauthRequired:
            self._remember(key, None)
            raise
        self._remember(key, credentials)
        return credentials

    def _once(self, flight_key: Hashable, work: Callable[[], T]) -> T:
        with self._flights_lock:
            flight = self._flights.get(flight_key)
            leader = flight is None
            if flight is None:
                flight = self._flights[flight_key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.result  # type: ignore[no-any-return]
        try:
            flight.result = work()
            return flight.result  # type: ignore[no-any-return]
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._flights_lock:
                del self._flights[flight_key]
            flight.done.set()

    def _drive(self, flow: Flow[T]) -> T:
        value: Any = None
        error: BaseException | None = None
        until: datetime | None = None
        # When this flow last read the store: a change posted since then ends a peer's wait.
        loaded = time.monotonic()
        try:
            while True:
                try:
                    effect = flow.throw(error) if error is not None else flow.send(value)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                value, error = None, None
                if isinstance(effect, Deadline):
                    until = effect.at
                    continue
                if isinstance(effect, Load):
                    loaded = time.monotonic()
                try:
                    with self._budget(until):
                        value = self._perform(effect, loaded)
                except Exception as exc:  # noqa: BLE001 - handed to the flow, which decides
                    error = exc
        finally:
            # Interrupted (KeyboardInterrupt, a cancelled task): the flow ends here, not at GC.
            flow.close()

    def _perform(self, effect: Effect, loaded: float) -> Any:
        match effect:
            case Load(key):
                with _store_errors(key):
                    return self.store.get(key)
            case Save(record):
                with _store_errors(record.key):
                    return self.store.put(record)
            case Remove(key):
                with _store_errors(key):
                    return self.store.delete(key)
            case StoreNow():
                clock = getattr(self.store, "now", None)
                if clock is None:
                    return None
                carried = self._carried_store_clock()
                if carried is not None:
                    return carried
                asked = time.monotonic()
                with _store_errors(None):
                    return self._read_store_clock(clock(), asked)
            case Send(request):
                return self._http.send(request)
            case Sleep(seconds, key, seen) if key is not None and (notices := self._notices()):
                return notices.wait(key, since=loaded, seconds=seconds, seen=seen)
            case Sleep(seconds):
                return self.policy.clock.sleep(seconds)
            case JournalPending(key, rescan) if rescan or self.journal.has_pending(key):
                return self.journal.pending(key, rescan=rescan)
            case JournalPending():
                return []
            case JournalWrite(entry):
                return self.journal.write(entry)
            case JournalDiscard(entry):
                return self.journal.discard(entry)
            case JournalForget(entry):
                return self.journal.forget(entry)
        raise AssertionError(f"unknown effect {effect!r}")  # pragma: no cover


class AsyncTokenManager(
    AsyncClosing, _Base[AsyncCredentialStore | CredentialStore, httpx.AsyncClient]
):
    """The asyncio twin of :class:`TokenManager`: same flow, same guarantees, for tasks.

    Sync-only stores are wrapped in a thread-offload store. A refresh runs in its own task, so
    a caller cancelled mid-refresh does not abandon the store write. Use one manager per loop.
    """

    __signature__ = concrete_signature(
        _Base.__init__,
        store="AsyncCredentialStore | CredentialStore",
        http="httpx.AsyncClient | None",
    )
    store: AsyncCredentialStore

    def _open(
        self, store: AsyncCredentialStore | CredentialStore, http: httpx.AsyncClient | None
    ) -> None:
        self.store = as_async_store(store)
        self._own_http = http is None
        self._http = http or httpx.AsyncClient()
        self._flights: dict[Hashable, asyncio.Task[Any]] = {}

    @classmethod
    def from_env(cls, **options: Any) -> AsyncTokenManager:
        """The asyncio twin of :meth:`TokenManager.from_env`: same variables, same settings."""
        from ._settings import Settings  # noqa: PLC0415 - it imports this module

        return Settings.from_env().async_manager(**options)

    def __repr__(self) -> str:
        return f"AsyncTokenManager(store={self.store!r}, provider={self.policy.provider.name!r})"

    async def get(self, key: str, *, min_valid: timedelta | float | None = None) -> Credentials:
        """Credentials for ``key`` valid beyond the leeway (or ``min_valid``, when longer),
        refreshing them if needed; see :meth:`TokenManager.get`."""
        check_key(key)
        leeway = _min_valid(min_valid)
        cached = self._cached(key, leeway)
        if cached is not None:
            return cached
        return await self._once(
            ("get", key, leeway),
            lambda: self._run_cached(key, get_flow(self._ahead(leeway), key)),
        )

    async def _refresh_ahead(
        self, key: str, leeway: timedelta, events: EventHook, stale: Secret | None = None
    ) -> Credentials:
        """The async form of :meth:`TokenManager._refresh_ahead`."""
        flow = get_flow(self._ahead(leeway, events), key, stale=stale)
        return await self._run_cached(key, flow)

    async def refresh(self, key: str, *, failed: str | Secret | None = None) -> Credentials:
        """Refresh ``key`` now; with ``failed``, only if the store still holds that access token."""
        check_key(key)
        bad = _failed(failed)
        return await self._once(
            ("refresh", key, bad),
            lambda: self._run_cached(key, refresh_flow(self._policy(), key, failed=bad)),
        )

    async def put(self, key: str, credentials: Credentials) -> bool:
        """Store ``credentials`` under ``key``, replacing what is there; whether there was
        nothing to replace."""
        check_key(key)
        if not isinstance(credentials, Credentials):
            raise ConfigurationError("credentials must be a credkeeper.Credentials")
        self._remember(key, None)
        return await self._drive(put_flow(self._policy(), key, credentials))

    async def delete(self, key: str) -> bool:
        """Remove the credential under ``key``; whether there was one."""
        check_key(key)
        self._remember(key, None)
        return await self._drive(delete_flow(self._policy(), key))

    async def aclose(self) -> None:
        """Close the HTTP client if the manager made it, and the store.

        Refreshes in flight finish first (for at most ``lease_ttl``), including those whose
        caller stopped waiting: one cut off between the provider's answer and the store write
        would leave the new refresh token in the journal only.
        """
        if self._flights:
            await asyncio.wait(
                list(self._flights.values()), timeout=self.policy.lease_ttl.total_seconds()
            )
        if self._own_http:
            await self._http.aclose()
        await self.store.close()

    async def _run_cached(self, key: str, flow: Flow[Credentials]) -> Credentials:
        try:
            credentials = await self._drive(flow)
        except ReauthRequired:
            self._remember(key, None)
            raise
        self._remember(key, credentials)
        return credentials

    async def _once(self, flight_key: Hashable, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        task = self._flights.get(flight_key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._flights[flight_key] = task

            def finished(done: asyncio.Task[Any]) -> None:
                self._flights.pop(flight_key, None)
                if not done.cancelled():
                    done.exception()  # retrieved here so an unawaited failure is not reported

            task.add_done_callback(finished)
        return await asyncio.shield(task)

    async def _drive(self, flow: Flow[T]) -> T:
        value: Any = None
        error: BaseException | None = None
        until: datetime | None = None
        # When this flow last read the store: a change posted since then ends a peer's wait.
        loaded = time.monotonic()
        try:
            while True:
                try:
                    effect = flow.throw(error) if error is not None else flow.send(value)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                value, error = None, None
                if isinstance(effect, Deadline):
                    until = effect.at
                    continue
                if isinstance(effect, Load):
                    loaded = time.monotonic()
                try:
                    with self._budget(until):
                        value = await self._perform(effect, loaded)
                except Exception as exc:  # noqa: BLE001 - handed to the flow, which decides
                    error = exc
        finally:
            # Interrupted (KeyboardInterrupt, a cancelled task): the flow ends here, not at GC.
            flow.close()

    async def _perform(self, effect: Effect, loaded: float) -> Any:
        match effect:
            case Load(key):
                with _store_errors(key):
                    return await self.store.get(key)
            case Save(record):
                with _store_errors(record.key):
                    return await self.store.put(record)
            case Remove(key):
                with _store_errors(key):
                    return await self.store.delete(key)
            case StoreNow():
                clock = getattr(self.store, "now", None)
                if clock is None:
                    return None
                carried = self._carried_store_clock()
                if carried is not None:
                    return carried
                asked = time.monotonic()
                with _store_errors(None):
                    return self._read_store_clock(await clock(), asked)
            case Send(request):
                return await self._http.send(request)
            case Sleep(seconds, key, seen) if key is not None and (notices := self._notices()):
                return await notices.wait_async(key, since=loaded, seconds=seconds, seen=seen)
            case Sleep(seconds):
                return await self.policy.clock.asleep(seconds)
            case JournalPending(key, rescan) if rescan or self.journal.has_pending(key):
                return await asyncio.to_thread(self.journal.pending, key, rescan=rescan)
            case JournalPending():
                return []
            case JournalWrite(entry):
                return await asyncio.to_thread(self.journal.write, entry)
            case JournalDiscard(entry):
                return await asyncio.to_thread(self.journal.discard, entry)
            case JournalForget(entry):
                # A file past retention is deleted: disk work, off the loop like a discard.
                return await asyncio.to_thread(self.journal.forget, entry)
        raise AssertionError(f"unknown effect {effect!r}")  # pragma: no cover


def _store_errors(key: str | None) -> contextlib.AbstractContextManager[None]:
    """A custom store's driver exception, escaped, as the StoreUnavailable the flow knows."""

    def translate(exc: Exception) -> StoreUnavailable:
        about = "" if key is None else f" on key {key!r}"
        return StoreUnavailable(f"the store failed{about} ({type(exc).__name__})", key=key)

    return error_boundary(translate, Exception)
