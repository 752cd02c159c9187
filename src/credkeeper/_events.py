"""What the refresh engine did, as events for metrics, logs and alerts; never a token.

A manager built with ``events=hook`` calls ``hook(event)`` for each :class:`RefreshEvent`, in the
thread or task that made the decision, the moment the flow makes it. The hook must be quick and
must not block (count, log, put on a queue): a refresh waits for it. An exception it raises is
logged and otherwise ignored, so a broken metrics exporter cannot fail a refresh.

Every refresh a manager starts ends in exactly one ``refresh_succeeded`` or ``refresh_failed``,
whose ``duration`` runs from the lease being taken to that end.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ._exceptions import ConfigurationError

__all__ = ["EventHook", "EventKind", "RefreshEvent"]

logger = logging.getLogger("credkeeper")


class EventKind(enum.StrEnum):
    """What happened; the ``outcome`` of each kind is listed beside it."""

    #: This manager took the key's lease and is about to ask the provider.
    REFRESH_STARTED = "refresh_started"
    #: The refresh ended with valid tokens: ``ok`` (the provider's, now stored) or ``adopted``
    #: (a peer's or a new login's, found when the provider refused the old refresh token).
    REFRESH_SUCCEEDED = "refresh_succeeded"
    #: The refresh ended without new tokens; the outcome says why: ``invalid_grant``,
    #: ``unavailable`` (throttled or down past the retries), ``provider_error``,
    #: ``store_unavailable``, ``store_contention``, ``deleted``, ``timeout``, ``interrupted``
    #: (the call was cancelled or interrupted mid-refresh), ``error``.
    REFRESH_FAILED = "refresh_failed"
    #: A due token was served without a refresh, still valid: ``cooldown`` (after provider
    #: failures), ``lease_busy`` (a peer's refresh outlasted the call's deadline),
    #: ``contention`` (the lease kept conflicting) or ``store_unavailable`` (its clock).
    REFRESH_DEFERRED = "refresh_deferred"
    #: One token-endpoint round trip: ``ok``, ``invalid_grant``, ``throttled`` (HTTP 429),
    #: ``unavailable`` (5xx or no answer) or ``error``; ``duration`` is its latency.
    PROVIDER_CALL = "provider_call"
    #: The provider refused the refresh token because a peer had already used it: its newer
    #: tokens are taken instead (the race that, done naively, logs users out).
    ADOPTED = "adopted"
    #: The credential was marked ``needs_reauth``: the user must log in again. Emitted by the
    #: one manager whose write made the change, so once per transition across a fleet.
    REAUTH_REQUIRED = "reauth_required"
    #: A login was stored over a credential marked ``needs_reauth``, or tokens a rescue journal
    #: kept were restored over it: the user is back. Emitted by the manager whose write
    #: replaced the marked record.
    RECOVERED = "recovered"
    #: The credential was deleted; emitted by the manager whose delete removed it.
    DELETED = "deleted"
    #: Taking the lease lost a compare-and-swap to another writer.
    LEASE_CONFLICT = "lease_conflict"
    #: A cooldown was recorded after provider failures; ``duration`` is its length.
    COOLDOWN = "cooldown"
    #: Tokens a crashed or failed write left in the rescue journal were stored.
    JOURNAL_RESCUE = "journal_rescue"


@dataclass(frozen=True, slots=True)
class RefreshEvent:
    """One event: its kind, the credential's key, an outcome and a duration in seconds."""

    kind: EventKind
    key: str
    outcome: str | None = None
    duration: float | None = None


EventHook = Callable[[RefreshEvent], None]


def emit(hook: EventHook | None, event: RefreshEvent) -> None:
    """Log ``event`` at DEBUG with structured fields, then call ``hook`` with it; what the hook
    raises is logged, never passed on.

    The log record carries ``credkeeper_event``, ``credkeeper_key``, ``credkeeper_outcome`` and
    ``credkeeper_duration`` as attributes, for a JSON formatter to pick up (``extra`` fields).
    """
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug(
            "key %r: %s%s",
            event.key,
            event.kind.value,
            f" ({event.outcome})" if event.outcome else "",
            extra={
                "credkeeper_event": event.kind.value,
                "credkeeper_key": event.key,
                "credkeeper_outcome": event.outcome,
                "credkeeper_duration": event.duration,
            },
        )
    if hook is not None:
        _call(hook, event)


def _call(hook: EventHook, event: RefreshEvent) -> None:
    try:
        hook(event)
    except Exception as exc:  # noqa: BLE001 - an exporter's failure must not fail a refresh
        logger.warning(
            "the events hook raised %s on %s for key %r; the refresh goes on",
            type(exc).__name__,
            event.kind,
            event.key,
        )


class Subscribers:
    """The hooks one manager tells, in order: the one it was built with, then those subscribed
    since. Falsy while there are none, so that the flow builds no event nobody reads.

    Each hook's failure is logged apart, so one broken consumer does not silence the others.
    """

    __slots__ = ("_hooks", "_lock")

    def __init__(self, hook: EventHook | None = None) -> None:
        self._hooks: tuple[EventHook, ...] = () if hook is None else (hook,)
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def __call__(self, event: RefreshEvent) -> None:
        hooks = self._hooks
        if len(hooks) == 1:
            hooks[0](event)
            return
        for hook in hooks:
            _call(hook, event)

    def add(self, hook: EventHook) -> Callable[[], None]:
        """Tell ``hook`` too, from now on; returns what stops telling it (idempotent).

        A hook already told is refused: it would hear every event twice.
        """
        if not callable(hook):
            raise ConfigurationError("the hook must be a callable taking a credkeeper.RefreshEvent")
        # Replaced, never mutated: a flow reading the tuple mid-event is never disturbed.
        with self._lock:
            if hook in self._hooks:
                raise ConfigurationError(
                    f"{hook!r} already hears this manager's events (given as events=, or "
                    "subscribed before); it would hear each of them twice"
                )
            self._hooks = (*self._hooks, hook)

        def remove() -> None:
            with self._lock:
                self._hooks = tuple(told for told in self._hooks if told != hook)

        return remove
