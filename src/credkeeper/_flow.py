"""The refresh flow: every decision of the engine, with no I/O.

Each flow is a generator that yields *effects* (load a record, save one, send an HTTP request,
sleep, touch the rescue journal) and receives their results, or has their exceptions thrown
into it, the way ``httpx.Auth.auth_flow`` works. ``TokenManager`` and ``AsyncTokenManager``
perform the effects, so the policy below is written once for threads and for asyncio.

The steps, explained in ``docs/design.md`` ("The refresh flow"): use a token valid beyond the
leeway; otherwise take a lease on the record by compare-and-swap so one worker across all
processes refreshes; write the answer to the rescue journal, then to the store, before anyone
uses it; on ``invalid_grant`` look for a newer token before condemning the credential; on a
throttled or failing provider, back off, fall back to the still-valid access token, and record
a cooldown for the whole fleet.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Generator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import httpx

from ._clock import Clock
from ._codec import TokenCodec
from ._credentials import Credentials
from ._events import EventHook, EventKind, RefreshEvent, emit
from ._exceptions import (
    ConfigurationError,
    ConflictError,
    CredentialNotFound,
    CredkeeperError,
    DecryptionError,
    InvalidGrant,
    ProviderError,
    ProviderUnavailable,
    ReauthRequired,
    RefreshTimeout,
    StoreContention,
    StoreCorrupted,
    StoreUnavailable,
)
from ._journal import RescueEntry, RescueJournal, fingerprint
from ._keyring import KeyRing
from ._provider import Provider, SalvagedAnswer
from ._record import Record, Status
from ._secret import Secret

__all__ = [
    "Deadline",
    "Effect",
    "Flow",
    "JournalDiscard",
    "JournalForget",
    "JournalPending",
    "JournalWrite",
    "Load",
    "Policy",
    "Save",
    "Send",
    "Sleep",
    "StoreNow",
    "delete_flow",
    "get_flow",
    "put_flow",
    "refresh_flow",
]

logger = logging.getLogger("credkeeper")

T = TypeVar("T")


# -- effects ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Load:
    """Read the record under ``key`` (result: ``Record | None``)."""

    key: str


@dataclass(frozen=True, slots=True)
class Save:
    """Compare-and-swap ``record`` into the store (result: the stored ``Record``)."""

    record: Record


@dataclass(frozen=True, slots=True)
class Remove:
    """Delete the record under ``key`` (result: ``bool``)."""

    key: str


@dataclass(frozen=True, slots=True)
class Send:
    """Send a request to the token endpoint (result: ``httpx.Response``)."""

    request: httpx.Request


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait ``seconds`` on the manager's clock; with ``key``, for a peer's refresh of that key,
    which a store that posts changes (:class:`~credkeeper.storekit.ChangeNotices`) ends early
    once the record moves on from version ``seen``, the one the last read found."""

    seconds: float
    key: str | None = None
    seen: str | None = None


@dataclass(frozen=True, slots=True)
class StoreNow:
    """Read the store's own clock (result: ``datetime``, or ``None`` when it has none)."""


@dataclass(frozen=True, slots=True)
class Deadline:
    """From now on, bound the I/O of this flow (a store's own retries) by ``at``."""

    at: datetime


@dataclass(frozen=True, slots=True)
class JournalPending:
    """Rescue entries for ``key`` (result: ``list[RescueEntry]``); ``rescan`` rereads the disk."""

    key: str
    rescan: bool = False


@dataclass(frozen=True, slots=True)
class JournalWrite:
    """Persist a rescue entry durably."""

    entry: RescueEntry


@dataclass(frozen=True, slots=True)
class JournalDiscard:
    """Delete a rescue entry whose tokens the store now holds."""

    entry: RescueEntry


@dataclass(frozen=True, slots=True)
class JournalForget:
    """Stop offering a rescue entry that belongs to another store or an older login."""

    entry: RescueEntry


Effect = (
    Load
    | Save
    | Remove
    | Send
    | Sleep
    | StoreNow
    | Deadline
    | JournalPending
    | JournalWrite
    | JournalDiscard
    | JournalForget
)
Flow = Generator[Effect, Any, T]


# -- policy ----------------------------------------------------------------------------


