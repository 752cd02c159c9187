"""Webhooks: tell other systems when a user must log in again, is back, or is gone.

:class:`Webhooks` is an events hook (``events=webhooks``) that turns three of the managers'
events into signed HTTP POSTs to every configured URL:

============================  ==============================================================
``credential.needs_reauth``   the credential was marked ``needs_reauth``: the user must log in
``credential.recovered``      a login was stored over a credential marked ``needs_reauth``
``credential.deleted``        the credential was deleted
============================  ==============================================================

Each request follows the Standard Webhooks scheme (https://www.standardwebhooks.com/): a JSON
body ``{"type": ..., "timestamp": ..., "data": {"key": ...}}`` and the headers ``webhook-id``,
``webhook-timestamp`` (Unix seconds of the attempt) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``, keyed with the ``whsec_`` secret).
Python receivers check them with :func:`verify_webhook`; the Standard Webhooks libraries of
other languages accept them as they are. The body names the credential's key and nothing
else: no token ever leaves in a webhook.

What is guaranteed, and what is not:

- **Once per transition across replicas.** Only the manager whose compare-and-swap write made
  the change emits the event, so one state change in the store gives one message, however many
  replicas watch the store; a replica that merely reads the new state sends nothing.
- **At least once per receiver, while the process lives.** A delivery is retried with
  exponential backoff and full jitter (honouring ``Retry-After``) until a 2xx answer, up to
  ``attempts`` times; a 4xx other than 408, 409, 425 and 429 is the receiver refusing the
  message and is not retried. A retry can repeat a message the receiver already handled (its
  answer was lost), so receivers must dedupe on ``webhook-id``, which stays the same across
  the attempts of one message (and is the same for every URL).
- **In memory only.** Pending deliveries are not persisted. A replica that stops keeps
  delivering for the ``grace`` period given to :meth:`Webhooks.aclose`, retries included, then
  logs every delivery it drops (type, key and URL). A replica that crashes loses what was
  pending; the store still holds the truth, the ``status`` of each credential, which a receiver
  can reconcile against (``GET /v1/users`` lists it).
- **Order is best-effort.** Each URL is served by a few concurrent workers; messages to one URL
  may arrive out of order, and a slow or dead URL never delays another.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import hashlib
import hmac
import json
import logging
import math
import random
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Self

import httpx

from credkeeper import __version__
from credkeeper._clock import Clock, SystemClock
from credkeeper._events import EventKind, RefreshEvent
from credkeeper._exceptions import ConfigurationError, WebhookVerificationError
from credkeeper._urls import secure_url, shown_url

__all__ = [
    "EVENT_TYPES",
    "WebhookVerificationError",
    "Webhooks",
    "new_webhook_secret",
    "sign_webhook",
    "verify_webhook",
]

logger = logging.getLogger("credkeeper.webhooks")

#: The event kinds that become webhooks, and the ``type`` each is sent as.
EVENT_TYPES: Mapping[EventKind, str] = MappingProxyType(
    {
        EventKind.REAUTH_REQUIRED: "credential.needs_reauth",
        EventKind.RECOVERED: "credential.recovered",
        EventKind.DELETED: "credential.deleted",
    }
)

# What a Standard Webhooks symmetric secret starts with; base64 of the key bytes follows.
_WHSEC = "whsec_"
# The Standard Webhooks bounds for an HMAC key: at least 192 bits, at most 512.
_MIN_KEY_BYTES = 24
_MAX_KEY_BYTES = 64
_NEW_KEY_BYTES = 32
_KEY_OPTION = "--webhook-secret (CREDKEEPER_WEBHOOK_SECRET)"
_SECRET_FIX = (
    f"; give {_WHSEC} followed by the base64 of {_MIN_KEY_BYTES} to {_MAX_KEY_BYTES} "
    f"random bytes, e.g. from: echo {_WHSEC}$(openssl rand -base64 {_NEW_KEY_BYTES})"
)
_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
# Timeout, conflict, too early, throttled: the receiver may take the same message later.
_RETRYABLE_4XX = frozenset({408, 409, 425, 429})
# Past this many doublings the backoff is at its cap anyway; 2.0 ** n would overflow later.
_MAX_DOUBLINGS = 62
# How many dropped deliveries a shutdown warning lists by name; the rest are counted.
_LISTED_DROPS = 20
_USER_AGENT = f"credkeeper/{__version__}"


# -- signing -----------------------------------------------------------------------------


def new_webhook_secret() -> str:
    """A fresh Standard Webhooks secret: ``whsec_`` and the base64 of 32 random bytes.

    Give the same value to ``credkeeper serve --webhook-secret`` and to the receivers.
    """
    return _WHSEC + base64.b64encode(secrets.token_bytes(_NEW_KEY_BYTES)).decode("ascii")


def sign_webhook(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one attempt: ``v1,<base64 signature>``.

    ``secret`` is a ``whsec_`` secret, ``msg_id`` the ``webhook-id`` (no ``.``, which would
    make the signed content ambiguous), ``timestamp`` the ``webhook-timestamp`` in Unix seconds
    and ``body`` the exact bytes sent.
    """
    key = _key_of(secret, "secret")
    if not isinstance(msg_id, str) or not msg_id or "." in msg_id:
        raise ConfigurationError(f"msg_id must be a non-empty str without '.', got {msg_id!r}")
    if type(timestamp) is not int or timestamp < 0:
        raise ConfigurationError(f"timestamp must be Unix seconds as an int, got {timestamp!r}")
    if not isinstance(body, bytes):
        raise ConfigurationError(f"body must be bytes, not {type(body).__name__}")
    return _signature(key, msg_id, str(timestamp), body)


