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
from collections.abc import Callable, Generator, Iterator
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
_THREADS = "credkeeper-sweep"
M = TypeVar("M", TokenManager, AsyncTokenManager)
T = TypeVar("T")


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


# The effects a sweep's flows yield and each sweeper performs: its store, its manager, its
# clock, threads or tasks. What the flow is sent back is named in each docstring.


@dataclass(frozen=True, slots=True)
class _Pause:
    """Sleep ``seconds`` on the manager's clock; ``None``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class _Scan:
    """The keys the store lists as due before ``before``, as a list."""

    before: datetime


@dataclass(frozen=True, slots=True)
class _Get:
    """The record under ``key``, or ``None``."""

    key: str


@dataclass(frozen=True, slots=True)
class _Refresh:
    """The manager's refresh of ``key`` ahead of the window, its events told to ``watch``."""

    key: str
    watch: _Watch
    stale: Secret | None


@dataclass(frozen=True, slots=True)
class _Gather:
    """What each flow returns, in order, ``concurrency`` flows driven at once. One raising
    stops the sweep (:meth:`~_SweeperBase.stop`), and is raised once those in flight are done."""

    flows: tuple[_Flow[Any], ...]


_Effect = _Pause | _Scan | _Get | _Refresh | _Gather
_Flow = Generator[_Effect, Any, T]