@dataclass(slots=True)
class RefreshTimes:
    """How long refreshes take, as this manager has seen them, for waiters to plan their reads.

    Learnt from the manager's own refreshes (lease taken to tokens stored) and from the peers'
    it waited on (between the last read that found the lease held and the one right after it
    that found the tokens); the estimate moves 30 % of the way towards each new observation,
    one at most twice the estimate counting as twice it, so that one refresh slowed by the
    provider's retries does not put every waiter to sleep for seconds.
    """

    expected: float | None = None

    def observe(self, seconds: float) -> None:
        """Take one refresh's duration into the estimate."""
        previous = self.expected
        if previous is None:
            self.expected = seconds
        else:
            self.expected = previous + 0.3 * (min(seconds, 2 * previous) - previous)


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Everything a flow needs besides effects: settings, the clock, randomness, the codec."""

    provider: Provider
    # Opens values credkeeper sealed (``ck1:``), whatever seals new ones.
    keyring: KeyRing | None = field(repr=False)
    # Seals what the manager writes: the key ring, the application's codec, or None (plain).
    # Not in the repr: an application's codec may show its secret in its own.
    codec: TokenCodec | None = field(repr=False)
    clock: Clock
    rng: random.Random
    owner: str
    leeway: timedelta
    lease_ttl: timedelta
    refresh_timeout: timedelta
    cooldown: timedelta
    max_cooldown: timedelta
    store_retries: int = 3
    accept_plaintext: bool = False
    # Keys whose plaintext tokens were already reported, so each is logged once per manager.
    plaintext_seen: set[str] = field(default_factory=set)
    # Told what the flow decides (docs: credkeeper._events); never given a token.
    events: EventHook | None = field(default=None, repr=False)
    # Shared by every call of the manager (and kept when the policy is rebound after a fork).
    times: RefreshTimes = field(default_factory=RefreshTimes, repr=False)

    def now(self) -> datetime:
        """The clock's current time."""
        return self.clock.now()

    def emit(
        self, kind: EventKind, key: str, outcome: str | None = None, duration: float | None = None
    ) -> None:
        """Tell the events hook and the DEBUG log; the hook's failures are only logged."""
        if self.events or logger.isEnabledFor(logging.DEBUG):
            emit(self.events, RefreshEvent(kind, key, outcome, duration))

    def fresh(self, credentials: Credentials) -> bool:
        """Whether ``credentials`` stay valid beyond the leeway, so no refresh is due yet.

        The one freshness check: the flow asks it of a stored record, the drivers of their cache.
        """
        return not credentials.expires_within(self.leeway, now=self.now())

    def credentials(self, record: Record) -> Credentials:
        """The credentials in ``record``, unsealed when a key ring is set."""
        return Credentials(
            access_token=self._open(record, "access_token"),
            refresh_token=self._open(record, "refresh_token"),
            expires_at=record.expires_at,
            scopes=record.scopes,
            subscription_type=record.subscription_type,
        )

    def _open(self, record: Record, name: str) -> Secret:
        value: str = getattr(record, name)
        if self.codec is not None and not isinstance(self.codec, KeyRing):
            return _open_with(self.codec, record, name, value)
        if KeyRing.is_sealed(value):
            if self.keyring is None:
                raise ConfigurationError(
                    f"the credential under key {record.key!r} is encrypted; pass keyring= "
                    "(e.g. KeyRing.from_env()) to the manager"
                )
            return Secret(self.keyring.unseal(value, key=record.key, field=name))
        if self.codec is not None:
            # Whoever can write the store but holds no key could plant tokens of their choosing.
            if not self.accept_plaintext:
                raise StoreCorrupted(
                    f"the {name} under key {record.key!r} is stored in plain text although a "
                    "key ring is set; store the credential again with put() to seal it, or "
                    "pass accept_plaintext=True if the application writes plain tokens itself",
                    key=record.key,
                )
            if record.key not in self.plaintext_seen:
                self.plaintext_seen.add(record.key)
                logger.warning(
                    "key %r: accepting a plain-text %s (accept_plaintext=True)",
                    record.key,
                    name,
                )
        return Secret(value)

    def _seal(self, key: str, name: str, token: Secret) -> str:
        """``token`` as the store keeps it; a codec failure is a write that did not happen.

        The codec passed its check when the manager was built, so a failure now is most
        likely its key service's, which a retry may cure: it is raised as StoreUnavailable, and
        after a refresh takes the path of a store that did not take the new tokens.
        """
        if self.codec is None:
            return token.get_secret_value()
        try:
            sealed = self.codec.seal(token.get_secret_value(), key=key, field=name)
        except Exception as exc:  # noqa: BLE001 - named by type: its text may quote the token
            failure = type(exc).__name__
        else:
            if isinstance(sealed, str) and sealed:
                return sealed
            failure = f"it gave a {type(sealed).__name__}, not a non-empty str"
        raise StoreUnavailable(
            f"the codec {type(self.codec).__name__} could not seal the {name} for key {key!r} "
            f"({failure})",
            key=key,
        )

    def record(
        self,
        key: str,
        credentials: Credentials,
        *,
        base: Record | None,
        obtained: datetime | None = None,
    ) -> Record:
        """An active, unleased record holding ``credentials``, versioned as ``base``.

        ``refreshed_at`` is when the tokens were obtained: now, for the provider's answer or a
        login stored with put; ``obtained`` for tokens a rescue journal kept since then. The
        sweeper's keep-alive reads it.
        """
        access = self._seal(key, "access_token", credentials.access_token)
        refresh = self._seal(key, "refresh_token", credentials.refresh_token)
        return Record(
            key=key,
            access_token=access,
            refresh_token=refresh,
            expires_at=credentials.expires_at,
            scopes=credentials.scopes,
            subscription_type=credentials.subscription_type,
            status=Status.ACTIVE,
            refreshed_at=self.now() if obtained is None else obtained,
            version=None if base is None else base.version,
        )

    def poll_delay(self, attempt: int) -> float:
        """How long to back off after a lost compare-and-swap: 50 ms doubling to 1 s."""
        return min(1.0, 0.05 * 2.0**attempt) * self.rng.uniform(0.5, 1.0)

    def wait_delay(self, elapsed: float) -> float:
        """How long to sleep before re-reading a record whose peer lease began ``elapsed`` s ago.

        Until the holder's expected finish, then in steps of a tenth of the time it has taken so
        far (20 ms at least): a waiter in another process learns of the new tokens at most a
        tenth of a refresh late (plus one read), where a schedule fixed in advance overshoots by
        up to its last step. With an estimate that holds, that is three or four reads for a
        refresh under a second; before the first estimate, a read every 20 ms for the first
        0.2 s. Never more than a second between reads, so a holder that died is noticed when its
        lease runs out. The lease's start is read as ``lease_until - lease_ttl``: every manager
        of a fleet should use the same ``lease_ttl``.
        """
        expected = self.times.expected
        if expected is not None and elapsed < expected:
            return min(1.0, expected - elapsed)
        return min(1.0, max(0.02, 0.1 * elapsed)) * self.rng.uniform(0.9, 1.0)

    def retry_delay(self, attempt: int, retry_after: float | None) -> float:
        """Jittered exponential backoff for the provider, never shorter than ``Retry-After``."""
        delay: float = min(8.0, 0.5 * 2.0**attempt) * self.rng.uniform(0.5, 1.0)
        return max(delay, retry_after or 0.0)

    def cooldown_for(self, failures: int, retry_after: float | None) -> timedelta:
        """How long the fleet leaves the provider alone after ``failures`` failed refreshes."""
        grown: timedelta = self.cooldown * 2.0 ** min(max(failures - 1, 0), 10)
        return max(min(grown, self.max_cooldown), timedelta(seconds=retry_after or 0))


