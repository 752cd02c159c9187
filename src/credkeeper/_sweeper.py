"""``Sweeper`` and ``AsyncSweeper``: refresh every credential before anyone has to wait for it.

A sweep asks the store for the keys due within a window (``scan_due``) and runs the manager's
own refresh flow on each, judged against the window instead of the leeway: the same leases, the
same journal, the same cooldowns and adoption as a caller's refresh, so any number of sweepers on
any number of hosts, beside live traffic, refresh each credential once. The sweeper adds only
scheduling: how many at once, a random order and start jitter so hosts do not march in step, and
one pause for the whole sweep when the provider throttles, instead of failing the keys. What
became of each key is read from the events its flow emitted, never guessed.

Sweepers running together do not divide the keys between them: each lists them all. Once one
has found ``concurrency`` keys fresh since its last listing (a peer refreshed them), it lists
the due keys again and passes over those no longer listed, which a peer has refreshed, without
reading them; so two sweepers read far fewer of each other's keys, and a sweep that finds no
key fresh lists them once. A key a store's listing misses (an eventually consistent listing,
such as Secrets Manager's) is passed over in this sweep only: its callers refresh it on demand
and the next sweep lists it again.

With ``keep_alive``, a sweep also refreshes credentials whose tokens were last obtained longer
ago than that (or at an unknown time), for providers that expire refresh tokens left unused:
listing them reads every record, so that pass runs at most once per ``keep_alive / 10``. The
first pass over records from before ``refreshed_at`` refreshes them all (their last refresh is
unknown), at the sweep's concurrency and paused by the provider's throttling like any sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from ._events import EventHook, EventKind, RefreshEvent
from ._exceptions import (
    ConfigurationError,
    CredentialNotFound,
    CredkeeperError,
    ReauthRequired,
)
from ._flow import _failure
from ._manager import AsyncTokenManager, TokenManager, _duration, concrete_signature
from ._record import END_OF_TIME, Record, Status
from ._secret import Secret

__all__ = ["AsyncSweeper", "SweepReport", "Sweeper"]

logger = logging.getLogger("credkeeper")

#: Added to the manager's leeway for the default window.
DEFAULT_AHEAD = timedelta(minutes=15)
#: The keep-alive pass runs at most once per ``keep_alive`` divided by this.
KEEP_ALIVE_PASSES = 10

Progress = Callable[[int, int], None]
M = TypeVar("M", TokenManager, AsyncTokenManager)


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one sweep did, key by key, counted; never a token.

    ``due``: keys the store listed. ``refreshed``: refreshed by this sweep. ``fresh``: valid
    beyond the window when their turn came (refreshed meanwhile by a peer or a caller, or listed
    by a store whose scan is coarse), or no longer listed as due by a listing made again during
    the sweep. ``by_peer``: the provider refused this sweep's refresh
    because a peer had just rotated the token, whose tokens were taken. ``idle``: keys the
    keep-alive pass listed, their tokens last obtained longer ago than ``keep_alive`` or at an
    unknown time; ``kept_alive``: those this sweep refreshed (the others count where their
    outcome says: ``fresh`` when a peer refreshed them first, ``failed``, ...). ``needs_reauth``:
    keys whose user must log in again (never retried). ``deferred``: key and reason of each key left
    due but still valid (``cooldown`` after its own provider failures, ``lease_busy``,
    ``contention``, ``store_unavailable``). ``failed``: key and outcome of each refresh that
    failed. ``deleted``: keys gone before their turn. ``throttled``: how many times the
    provider made the sweep pause.
    """

    due: int
    refreshed: int = 0
    fresh: int = 0
    by_peer: int = 0
    idle: int = 0
    kept_alive: int = 0
    needs_reauth: tuple[str, ...] = ()
    deferred: tuple[tuple[str, str], ...] = ()
    failed: tuple[tuple[str, str], ...] = ()
    deleted: int = 0
    throttled: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether no refresh failed (keys needing re-auth are the users' to fix, not a failure)."""
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values, for ``credkeeper sweep --json``."""
        pairs = {"deferred": "reason", "failed": "outcome"}
        document: dict[str, Any] = {}
        for name in (f.name for f in dataclasses.fields(self)):
            value = getattr(self, name)
            if name in pairs:
                value = [{"key": key, pairs[name]: why} for key, why in value]
            elif name == "needs_reauth":
                value = list(value)
            elif name == "seconds":
                value = round(value, 3)
            document[name] = value
        return document


@dataclass(frozen=True, slots=True)
class _Verdict:
    """What one key's turn came to; ``pause``: how long a throttled sweep waits."""

    outcome: str  # a SweepReport field, or "throttled"
    detail: str = ""
    pause: float = 0.0


@dataclass(slots=True)
class _Tally:
    """The report being built by threads or tasks; ``lock`` guards it across threads."""

    due: int
    idle: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    listed: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    throttled: int = 0
    done: int = 0
    # The due keys as a scan made during the sweep listed them; fresh keys found since.
    still_due: set[str] | None = None
    fresh_since_scan: int = 0
    scanning: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, key: str, verdict: _Verdict) -> int:
        """Add one key's verdict; how many keys are done, counted under the lock."""
        with self.lock:
            if verdict.outcome in ("needs_reauth", "deferred", "failed"):
                self.listed.setdefault(verdict.outcome, []).append((key, verdict.detail))
            else:
                self.counts[verdict.outcome] = self.counts.get(verdict.outcome, 0) + 1
            self.done += 1
            return self.done

    @property
    def total(self) -> int:
        """How many keys this sweep takes a turn on."""
        return self.due + self.idle

    def pause(self) -> None:
        with self.lock:
            self.throttled += 1

    def left(self, key: str) -> bool:
        """Whether a scan made during the sweep no longer listed ``key`` as due."""
        with self.lock:
            return self.still_due is not None and key not in self.still_due

    def scan_again(self, verdict: _Verdict, threshold: int) -> bool:
        """Whether the caller should list the due keys again now: ``threshold`` keys were
        found fresh since the last listing (a peer is sweeping too), and no one else is."""
        with self.lock:
            if verdict.outcome != "fresh":
                return False
            self.fresh_since_scan += 1
            if self.scanning or self.fresh_since_scan < threshold:
                return False
            self.scanning, self.fresh_since_scan = True, 0
            return True

    def scanned(self, keys: set[str] | None) -> None:
        """Take a new listing of the due keys (``None``: the scan failed; keep the last)."""
        with self.lock:
            if keys is not None:
                self.still_due = keys
            self.scanning = False

    def report(self, seconds: float) -> SweepReport:
        listed = {name: tuple(sorted(pairs)) for name, pairs in self.listed.items()}
        return SweepReport(
            due=self.due,
            refreshed=self.counts.get("refreshed", 0),
            fresh=self.counts.get("fresh", 0),
            by_peer=self.counts.get("by_peer", 0),
            idle=self.idle,
            kept_alive=self.counts.get("kept_alive", 0),
            needs_reauth=tuple(key for key, _ in listed.get("needs_reauth", ())),
            deferred=listed.get("deferred", ()),
            failed=listed.get("failed", ()),
            deleted=self.counts.get("deleted", 0),
            throttled=self.throttled,
            seconds=seconds,
        )


