"""No error carries a token: not in its text, not in the locals of any frame of its traceback.

Every provider and wrapper error path is triggered through the public API over loopback HTTP,
then formatted the way Sentry or rich's ``show_locals`` would see it: with the ``repr`` of every
local of every frame. None of the tokens of the exchange, sent or received, may appear there
in plain, JSON-escaped or URL-encoded form.
"""

from __future__ import annotations

import json
import secrets
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, quote_plus

import pytest

from credkeeper import (
    AsyncWrapperClient,
    AuthFailed,
    Credentials,
    InvalidRequest,
    MemoryStore,
    Provider,
    ProviderError,
    ProviderUnavailable,
    ReauthRequired,
    TokenManager,
    UsageLimitReached,
    WrapperClient,
    WrapperCLIError,
    WrapperError,
    WrapperUnavailable,
)
from credkeeper._provider import AuthMethod
from credkeeper.testing import FakeClock, FakeProvider, FakeWrapper, Fault, WrapperFault
from tests.echoes import echo, unprocessable

from .conftest import KEY

HELLO = [{"role": "user", "content": "hello"}]
CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
CLIENT_SECRET = "client/SECRET+" + secrets.token_hex(8) + "=é"


def mint(kind: Literal["access", "refresh"]) -> str:
    """An opaque token, without the sk-ant- shape the patterns would catch, whose URL encoding
    differs from its plain form."""
    return f"1//{kind}.{secrets.token_hex(12)}+{secrets.token_hex(6)}/{secrets.token_hex(6)}="


def mint_accented(kind: Literal["access", "refresh"]) -> str:
    """An opaque token whose JSON escape differs from its plain form too."""
    return mint(kind) + "é"


def forms(tokens: Iterable[str]) -> set[str]:
    """Each token plain, JSON-escaped and URL-encoded."""
    found: set[str] = set()
    for token in tokens:
        found |= {token, json.dumps(token)[1:-1], quote(token, safe=""), quote_plus(token)}
    return found


def formatted(exc: BaseException) -> str:
    """The traceback with every frame's locals, as tools that capture them show it."""
    return "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())


def leaks(exc: BaseException, tokens: Iterable[str]) -> tuple[list[str], list[str]]:
    """The token forms found in ``str(exc)``, and those found in its formatted traceback."""
    every = forms(tokens)
    message, shown = str(exc), formatted(exc)
    return sorted(f for f in every if f in message), sorted(f for f in every if f in shown)


def raised(call: Callable[[], object]) -> BaseException:
    """The exception ``call`` raises, caught one frame down: the test's own locals stay out."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the exception is the subject
        return exc
    raise AssertionError("no exception was raised")


async def araised(call: Callable[[], Awaitable[object]]) -> BaseException:
    """The exception the awaitable ``call`` makes raises, caught one frame down."""
    try:
        await call()
    except Exception as exc:  # noqa: BLE001 - the exception is the subject
        return exc
    raise AssertionError("no exception was raised")


@pytest.fixture
def fake(clock: FakeClock) -> Iterator[FakeProvider]:
    """A provider minting opaque tokens, on the test's clock."""
    with FakeProvider(clock=clock, mint=mint) as provider:
        yield provider


@pytest.fixture
def due(manager: TokenManager, fake: FakeProvider) -> Credentials:
    """Stored credentials already expired, so the next get() must refresh."""
    credentials = fake.issue(expires_in=-60)
    manager.put(KEY, credentials)
    return credentials


# -- the provider ------------------------------------------------------------------------

