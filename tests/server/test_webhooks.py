"""Webhooks: signed, retried deliveries of credential events to real receivers on loopback.

Each receiver is a real HTTP server in a thread that logs every request and answers as told:
a status, a ``Retry-After``, or nothing until the test releases it (a slow or dead receiver).
Time is real but short: the backoff is a few milliseconds, and tests wait on the receiver's
log or on ``aclose``, which returns once every queued delivery has ended.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from credkeeper import AsyncTokenManager, ConfigurationError, MemoryStore, ReauthRequired
from credkeeper._events import EventKind, RefreshEvent
from credkeeper.server._webhooks import (
    EVENT_TYPES,
    Webhooks,
    WebhookVerificationError,
    new_webhook_secret,
    sign_webhook,
    verify_webhook,
)
from credkeeper.testing import FakeClock, FakeProvider
from credkeeper.testing._http import FakeServer, Reply, Request

KEY = "alice"
# The Standard Webhooks specification's published test vector.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
# Long enough for any delivery of these tests to end on a loaded machine; tests never wait it out.
PATIENCE = 30.0


# -- the receiver ------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """How the receiver answers one request: a status, maybe ``Retry-After``, maybe held."""

    status: int = 204
    retry_after: str | None = None
    #: Answer only once the test calls ``release()`` (or the receiver stops).
    held: bool = False


@dataclass(frozen=True)
class Received:
    """One request as the receiver got it."""

    headers: httpx.Headers
    body: bytes


class Receiver(FakeServer[Answer, Received]):
    """A webhook receiver on loopback: answers queued with ``fail_next``, then ``always``."""

    _fault_type = Answer
    _max_body = 1 << 16

    def __init__(self, always: Answer | None = None) -> None:
        super().__init__()
        self.always = always or Answer()
        self._released = threading.Event()

    @property
    def hook_url(self) -> str:
        """Where webhooks are posted."""
        return self.url + "/hooks"

    @property
    def received(self) -> list[Received]:
        """Every request so far, in arrival order."""
        return self._logged()

    def release(self) -> None:
        """Let every held answer go, now and from now on."""
        self._released.set()

    def stop(self) -> None:
        """Release held answers, then stop serving."""
        self.release()
        super().stop()

    def _respond(self, request: Request) -> Reply | None:
        with self._lock:
            self._record_locked(Received(request.headers, request.body or b""))
        answer = self._take_fault() or self.always
        if answer.held:
            self._released.wait(PATIENCE)
        headers = () if answer.retry_after is None else (("Retry-After", answer.retry_after),)
        return Reply(answer.status, headers=headers)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A receiver answering 204 to everything."""
    with Receiver() as server:
        yield server


@pytest.fixture
def secret() -> str:
    """The secret the test's webhooks are signed with."""
    return new_webhook_secret()


def hooks(*urls: str, secret: str, **options: Any) -> Webhooks:
    """Webhooks with a backoff of milliseconds, so retries cost the suite nothing."""
    options.setdefault("backoff", 0.005)
    options.setdefault("backoff_cap", 0.02)
    options.setdefault("timeout", PATIENCE)
    return Webhooks(list(urls), secret=secret, **options)


def needs_reauth(key: str = KEY) -> RefreshEvent:
    """The event a manager emits when it marks ``key`` needs_reauth."""
    return RefreshEvent(EventKind.REAUTH_REQUIRED, key, "invalid_grant")


def unused_url() -> str:
    """An http URL on loopback nobody listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hooks"


async def wait_for_requests(receiver: Receiver, count: int) -> list[Received]:
    """The receiver's log once it holds ``count`` requests, waited for off the loop."""
    return await asyncio.to_thread(receiver.wait_for_calls, count, timeout=PATIENCE)