def _open_with(codec: TokenCodec, record: Record, name: str, value: str) -> Secret:
    """``value`` opened by the application's codec; any failure is one opaque error."""
    try:
        plain = codec.unseal(value, key=record.key, field=name)
    except CredkeeperError:
        raise
    except Exception:  # noqa: BLE001 - the codec's own error may quote the value
        plain = None
    if not isinstance(plain, str) or not plain:
        raise DecryptionError(
            f"the codec could not open the {name} under key {record.key!r}; check that "
            "it is the scheme (and key) the application stores this field with"
        )
    return Secret(plain)


def _skew(policy: Policy, store_now: object) -> timedelta:
    """How far the store's clock (``StoreNow``'s answer) is ahead of the manager's."""
    if store_now is None:
        return timedelta(0)
    if not isinstance(store_now, datetime) or store_now.utcoffset() is None:
        raise ConfigurationError(
            f"the store's now() must return an aware datetime or None, got {store_now!r}"
        )
    return store_now - policy.now()


def _usable(credentials: Credentials, failed: Secret | None, now: datetime) -> bool:
    """Whether the access token may still be handed out: unexpired and not known to fail."""
    return credentials.expires_at > now and credentials.access_token != failed


@dataclass(slots=True)
class _Run:
    """One refresh a flow started: when, and whether its end was already reported."""

    key: str
    started: datetime
    ended: bool = False

    def end(self, policy: Policy, kind: EventKind, outcome: str) -> None:
        """Report the refresh's end, once: the first end reported is the one that counts."""
        if not self.ended:
            self.ended = True
            seconds = (policy.now() - self.started).total_seconds()
            if outcome == "ok":
                policy.times.observe(seconds)
            policy.emit(kind, self.key, outcome, seconds)