UNREADABLE = {
    "nested": lambda answer: {"data": answer},
    "camel-case": lambda answer: {
        "accessToken": answer["access_token"],
        "refreshToken": answer["refresh_token"],
        "expiresIn": answer["expires_in"],
    },
    "lists": lambda answer: {
        **answer,
        "access_token": [answer["access_token"]],
        "refresh_token": [answer["refresh_token"]],
    },
    "unknown-names": lambda answer: {"result": [answer["access_token"], answer["refresh_token"]]},
    "access-unusable": lambda answer: {**answer, "access_token": 42},
    "access-lone-surrogate": lambda answer: {
        **answer,
        "access_token": answer["access_token"] + "\ud800",
    },
    "refresh-lone-surrogate": lambda answer: {
        **answer,
        "refresh_token": answer["refresh_token"] + "\ud800",
    },
    "not-json": lambda answer: f"<html>{answer['access_token']} {answer['refresh_token']}</html>",
}


class TestProviderErrors:
    @pytest.fixture
    def fake(self, clock: FakeClock) -> Iterator[FakeProvider]:
        """A provider minting tokens that every encoding changes."""
        with FakeProvider(clock=clock, mint=mint_accented) as provider:
            yield provider

    def test_invalid_grant(
        self, manager: TokenManager, fake: FakeProvider, due: Credentials
    ) -> None:
        """invalid_grant echoing the tokens: ReauthRequired carries none of them."""
        body = {"error": "invalid_grant", "error_description": echo(due)}
        fake.fail_next(Fault.status(400, body=json.dumps(body)))

        exc = raised(lambda: manager.get(KEY))

        assert (ReauthRequired, [], []) == (type(exc), *leaks(exc, fake.all_tokens()))

    def test_other_client_error(
        self, manager: TokenManager, fake: FakeProvider, due: Credentials
    ) -> None:
        """A 403 echoing the tokens: the ProviderError carries none of them."""
        fake.fail_next(Fault.status(403, body=echo(due)))

        exc = raised(lambda: manager.get(KEY))

        assert (ProviderError, [], []) == (type(exc), *leaks(exc, fake.all_tokens()))

    @pytest.mark.parametrize("status", [429, 503])
    def test_unavailable(
        self, manager: TokenManager, fake: FakeProvider, due: Credentials, status: int
    ) -> None:
        """429 and 5xx echoing the tokens, until the deadline: no token in the final error."""
        fake.fail_next(*[Fault.status(status, body=echo(due))] * 50)

        exc = raised(lambda: manager.get(KEY))

        assert (ProviderUnavailable, [], []) == (type(exc), *leaks(exc, fake.all_tokens()))

    @pytest.mark.parametrize("shape", UNREADABLE.values(), ids=UNREADABLE.keys())
    def test_unreadable_success(
        self,
        manager: TokenManager,
        fake: FakeProvider,
        due: Credentials,
        shape: Callable[[dict[str, Any]], object],
    ) -> None:
        """A 200 the parser cannot read carries new tokens: the error shows none of them."""
        fake.fail_next(Fault.reshape(shape))

        exc = raised(lambda: manager.get(KEY))

        assert (True, [], []) == (
            isinstance(exc, ProviderError),
            *leaks(exc, fake.all_tokens()),
        )

    @pytest.mark.parametrize("fault", [Fault.drop(), Fault.timeout(5.0)], ids=["drop", "timeout"])
    def test_transport_error(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path, fault: Fault
    ) -> None:
        """A connection dropped or timed out: the chained httpx error holds no token either."""
        with TokenManager(
            MemoryStore(),
            fake.provider(timeout=0.2),
            journal=tmp_path / "journal",
            clock=clock,
            refresh_timeout=2.0,
        ) as manager:
            manager.put(KEY, fake.issue(expires_in=-60))
            fake.fail_next(*[fault] * 20)

            exc = raised(lambda: manager.get(KEY))
            fake.clear_faults()

        assert (ProviderUnavailable, [], []) == (type(exc), *leaks(exc, fake.all_tokens()))

    @pytest.mark.parametrize("method", ["client_secret_post", "client_secret_basic"])
    def test_client_secret(self, clock: FakeClock, tmp_path: Path, method: AuthMethod) -> None:
        """A 500 echoing the client secret and the tokens: the error shows none of them."""
        with (
            FakeProvider(clock=clock, mint=mint_accented, client_secret=CLIENT_SECRET) as fake,
            TokenManager(
                MemoryStore(),
                Provider(
                    token_url=fake.token_url,
                    client_id=CLIENT_ID,
                    client_secret=CLIENT_SECRET,
                    auth_method=method,
                ),
                journal=tmp_path / "journal",
                clock=clock,
            ) as manager,
        ):
            credentials = fake.issue(expires_in=-60)
            manager.put(KEY, credentials)
            body = f"{echo(credentials)} secret={quote(CLIENT_SECRET, safe='')} {CLIENT_SECRET}"
            fake.fail_next(*[Fault.status(500, body=body)] * 50)

            exc = raised(lambda: manager.get(KEY))

        assert (ProviderUnavailable, [], []) == (
            type(exc),
            *leaks(exc, {*fake.all_tokens(), CLIENT_SECRET}),
        )