class _Watch:
    """The events of one key's flow, passed on to the manager's own hook as well."""

    def __init__(self, hook: EventHook | None) -> None:
        self.hook = hook
        self.events: list[RefreshEvent] = []

    def __call__(self, event: RefreshEvent) -> None:
        self.events.append(event)
        if self.hook is not None:
            self.hook(event)

    def last(self, *kinds: EventKind) -> RefreshEvent | None:
        return next((e for e in reversed(self.events) if e.kind in kinds), None)


def _verdict(error: Exception | None, watch: _Watch) -> _Verdict:
    """What one key's turn came to, from the events its flow emitted and what it raised."""
    end = watch.last(EventKind.REFRESH_SUCCEEDED, EventKind.REFRESH_FAILED)
    if isinstance(error, ReauthRequired):
        return _Verdict("needs_reauth")
    if end is not None and end.kind is EventKind.REFRESH_FAILED:
        if end.outcome == "unavailable":
            # The provider throttled or failed past this key's deadline: pause everyone for the
            # cooldown the flow recorded, then try the key again.
            cooldown = watch.last(EventKind.COOLDOWN)
            pause = cooldown.duration if cooldown is not None and cooldown.duration else 0.0
            return _Verdict("throttled", pause=max(pause, 1.0))
        return _Verdict("failed", end.outcome or "error")
    if error is not None:
        if isinstance(error, CredentialNotFound):
            return _Verdict("deleted")
        return _Verdict("failed", _failure(error))
    if end is not None:
        return _Verdict("refreshed" if end.outcome == "ok" else "by_peer")
    deferral = watch.last(EventKind.REFRESH_DEFERRED)
    if deferral is not None:
        return _Verdict("deferred", deferral.outcome or "")
    return _Verdict("fresh")