# Why a refresh that raised ended, most specific first.
_FAILURES: tuple[tuple[type[BaseException], str], ...] = (
    (ReauthRequired, "invalid_grant"),
    (ProviderUnavailable, "unavailable"),
    (ProviderError, "provider_error"),
    (StoreContention, "store_contention"),
    (StoreUnavailable, "store_unavailable"),
    (CredentialNotFound, "deleted"),
    (RefreshTimeout, "timeout"),
    (GeneratorExit, "interrupted"),
)


def _failure(exc: BaseException) -> str:
    return next((outcome for kind, outcome in _FAILURES if isinstance(exc, kind)), "error")


def _provider_outcome(exc: ProviderError | httpx.TransportError) -> str:
    if isinstance(exc, InvalidGrant):
        return "invalid_grant"
    if isinstance(exc, ProviderUnavailable | httpx.TransportError):
        return "throttled" if getattr(exc, "status", None) == 429 else "unavailable"
    return "error"


# -- flows -----------------------------------------------------------------------------


def get_flow(policy: Policy, key: str, *, stale: Secret | None = None) -> Flow[Credentials]:
    """Fresh credentials for ``key``: stored ones if valid beyond the leeway, else refreshed.

    With ``stale`` (an access token still valid but due for replacement, as a keep-alive's),
    the stored credentials are refreshed too while they hold that token, and a peer's newer
    ones are taken as they are; unlike a refused token, a stale one is still handed out when
    the refresh must wait (a cooldown, a peer's lease, the store's clock down).
    """
    return (yield from _get(policy, key, failed=None, force=False, stale=stale))


def refresh_flow(policy: Policy, key: str, *, failed: Secret | None = None) -> Flow[Credentials]:
    """Refreshed credentials for ``key``, whatever the expiry of the stored ones.

    With ``failed`` (an access token the wrapper refused), only if the store still holds that
    token: a peer that refreshed meanwhile has already done the work. Without it, the stored
    access token counts as the failed one, so the refresh is forced.
    """
    return (yield from _get(policy, key, failed=failed, force=failed is None))


def _get(
    policy: Policy, key: str, *, failed: Secret | None, force: bool, stale: Secret | None = None
) -> Flow[Credentials]:
    deadline = yield from _start(policy)
    yield from _apply_rescues(policy, key, deadline, rescan=False)
    record = yield Load(key)
    if force and record is not None:
        failed = policy.credentials(record).access_token
    return (yield from _ensure_fresh(policy, key, record, failed, deadline, stale))


def put_flow(policy: Policy, key: str, credentials: Credentials) -> Flow[bool]:
    """Store ``credentials`` under ``key``, replacing what is there and making it active;
    whether this write created the record (decided by the compare-and-swap that won)."""
    deadline = yield from _start(policy)
    attempt = 0
    while True:
        current = yield Load(key)
        try:
            yield Save(policy.record(key, credentials, base=current))
        except ConflictError:
            yield from _backoff(policy, key, attempt, deadline, "storing the credentials")
            attempt += 1
            continue
        if current is not None and current.status is Status.NEEDS_REAUTH:
            # This write replaced the marked record: no other writer can report it too.
            policy.emit(EventKind.RECOVERED, key)
        return current is None