# -- the wrapper -------------------------------------------------------------------------


def faults(credentials: Credentials) -> dict[str, tuple[list[WrapperFault], type[Exception]]]:
    """Each wrapper error path: the faults that trigger it and the error it raises."""
    told = echo(credentials)
    return {
        "422": ([unprocessable(credentials)], InvalidRequest),
        # The retry after the refresh sends other tokens; its answer quotes nothing of the first.
        "auth-error-200": (
            [
                WrapperFault.cli_error(f"Invalid API key · Please run /login {told}"),
                WrapperFault.cli_error(FakeWrapper.INVALID_API_KEY),
            ],
            AuthFailed,
        ),
        "401": (
            [
                WrapperFault.status(401, detail=f"Invalid OAuth token {told}"),
                WrapperFault.status(401),
            ],
            AuthFailed,
        ),
        "500": ([WrapperFault.status(500, detail=f"Server error: {told}")], WrapperUnavailable),
        "cli-error": ([WrapperFault.cli_error(f"Command failed: {told}")], WrapperCLIError),
        "usage-limit": (
            [WrapperFault.cli_error(f"{FakeWrapper.OPUS_WEEKLY_LIMIT} {told}")],
            UsageLimitReached,
        ),
        "not-json": ([WrapperFault.status(200, body=f"<html>{told}</html>")], WrapperError),
        "timeout-echo": ([WrapperFault.cli_timeout()], WrapperUnavailable),
    }


PATHS = [
    "422",
    "auth-error-200",
    "401",
    "500",
    "cli-error",
    "usage-limit",
    "not-json",
    "timeout-echo",
]