def webhook_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the webhooks logged at WARNING or above."""
    return [
        record
        for record in caplog.records
        if record.name == "credkeeper.webhooks" and record.levelno >= logging.WARNING
    ]


# -- signing -----------------------------------------------------------------------------


class TestSign:
    def test_signature_matches_the_standard_webhooks_test_vector(self) -> None:
        """sign_webhook() gives the specification's published signature for its test vector."""
        actual = sign_webhook(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY)

        assert VECTOR_SIGNATURE == actual

    def test_new_secret_holds_32_random_bytes(self) -> None:
        """new_webhook_secret() is whsec_ and the base64 of 32 bytes, different every time."""
        first, second = new_webhook_secret(), new_webhook_secret()

        assert (True, 32) == (first.startswith("whsec_"), len(base64.b64decode(first[6:])))
        assert first != second

    def test_malformed_secret_is_refused_without_repeating_it(self) -> None:
        """A secret that is not whsec_ and base64 is a ConfigurationError that hides it."""
        bad = "whsec_not*base64*at*all"

        with pytest.raises(ConfigurationError) as caught:
            sign_webhook(bad, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY)

        assert bad not in str(caught.value)


class TestVerifyWebhook:
    def headers(self, *, signature: str = VECTOR_SIGNATURE) -> dict[str, str]:
        return {
            "Webhook-Id": VECTOR_ID,
            "Webhook-Timestamp": str(VECTOR_TIMESTAMP),
            "Webhook-Signature": signature,
        }

    def at(self, seconds_after: float) -> datetime:
        return datetime.fromtimestamp(VECTOR_TIMESTAMP, UTC) + timedelta(seconds=seconds_after)

    def test_signed_request_gives_its_payload(self) -> None:
        """A request signed with the secret, within the tolerance, gives the decoded body."""
        payload = verify_webhook(VECTOR_SECRET, self.headers(), VECTOR_BODY, now=self.at(10))

        assert {"test": 2432232314} == payload

    def test_any_of_several_signatures_may_match(self) -> None:
        """One matching v1 signature among others (a secret being rotated) is enough."""
        other = sign_webhook(new_webhook_secret(), VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY)
        headers = self.headers(signature=f"{other} v1a,c29tZXRoaW5n {VECTOR_SIGNATURE}")

        payload = verify_webhook(VECTOR_SECRET, headers, VECTOR_BODY, now=self.at(0))

        assert {"test": 2432232314} == payload

    def test_tampered_body_is_rejected(self) -> None:
        """A body changed after signing fails verification."""
        with pytest.raises(WebhookVerificationError, match="no webhook-signature matches"):
            verify_webhook(VECTOR_SECRET, self.headers(), b'{"test": 1}', now=self.at(0))

    def test_wrong_secret_is_rejected(self) -> None:
        """A signature made with another secret fails verification."""
        with pytest.raises(WebhookVerificationError, match="no webhook-signature matches"):
            verify_webhook(new_webhook_secret(), self.headers(), VECTOR_BODY, now=self.at(0))

    def test_stale_timestamp_is_rejected(self) -> None:
        """A request older than the tolerance is refused, however well signed (a replay)."""
        with pytest.raises(WebhookVerificationError, match="s old"):
            verify_webhook(VECTOR_SECRET, self.headers(), VECTOR_BODY, now=self.at(301))

    def test_future_timestamp_is_rejected(self) -> None:
        """A request dated beyond the tolerance ahead is refused."""
        with pytest.raises(WebhookVerificationError, match="in the future"):
            verify_webhook(VECTOR_SECRET, self.headers(), VECTOR_BODY, now=self.at(-301))

    def test_missing_header_is_named(self) -> None:
        """A request without webhook-signature is refused, naming the header."""
        headers = self.headers()
        del headers["Webhook-Signature"]

        with pytest.raises(WebhookVerificationError, match="missing header: webhook-signature"):
            verify_webhook(VECTOR_SECRET, headers, VECTOR_BODY, now=self.at(0))


# -- configuration -----------------------------------------------------------------------


class TestConfiguration:
    def test_plain_http_to_another_host_is_refused(self, secret: str) -> None:
        """An http:// URL is accepted on loopback only; the error names --webhook."""
        with pytest.raises(ConfigurationError, match="--webhook must use https"):
            Webhooks(["http://hooks.example.com/credkeeper"], secret=secret)

    def test_bad_secret_names_the_option_and_hides_the_value(self) -> None:
        """A secret too short to be safe is refused naming --webhook-secret, not repeating it."""
        short = "whsec_" + base64.b64encode(b"0123456789").decode()

        with pytest.raises(ConfigurationError, match="--webhook-secret") as caught:
            Webhooks(["https://hooks.example.com/credkeeper"], secret=short)

        assert short[6:] not in str(caught.value)

    def test_same_url_twice_is_refused(self, secret: str) -> None:
        """A URL given twice would get every event twice; it is refused."""
        url = "https://hooks.example.com/credkeeper"

        with pytest.raises(ConfigurationError, match="given twice"):
            Webhooks([url, url], secret=secret)

    def test_repr_shows_neither_secret_nor_url_credentials(self, secret: str) -> None:
        """repr names the URLs without their user, password or query, and never the secret."""
        webhooks = Webhooks(["https://user:pw@hooks.example.com/in?sig=abc"], secret=secret)

        assert "['https://hooks.example.com/in?...']" in repr(webhooks)
        assert secret[6:] not in repr(webhooks)