def delete_flow(policy: Policy, key: str) -> Flow[bool]:
    """Remove ``key``; a rescue entry for it has nothing left to rescue."""
    yield from _start(policy)
    # A record it cannot read (damaged, planted, or sealed elsewhere) is removed all the same.
    try:
        record = yield Load(key)
    except StoreCorrupted:
        record = None
    stored = None
    if record is not None:
        with contextlib.suppress(StoreCorrupted, DecryptionError, ConfigurationError):
            stored = fingerprint(policy.credentials(record).refresh_token)
    removed = yield Remove(key)
    if removed:
        policy.emit(EventKind.DELETED, key)
    for entry in (yield from _journal(JournalPending(key), key, [])):
        # Only entries for this store's record: the journal is shared by every store on the host.
        yield from _journal(
            (JournalDiscard if entry.replaces == stored else JournalForget)(entry), key
        )
    return bool(removed)


def _start(policy: Policy) -> Flow[datetime]:
    """The call's one deadline, which the store's own retries share through the driver."""
    deadline = policy.now() + policy.refresh_timeout
    yield Deadline(deadline)
    return deadline


def _backoff(policy: Policy, key: str, attempt: int, deadline: datetime, what: str) -> Flow[None]:
    """Wait before retry ``attempt + 1`` of ``what``, which lost a compare-and-swap.

    The first retry is immediate (a lost race usually settles on the next read); later ones back
    off with jitter. Past ``deadline``, :class:`StoreContention` says what kept failing.
    """
    delay = 0.0 if attempt == 0 else policy.poll_delay(attempt - 1)
    if policy.now() + timedelta(seconds=delay) > deadline:
        raise StoreContention(
            f"{what} for key {key!r} kept conflicting with other writers until the call's "
            "deadline; retry later, and look for a process rewriting this record in a loop",
            key=key,
        )
    if delay:
        yield Sleep(delay)


def _journal(effect: Effect, key: str, default: Any = None) -> Flow[Any]:
    """Perform a journal effect whose failure must not fail the call: log it and go on."""
    try:
        return (yield effect)
    except Exception as exc:  # noqa: BLE001 - whatever broke the journal, the store still counts
        logger.warning(
            "key %r: the rescue journal failed (%s: %s); going on without it",
            key,
            type(exc).__name__,
            exc,
        )
        return default


def _ensure_fresh(
    policy: Policy,
    key: str,
    record: Record | None,
    failed: Secret | None,
    deadline: datetime,
    stale: Secret | None = None,
) -> Flow[Credentials]:
    # One lease id per flow, not per process: two flows of one manager (a get() and a forced
    # refresh) must exclude each other exactly as two hosts do.
    owner = f"{policy.owner}/{policy.rng.getrandbits(32):08x}"
    conflicts = 0
    # How far the store's clock is ahead of ours: leases are judged on the store's clock, the
    # one every host shares, so a host whose clock runs ahead cannot take a live lease over.
    skew: timedelta | None = None
    # While waiting on a peer: when its lease began (store clock), and how long it had been
    # running at the last read that still found it held.
    waited: tuple[datetime, float] | None = None
    rescanned = False
    while True:
        if record is None:
            raise CredentialNotFound(key)
        if record.status is Status.NEEDS_REAUTH:
            raise ReauthRequired(key)
        credentials = policy.credentials(record)
        if policy.fresh(credentials) and credentials.access_token not in (failed, stale):
            if waited is not None and skew is not None:
                began, held = waited
                done = (policy.now() + skew - began).total_seconds()
                policy.times.observe((held + done) / 2)
            return credentials
        if skew is None:
            try:
                skew = _skew(policy, (yield StoreNow()))
            except StoreUnavailable:
                if _usable(credentials, failed, policy.now()):
                    return _deferred(policy, key, credentials, "store_unavailable")
                raise
        now = policy.now()
        if record.cooldown_until is not None and now + skew < record.cooldown_until:
            if _usable(credentials, failed, now):
                logger.debug("key %r: provider cooling down, using the current token", key)
                return _deferred(policy, key, credentials, "cooldown")
            wait = (record.cooldown_until - now - skew).total_seconds()
            raise ProviderUnavailable(
                f"refreshing key {key!r} is paused for {wait:.0f} s after provider failures "
                f"({record.last_error or 'unknown'})",
                retry_after=wait,
            )
        lease_until = record.lease_until
        if lease_until is not None and lease_until > now + skew and record.lease_owner != owner:
            if now >= deadline:
                if _usable(credentials, failed, now):
                    return _deferred(policy, key, credentials, "lease_busy")
                raise RefreshTimeout(key)
            began = lease_until - policy.lease_ttl
            elapsed = max(0.0, (now + skew - began).total_seconds())
            waited = (began, elapsed)
            yield Sleep(policy.wait_delay(elapsed), key, record.version)
            record = yield Load(key)
            continue
        # Only a read right after one that found a peer's lease held times that peer's refresh.
        waited = None
        if record.lease_owner not in (None, owner) and not rescanned:
            # A lease that ran out without being released: its holder may have died between the
            # provider's answer and the store write. If it journalled that answer on this host,
            # those tokens go to the store before anyone sends the refresh token it spent.
            rescanned = True
            if (yield from _apply_rescues(policy, key, deadline, rescan=True)):
                record = yield Load(key)
                continue
        try:
            record = yield Save(
                record.replace(lease_owner=owner, lease_until=now + skew + policy.lease_ttl)
            )
        except ConflictError:
            policy.emit(EventKind.LEASE_CONFLICT, key)
            try:
                yield from _backoff(policy, key, conflicts, deadline, "taking the refresh lease")
            except StoreContention:
                if _usable(credentials, failed, policy.now()):
                    return _deferred(policy, key, credentials, "contention")
                raise
            conflicts += 1
            record = yield Load(key)
            continue
        logger.debug("key %r: lease taken, refreshing", key)
        lease_end = now + policy.lease_ttl  # on our clock, for our own retries
        run = _Run(key, now)
        policy.emit(EventKind.REFRESH_STARTED, key)
        try:
            return (
                yield from _refresh(
                    policy, run, record, credentials, failed, deadline, lease_end, skew
                )
            )
        except BaseException as exc:
            # GeneratorExit too: a flow closed mid-refresh (KeyboardInterrupt, a cancelled
            # task) still ends the refresh it started, once.
            run.end(policy, EventKind.REFRESH_FAILED, _failure(exc))
            raise


