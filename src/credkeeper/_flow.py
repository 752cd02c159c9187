"""The refresh flow: every decision of the engine, with no I/O.

Each flow is a generator that yields *effects* (load a record, save one, send an HTTP request,
sleep, touch the rescue journal) and receives their results, or has their exceptions thrown
into it, the way ``httpx.Auth.auth_flow`` works. ``TokenManager`` and ``AsyncTokenManager``
perform the effects, so the policy below is written once for threads and for asyncio.

The steps (DESIGN section 4): use a token valid beyond the leeway; otherwise take a lease on the
record by compare-and-swap so one worker across all processes refreshes; write the answer to the
rescue journal, then to the store, before anyone uses it; on ``invalid_grant`` look for a newer
token before condemning the credential; on a throttled or failing provider, back off, fall back to
the still-valid access token, and record a cooldown for the whole fleet.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Generator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import httpx

from ._clock import Clock
from ._credentials import Credentials
from ._exceptions import (
    ConfigurationError,
    ConflictError,
    CredentialNotFound,
    InvalidGrant,
    ProviderError,
    ProviderUnavailable,
    ReauthRequired,
    RefreshTimeout,
    StoreUnavailable,
)
from ._journal import RescueEntry, RescueJournal, fingerprint
from ._keyring import KeyRing
from ._provider import Provider
from ._record import Record, Status
from ._secret import Secret

__all__ = [
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
    "delete_flow",
    "get_flow",
    "put_flow",
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
    """Wait ``seconds`` on the manager's clock."""

    seconds: float


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
    | JournalPending
    | JournalWrite
    | JournalDiscard
    | JournalForget
)
Flow = Generator[Effect, Any, T]


# -- policy ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Everything a flow needs besides effects: settings, the clock, randomness, the codec."""

    provider: Provider
    keyring: KeyRing | None
    clock: Clock
    rng: random.Random
    owner: str
    leeway: timedelta
    lease_ttl: timedelta
    refresh_timeout: timedelta
    cooldown: timedelta
    max_cooldown: timedelta
    store_retries: int = 3

    def now(self) -> datetime:
        """The clock's current time."""
        return self.clock.now()

    def credentials(self, record: Record) -> Credentials:
        """The credentials in ``record``, unsealed when a key ring is set."""
        access, refresh = record.access_token, record.refresh_token
        if self.keyring is not None:
            if KeyRing.is_sealed(access):
                access = self.keyring.unseal(access, key=record.key, field="access_token")
            if KeyRing.is_sealed(refresh):
                refresh = self.keyring.unseal(refresh, key=record.key, field="refresh_token")
        elif KeyRing.is_sealed(access) or KeyRing.is_sealed(refresh):
            raise ConfigurationError(
                f"the credential under key {record.key!r} is encrypted; pass keyring= "
                "(e.g. KeyRing.from_env()) to the manager"
            )
        return Credentials(
            access_token=access,
            refresh_token=refresh,
            expires_at=record.expires_at,
            scopes=record.scopes,
            subscription_type=record.subscription_type,
        )

    def record(self, key: str, credentials: Credentials, *, base: Record | None) -> Record:
        """An active, unleased record holding ``credentials``, versioned as ``base``."""
        access = credentials.access_token.get_secret_value()
        refresh = credentials.refresh_token.get_secret_value()
        if self.keyring is not None:
            access = self.keyring.seal(access, key=key, field="access_token")
            refresh = self.keyring.seal(refresh, key=key, field="refresh_token")
        return Record(
            key=key,
            access_token=access,
            refresh_token=refresh,
            expires_at=credentials.expires_at,
            scopes=credentials.scopes,
            subscription_type=credentials.subscription_type,
            status=Status.ACTIVE,
            version=None if base is None else base.version,
        )

    def poll_delay(self, attempt: int) -> float:
        """How long a waiter sleeps before re-reading a leased record: 50 ms doubling to 1 s."""
        return min(1.0, 0.05 * 2.0**attempt) * self.rng.uniform(0.5, 1.0)

    def retry_delay(self, attempt: int, retry_after: float | None) -> float:
        """Jittered exponential backoff for the provider, never shorter than ``Retry-After``."""
        delay: float = min(8.0, 0.5 * 2.0**attempt) * self.rng.uniform(0.5, 1.0)
        return max(delay, retry_after or 0.0)

    def cooldown_for(self, failures: int, retry_after: float | None) -> timedelta:
        """How long the fleet leaves the provider alone after ``failures`` failed refreshes."""
        grown: timedelta = self.cooldown * 2.0 ** min(max(failures - 1, 0), 10)
        return max(min(grown, self.max_cooldown), timedelta(seconds=retry_after or 0))


def _usable(credentials: Credentials, failed: Secret | None, now: datetime) -> bool:
    """Whether the access token may still be handed out: unexpired and not known to fail."""
    return credentials.expires_at > now and credentials.access_token != failed