class _SweeperBase(Generic[M]):
    """Settings, construction and the scheduling both sweepers share; no I/O."""

    # The manager type this sweeper takes, and what to use for the other.
    _kinds: tuple[type[M], str]

    def __init__(
        self,
        manager: M,
        *,
        window: timedelta | float | None = None,
        concurrency: int = 8,
        jitter: timedelta | float = 0.1,
        max_attempts: int = 3,
        keep_alive: timedelta | float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        kind, other = self._kinds
        if not isinstance(manager, kind):
            raise ConfigurationError(f"manager must be a credkeeper.{kind.__name__}; {other}")
        self.manager: M = manager
        for name, value in (("concurrency", concurrency), ("max_attempts", max_attempts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(
                    f"{name} must be a whole number of at least 1, got {value!r}"
                )
        policy = manager.policy
        self.window = (
            policy.leeway + DEFAULT_AHEAD if window is None else _duration(window, "window")
        )
        if self.window < policy.leeway:
            raise ConfigurationError(
                f"window ({self.window.total_seconds():g} s) must be at least the manager's "
                f"leeway ({policy.leeway.total_seconds():g} s): a sweep that stops short of "
                "the leeway leaves callers to refresh"
            )
        self.keep_alive = (
            None if keep_alive is None else _duration(keep_alive, "keep_alive", minimum=1.0)
        )
        self.concurrency = concurrency
        self.jitter = _duration(jitter, "jitter").total_seconds()
        self.max_attempts = max_attempts
        self._rng = rng or random.Random()  # noqa: S311 - scheduling jitter, not secrecy
        self._stopping = threading.Event()
        self._starts = itertools.count()  # keys begun this sweep; next() is atomic in CPython
        # On the manager's clock, which the cooldowns a pause waits out are written in.
        self._now = policy.clock.now
        self._pause_until = datetime.min.replace(tzinfo=UTC)
        self._pause_lock = threading.Lock()
        self._wake: asyncio.Event | None = None
        # When the last keep-alive pass listed the idle keys, on the manager's clock.
        self._kept_at: datetime | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.manager!r}, window={self.window.total_seconds():g}s)"

    def stop(self) -> None:
        """Start no new refresh; those in flight finish, and the sweep returns after them."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (or a signal asked for it)."""
        return self._stopping.is_set()

    def _waits(self) -> Iterator[float]:
        """The sleeps before a key's next attempt: what is left of the sweep's pause, in steps
        of at most a second so that a stop is seen; then, for the sweep's first ``concurrency``
        keys, a random start delay, so that workers (and hosts) do not start in step."""
        while not self.stopping:
            left = (self._pause_until - self._now()).total_seconds()
            if left <= 0:
                break
            yield min(left, 1.0)
        if self.jitter and not self.stopping and next(self._starts) < self.concurrency:
            yield self._rng.uniform(0.0, self.jitter)

    def _throttled(self, verdict: _Verdict, tally: _Tally) -> None:
        tally.pause()
        resume = self._now() + timedelta(seconds=verdict.pause)
        self._pause_until = max(self._pause_until, resume)

    def _order(self, keys: list[str]) -> list[str]:
        # Hosts sweeping together start from different ends, so they contend less for leases.
        keys = list(dict.fromkeys(keys))
        self._rng.shuffle(keys)
        return keys

    def _keep_alive_now(self) -> datetime | None:
        """The time of a keep-alive pass to run now, or ``None``: no keep-alive, or its last
        pass was less than ``keep_alive / KEEP_ALIVE_PASSES`` ago."""
        if self.keep_alive is None:
            return None
        now = self._now()
        if self._kept_at is not None and now - self._kept_at < self.keep_alive / KEEP_ALIVE_PASSES:
            return None
        return now

    def _idle(self, now: datetime, records: list[tuple[str, Record | None]]) -> dict[str, Record]:
        """The records the keep-alive pass refreshes, in sweep order: active, and obtained
        longer than ``keep_alive`` before ``now`` or at an unknown time. Records a store lists
        but cannot read are left to the due sweep and to callers, which report them."""
        assert self.keep_alive is not None
        oldest = now - self.keep_alive
        idle = {
            key: record
            for key, record in records
            if record is not None
            and record.status is Status.ACTIVE
            and (record.refreshed_at is None or record.refreshed_at <= oldest)
        }
        self._kept_at = now
        return {key: idle[key] for key in self._order(list(idle))}

    def _stale(self, record: Record | None) -> Secret | None:
        """For a keep-alive turn, the access token its record was read with: refreshed while
        the store still holds it, taken as it is once a peer (another sweeper, a caller) has
        replaced it. ``None`` for a due key's turn."""
        return None if record is None else self.manager.policy.credentials(record).access_token


class Sweeper(_SweeperBase[TokenManager]):
    """Refreshes, ahead of time, every credential of a :class:`TokenManager` due within ``window``.

    ``window`` defaults to the manager's leeway plus 15 minutes. ``concurrency`` refreshes run at
    once, in threads, each starting after a random delay of up to ``jitter`` seconds, keys in random
    order. When the provider throttles (429, ``Retry-After``) or is down past a key's deadline,
    the whole sweep pauses for the cooldown the flow recorded and tries the key again, for at
    most ``max_attempts`` attempts in all, before it counts as failed. ``needs_reauth`` keys are
    reported, never retried.

    ``keep_alive`` (default off) also refreshes every active credential whose tokens were last
    obtained (``Record.refreshed_at``) longer ago than that, or at an unknown time, through the
    same leases: for providers that expire a refresh token left unused, so that an idle user is
    never logged out for being idle. Finding them reads every record, so that pass runs in the
    first sweep and then at most once per ``keep_alive / 10``.
    """

    __signature__ = concrete_signature(_SweeperBase.__init__, manager="TokenManager")
    _kinds = (TokenManager, "use AsyncSweeper with an AsyncTokenManager")

    def due(self) -> list[str]:
        """The keys due within the window now, as the store lists them."""
        return list(self.manager.store.scan_due(self._now() + self.window))

    def run_once(self, *, progress: Progress | None = None) -> SweepReport:
        """Sweep once: every key due within the window, each refreshed at most once.

        ``progress(done, total)`` is called after each key, from the sweeping threads. Stopped
        (:meth:`stop`, or an exception such as KeyboardInterrupt here), it starts no new key and
        returns, or raises, once the refreshes in flight are done.
        """
        started = time.monotonic()
        self._starts = itertools.count()
        keys = self._order(self.due())
        idle = self._idle_records(set(keys))
        tally = _Tally(due=len(keys), idle=len(idle))
        if progress is not None:
            progress(0, tally.total)
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="credkeeper-sweep") as pool:
            turns = [(key, None) for key in keys] + list(idle.items())
            futures = [
                pool.submit(self._turn, key, tally, progress, record) for key, record in turns
            ]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                self.stop()
                raise
        return tally.report(time.monotonic() - started)

    def run_forever(
        self,
        *,
        interval: timedelta | float = 60.0,
        on_report: Callable[[SweepReport], None] | None = None,
        handle_signals: bool = True,
    ) -> None:
        """Sweep every ``interval`` (less up to a tenth, at random) until :meth:`stop`.

        With ``handle_signals`` (and in the main thread), SIGTERM and SIGINT stop it too, and a
        second signal goes to the handler that was there before. A refresh in flight always
        finishes. ``on_report`` gets each sweep's report; a sweep that fails as a whole (the
        store down for its scan) is logged and the next one goes on.
        """
        seconds = _duration(interval, "interval").total_seconds()
        with _signals_stop(self) if handle_signals else contextlib.nullcontext():
            while not self.stopping:
                try:
                    report = self.run_once()
                except CredkeeperError as exc:
                    _sweep_failed(exc)
                else:
                    if on_report is not None:
                        on_report(report)
                self._stopping.wait(seconds * self._rng.uniform(0.9, 1.0))

    def _idle_records(self, due: set[str]) -> dict[str, Record]:
        """The keep-alive pass's records, if one is to run now; none of the ``due`` keys."""
        now = self._keep_alive_now()
        if now is None:
            return {}
        store = self.manager.store
        keys = [key for key in dict.fromkeys(store.scan_due(END_OF_TIME)) if key not in due]
        return self._idle(now, [(key, _readable(store.get, key)) for key in keys])

    def _turn(
        self, key: str, tally: _Tally, progress: Progress | None, record: Record | None = None
    ) -> None:
        if record is None and tally.left(key):
            verdict = _Verdict("fresh")
        else:
            verdict = _Verdict("failed", "unavailable")
            for _ in range(self.max_attempts):
                for seconds in self._waits():
                    self.manager.policy.clock.sleep(seconds)
                if self.stopping:
                    return
                attempt = self._refresh(key, record)
                if attempt.outcome != "throttled":
                    verdict = attempt
                    break
                with self._pause_lock:
                    self._throttled(attempt, tally)
            if record is None and tally.scan_again(verdict, self.concurrency):
                listed = None
                try:
                    listed = self._still_due()
                finally:  # an interrupted listing must not leave the next one barred
                    tally.scanned(listed)
        done = tally.count(key, verdict)
        if progress is not None:
            progress(done, tally.total)

    def _still_due(self) -> set[str] | None:
        """The keys due now, or ``None`` if the store cannot list them (the sweep goes on)."""
        try:
            return set(self.due())
        except CredkeeperError:
            return None

    def _refresh(self, key: str, record: Record | None) -> _Verdict:
        watch = _Watch(self.manager.policy.events)
        try:
            self.manager._refresh_ahead(key, self.window, watch, self._stale(record))
        except Exception as exc:  # noqa: BLE001 - classified and counted; the sweep goes on
            return _kept(_verdict(exc, watch), record)
        return _kept(_verdict(None, watch), record)