def _deferred(policy: Policy, key: str, credentials: Credentials, reason: str) -> Credentials:
    """Serve a due but still valid token without refreshing it, and say why."""
    policy.emit(EventKind.REFRESH_DEFERRED, key, reason)
    return credentials


def _refresh(
    policy: Policy,
    run: _Run,
    record: Record,
    credentials: Credentials,
    failed: Secret | None,
    deadline: datetime,
    lease_end: datetime,
    skew: timedelta,
) -> Flow[Credentials]:
    """Holding the lease: ask the provider, with retries, and persist what it answers.

    ``skew`` is how far the store's clock is ahead of ours: cooldowns are written in its time.
    """
    key = run.key
    attempt = 0
    while True:
        request = policy.provider.build_request(credentials.refresh_token)
        sent = policy.now()
        try:
            try:
                response = yield Send(request)
                fresh = policy.provider.parse_response(
                    response, previous=credentials, now=policy.now()
                )
            except (ProviderError, httpx.TransportError) as exc:
                _called(policy, key, sent, _provider_outcome(exc))
                raise
            _called(policy, key, sent, "ok")
        except InvalidGrant:
            logger.info("key %r: provider answered invalid_grant", key)
            return (
                yield from _on_invalid_grant(policy, run, credentials, record.lease_owner, deadline)
            )
        except SalvagedAnswer as exc:
            # The refresh token rotated: keep the new one, though this call cannot be served.
            logger.warning("key %r: %s", key, exc)
            run.end(policy, EventKind.REFRESH_FAILED, "provider_error")
            yield from _persist(
                policy, run, record, credentials, exc.credentials, deadline, lease_end
            )
            raise ProviderError(str(exc), status=exc.status, excerpt=exc.excerpt) from None
        except (ProviderUnavailable, httpx.TransportError) as exc:
            error = (
                exc if isinstance(exc, ProviderUnavailable) else policy.provider.unavailable(exc)
            )
            delay = policy.retry_delay(attempt, error.retry_after)
            finish = policy.now() + timedelta(seconds=delay + policy.provider.timeout)
            if finish > deadline:
                return (yield from _give_up(policy, run, record, credentials, failed, error, skew))
            logger.info("key %r: %s; retrying in %.2f s", key, error, delay)
            yield Sleep(delay)
            attempt += 1
            continue
        except ProviderError as exc:
            yield from _release(policy, key, record, skew, error=exc, retry_after=None)
            raise
        return (yield from _persist(policy, run, record, credentials, fresh, deadline, lease_end))