def verify_webhook(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: float = 300.0,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The payload of a webhook whose headers prove it came from a holder of ``secret``.

    ``headers`` are the request's (any letter case), ``body`` its exact bytes, before any JSON
    parsing. A ``webhook-timestamp`` more than ``tolerance`` seconds away from ``now`` (default:
    the current time) is refused, so a captured request cannot be replayed later; any ``v1``
    signature in the space-separated ``webhook-signature`` list may match, compared in constant
    time. Raises :class:`WebhookVerificationError`, or :class:`ConfigurationError` for a
    malformed ``secret``. The same message can arrive more than once: dedupe on ``webhook-id``.
    """
    key = _key_of(secret, "secret")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float):
        raise ConfigurationError(f"tolerance must be a number of seconds, got {tolerance!r}")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ConfigurationError(f"tolerance must be finite and >= 0, got {tolerance!r}")
    if now is None:
        now = datetime.now(UTC)
    elif not isinstance(now, datetime) or now.utcoffset() is None:
        raise ConfigurationError(
            f"now must be an aware datetime, e.g. datetime.now(timezone.utc), got {now!r}"
        )
    if not isinstance(body, bytes):
        raise ConfigurationError(f"body must be the request's raw bytes, not {type(body).__name__}")
    lowered = {str(name).lower(): value for name, value in headers.items()}
    missing = [name for name in _HEADERS if not lowered.get(name)]
    if missing:
        raise WebhookVerificationError(f"missing header: {', '.join(missing)}")
    msg_id, stamp, signatures = (lowered[name] for name in _HEADERS)
    if not (stamp.isascii() and stamp.isdigit()):
        raise WebhookVerificationError("webhook-timestamp is not a whole number of Unix seconds")
    age = now.timestamp() - int(stamp)
    if age > tolerance:
        raise WebhookVerificationError(
            f"webhook-timestamp is {age:.0f} s old, beyond the {tolerance:g} s tolerance "
            "(a replayed request, or a clock that is off)"
        )
    if -age > tolerance:
        raise WebhookVerificationError(
            f"webhook-timestamp is {-age:.0f} s in the future, beyond the {tolerance:g} s "
            "tolerance (a clock that is off)"
        )
    expected = _digest(key, msg_id, stamp, body)
    if not any(hmac.compare_digest(expected, offered) for offered in _offered(signatures)):
        raise WebhookVerificationError("no webhook-signature matches the secret and the body")
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise WebhookVerificationError("the signed body is not a JSON object")
    return payload


def _key_of(secret: object, option: str) -> bytes:
    """The HMAC key a ``whsec_`` secret encodes; the message never repeats the secret."""
    if not isinstance(secret, str) or not secret.startswith(_WHSEC):
        raise ConfigurationError(f"{option} must start with {_WHSEC!r}{_SECRET_FIX}")
    encoded = secret[len(_WHSEC) :]
    try:
        # Padding is optional in the secrets some tools print; restore it before decoding.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"{option} is not base64 after {_WHSEC!r}{_SECRET_FIX}") from None
    if not _MIN_KEY_BYTES <= len(key) <= _MAX_KEY_BYTES:
        raise ConfigurationError(f"{option} holds a {len(key)}-byte key{_SECRET_FIX}")
    return key


def _digest(key: bytes, msg_id: str, stamp: str, body: bytes) -> bytes:
    return hmac.digest(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256)


def _signature(key: bytes, msg_id: str, stamp: str, body: bytes) -> str:
    return "v1," + base64.b64encode(_digest(key, msg_id, stamp, body)).decode("ascii")


def _offered(header: str) -> list[bytes]:
    """The ``v1`` signatures of a ``webhook-signature`` header; other schemes are skipped."""
    found: list[bytes] = []
    for entry in header.split():
        version, _, encoded = entry.partition(",")
        if version != "v1":
            continue
        try:
            found.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return found


# -- delivery ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Message:
    """One event as sent: the same id and body to every URL and in every attempt."""

    id: str
    type: str
    key: str
    body: bytes


@dataclass(eq=False, slots=True)
class _Route:
    """One URL: its queue, its workers and the messages they hold now."""

    url: str
    shown: str
    queue: asyncio.Queue[_Message] | None = None
    workers: list[asyncio.Task[None]] = field(default_factory=list)
    inflight: set[_Message] = field(default_factory=set)


class _State(enum.Enum):
    NEW = "not started"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class Webhooks:
    """The events hook that POSTs ``credential.*`` webhooks to ``urls``, signed with ``secret``.

    Subscribe it to a manager (``manager.subscribe(webhooks)``, or ``events=webhooks``), ``await
    start()`` (or enter it with ``async with``) on the loop that should deliver, and ``await
    aclose()`` when stopping; once each: a closed instance does not start again. Given to
    :func:`~credkeeper.server.create_app`, the application's lifespan does all three. Calling it
    is quick and never blocks: it builds the message and queues one delivery per URL, from the
    loop's thread or any other. Events before :meth:`start` or after :meth:`aclose` are logged
    and dropped; other event kinds are ignored.

    ``urls`` must be https (plain http only to a loopback host) and distinct; ``secret`` is a
    ``whsec_`` secret (see :func:`new_webhook_secret`). Each attempt times out after
    ``timeout`` seconds; a failed delivery is tried up to ``attempts`` times in all, waiting a
    random time up to ``backoff * 2 ** n`` seconds (at most ``backoff_cap``, at least a
    ``Retry-After`` within that cap). ``concurrency`` deliveries run at once per URL; beyond
    ``max_pending`` waiting for one URL, new ones are logged and dropped. ``http`` is the
    caller's client (it stays open); ``clock`` and ``rng`` give time and jitter. Logs go to
    ``credkeeper.webhooks`` with ``credkeeper_*`` fields in ``extra``; never the secret.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        secret: str,
        attempts: int = 6,
        timeout: float = 10.0,
        backoff: float = 1.0,
        backoff_cap: float = 60.0,
        concurrency: int = 4,
        max_pending: int = 10_000,
        http: httpx.AsyncClient | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if isinstance(urls, str) or not isinstance(urls, Sequence):
            raise ConfigurationError(
                f"urls must be a list of --webhook URLs, not {type(urls).__name__}"
            )
        if not urls:
            raise ConfigurationError("give at least one --webhook URL to send webhooks to")
        routes: dict[str, _Route] = {}
        for url in urls:
            parts = secure_url(url, option="--webhook")
            assert isinstance(url, str)
            if url in routes:
                raise ConfigurationError(
                    f"--webhook {shown_url(parts)!r} is given twice; each URL gets every event once"
                )
            routes[url] = _Route(url, shown_url(parts))
        key = _key_of(secret, _KEY_OPTION)
        _check_int("attempts", attempts, 1)
        _check_int("concurrency", concurrency, 1)
        _check_int("max_pending", max_pending, 1)
        _check_seconds("timeout", timeout)
        _check_seconds("backoff", backoff)
        _check_seconds("backoff_cap", backoff_cap)
        if backoff_cap < backoff:
            raise ConfigurationError(
                f"backoff_cap ({backoff_cap!r}) must be at least backoff ({backoff!r})"
            )
        if http is not None and not isinstance(http, httpx.AsyncClient):
            raise ConfigurationError("http must be an httpx.AsyncClient or None")
        if rng is not None and not isinstance(rng, random.Random):
            raise ConfigurationError("rng must be a random.Random or None")
        self._routes = list(routes.values())
        self._key = key
        self._attempts = attempts
        self._timeout = float(timeout)
        self._backoff = float(backoff)
        self._backoff_cap = float(backoff_cap)
        self._concurrency = concurrency
        self._max_pending = max_pending
        self._http = http
        self._own_http = http is None
        self._clock: Clock = SystemClock() if clock is None else clock
        # Jitter only: message ids come from `secrets`, so seeded tests cannot make them collide.
        self._rng = random.Random() if rng is None else rng  # noqa: S311
        self._state = _State.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None

    def __repr__(self) -> str:
        urls = [route.shown for route in self._routes]
        return f"Webhooks(urls={urls!r}, attempts={self._attempts}, state={self._state.value!r})"

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind to the running loop and start the delivery workers; once per instance."""
        if self._state is not _State.NEW:
            raise RuntimeError(
                f"Webhooks.start() runs once; these webhooks are {self._state.value}"
            )
        loop = asyncio.get_running_loop()
        if self._http is None:
            self._http = httpx.AsyncClient()
        for route in self._routes:
            route.queue = asyncio.Queue(self._max_pending)
            route.workers = [
                loop.create_task(self._work(route), name=f"webhook {route.shown} #{n}")
                for n in range(self._concurrency)
            ]
        self._loop, self._thread = loop, threading.get_ident()
        self._state = _State.RUNNING

    async def aclose(self, grace: float = 10.0) -> None:
        """Stop taking events, deliver what is queued for at most ``grace`` seconds (retries
        included), then cancel the rest and log each delivery dropped. Idempotent."""
        _check_seconds("grace", grace, zero=True)
        if self._state is _State.NEW:
            self._state = _State.CLOSED
            return
        if self._state is not _State.RUNNING:
            return
        self._state = _State.CLOSING
        try:
            waits = [route.queue.join() for route in self._routes if route.queue is not None]
            # What the grace does not cover is counted and logged below.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), grace)
        finally:
            self._state = _State.CLOSED
            await self._stop_workers()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _stop_workers(self) -> None:
        """Cancel every worker, log what they leave undelivered, close a client of our own."""
        dropped: list[tuple[_Route, _Message]] = []
        for route in self._routes:
            dropped.extend((route, message) for message in route.inflight)
            while route.queue is not None and not route.queue.empty():
                dropped.append((route, route.queue.get_nowait()))
        workers = [worker for route in self._routes for worker in route.workers]
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if dropped:
            listed = ", ".join(
                f"{message.type} for {message.key!r} to {route.shown}"
                for route, message in dropped[:_LISTED_DROPS]
            )
            more = len(dropped) - _LISTED_DROPS
            logger.warning(
                "webhooks closed with %d deliveries not confirmed, dropped: %s%s",
                len(dropped),
                listed,
                f" and {more} more" if more > 0 else "",
                extra={
                    "credkeeper_dropped_count": len(dropped),
                    "credkeeper_dropped": [
                        {
                            "webhook_id": message.id,
                            "type": message.type,
                            "key": message.key,
                            "url": route.shown,
                        }
                        for route, message in dropped
                    ],
                },
            )
        if self._own_http and self._http is not None:
            await self._http.aclose()

    # -- the hook ------------------------------------------------------------------------

    def __call__(self, event: RefreshEvent) -> None:
        """Queue a webhook for ``event`` to every URL, if its kind is one of
        :data:`EVENT_TYPES`; quick, non-blocking and safe from any thread."""
        kind = EVENT_TYPES.get(event.kind)
        if kind is None:
            return
        message = self._message(kind, event.key)
        loop = self._loop
        if self._state is not _State.RUNNING or loop is None:
            self._refuse(message)
            return
        if threading.get_ident() == self._thread:
            self._enqueue(message)
            return
        try:
            loop.call_soon_threadsafe(self._enqueue, message)
        except RuntimeError:  # the loop closed since the state was read
            self._refuse(message)

    def _message(self, kind: str, key: str) -> _Message:
        moment = self._clock.now().astimezone(UTC)
        stamp = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        payload = {"type": kind, "timestamp": stamp, "data": {"key": key}}
        body = json.dumps(payload, separators=(",", ":")).encode("ascii")
        return _Message("msg_" + secrets.token_urlsafe(18), kind, key, body)

    def _enqueue(self, message: _Message) -> None:
        """Runs on the loop: one delivery per URL, unless closed or a queue is full."""
        if self._state is not _State.RUNNING and self._state is not _State.CLOSING:
            self._refuse(message)
            return
        for route in self._routes:
            assert route.queue is not None
            try:
                route.queue.put_nowait(message)
            except asyncio.QueueFull:
                logger.warning(
                    "webhook %s for key %r to %s dropped: its queue is full (max_pending %d)",
                    message.type,
                    message.key,
                    route.shown,
                    self._max_pending,
                    extra=_fields(message, route),
                )

    def _refuse(self, message: _Message) -> None:
        logger.warning(
            "webhook %s for key %r dropped: the webhooks are %s",
            message.type,
            message.key,
            self._state.value,
            extra=_fields(message),
        )

    # -- delivering ----------------------------------------------------------------------

    async def _work(self, route: _Route) -> None:
        assert route.queue is not None
        while True:
            message = await route.queue.get()
            route.inflight.add(message)
            try:
                await self._deliver(route, message)
            except Exception:  # one broken delivery must not stop the others
                logger.exception(
                    "webhook %s for key %r to %s failed unexpectedly; not retried",
                    message.type,
                    message.key,
                    route.shown,
                    extra=_fields(message, route),
                )
            finally:
                route.inflight.discard(message)
                route.queue.task_done()

    async def _deliver(self, route: _Route, message: _Message) -> None:
        """Try ``message`` until a 2xx, a refusal or the last attempt; log how it ended."""
        assert self._http is not None
        last = "no answer"
        for attempt in range(1, self._attempts + 1):
            retry_after = None
            stamp = str(int(self._clock.now().timestamp()))
            headers = {
                "content-type": "application/json",
                "user-agent": _USER_AGENT,
                "webhook-id": message.id,
                "webhook-timestamp": stamp,
                "webhook-signature": _signature(self._key, message.id, stamp, message.body),
            }
            try:
                # Streamed and never read: a receiver's answer body is of no use here.
                async with self._http.stream(
                    "POST", route.url, content=message.body, headers=headers, timeout=self._timeout
                ) as response:
                    status = response.status_code
                    retry_after = _retry_after(response.headers.get("retry-after"))
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            else:
                if 200 <= status < 300:
                    logger.debug(
                        "webhook %s for key %r delivered to %s",
                        message.type,
                        message.key,
                        route.shown,
                        extra=_fields(message, route, status=status, attempts=attempt),
                    )
                    return
                last = f"HTTP {status}"
                if 400 <= status < 500 and status not in _RETRYABLE_4XX:
                    logger.warning(
                        "webhook %s for key %r refused by %s with HTTP %d; not retried",
                        message.type,
                        message.key,
                        route.shown,
                        status,
                        extra=_fields(message, route, status=status, attempts=attempt),
                    )
                    return
            if attempt < self._attempts:
                await self._clock.asleep(self._delay(attempt, retry_after))
        logger.warning(
            "webhook %s for key %r to %s given up after %d attempts; last: %s",
            message.type,
            message.key,
            route.shown,
            self._attempts,
            last,
            extra=_fields(message, route, status=last, attempts=self._attempts),
        )

    def _delay(self, failures: int, retry_after: float | None) -> float:
        """Full jitter over an exponential ceiling; a ``Retry-After`` is a floor, within the cap."""
        ceiling = min(self._backoff_cap, self._backoff * 2.0 ** min(failures - 1, _MAX_DOUBLINGS))
        delay = self._rng.uniform(0.0, ceiling)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._backoff_cap))
        return delay


def _retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` of whole seconds; a date or anything else is ignored."""
    if value is None:
        return None
    value = value.strip()
    return float(value) if value.isascii() and value.isdigit() else None


def _fields(message: _Message, route: _Route | None = None, **more: object) -> dict[str, object]:
    """The ``extra`` fields of a log record about ``message``: never the body or a secret."""
    fields: dict[str, object] = {
        "credkeeper_webhook_id": message.id,
        "credkeeper_webhook_type": message.type,
        "credkeeper_key": message.key,
    }
    if route is not None:
        fields["credkeeper_webhook_url"] = route.shown
    fields.update({f"credkeeper_{name}": value for name, value in more.items()})
    return fields


def _check_int(name: str, value: object, least: int) -> None:
    if type(value) is not int or value < least:
        raise ConfigurationError(f"{name} must be an int >= {least}, got {value!r}")


def _check_seconds(name: str, value: object, *, zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        least = ">= 0" if zero else "> 0"
        raise ConfigurationError(f"{name} must be finite and {least} seconds, got {value!r}")