class AsyncSweeper(_SweeperBase[AsyncTokenManager]):
    """The asyncio twin of :class:`Sweeper`, on an :class:`AsyncTokenManager`: the same sweep,
    ``concurrency`` tasks at once."""

    __signature__ = concrete_signature(_SweeperBase.__init__, manager="AsyncTokenManager")
    _kinds = (AsyncTokenManager, "use Sweeper with a TokenManager")

    async def due(self) -> list[str]:
        """The keys due within the window now, as the store lists them."""
        return [key async for key in self.manager.store.scan_due(self._now() + self.window)]

    async def run_once(self, *, progress: Progress | None = None) -> SweepReport:
        """Sweep once; see :meth:`Sweeper.run_once`. Cancelled, it starts no new key, and the
        refreshes in flight finish in the background."""
        started = time.monotonic()
        self._starts = itertools.count()
        keys = self._order(await self.due())
        idle = await self._idle_records(set(keys))
        tally = _Tally(due=len(keys), idle=len(idle))
        if progress is not None:
            progress(0, tally.total)
        gate = asyncio.Semaphore(self.concurrency)

        async def turn(key: str, record: Record | None) -> None:
            async with gate:
                await self._turn(key, tally, progress, record)

        turns = [(key, None) for key in keys] + list(idle.items())
        tasks = [asyncio.ensure_future(turn(key, record)) for key, record in turns]
        try:
            # Shielded: a refresh cut off between the provider and the store would leave the
            # new refresh token in the journal only.
            await asyncio.shield(asyncio.gather(*tasks))
        except BaseException:
            self.stop()
            raise
        return tally.report(time.monotonic() - started)

    async def run_forever(
        self,
        *,
        interval: timedelta | float = 60.0,
        on_report: Callable[[SweepReport], None] | None = None,
        handle_signals: bool = True,
    ) -> None:
        """Sweep every ``interval`` until :meth:`stop`; see :meth:`Sweeper.run_forever`. The
        signals are taken through the running loop, so an application serving on the same loop
        should pass ``handle_signals=False`` and call :meth:`stop` from its own shutdown."""
        seconds = _duration(interval, "interval").total_seconds()
        self._wake = asyncio.Event()
        with _loop_signals_stop(self) if handle_signals else contextlib.nullcontext():
            while not self.stopping:
                try:
                    report = await self.run_once()
                except CredkeeperError as exc:
                    _sweep_failed(exc)
                else:
                    if on_report is not None:
                        on_report(report)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), seconds * self._rng.uniform(0.9, 1.0))

    def stop(self) -> None:
        """Start no new refresh; those in flight finish. Call it from the sweeper's loop."""
        super().stop()
        if self._wake is not None:
            self._wake.set()

    async def _idle_records(self, due: set[str]) -> dict[str, Record]:
        """The keep-alive pass's records, if one is to run now; none of the ``due`` keys."""
        now = self._keep_alive_now()
        if now is None:
            return {}
        store = self.manager.store
        listed = [key async for key in store.scan_due(END_OF_TIME)]
        keys = [key for key in dict.fromkeys(listed) if key not in due]
        return self._idle(now, [(key, await _areadable(store.get, key)) for key in keys])

    async def _turn(
        self, key: str, tally: _Tally, progress: Progress | None, record: Record | None = None
    ) -> None:
        if record is None and tally.left(key):
            verdict = _Verdict("fresh")
        else:
            verdict = _Verdict("failed", "unavailable")
            for _ in range(self.max_attempts):
                for seconds in self._waits():
                    await self.manager.policy.clock.asleep(seconds)
                if self.stopping:
                    return
                attempt = await self._refresh(key, record)
                if attempt.outcome != "throttled":
                    verdict = attempt
                    break
                self._throttled(attempt, tally)
            if record is None and tally.scan_again(verdict, self.concurrency):
                listed = None
                try:
                    listed = await self._still_due()
                finally:  # an interrupted listing must not leave the next one barred
                    tally.scanned(listed)
        done = tally.count(key, verdict)
        if progress is not None:
            progress(done, tally.total)

    async def _still_due(self) -> set[str] | None:
        """The keys due now, or ``None`` if the store cannot list them (the sweep goes on)."""
        try:
            return set(await self.due())
        except CredkeeperError:
            return None

    async def _refresh(self, key: str, record: Record | None) -> _Verdict:
        watch = _Watch(self.manager.policy.events)
        try:
            await self.manager._refresh_ahead(key, self.window, watch, self._stale(record))
        except Exception as exc:  # noqa: BLE001 - classified and counted; the sweep goes on
            return _kept(_verdict(exc, watch), record)
        return _kept(_verdict(None, watch), record)