# -- delivering --------------------------------------------------------------------------


@pytest.mark.anyio
class TestDelivery:
    async def test_delivery_verifies_and_names_type_and_key(
        self, receiver: Receiver, secret: str
    ) -> None:
        """A delivery passes verify_webhook and carries the event's type and key."""
        async with hooks(receiver.hook_url, secret=secret) as webhooks:
            webhooks(needs_reauth())
        (request,) = receiver.received

        payload = verify_webhook(secret, request.headers, request.body)

        assert ("credential.needs_reauth", {"key": KEY}) == (payload["type"], payload["data"])
        assert request.headers["webhook-id"].startswith("msg_")
        assert "application/json" == request.headers["content-type"]

    @pytest.mark.parametrize(
        ("kind", "expected"),
        [
            (EventKind.REAUTH_REQUIRED, "credential.needs_reauth"),
            (EventKind.RECOVERED, "credential.recovered"),
            (EventKind.DELETED, "credential.deleted"),
        ],
    )
    async def test_each_credential_event_has_its_type(
        self, receiver: Receiver, secret: str, kind: EventKind, expected: str
    ) -> None:
        """needs_reauth, recovered and deleted each become their credential.* type."""
        async with hooks(receiver.hook_url, secret=secret) as webhooks:
            webhooks(RefreshEvent(kind, KEY))
        (request,) = receiver.received

        assert expected == verify_webhook(secret, request.headers, request.body)["type"]

    async def test_other_events_send_nothing(self, receiver: Receiver, secret: str) -> None:
        """Refresh outcomes, conflicts and the like are not webhooks."""
        async with hooks(receiver.hook_url, secret=secret) as webhooks:
            for kind in set(EventKind) - set(EVENT_TYPES):
                webhooks(RefreshEvent(kind, KEY))

        assert [] == receiver.received

    async def test_retry_after_500_keeps_the_webhook_id(
        self, receiver: Receiver, secret: str
    ) -> None:
        """A 500 is retried with the same webhook-id, freshly signed, until a 2xx."""
        receiver.fail_next(Answer(500), Answer(503))
        async with hooks(receiver.hook_url, secret=secret) as webhooks:
            webhooks(needs_reauth())
        requests = receiver.received

        assert 3 == len(requests)
        assert 1 == len({request.headers["webhook-id"] for request in requests})
        assert all(verify_webhook(secret, r.headers, r.body) for r in requests)

    async def test_refused_delivery_is_not_retried(
        self, receiver: Receiver, secret: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A 410 is the receiver refusing the message: one request, and a warning."""
        receiver.fail_next(Answer(410))
        async with hooks(receiver.hook_url, secret=secret) as webhooks:
            webhooks(needs_reauth())

        (record,) = webhook_records(caplog)
        assert 1 == len(receiver.received)
        assert record.getMessage().endswith("with HTTP 410; not retried")

    async def test_throttled_delivery_waits_the_retry_after(
        self, receiver: Receiver, secret: str
    ) -> None:
        """A 429 with Retry-After: 7 is retried after 7 seconds, not the shorter backoff."""
        clock = FakeClock()
        receiver.fail_next(Answer(429, retry_after="7"))
        webhooks = hooks(receiver.hook_url, secret=secret, clock=clock, backoff_cap=30)
        async with webhooks:
            webhooks(needs_reauth())

        assert ([7.0], 2) == (clock.sleeps, len(receiver.received))

    async def test_delivery_is_given_up_after_the_attempts(
        self, secret: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A receiver failing every time gets `attempts` requests, then a warning names it."""
        with Receiver(Answer(500)) as failing:
            async with hooks(failing.hook_url, secret=secret, attempts=3) as webhooks:
                webhooks(needs_reauth())
            url, received = failing.hook_url, failing.received

        (record,) = webhook_records(caplog)
        assert 3 == len(received)
        assert (
            f"webhook credential.needs_reauth for key 'alice' to {url} given up "
            "after 3 attempts; last: HTTP 500"
        ) == record.getMessage()

    async def test_unreachable_receiver_is_retried_then_given_up(
        self, secret: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Connection failures are retried like 5xx answers, and the give-up names the error."""
        async with hooks(unused_url(), secret=secret, attempts=2) as webhooks:
            webhooks(needs_reauth())

        (record,) = webhook_records(caplog)
        assert record.getMessage().endswith("given up after 2 attempts; last: ConnectError")

    async def test_every_url_receives_the_same_message(self, secret: str) -> None:
        """Two URLs each receive the event, with one webhook-id between them."""
        with Receiver() as first, Receiver() as second:
            async with hooks(first.hook_url, second.hook_url, secret=secret) as webhooks:
                webhooks(needs_reauth())
            ids = {r.headers["webhook-id"] for r in [*first.received, *second.received]}

            assert (1, 1, 1) == (len(first.received), len(second.received), len(ids))

    async def test_dead_url_does_not_delay_a_live_one(self, secret: str) -> None:
        """A receiver that never answers holds up only its own deliveries."""
        with Receiver(Answer(held=True)) as dead, Receiver() as live:
            webhooks = hooks(dead.hook_url, live.hook_url, secret=secret)
            async with webhooks:
                webhooks(needs_reauth())
                await wait_for_requests(dead, 1)
                delivered = await wait_for_requests(live, 1)
                await webhooks.aclose(grace=0)

            assert 1 == len(delivered)

    async def test_hook_called_from_another_thread_delivers(
        self, receiver: Receiver, secret: str
    ) -> None:
        """A manager calling the hook from a worker thread gets its event delivered."""
        async with hooks(receiver.hook_url, secret=secret) as webhooks:
            await asyncio.to_thread(webhooks, needs_reauth())

        assert 1 == len(receiver.received)

    async def test_hook_called_from_many_threads_at_once_loses_nothing(
        self, receiver: Receiver, secret: str
    ) -> None:
        """Events from 16 threads at once are each delivered once."""
        keys = [f"user-{n}" for n in range(16)]
        async with hooks(receiver.hook_url, secret=secret) as webhooks:
            await asyncio.gather(*(asyncio.to_thread(webhooks, needs_reauth(k)) for k in keys))
        received = [verify_webhook(secret, r.headers, r.body) for r in receiver.received]

        assert sorted(keys) == sorted(payload["data"]["key"] for payload in received)

    async def test_event_before_start_is_dropped_with_a_warning(
        self, receiver: Receiver, secret: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An event before start() is logged, naming its type and key, and not sent."""
        webhooks = hooks(receiver.hook_url, secret=secret)

        webhooks(needs_reauth())

        (record,) = webhook_records(caplog)
        assert (
            "webhook credential.needs_reauth for key 'alice' dropped: the webhooks are not started"
        ) == record.getMessage()
        await webhooks.aclose()

    async def test_event_after_aclose_is_dropped_with_a_warning(
        self, receiver: Receiver, secret: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An event after aclose() is logged and not sent."""
        async with hooks(receiver.hook_url, secret=secret) as webhooks:
            pass

        webhooks(needs_reauth())

        (record,) = webhook_records(caplog)
        assert record.getMessage().endswith("dropped: the webhooks are closed")
        assert [] == receiver.received

    async def test_aclose_delivers_what_is_queued(self, secret: str) -> None:
        """aclose waits, within its grace, for queued deliveries behind a slow one."""
        with Receiver() as receiver:
            receiver.fail_next(Answer(held=True))
            webhooks = hooks(receiver.hook_url, secret=secret, concurrency=1)
            await webhooks.start()
            webhooks(needs_reauth("slow"))
            webhooks(needs_reauth("queued"))
            await wait_for_requests(receiver, 1)

            closing = asyncio.create_task(webhooks.aclose(grace=PATIENCE))
            receiver.release()
            await closing

            keys = [
                verify_webhook(secret, r.headers, r.body)["data"]["key"] for r in receiver.received
            ]
        assert ["slow", "queued"] == keys

    async def test_aclose_drops_what_the_grace_does_not_cover(
        self, secret: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Past the grace, aclose cancels the deliveries left and logs each one's type and key."""
        with Receiver(Answer(held=True)) as stuck:
            webhooks = hooks(stuck.hook_url, secret=secret, concurrency=1)
            await webhooks.start()
            webhooks(needs_reauth("first"))
            webhooks(RefreshEvent(EventKind.DELETED, "second"))
            await wait_for_requests(stuck, 1)
            url = stuck.hook_url

            await webhooks.aclose(grace=0.05)

        (record,) = webhook_records(caplog)
        assert (
            "webhooks closed with 2 deliveries not confirmed, dropped: "
            f"credential.needs_reauth for 'first' to {url}, "
            f"credential.deleted for 'second' to {url}"
        ) == record.getMessage()

    async def test_full_queue_drops_new_deliveries_with_a_warning(
        self, secret: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Beyond max_pending deliveries waiting for a URL, a new one is logged and dropped."""
        with Receiver(Answer(held=True)) as slow:
            webhooks = hooks(slow.hook_url, secret=secret, concurrency=1, max_pending=1)
            async with webhooks:
                webhooks(needs_reauth("sending"))
                await wait_for_requests(slow, 1)
                webhooks(needs_reauth("waiting"))
                webhooks(needs_reauth("overflow"))
                (record,) = webhook_records(caplog)
                slow.release()

        assert "for key 'overflow'" in record.getMessage()
        assert record.getMessage().endswith("its queue is full (max_pending 1)")

    async def test_no_log_line_holds_the_secret(
        self, secret: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Failures, retries and drops are logged without the secret or its key bytes."""
        caplog.set_level(logging.DEBUG, logger="credkeeper.webhooks")
        with Receiver(Answer(500)) as failing:
            async with hooks(failing.hook_url, secret=secret, attempts=2) as webhooks:
                webhooks(needs_reauth())
        logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)

        assert (False, False) == (secret in logged, secret[6:] in logged)

    async def test_jitter_comes_from_the_given_rng(self, secret: str) -> None:
        """Two webhooks with equally seeded rngs wait the same times between attempts."""
        waits = []
        for _ in range(2):
            clock = FakeClock()
            with Receiver(Answer(500)) as failing:
                webhooks = hooks(
                    failing.hook_url, secret=secret, clock=clock, rng=random.Random(7), attempts=4
                )
                async with webhooks:
                    webhooks(needs_reauth())
            waits.append(clock.sleeps)

        assert waits[0] == waits[1]
        assert 3 == len(waits[0])


# -- with a manager ----------------------------------------------------------------------


@dataclass
class Transitions:
    """What a receiver got while a manager took a credential through its three transitions."""

    received: list[Received]
    tokens: set[str]


@pytest.fixture
async def transitions(
    fake: FakeProvider, tmp_path: Path, secret: str
) -> AsyncIterator[Transitions]:
    """A credential marked needs_reauth, logged in again and deleted, by a real manager."""
    with Receiver() as receiver:
        webhooks = hooks(receiver.hook_url, secret=secret, concurrency=1)
        async with (
            webhooks,
            AsyncTokenManager(
                MemoryStore(), fake.provider(), journal=tmp_path / "j", events=webhooks
            ) as manager,
        ):
            credentials = fake.issue(expires_in=0)
            await manager.put(KEY, credentials)
            fake.revoke(credentials)
            with pytest.raises(ReauthRequired):
                await manager.get(KEY)
            await manager.put(KEY, fake.issue())
            await manager.delete(KEY)
        yield Transitions(receiver.received, fake.all_tokens())


@pytest.mark.anyio
class TestWithManager:
    async def test_each_transition_is_one_webhook(
        self, transitions: Transitions, secret: str
    ) -> None:
        """needs_reauth, the new login and the delete each reach the receiver once, in order."""
        types = [verify_webhook(secret, r.headers, r.body)["type"] for r in transitions.received]

        assert ["credential.needs_reauth", "credential.recovered", "credential.deleted"] == types

    async def test_no_token_in_any_request(self, transitions: Transitions) -> None:
        """No access or refresh token the provider issued appears in a webhook's body or headers."""
        sent = [r.body.decode() + str(r.headers.raw) for r in transitions.received]

        assert [] == [token for token in transitions.tokens for text in sent if token in text]