def _called(policy: Policy, key: str, sent: datetime, outcome: str) -> None:
    """Report one token-endpoint round trip, sent at ``sent``, and how it went."""
    policy.emit(EventKind.PROVIDER_CALL, key, outcome, (policy.now() - sent).total_seconds())


def _persist(
    policy: Policy,
    run: _Run,
    record: Record,
    used: Credentials,
    fresh: Credentials,
    deadline: datetime,
    lease_end: datetime,
) -> Flow[Credentials]:
    """Journal, then compare-and-swap the new tokens into the store, then drop the journal entry.

    The provider has consumed the old refresh token: the store write may use what is left of
    the lease, beyond the call's deadline, but not past the lease, or another host could
    present the consumed token meanwhile.
    """
    key = run.key
    entry = RescueEntry(
        id=RescueJournal.new_id(),
        key=key,
        credentials=fresh,
        replaces=fingerprint(used.refresh_token),
        created_at=policy.now(),
    )
    journaled = True
    try:
        yield JournalWrite(entry)
    except Exception as exc:  # noqa: BLE001 - whatever the journal's failure, the store write follows
        journaled = False
        logger.warning(
            "key %r: rescue journal unwritable (%s: %s); writing the store only",
            key,
            type(exc).__name__,
            exc,
        )
    write_until = max(deadline, lease_end - timedelta(seconds=policy.provider.timeout))
    yield Deadline(write_until)
    kept = (
        "they are kept in the rescue journal and will be written on the next use of the key"
        if journaled
        else "the rescue journal could not take them either; the user may have to log in again"
    )
    base = record
    failures = 0
    conflicts = 0
    while True:
        try:
            yield Save(policy.record(key, fresh, base=base))
        except ConflictError:
            current = yield Load(key)
            if current is None:
                # Deleted meanwhile, or a read that found nothing for a moment: the entry stays
                # on disk (the new refresh token may be its only copy), only no longer offered.
                yield from _discard(entry, journaled, keep_on_disk=True)
                raise CredentialNotFound(key) from None
            if fingerprint(policy.credentials(current).refresh_token) == entry.replaces:
                # Only coordination fields moved (a lease taken over): write again.
                try:
                    yield from _backoff(
                        policy, key, conflicts, write_until, "storing the refreshed tokens"
                    )
                except StoreContention as exc:
                    raise StoreContention(f"{exc}; {kept}", key=key) from None
                conflicts += 1
                base = current
                continue
            # Someone stored other tokens (a new login) while we refreshed: theirs win.
            run.end(policy, EventKind.REFRESH_SUCCEEDED, "adopted")
            yield from _discard(entry, journaled)
            yield Deadline(deadline)
            return (yield from _ensure_fresh(policy, key, current, None, deadline))
        except StoreUnavailable as exc:
            failures += 1
            delay = policy.retry_delay(failures - 1, None)
            if (
                failures >= policy.store_retries
                or policy.now() + timedelta(seconds=delay) >= write_until
            ):
                # The same words whether the store or the codec failed: the tokens are safe
                # in the journal either way, and the next use of the key writes them.
                raise StoreUnavailable(
                    f"the new tokens for key {key!r} were not stored ({exc}); {kept}", key=key
                ) from exc
            yield Sleep(delay)
            continue
        run.end(policy, EventKind.REFRESH_SUCCEEDED, "ok")
        yield from _discard(entry, journaled)
        logger.info("key %r: refreshed, new tokens stored", key)
        return fresh


def _discard(entry: RescueEntry, journaled: bool, *, keep_on_disk: bool = False) -> Flow[None]:
    """Drop a rescue entry whose tokens the store now holds (``keep_on_disk``: stop offering
    it, but keep the file); a journal failure is only logged."""
    if journaled:
        yield from _journal((JournalForget if keep_on_disk else JournalDiscard)(entry), entry.key)