def _kept(verdict: _Verdict, record: Record | None) -> _Verdict:
    """A keep-alive turn's refresh counts as ``kept_alive``, not as a due key's ``refreshed``."""
    if record is not None and verdict.outcome == "refreshed":
        return _Verdict("kept_alive")
    return verdict


def _readable(get: Callable[[str], Record | None], key: str) -> Record | None:
    """``get(key)``, or ``None`` for a record the store holds damaged or could not read now
    (logged, never a token): one key's read never stops the sweep, due keys included."""
    try:
        return get(key)
    except CredkeeperError as exc:
        logger.warning("keep-alive skips key %r this time: %s", key, exc)
        return None


async def _areadable(get: Callable[[str], Any], key: str) -> Record | None:
    """The async form of :func:`_readable`."""
    try:
        record: Record | None = await get(key)
    except CredkeeperError as exc:
        logger.warning("keep-alive skips key %r this time: %s", key, exc)
        return None
    return record


def _sweep_failed(exc: CredkeeperError) -> None:
    # credkeeper's own messages hold no token.
    logger.warning("the sweep failed (%s: %s); sweeping again later", type(exc).__name__, exc)


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _signals_stop(sweeper: _SweeperBase[Any]) -> Iterator[None]:
    """The first SIGTERM or SIGINT stops ``sweeper``; a second goes to the previous handler
    (a second Ctrl-C interrupts). Only in the main thread, where signals can be handled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in _SIGNALS}

    def restore() -> None:
        for number, old in previous.items():
            if old is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(number, old)

    def handler(number: int, frame: Any) -> None:
        sweeper.stop()
        restore()

    for number in _SIGNALS:
        signal.signal(number, handler)
    try:
        yield
    finally:
        restore()


@contextlib.contextmanager
def _loop_signals_stop(sweeper: _SweeperBase[Any]) -> Iterator[None]:
    """The asyncio form of :func:`_signals_stop`, through the running loop's handlers; the
    handlers that were there before are put back afterwards."""
    loop = asyncio.get_running_loop()
    previous = {number: signal.getsignal(number) for number in _SIGNALS}
    installed: list[signal.Signals] = []

    def restore() -> None:
        for number in installed:
            loop.remove_signal_handler(number)
            old = previous[number]
            if old is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(number, old)
        installed.clear()

    def stop() -> None:
        sweeper.stop()
        restore()

    for number in _SIGNALS:
        try:
            loop.add_signal_handler(number, stop)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or a platform without them
        installed.append(number)
    try:
        yield
    finally:
        restore()