class TestWrapperErrors:
    @pytest.mark.parametrize("path", PATHS)
    def test_create(
        self,
        client: WrapperClient,
        alice: Credentials,
        fake: FakeProvider,
        wrapper: FakeWrapper,
        path: str,
    ) -> None:
        """Each error of messages.create carries no token, in its text or its frames."""
        queued, expected = faults(alice)[path]
        wrapper.fail_next(*queued)

        exc = raised(lambda: client.messages.create(KEY, HELLO))

        assert (expected, [], []) == (type(exc), *leaks(exc, fake.all_tokens()))

    @pytest.mark.parametrize("path", PATHS)
    @pytest.mark.parametrize("keepalive", [False, True], ids=["ndjson", "sse"])
    def test_stream(
        self,
        client: WrapperClient,
        alice: Credentials,
        fake: FakeProvider,
        wrapper: FakeWrapper,
        path: str,
        keepalive: bool,
    ) -> None:
        """Each error opening a stream carries no token, in its text or its frames."""
        queued, _ = faults(alice)[path]
        wrapper.fail_next(*queued)

        exc = raised(lambda: list(client.messages.stream(KEY, HELLO, keepalive=keepalive)))

        assert (True, [], []) == (isinstance(exc, WrapperError), *leaks(exc, fake.all_tokens()))

    @pytest.mark.parametrize("keepalive", [False, True], ids=["ndjson", "sse"])
    def test_stream_error(
        self,
        client: WrapperClient,
        alice: Credentials,
        fake: FakeProvider,
        wrapper: FakeWrapper,
        keepalive: bool,
    ) -> None:
        """An in-band error after the first deltas carries no token, in its text or its frames."""
        wrapper.fail_next(WrapperFault.stream_error(f"API Error: Connection error. {echo(alice)}"))

        exc = raised(lambda: list(client.messages.stream(KEY, HELLO, keepalive=keepalive)))

        assert (WrapperError, [], []) == (type(exc), *leaks(exc, fake.all_tokens()))

    def test_transport_timeout(
        self, client: WrapperClient, alice: Credentials, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """A call that times out: the chained httpx error holds no token of the request body."""
        wrapper.fail_next(WrapperFault.delay(1.0))

        exc = raised(lambda: client.messages.create(KEY, HELLO, timeout=0.2))

        assert (WrapperUnavailable, [], []) == (type(exc), *leaks(exc, fake.all_tokens()))

    def test_stream_transport_timeout(
        self, client: WrapperClient, alice: Credentials, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """A stream that times out: the chained httpx error holds no token of the request body."""
        wrapper.fail_next(WrapperFault.delay(1.0))

        exc = raised(lambda: list(client.messages.stream(KEY, HELLO, timeout=0.2)))

        assert (WrapperUnavailable, [], []) == (type(exc), *leaks(exc, fake.all_tokens()))


class TestAsyncWrapperErrors:
    @pytest.mark.anyio
    @pytest.mark.parametrize("path", PATHS)
    async def test_create(
        self, aclient: AsyncWrapperClient, fake: FakeProvider, wrapper: FakeWrapper, path: str
    ) -> None:
        """Each error of the async messages.create carries no token, in text or frames."""
        queued, expected = faults(await aclient.tokens.get(KEY))[path]
        wrapper.fail_next(*queued)

        exc = await araised(lambda: aclient.messages.create(KEY, HELLO))

        assert (expected, [], []) == (type(exc), *leaks(exc, fake.all_tokens()))

    @pytest.mark.anyio
    @pytest.mark.parametrize("path", PATHS)
    @pytest.mark.parametrize("keepalive", [False, True], ids=["ndjson", "sse"])
    async def test_stream(
        self,
        aclient: AsyncWrapperClient,
        fake: FakeProvider,
        wrapper: FakeWrapper,
        path: str,
        keepalive: bool,
    ) -> None:
        """Each error opening an async stream carries no token, in text or frames."""
        queued, _ = faults(await aclient.tokens.get(KEY))[path]
        wrapper.fail_next(*queued)

        async def drain() -> None:
            async for _ in aclient.messages.stream(KEY, HELLO, keepalive=keepalive):
                pass

        exc = await araised(drain)

        assert (True, [], []) == (isinstance(exc, WrapperError), *leaks(exc, fake.all_tokens()))

    @pytest.mark.anyio
    @pytest.mark.parametrize("keepalive", [False, True], ids=["ndjson", "sse"])
    async def test_stream_error(
        self, aclient: AsyncWrapperClient, fake: FakeProvider, wrapper: FakeWrapper, keepalive: bool
    ) -> None:
        """An in-band error in an async stream carries no token, in text or frames."""
        told = echo(await aclient.tokens.get(KEY))
        wrapper.fail_next(WrapperFault.stream_error(f"API Error: Connection error. {told}"))

        async def drain() -> None:
            async for _ in aclient.messages.stream(KEY, HELLO, keepalive=keepalive):
                pass

        exc = await araised(drain)

        assert (WrapperError, [], []) == (type(exc), *leaks(exc, fake.all_tokens()))

    @pytest.mark.anyio
    async def test_transport_timeout(
        self, aclient: AsyncWrapperClient, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """An async call that times out: the chained httpx error holds no token."""
        wrapper.fail_next(WrapperFault.delay(1.0))

        exc = await araised(lambda: aclient.messages.create(KEY, HELLO, timeout=0.2))

        assert (WrapperUnavailable, [], []) == (type(exc), *leaks(exc, fake.all_tokens()))