def _on_invalid_grant(
    policy: Policy, run: _Run, used: Credentials, owner: str | None, deadline: datetime
) -> Flow[Credentials]:
    """Tell a lost race (a newer token exists somewhere) from a dead credential."""
    key = run.key
    conflicts = 0
    while True:
        current = yield Load(key)
        if current is None:
            raise CredentialNotFound(key)
        stored = policy.credentials(current)
        if stored.refresh_token != used.refresh_token:
            logger.info("key %r: a peer refreshed first; adopting its tokens", key)
            if current.lease_owner == owner:
                try:
                    current = yield Save(current.replace(lease_owner=None, lease_until=None))
                except ConflictError:
                    yield from _backoff(policy, key, conflicts, deadline, "releasing the lease")
                    conflicts += 1
                    continue
            policy.emit(EventKind.ADOPTED, key)
            run.end(policy, EventKind.REFRESH_SUCCEEDED, "adopted")
            # The adopted tokens may be old themselves (a rescue entry from hours ago).
            return (yield from _ensure_fresh(policy, key, current, None, deadline))
        # A crashed process on this host may have journalled the answer for this very token.
        if (yield from _apply_rescues(policy, key, deadline, rescan=True)):
            continue
        try:
            yield Save(
                current.replace(
                    status=Status.NEEDS_REAUTH,
                    lease_owner=None,
                    lease_until=None,
                    failures=current.failures + 1,
                    last_error="invalid_grant",
                )
            )
        except ConflictError:
            yield from _backoff(policy, key, conflicts, deadline, "marking it needs_reauth")
            conflicts += 1
            continue
        logger.warning("key %r: refresh token refused; marked needs_reauth", key)
        policy.emit(EventKind.REAUTH_REQUIRED, key)
        raise ReauthRequired(key)


def _give_up(
    policy: Policy,
    run: _Run,
    record: Record,
    credentials: Credentials,
    failed: Secret | None,
    error: ProviderUnavailable,
    skew: timedelta,
) -> Flow[Credentials]:
    """Retries exhausted: record a cooldown, then serve the current token if it still works."""
    key = run.key
    yield from _release(policy, key, record, skew, error=error, retry_after=error.retry_after)
    run.end(policy, EventKind.REFRESH_FAILED, "unavailable")
    if _usable(credentials, failed, policy.now()):
        logger.warning(
            "key %r: refresh failed (%s); using the still-valid access token", key, error
        )
        return credentials
    raise error


def _release(
    policy: Policy,
    key: str,
    record: Record,
    skew: timedelta,
    *,
    error: ProviderError,
    retry_after: float | None,
) -> Flow[None]:
    """Drop the lease with failure bookkeeping; best effort, the lease expires anyway."""
    failures = record.failures + 1
    label = f"HTTP {error.status}" if error.status is not None else type(error).__name__
    cooldown = policy.cooldown_for(failures, retry_after)
    try:
        yield Save(
            record.replace(
                lease_owner=None,
                lease_until=None,
                failures=failures,
                cooldown_until=policy.now() + skew + cooldown,
                last_error=label,
            )
        )
    except (ConflictError, StoreUnavailable):
        logger.debug("key %r: could not release the lease; it will expire", key)
        return
    policy.emit(EventKind.COOLDOWN, key, label, cooldown.total_seconds())


def _apply_rescues(policy: Policy, key: str, deadline: datetime, *, rescan: bool) -> Flow[bool]:
    """Write journalled tokens the store never received; whether any was applied."""
    applied = False
    entries: list[RescueEntry] = yield from _journal(JournalPending(key, rescan=rescan), key, [])
    for entry in entries:
        conflicts = 0
        while True:
            current = yield Load(key)
            if current is None:
                # Not in this store; the entry may be another store's only copy of its tokens.
                yield from _journal(JournalForget(entry), key)
                break
            stored = policy.credentials(current).refresh_token
            if stored == entry.credentials.refresh_token:
                yield from _journal(JournalDiscard(entry), key)
                break
            if fingerprint(stored) != entry.replaces:
                yield from _journal(JournalForget(entry), key)
                break
            try:
                yield Save(
                    policy.record(key, entry.credentials, base=current, obtained=entry.created_at)
                )
            except ConflictError:
                yield from _backoff(policy, key, conflicts, deadline, "restoring journalled tokens")
                conflicts += 1
                continue
            logger.info("key %r: restored tokens from the rescue journal", key)
            policy.emit(EventKind.JOURNAL_RESCUE, key)
            if current.status is Status.NEEDS_REAUTH:
                # Marked by a peer that could not see this host's journal: the user is back.
                policy.emit(EventKind.RECOVERED, key)
            yield from _journal(JournalDiscard(entry), key)
            applied = True
            break
    return applied