# -- flows -----------------------------------------------------------------------------


def get_flow(
    policy: Policy, key: str, *, failed: Secret | None = None, force: bool = False
) -> Flow[Credentials]:
    """Fresh credentials for ``key``: stored ones if valid beyond the leeway, else refreshed.

    ``failed`` is an access token the wrapper refused: refresh if the store still holds it.
    ``force`` refreshes whatever the expiry (once: concurrent forced callers share the result).
    """
    yield from _apply_rescues(policy, key, rescan=False)
    record = yield Load(key)
    if force and record is not None:
        failed = policy.credentials(record).access_token
    return (yield from _ensure_fresh(policy, key, record, failed))


def put_flow(policy: Policy, key: str, credentials: Credentials) -> Flow[Record]:
    """Store ``credentials`` under ``key``, replacing what is there and making it active."""
    while True:
        current = yield Load(key)
        try:
            stored: Record = yield Save(policy.record(key, credentials, base=current))
        except ConflictError:
            continue
        return stored


def delete_flow(policy: Policy, key: str) -> Flow[bool]:
    """Remove ``key``; a rescue entry for it has nothing left to rescue."""
    record = yield Load(key)
    removed = yield Remove(key)
    stored = None if record is None else fingerprint(policy.credentials(record).refresh_token)
    for entry in (yield JournalPending(key)):
        # Only entries for this store's record: the journal is shared by every store on the host.
        yield (JournalDiscard if entry.replaces == stored else JournalForget)(entry)
    return bool(removed)


def _ensure_fresh(
    policy: Policy, key: str, record: Record | None, failed: Secret | None
) -> Flow[Credentials]:
    deadline = policy.now() + policy.refresh_timeout
    # One lease id per flow, not per process: two flows of one manager (a get() and a forced
    # refresh) must exclude each other exactly as two hosts do.
    owner = f"{policy.owner}/{policy.rng.getrandbits(32):08x}"
    polls = 0
    while True:
        if record is None:
            raise CredentialNotFound(key)
        if record.status is Status.NEEDS_REAUTH:
            raise ReauthRequired(key)
        credentials = policy.credentials(record)
        now = policy.now()
        due = credentials.expires_within(policy.leeway, now=now)
        if not due and credentials.access_token != failed:
            return credentials
        if record.cooldown_until is not None and now < record.cooldown_until:
            if _usable(credentials, failed, now):
                logger.debug("key %r: provider cooling down, using the current token", key)
                return credentials
            wait = (record.cooldown_until - now).total_seconds()
            raise ProviderUnavailable(
                f"refreshing key {key!r} is paused for {wait:.0f} s after provider failures "
                f"({record.last_error or 'unknown'})",
                retry_after=wait,
            )
        leased = record.lease_until is not None and record.lease_until > now
        if leased and record.lease_owner != owner:
            if now >= deadline:
                if _usable(credentials, failed, now):
                    return credentials
                raise RefreshTimeout(key)
            yield Sleep(policy.poll_delay(polls))
            polls += 1
            record = yield Load(key)
            continue
        try:
            record = yield Save(
                record.replace(lease_owner=owner, lease_until=now + policy.lease_ttl)
            )
        except ConflictError:
            record = yield Load(key)
            continue
        logger.debug("key %r: lease taken, refreshing", key)
        return (yield from _refresh(policy, key, record, credentials, failed, deadline))


def _refresh(
    policy: Policy,
    key: str,
    record: Record,
    credentials: Credentials,
    failed: Secret | None,
    deadline: datetime,
) -> Flow[Credentials]:
    """Holding the lease: ask the provider, with retries, and persist what it answers."""
    attempt = 0
    while True:
        request = policy.provider.build_request(credentials.refresh_token.get_secret_value())
        try:
            response = yield Send(request)
            fresh = policy.provider.parse_response(response, previous=credentials, now=policy.now())
        except InvalidGrant:
            logger.info("key %r: provider answered invalid_grant", key)
            return (yield from _on_invalid_grant(policy, key, credentials, record.lease_owner))
        except (ProviderUnavailable, httpx.TransportError) as exc:
            error = (
                exc if isinstance(exc, ProviderUnavailable) else policy.provider.unavailable(exc)
            )
            delay = policy.retry_delay(attempt, error.retry_after)
            finish = policy.now() + timedelta(seconds=delay + policy.provider.timeout)
            if finish > deadline:
                return (yield from _give_up(policy, key, record, credentials, failed, error))
            logger.info("key %r: %s; retrying in %.2f s", key, error, delay)
            yield Sleep(delay)
            attempt += 1
            continue
        except ProviderError as exc:
            yield from _release(policy, key, record, error=exc, retry_after=None)
            raise
        return (yield from _persist(policy, key, record, credentials, fresh))