class _SweeperBase(Generic[M]):
    """Settings, construction and the sweep itself, as flows yielding effects; no I/O."""

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

    def _sweep(self, progress: Progress | None) -> _Flow[SweepReport]:
        """One sweep: list the due keys (and the idle ones), take a turn on each, report."""
        started = time.monotonic()
        self._starts = itertools.count()
        keys = self._order((yield _Scan(self._now() + self.window)))
        idle = yield from self._idle_records(set(keys))
        tally = _Tally(due=len(keys), idle=len(idle))
        if progress is not None:
            progress(0, tally.total)
        turns = [(key, None) for key in keys] + list(idle.items())
        yield _Gather(tuple(self._turn(key, tally, progress, record) for key, record in turns))
        return tally.report(time.monotonic() - started)

    def _idle_records(self, due: set[str]) -> _Flow[dict[str, Record]]:
        """The records the keep-alive pass refreshes, in sweep order, none of the ``due`` keys:
        active, and obtained longer than ``keep_alive`` ago or at an unknown time. Empty without
        keep-alive, or when its last pass was less than ``keep_alive / KEEP_ALIVE_PASSES`` ago.
        Records a store lists but cannot read are left to the due sweep and to callers, which
        report them."""
        now, keep_alive, last = self._now(), self.keep_alive, self._kept_at
        if keep_alive is None or (last is not None and now - last < keep_alive / KEEP_ALIVE_PASSES):
            return {}
        keys = tuple(key for key in dict.fromkeys((yield _Scan(END_OF_TIME))) if key not in due)
        records = yield _Gather(tuple(self._read(key) for key in keys))
        idle = {
            key: record
            for key, record in zip(keys, records, strict=True)
            if record is not None
            and record.status is Status.ACTIVE
            and (record.refreshed_at is None or record.refreshed_at <= now - keep_alive)
        }
        self._kept_at = now
        return {key: idle[key] for key in self._order(list(idle))}

    def _read(self, key: str) -> _Flow[Record | None]:
        """The keep-alive pass's read of ``key``: ``None`` once the sweep is stopped, or for a
        record the store holds damaged or could not read now (logged, never a token): one key's
        read never stops the sweep, due keys included."""
        if self.stopping:
            return None
        try:
            record: Record | None = yield _Get(key)
        except CredkeeperError as exc:
            logger.warning("keep-alive skips key %r this time: %s", key, exc)
            return None
        return record

    def _turn(
        self, key: str, tally: _Tally, progress: Progress | None, record: Record | None
    ) -> _Flow[None]:
        """One key's turn: refreshed, or retried after the sweep's pause while the provider
        throttles; counted unless the sweep stopped first."""
        if record is None and tally.left(key):
            verdict = _Verdict("fresh")
        else:
            verdict = _Verdict("failed", "unavailable")
            for _ in range(self.max_attempts):
                for seconds in self._waits():
                    yield _Pause(seconds)
                if self.stopping:
                    return
                attempt = yield from self._refresh(key, record)
                if attempt.outcome != "throttled":
                    verdict = attempt
                    break
                self._throttled(attempt, tally)
            if record is None and tally.scan_again(verdict, self.concurrency):
                listed = None
                try:
                    with contextlib.suppress(CredkeeperError):  # unlisted now: the sweep goes on
                        listed = set((yield _Scan(self._now() + self.window)))
                finally:  # an interrupted listing must not leave the next one barred
                    tally.scanned(listed)
        done = tally.count(key, verdict)
        if progress is not None:
            progress(done, tally.total)

    def _refresh(self, key: str, record: Record | None) -> _Flow[_Verdict]:
        """One attempt's verdict. A keep-alive turn passes the access token its ``record`` was
        read with: refreshed while the store still holds it, taken as it is once a peer (another
        sweeper, a caller) has replaced it; its refresh counts as ``kept_alive``."""
        watch, error = _Watch(self.manager.policy.events), None
        try:
            stale = None if record is None else self.manager.policy.credentials(record).access_token
            yield _Refresh(key, watch, stale)
        except Exception as exc:  # noqa: BLE001 - classified and counted; the sweep goes on
            error = exc
        verdict = _verdict(error, watch)
        if record is not None and verdict.outcome == "refreshed":
            return _Verdict("kept_alive")
        return verdict

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
        with self._pause_lock:
            resume = self._now() + timedelta(seconds=verdict.pause)
            self._pause_until = max(self._pause_until, resume)

    def _order(self, keys: list[str]) -> list[str]:
        # Hosts sweeping together start from different ends, so they contend less for leases.
        keys = list(dict.fromkeys(keys))
        self._rng.shuffle(keys)
        return keys


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
        return self._drive(self._sweep(progress))

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

    def _drive(self, flow: _Flow[T]) -> T:
        send: Callable[[Any], _Effect] = flow.send
        reply: Any = None
        with contextlib.closing(flow):  # interrupted (KeyboardInterrupt), it ends here, not at GC
            while True:
                try:
                    effect = send(reply)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                try:
                    send, reply = flow.send, self._perform(effect)
                except Exception as exc:  # noqa: BLE001 - handed to the flow, which decides
                    send, reply = flow.throw, exc

    def _perform(self, effect: _Effect) -> Any:
        match effect:
            case _Pause(seconds):
                return self.manager.policy.clock.sleep(seconds)
            case _Scan(before):
                return list(self.manager.store.scan_due(before))
            case _Refresh(key, watch, stale):
                return self.manager._refresh_ahead(key, self.window, watch, stale)
            case _Get(key):
                return self.manager.store.get(key)
            case _Gather(flows):
                with ThreadPoolExecutor(self.concurrency, thread_name_prefix=_THREADS) as pool:
                    futures = [pool.submit(self._drive, flow) for flow in flows]
                    try:
                        return [future.result() for future in futures]
                    except BaseException:
                        self.stop()
                        raise
        raise AssertionError(f"unknown effect {effect!r}")  # pragma: no cover


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
        return await self._drive(self._sweep(progress))

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
        loop = asyncio.get_running_loop()
        with _signals_stop(self, loop) if handle_signals else contextlib.nullcontext():
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

    async def _drive(self, flow: _Flow[T]) -> T:
        send: Callable[[Any], _Effect] = flow.send
        reply: Any = None
        with contextlib.closing(flow):  # interrupted (a cancelled task), it ends here, not at GC
            while True:
                try:
                    effect = send(reply)
                except StopIteration as stop:
                    return stop.value  # type: ignore[no-any-return]
                try:
                    send, reply = flow.send, await self._perform(effect)
                except Exception as exc:  # noqa: BLE001 - handed to the flow, which decides
                    send, reply = flow.throw, exc

    async def _perform(self, effect: _Effect) -> Any:
        match effect:
            case _Pause(seconds):
                return await self.manager.policy.clock.asleep(seconds)
            case _Scan(before):
                return [key async for key in self.manager.store.scan_due(before)]
            case _Refresh(key, watch, stale):
                return await self.manager._refresh_ahead(key, self.window, watch, stale)
            case _Get(key):
                return await self.manager.store.get(key)
            case _Gather(flows):
                gate = asyncio.Semaphore(self.concurrency)

                async def drive(flow: _Flow[Any]) -> Any:
                    async with gate:
                        return await self._drive(flow)

                tasks = [asyncio.ensure_future(drive(flow)) for flow in flows]
                try:
                    # Shielded: a refresh cut off between the provider and the store would leave
                    # the new refresh token in the journal only.
                    return await asyncio.shield(asyncio.gather(*tasks))
                except BaseException:
                    self.stop()
                    raise
        raise AssertionError(f"unknown effect {effect!r}")  # pragma: no cover


def _sweep_failed(exc: CredkeeperError) -> None:
    # credkeeper's own messages hold no token.
    logger.warning("the sweep failed (%s: %s); sweeping again later", type(exc).__name__, exc)


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _signals_stop(
    sweeper: _SweeperBase[Any], loop: asyncio.AbstractEventLoop | None = None
) -> Iterator[None]:
    """The first SIGTERM or SIGINT stops ``sweeper``; a second goes to the handler that was
    there before (a second Ctrl-C interrupts), which is put back afterwards. With ``loop``,
    through the loop's own handlers. Only in the main thread, where signals can be handled."""
    previous = {number: signal.getsignal(number) for number in _SIGNALS}
    installed: list[signal.Signals] = []

    def restore() -> None:
        for number in installed:
            if loop is not None:
                loop.remove_signal_handler(number)
            old = previous[number]
            if old is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(number, old)
        installed.clear()

    def stop(*_: Any) -> None:
        sweeper.stop()
        restore()

    for number in _SIGNALS:
        try:
            if loop is None:
                signal.signal(number, stop)
            else:
                loop.add_signal_handler(number, stop)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or a platform without them
        installed.append(number)
    try:
        yield
    finally:
        restore()