def _persist(
    policy: Policy, key: str, record: Record, used: Credentials, fresh: Credentials
) -> Flow[Credentials]:
    """Journal, then compare-and-swap the new tokens into the store, then drop the journal entry."""
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
    except OSError as exc:
        journaled = False
        # The store write below is the tokens' one remaining chance: go on to it.
        logger.warning(
            "key %r: rescue journal unwritable (%s); writing the store only",
            key,
            type(exc).__name__,
        )
    base = record
    failures = 0
    while True:
        try:
            yield Save(policy.record(key, fresh, base=base))
        except ConflictError:
            current = yield Load(key)
            if current is None:
                yield from _discard(entry, journaled)
                raise CredentialNotFound(key) from None
            if fingerprint(policy.credentials(current).refresh_token) == entry.replaces:
                base = current  # only coordination fields moved (a lease taken over): write again
                continue
            # Someone stored other tokens (a new login) while we refreshed: theirs win.
            yield from _discard(entry, journaled)
            return (yield from _ensure_fresh(policy, key, current, None))
        except StoreUnavailable as exc:
            failures += 1
            delay = policy.retry_delay(failures - 1, None)
            # Retrying past the lease would let another host present the consumed token.
            lease_left = (record.lease_until or policy.now()) - policy.now()
            if failures >= policy.store_retries or delay + policy.provider.timeout >= (
                lease_left.total_seconds()
            ):
                raise StoreUnavailable(
                    f"the store did not take the new tokens for key {key!r}; they are kept in "
                    "the rescue journal and will be written on the next use of the key",
                    key=key,
                ) from exc
            yield Sleep(delay)
            continue
        yield from _discard(entry, journaled)
        logger.info("key %r: refreshed, new tokens stored", key)
        return fresh


def _discard(entry: RescueEntry, journaled: bool) -> Flow[None]:
    """Drop a rescue entry whose tokens the store now holds; a journal failure is only logged."""
    if not journaled:
        return
    try:
        yield JournalDiscard(entry)
    except OSError as exc:
        logger.warning("could not remove rescue entry %s (%s)", entry.id, type(exc).__name__)


def _on_invalid_grant(
    policy: Policy, key: str, used: Credentials, owner: str | None
) -> Flow[Credentials]:
    """Tell a lost race (a newer token exists somewhere) from a dead credential."""
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
                    continue
            # The adopted tokens may be old themselves (a rescue entry from hours ago).
            return (yield from _ensure_fresh(policy, key, current, None))
        # A crashed process on this host may have journalled the answer for this very token.
        if (yield from _apply_rescues(policy, key, rescan=True)):
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
            continue
        logger.warning("key %r: refresh token refused; marked needs_reauth", key)
        raise ReauthRequired(key)


def _give_up(
    policy: Policy,
    key: str,
    record: Record,
    credentials: Credentials,
    failed: Secret | None,
    error: ProviderUnavailable,
) -> Flow[Credentials]:
    """Retries exhausted: record a cooldown, then serve the current token if it still works."""
    yield from _release(policy, key, record, error=error, retry_after=error.retry_after)
    if _usable(credentials, failed, policy.now()):
        logger.warning(
            "key %r: refresh failed (%s); using the still-valid access token", key, error
        )
        return credentials
    raise error


def _release(
    policy: Policy, key: str, record: Record, *, error: ProviderError, retry_after: float | None
) -> Flow[None]:
    """Drop the lease with failure bookkeeping; best effort, the lease expires anyway."""
    failures = record.failures + 1
    label = f"HTTP {error.status}" if error.status is not None else type(error).__name__
    try:
        yield Save(
            record.replace(
                lease_owner=None,
                lease_until=None,
                failures=failures,
                cooldown_until=policy.now() + policy.cooldown_for(failures, retry_after),
                last_error=label,
            )
        )
    except (ConflictError, StoreUnavailable):
        logger.debug("key %r: could not release the lease; it will expire", key)


def _apply_rescues(policy: Policy, key: str, *, rescan: bool) -> Flow[bool]:
    """Write journalled tokens the store never received; whether any was applied."""
    applied = False
    entries: list[RescueEntry] = yield JournalPending(key, rescan=rescan)
    for entry in entries:
        while True:
            current = yield Load(key)
            if current is None:
                # Not in this store; the entry may be another store's only copy of its tokens.
                yield JournalForget(entry)
                break
            stored = policy.credentials(current).refresh_token
            if stored == entry.credentials.refresh_token:
                yield JournalDiscard(entry)
                break
            if fingerprint(stored) != entry.replaces:
                yield JournalForget(entry)
                break
            try:
                yield Save(policy.record(key, entry.credentials, base=current))
            except ConflictError:
                continue
            logger.info("key %r: restored tokens from the rescue journal", key)
            yield JournalDiscard(entry)
            applied = True
            break
    return applied
