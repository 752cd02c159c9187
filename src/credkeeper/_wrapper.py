"""``WrapperClient`` and ``AsyncWrapperClient``: Claude Wrapper API calls with fresh credentials.

Every call takes the user's credentials from a token manager (refreshed beforehand when they are
within its leeway), sends them in ``oauth_credentials``, and reads the answer the way the real
wrapper gives it (``wrapper-and-provider.md`` section 1): an expired or revoked token comes back
as HTTP 200 with a ``cli_error`` text, so errors are classified by text. After an auth failure
the manager refreshes only if the store still holds the refused token, and the call is retried
once. The decision lives in :func:`call_flow`; the two clients only perform its effects.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from functools import cached_property
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, Unpack

import httpx

from ._closing import AsyncClosing, Closing
from ._credentials import Credentials
from ._exceptions import (
    AuthFailed,
    ConfigurationError,
    InvalidRequest,
    UsageLimitReached,
    WrapperCLIError,
    WrapperError,
    WrapperUnavailable,
)
from ._manager import AsyncTokenManager, TokenManager, concrete_signature
from ._messages import (
    DONE,
    MAPPING,
    End,
    Event,
    Health,
    Message,
    RequestOptions,
    ResultEvent,
    StreamEvent,
    build_body,
    parse_event,
    read_line,
    violations_from_422,
)
from ._record import check_key
from ._redact import Redactor, harvest
from ._secret import Secret
from ._urls import secure_url, shown_url

__all__ = [
    "DEFAULT_WRAPPER_URL",
    "AsyncMessageStream",
    "AsyncMessages",
    "AsyncWrapperClient",
    "MessageStream",
    "Messages",
    "WrapperClient",
]

T = TypeVar("T")
M = TypeVar("M", TokenManager, AsyncTokenManager)
X = TypeVar("X", httpx.Client, httpx.AsyncClient)
L = TypeVar("L", Iterator[str], AsyncIterator[str])

DEFAULT_WRAPPER_URL = "https://wrapper.claude.serenity-system.fr"
#: The variable naming the wrapper when a client is given no ``base_url``, as for the command line.
WRAPPER_URL_VARIABLE = "CREDKEEPER_WRAPPER_URL"
# The wrapper runs the CLI for up to 180 s on a platform that cuts requests at 300 s.
DEFAULT_TIMEOUT = httpx.Timeout(310.0, connect=10.0)

_logger = logging.getLogger("credkeeper.wrapper")
# The most lines read after a stream's result before its connection is closed instead.
_DRAIN_LINES = 16

# Upstream quota texts are checked first: they must never cost a refresh.
_LIMIT = re.compile(
    r"limit reached|hit your (?:\w+ )?limit|usage limit|rate[_ ]limit|quota|api error: 429",
    re.IGNORECASE,
)
_AUTH = re.compile(
    r"please run /login|not logged in|invalid api key|authentication_error|oauth token"
    r"|failed to authenticate|invalid bearer token|\b401\b"
    # The CLI's text for a revoked token in non-interactive mode, which the wrapper uses.
    r"|does not have access to claude|please login again",
    re.IGNORECASE,
)


# -- the flow ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fetch:
    """Effect: the manager's credentials for ``key`` (refreshed first if due)."""

    key: str


@dataclass(frozen=True, slots=True)
class Renew:
    """Effect: refresh ``key`` unless the store already holds a token other than ``failed``."""

    key: str
    failed: Secret


@dataclass(frozen=True, slots=True)
class Attempt:
    """Effect: send the request with ``credentials``; a result or :class:`Refused`."""

    credentials: Credentials


@dataclass(frozen=True, slots=True)
class Refused:
    """The wrapper refused the credentials (HTTP 401 or an auth ``cli_error``)."""

    excerpt: str


CallEffect = Fetch | Renew | Attempt
CallFlow = Generator[CallEffect, Any, T]


def call_flow(key: str) -> CallFlow[Any]:
    """Fresh credentials, one attempt, and after an auth failure one refresh and one retry."""
    credentials: Credentials = yield Fetch(key)
    outcome = yield Attempt(credentials)
    if not isinstance(outcome, Refused):
        return outcome
    _logger.info("the wrapper refused the credentials for key %r; refreshing and retrying", key)
    credentials = yield Renew(key, credentials.access_token)
    outcome = yield Attempt(credentials)
    if isinstance(outcome, Refused):
        raise AuthFailed(
            f"the wrapper refused the credentials under key {key!r} again after a refresh: "
            f"{outcome.excerpt}",
            key=key,
            excerpt=outcome.excerpt,
        )
    return outcome


# -- reading answers (pure) --------------------------------------------------------------
#
# Each reader returns the error it finds instead of raising it: its frame holds the wrapper's
# answer, which may quote a token, and must not be on the error's traceback, where tools that
# capture locals would find it. The few frames that raise hold the response object, the
# redactor and the error, never the text.


def _redactor(credentials: Credentials) -> Redactor:
    return Redactor((credentials.access_token, credentials.refresh_token))


def _is_error(document: object) -> bool:
    return (
        isinstance(document, MAPPING)
        and document.get("type") == "error"
        and isinstance(document.get("error"), MAPPING)
    )


def error_outcome(
    error: Mapping[str, Any], *, key: str, status: int | None, redactor: Redactor
) -> Refused | WrapperError:
    """:class:`Refused` for an auth failure, else the matching :class:`WrapperError`."""
    message = error.get("message")
    text = message if isinstance(message, str) else json.dumps(message)
    code = error.get("code") if isinstance(error.get("code"), str) else None
    quoted = redactor.including(harvest(error)).excerpt(text)
    if _LIMIT.search(text):
        return UsageLimitReached(
            f"the account under key {key!r} reached a usage limit: {quoted}",
            status=status,
            code=code,
            key=key,
            excerpt=quoted,
        )
    if _AUTH.search(text):
        return Refused(quoted)
    kind = WrapperCLIError if code == "cli_error" else WrapperError
    return kind(
        f"the wrapper failed for key {key!r} ({code or 'no code'}): {quoted}",
        status=status,
        code=code,
        key=key,
        excerpt=quoted,
    )


def interpret(
    response: httpx.Response, *, key: str, model: str, redactor: Redactor
) -> Message | Refused:
    """The outcome of one non-streaming answer; raises for every error but an auth failure."""
    outcome = read_answer(
        response.status_code, response.content, key=key, model=model, redactor=redactor
    )
    if isinstance(outcome, WrapperError):
        raise outcome
    return outcome


def read_answer(
    status: int, content: bytes, *, key: str, model: str, redactor: Redactor
) -> Message | Refused | WrapperError:
    """The outcome of one non-streaming answer, errors included."""
    text = content.decode("utf-8", "replace")
    try:
        document: Any = json.loads(text)
    except (ValueError, RecursionError):
        document = None
        if status == 200:
            quoted = redactor.excerpt(text)
            return WrapperError(
                f"the wrapper's answer for key {key!r} is not JSON: {quoted}",
                status=status,
                key=key,
                excerpt=quoted,
            )
    if status != 200:
        # An error body may quote what was sent under names of its own, as FastAPI's "input".
        redactor = redactor.including(harvest(document))
    if status == 401:
        return Refused(redactor.excerpt(text))
    if status == 422:
        return InvalidRequest(violations_from_422(document, redactor), status=status, key=key)
    if status != 200:
        quoted = redactor.excerpt(text)
        kind = WrapperUnavailable if status >= 500 or status == 429 else WrapperError
        return kind(
            f"the wrapper answered HTTP {status} for key {key!r}: {quoted}",
            status=status,
            key=key,
            excerpt=quoted,
        )
    if _is_error(document):
        return error_outcome(document["error"], key=key, status=status, redactor=redactor)
    try:
        return Message.parse(document, model=model)
    except WrapperError as exc:
        return exc.with_traceback(None)


def _failed_result(event: ResultEvent) -> Mapping[str, Any]:
    return {"message": event.result, "code": event.subtype}


def head_step(
    head: list[Event], document: Mapping[str, Any], *, key: str, redactor: Redactor
) -> Refused | WrapperError | bool:
    """Take one streamed object before anything reaches the caller.

    The head runs up to the first ``stream_event`` or the ``result``: the CLI reports a failed
    call in band as ``system/init``, a synthetic ``assistant`` message and an ``is_error``
    result, and while the caller has seen nothing an auth failure can still be retried.
    Returns ``True`` once the head is complete and good, ``False`` to read on, or the
    :class:`Refused` or :class:`WrapperError` that ends it.
    """
    if _is_error(document):
        return error_outcome(document["error"], key=key, status=200, redactor=redactor)
    event = _event(document)
    if isinstance(event, WrapperError):
        return event
    if isinstance(event, ResultEvent) and event.is_error:
        return error_outcome(_failed_result(event), key=key, status=200, redactor=redactor)
    head.append(event)
    return isinstance(event, StreamEvent | ResultEvent)


def body_event(
    document: Mapping[str, Any], *, key: str, redactor: Redactor
) -> Event | WrapperError:
    """One streamed object after the head; an in-band error or a failed result is an error."""
    if _is_error(document):
        error: Mapping[str, Any] = document["error"]
    else:
        event = _event(document)
        if not (isinstance(event, ResultEvent) and event.is_error):
            return event
        error = _failed_result(event)
    outcome = error_outcome(error, key=key, status=200, redactor=redactor)
    if isinstance(outcome, WrapperError):
        return outcome
    return AuthFailed(
        f"the wrapper refused the credentials under key {key!r} mid-stream: {outcome.excerpt}",
        status=200,
        key=key,
        excerpt=outcome.excerpt,
    )


def _event(document: Mapping[str, Any]) -> Event | WrapperError:
    try:
        return parse_event(document)
    except WrapperError as exc:
        return exc.with_traceback(None)


def _stream_truncated(key: str) -> WrapperError:
    return WrapperError(f"the wrapper's stream for key {key!r} ended before its result", key=key)


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """One of the wrapper's URLs, parsed once per client, and the form messages show it in.

    httpx parses a URL given as a string again for every request, one of the larger costs of
    a call; an ``httpx.URL`` it takes as it is.
    """

    url: httpx.URL
    shown: str

    @classmethod
    def of(cls, base_url: str, path: str, *, option: str = "base_url") -> _Endpoint:
        shown = shown_url(base_url + path)
        try:
            url = httpx.URL(base_url + path)
        except httpx.InvalidURL as exc:
            raise ConfigurationError(f"{option} is not a valid URL ({exc}): {shown!r}") from None
        return cls(url, shown)


class _TransportErrors:
    """httpx's connection and timeout errors as :class:`WrapperUnavailable`, mapped in one place.

    A class rather than a generator-based context manager: it is entered on every call, and
    this is the cheaper of the two.
    """

    __slots__ = ("_endpoint", "_key")

    def __init__(self, key: str | None, endpoint: _Endpoint) -> None:
        self._key = key
        self._endpoint = endpoint

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not isinstance(exc, httpx.TransportError):
            return
        shown = self._endpoint.shown
        about = f" for key {self._key!r}" if self._key is not None else ""
        if isinstance(exc, httpx.TimeoutException):
            raise WrapperUnavailable(
                f"the wrapper at {shown} did not answer in time{about}; "
                "raise the timeout or retry later",
                key=self._key,
            ) from exc
        raise WrapperUnavailable(
            f"could not reach the wrapper at {shown}{about}: {type(exc).__name__}",
            key=self._key,
        ) from exc


def _payload(body: Mapping[str, Any], credentials: Credentials) -> dict[str, Any]:
    return {"oauth_credentials": credentials.to_wrapper(), **body}


def _timeout(value: object) -> float | httpx.Timeout:
    if isinstance(value, httpx.Timeout):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(
            f"timeout must be a positive number of seconds or an httpx.Timeout, got {value!r}"
        )
    return float(value)


def _base_url(value: str | None) -> tuple[str, str]:
    """``value``, else ``CREDKEEPER_WRAPPER_URL`` as the command line reads it, else the
    public wrapper; checked and without a trailing slash, and how errors name it."""
    option = "base_url"
    if value is None:
        value = os.environ.get(WRAPPER_URL_VARIABLE) or DEFAULT_WRAPPER_URL
        option = f"environment variable {WRAPPER_URL_VARIABLE}"
    # The tokens travel in every request body: the same rule as the provider's token_url.
    secure_url(value, option=option, hint=f"; the public wrapper is {DEFAULT_WRAPPER_URL}")
    return value.rstrip("/"), option


def _request(
    http: httpx.Client | httpx.AsyncClient, call: _Call, credentials: Credentials
) -> httpx.Request:
    """The request for ``call`` with ``credentials``.

    Built apart from sending: httpx's ``post(json=...)`` would keep the body, tokens included,
    as a local of every frame a timeout's traceback passes through.
    """
    return http.build_request(
        "POST",
        call.endpoint.url,
        json=_payload(call.body, credentials),
        extensions=call.extensions,
    )


def _extensions(timeout: float | httpx.Timeout) -> dict[str, Any]:
    """The request extensions httpx's ``build_request`` makes of ``timeout=``.

    Made once per client for its default timeout rather than again for every request.
    """
    return {"timeout": httpx.Timeout(timeout).as_dict()}


@dataclass(slots=True)
class _Call:
    key: str
    endpoint: _Endpoint
    # Out of the repr: an MCP server's auth_token may be in it.
    body: dict[str, Any] = field(repr=False)
    model: str
    extensions: dict[str, Any]
    #: Whether the answer is read past its result: the /v1/messages stream is sent in one piece
    #: and ends there; keepalive's may never end (its CLI is left running).
    drained: bool = True


class _Endpoints:
    """What both clients share: the URLs, the timeout, and request preparation."""

    def __init__(self, base_url: str | None, timeout: float | httpx.Timeout | None) -> None:
        self.base_url, option = _base_url(base_url)
        # Always set, so that an httpx client passed in does not shorten calls to its own
        # default (5 s for httpx), far below what the wrapper's CLI may take.
        self.timeout = DEFAULT_TIMEOUT if timeout is None else _timeout(timeout)
        self.extensions = _extensions(self.timeout)
        self.messages = _Endpoint.of(self.base_url, "/v1/messages", option=option)
        self.keepalive = _Endpoint.of(self.base_url, "/v1/messages/keepalive", option=option)
        self.health = _Endpoint.of(self.base_url, "/health", option=option)

    def call(
        self,
        key: str,
        messages: Sequence[Mapping[str, Any]],
        options: RequestOptions,
        *,
        stream: bool,
        keepalive: bool = False,
    ) -> _Call:
        check_key(key)
        body = build_body(messages, options)
        if stream:
            body["stream"] = True
        endpoint = self.keepalive if keepalive else self.messages
        timeout = options.get("timeout")
        extensions = self.extensions if timeout is None else _extensions(_timeout(timeout))
        return _Call(key, endpoint, body, body["model"], extensions, drained=not keepalive)


class _Client(Generic[M, X]):
    """What both clients share: construction from a token manager, the URLs and the repr."""

    # The manager and httpx client types this client takes, and what to use for the others.
    _kinds: tuple[type[M], type[X], str, str]

    def __init__(
        self,
        tokens: M,
        *,
        base_url: str | None = None,
        http: X | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> None:
        manager, client, other_manager, other_client = self._kinds
        if not isinstance(tokens, manager):
            raise ConfigurationError(
                f"tokens must be a credkeeper.{manager.__name__}; {other_manager}"
            )
        if http is not None and not isinstance(http, client):
            raise ConfigurationError(f"http must be an httpx.{client.__name__} ({other_client})")
        self.tokens: M = tokens
        self._endpoints = _Endpoints(base_url, timeout)
        self._own_http = http is None
        self._http: X = http if http is not None else client(timeout=DEFAULT_TIMEOUT)

    @property
    def base_url(self) -> str:
        """The wrapper's base URL, without a trailing slash."""
        return self._endpoints.base_url

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"


# -- sync --------------------------------------------------------------------------------


@dataclass(slots=True, repr=False)
class _Opened(Generic[L]):
    """A stream past its head: the events read so far and the rest of its lines."""

    response: httpx.Response
    head: list[Event]
    redactor: Redactor
    lines: L


class _StreamBase:
    """What both stream types share: the call, the final result, and reading after the head."""

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._key = call.key
        self.result: ResultEvent | None = None

    def _after(
        self, line: str, redactor: Redactor
    ) -> Event | WrapperError | Literal[End.DONE] | None:
        """The event or error on ``line``, ``None`` to skip it, or :data:`DONE` at the end."""
        document = read_line(line)
        if document is None or document is DONE or isinstance(document, WrapperError):
            return document
        event = body_event(document, key=self._key, redactor=redactor)
        if isinstance(event, ResultEvent):
            self.result = event
        return event

    def _items(self, lines: Iterator[str], redactor: Redactor) -> Iterator[Event | WrapperError]:
        """The events and errors of ``lines`` up to the end; an error for the caller to raise.

        A generator apart from the one that raises, so that the line it holds is not a local
        of any frame on the error's traceback.
        """
        for line in lines:
            item = self._after(line, redactor)
            if item is DONE:
                return
            if item is not None:
                yield item

    async def _aitems(
        self, lines: AsyncIterator[str], redactor: Redactor
    ) -> AsyncIterator[Event | WrapperError]:
        """The async twin of :meth:`_items`."""
        async for line in lines:
            item = self._after(line, redactor)
            if item is DONE:
                return
            if item is not None:
                yield item


class MessageStream(Closing, _StreamBase):
    """The events of one streamed reply, in order; the final :class:`ResultEvent` ends it.

    Iterate it once, or use :meth:`text_deltas` for the text alone. The request goes out on the
    first iteration; an auth failure that opens the stream is refreshed and retried before
    anything is yielded. :attr:`result` holds the final event once it has arrived. Use it in a
    ``with`` block (or call :meth:`close`) to release the connection when stopping early.
    """

    def __init__(self, open_stream: Callable[[], _Opened[Iterator[str]]], call: _Call) -> None:
        super().__init__(call)
        self._open = open_stream
        self._events: Generator[Event, None, None] | None = None
        self._closed = False

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self._closed:
            raise StopIteration
        if self._events is None:
            self._events = self._generate()
        return next(self._events)

    def close(self) -> None:
        """Stop reading and release the connection; idempotent."""
        self._closed = True
        if self._events is not None:
            self._events.close()

    def text_deltas(self) -> Iterator[str]:
        """The reply's text as it streams: each ``text_delta``, in order."""
        for event in self:
            if isinstance(event, StreamEvent) and event.text:
                yield event.text

    def _generate(self) -> Generator[Event, None, None]:
        opened = self._open()
        response = opened.response
        try:
            for event in opened.head:
                if isinstance(event, ResultEvent):
                    self.result = event
                yield event
                if self.result is not None:
                    return
            with _TransportErrors(self._key, self._call.endpoint):
                for item in self._items(opened.lines, opened.redactor):
                    if isinstance(item, WrapperError):
                        raise item
                    yield item
                    if self.result is not None:
                        return
            raise _stream_truncated(self._key)
        finally:
            if self.result is not None and self._call.drained:
                _drain(opened.lines)
            response.close()


class Messages:
    """``client.messages``: :meth:`create` and :meth:`stream` on ``POST /v1/messages``."""

    def __init__(self, client: WrapperClient) -> None:
        self._client = client

    def create(
        self,
        key: str,
        messages: Sequence[Mapping[str, Any]],
        **options: Unpack[RequestOptions],
    ) -> Message:
        """Send ``messages`` (the full history: the wrapper keeps no session) as user ``key``.

        ``options`` are the keywords of :class:`RequestOptions` (``model="sonnet"``,
        ``thinking``, ``include_files``, ``mcp_servers``, ``timeout``, ...). Raises
        :class:`InvalidRequest` before sending when the wrapper would refuse the request.
        """
        call = self._client._endpoints.call(key, messages, options, stream=False)
        http = self._client._http

        def attempt(credentials: Credentials) -> Message | Refused:
            request = _request(http, call, credentials)
            with _TransportErrors(call.key, call.endpoint):
                response = http.send(request)
            return interpret(
                response, key=call.key, model=call.model, redactor=_redactor(credentials)
            )

        return self._client._run(call.key, attempt)  # type: ignore[no-any-return]

    def stream(
        self,
        key: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        keepalive: bool = False,
        **options: Unpack[RequestOptions],
    ) -> MessageStream:
        """Like :meth:`create`, but the reply's events as they are read.

        The wrapper sends ``/v1/messages`` streams as NDJSON in one go once the CLI is done;
        ``keepalive=True`` uses ``/v1/messages/keepalive`` instead (real SSE, with in-band
        ``file_created`` events under ``include_files``). Either way the :class:`ResultEvent`
        ends the stream.
        """
        call = self._client._endpoints.call(
            key, messages, options, stream=True, keepalive=keepalive
        )
        http = self._client._http

        def attempt(credentials: Credentials) -> _Opened[Iterator[str]] | Refused:
            redactor = _redactor(credentials)
            request = _request(http, call, credentials)
            with _TransportErrors(call.key, call.endpoint):
                response = http.send(request, stream=True)
            try:
                with _TransportErrors(call.key, call.endpoint):
                    if not _streams(response):
                        response.read()
                        return _unstreamed(call, response, redactor)
                    outcome = _read_head(response, response.iter_lines(), call.key, redactor)
            except BaseException:
                response.close()
                raise
            if not isinstance(outcome, _Opened):
                response.close()
            if isinstance(outcome, WrapperError):
                raise outcome
            return outcome

        return MessageStream(lambda: self._client._run(call.key, attempt), call)


class WrapperClient(Closing, _Client[TokenManager, httpx.Client]):
    """Calls the Claude Wrapper API for many users, with credentials from a :class:`TokenManager`.

    Each call gets credentials valid beyond the manager's leeway (15 minutes by default, well
    clear of the 5 minutes at which the wrapper's CLI would refresh by itself and lose the new
    refresh token). When the wrapper refuses them anyway (HTTP 401, or HTTP 200 with an auth
    ``cli_error``), the manager refreshes unless another worker already has, and the call is
    retried once; a second refusal raises :class:`AuthFailed`. ``base_url`` defaults to the
    ``CREDKEEPER_WRAPPER_URL`` variable when it is set (as for the command line), else the public
    wrapper. ``http`` is an httpx client to use (yours stays open on :meth:`close`); ``timeout``
    defaults to 310 s, beyond the wrapper's own 300 s limit.
    """

    __signature__ = concrete_signature(
        _Client.__init__, tokens="TokenManager", http="httpx.Client | None"
    )
    _kinds = (
        TokenManager,
        httpx.Client,
        "use AsyncWrapperClient with an AsyncTokenManager",
        "AsyncWrapperClient takes an httpx.AsyncClient",
    )

    @cached_property
    def messages(self) -> Messages:
        """:meth:`~Messages.create` and :meth:`~Messages.stream` on ``POST /v1/messages``."""
        return Messages(self)

    def close(self) -> None:
        """Close the HTTP client if this client made it; the token manager stays open."""
        if self._own_http:
            self._http.close()

    def health(self) -> Health:
        """``GET /health``: the wrapper's status and version (no credentials needed)."""
        health = self._endpoints.health
        with _TransportErrors(None, health):
            response = self._http.get(health.url, timeout=self._endpoints.timeout)
        return _health(response.status_code, response.content)

    def _run(self, key: str, attempt: Callable[[Credentials], Any]) -> Any:
        flow = call_flow(key)
        value: Any = None
        while True:
            try:
                effect = flow.send(value)
            except StopIteration as stop:
                return stop.value
            match effect:
                case Fetch(key):
                    value = self.tokens.get(key)
                case Renew(key, failed):
                    value = self.tokens.refresh(key, failed=failed)
                case Attempt(credentials):
                    value = attempt(credentials)


# -- async -------------------------------------------------------------------------------


class AsyncMessageStream(AsyncClosing, _StreamBase):
    """The async twin of :class:`MessageStream`: ``async for event in stream``."""

    def __init__(
        self,
        open_stream: Callable[[], Coroutine[Any, Any, _Opened[AsyncIterator[str]]]],
        call: _Call,
    ) -> None:
        super().__init__(call)
        self._open = open_stream
        self._events: AsyncGenerator[Event, None] | None = None
        self._closed = False

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        if self._events is None:
            self._events = self._generate()
        return await anext(self._events)

    async def aclose(self) -> None:
        """Stop reading and release the connection; idempotent."""
        self._closed = True
        if self._events is not None:
            await self._events.aclose()

    async def text_deltas(self) -> AsyncIterator[str]:
        """The reply's text as it streams: each ``text_delta``, in order."""
        async for event in self:
            if isinstance(event, StreamEvent) and event.text:
                yield event.text

    async def _generate(self) -> AsyncGenerator[Event, None]:
        opened = await self._open()
        response = opened.response
        try:
            for event in opened.head:
                if isinstance(event, ResultEvent):
                    self.result = event
                yield event
                if self.result is not None:
                    return
            with _TransportErrors(self._key, self._call.endpoint):
                async for item in self._aitems(opened.lines, opened.redactor):
                    if isinstance(item, WrapperError):
                        raise item
                    yield item
                    if self.result is not None:
                        return
            raise _stream_truncated(self._key)
        finally:
            if self.result is not None and self._call.drained:
                await _adrain(opened.lines)
            await response.aclose()


class AsyncMessages:
    """``client.messages`` of :class:`AsyncWrapperClient`; see :class:`Messages`."""

    def __init__(self, client: AsyncWrapperClient) -> None:
        self._client = client

    async def create(
        self,
        key: str,
        messages: Sequence[Mapping[str, Any]],
        **options: Unpack[RequestOptions],
    ) -> Message:
        """Send ``messages`` as user ``key``; see :meth:`Messages.create`."""
        call = self._client._endpoints.call(key, messages, options, stream=False)
        http = self._client._http

        async def attempt(credentials: Credentials) -> Message | Refused:
            request = _request(http, call, credentials)
            with _TransportErrors(call.key, call.endpoint):
                response = await http.send(request)
            return interpret(
                response, key=call.key, model=call.model, redactor=_redactor(credentials)
            )

        return await self._client._run(call.key, attempt)  # type: ignore[no-any-return]

    def stream(
        self,
        key: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        keepalive: bool = False,
        **options: Unpack[RequestOptions],
    ) -> AsyncMessageStream:
        """The reply's events as they are read; see :meth:`Messages.stream`.

        Not a coroutine: ``async with client.messages.stream(...) as stream`` or
        ``async for event in client.messages.stream(...)``.
        """
        call = self._client._endpoints.call(
            key, messages, options, stream=True, keepalive=keepalive
        )
        http = self._client._http

        async def attempt(credentials: Credentials) -> _Opened[AsyncIterator[str]] | Refused:
            redactor = _redactor(credentials)
            request = _request(http, call, credentials)
            with _TransportErrors(call.key, call.endpoint):
                response = await http.send(request, stream=True)
            try:
                with _TransportErrors(call.key, call.endpoint):
                    if not _streams(response):
                        await response.aread()
                        return _unstreamed(call, response, redactor)
                    outcome = await _aread_head(
                        response, response.aiter_lines(), call.key, redactor
                    )
            except BaseException:
                await response.aclose()
                raise
            if not isinstance(outcome, _Opened):
                await response.aclose()
            if isinstance(outcome, WrapperError):
                raise outcome
            return outcome

        return AsyncMessageStream(lambda: self._client._run(call.key, attempt), call)


class AsyncWrapperClient(AsyncClosing, _Client[AsyncTokenManager, httpx.AsyncClient]):
    """The asyncio twin of :class:`WrapperClient`, with an :class:`AsyncTokenManager`."""

    __signature__ = concrete_signature(
        _Client.__init__, tokens="AsyncTokenManager", http="httpx.AsyncClient | None"
    )
    _kinds = (
        AsyncTokenManager,
        httpx.AsyncClient,
        "use WrapperClient with a TokenManager",
        "WrapperClient takes an httpx.Client",
    )

    @cached_property
    def messages(self) -> AsyncMessages:
        """:meth:`~AsyncMessages.create` and :meth:`~AsyncMessages.stream`."""
        return AsyncMessages(self)

    async def aclose(self) -> None:
        """Close the HTTP client if this client made it; the token manager stays open."""
        if self._own_http:
            await self._http.aclose()

    async def health(self) -> Health:
        """``GET /health``: the wrapper's status and version (no credentials needed)."""
        health = self._endpoints.health
        with _TransportErrors(None, health):
            response = await self._http.get(health.url, timeout=self._endpoints.timeout)
        return _health(response.status_code, response.content)

    async def _run(
        self, key: str, attempt: Callable[[Credentials], Coroutine[Any, Any, Any]]
    ) -> Any:
        flow = call_flow(key)
        value: Any = None
        while True:
            try:
                effect = flow.send(value)
            except StopIteration as stop:
                return stop.value
            match effect:
                case Fetch(key):
                    value = await self.tokens.get(key)
                case Renew(key, failed):
                    value = await self.tokens.refresh(key, failed=failed)
                case Attempt(credentials):
                    value = await attempt(credentials)


# -- helpers shared by both clients -----------------------------------------------------


def _drain(lines: Iterator[str]) -> None:
    """Read what follows a stream's result (its end, or a few stray lines): a response read to
    its end gives its connection back to the pool; one closed early throws it away. Only for
    an answer known to end (see ``_Call.drained``): reading one that does not would wait out
    the read timeout."""
    with contextlib.suppress(httpx.HTTPError):
        for _ in itertools.islice(lines, _DRAIN_LINES):
            pass


async def _adrain(lines: AsyncIterator[str]) -> None:
    """The async form of :func:`_drain`."""
    with contextlib.suppress(httpx.HTTPError):
        left = _DRAIN_LINES
        async for _ in lines:
            left -= 1
            if not left:
                return


def _streams(response: httpx.Response) -> bool:
    """Whether a 200 answer is a stream, not the JSON error body that replaces one."""
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    return response.status_code == 200 and content_type != "application/json"


def _unstreamed(call: _Call, response: httpx.Response, redactor: Redactor) -> Refused:
    """The error a stream request got instead of a stream (the body already read)."""
    outcome = interpret(response, key=call.key, model=call.model, redactor=redactor)
    if isinstance(outcome, Refused):
        return outcome
    raise WrapperError(
        f"the wrapper answered a stream request for key {call.key!r} with a plain message",
        status=response.status_code,
        key=call.key,
    )


def _head_line(
    head: list[Event], line: str, key: str, redactor: Redactor
) -> Refused | WrapperError | bool:
    document = read_line(line)
    if document is None:
        return False
    if document is DONE:
        return True
    if isinstance(document, WrapperError):
        return document
    return head_step(head, document, key=key, redactor=redactor)


def _read_head(
    response: httpx.Response, lines: Iterator[str], key: str, redactor: Redactor
) -> _Opened[Iterator[str]] | Refused | WrapperError:
    """The stream opened past its head, or what ended it; errors are returned, not raised.

    The head and the last line stay in this frame: on an in-band error they quote it.
    """
    head: list[Event] = []
    verdict: Refused | WrapperError | bool = True
    for line in lines:
        verdict = _head_line(head, line, key, redactor)
        if verdict is not False:
            break
    if verdict is True or verdict is False:
        return _Opened(response, head, redactor, lines)
    return verdict


async def _aread_head(
    response: httpx.Response, lines: AsyncIterator[str], key: str, redactor: Redactor
) -> _Opened[AsyncIterator[str]] | Refused | WrapperError:
    """The async twin of :func:`_read_head`."""
    head: list[Event] = []
    verdict: Refused | WrapperError | bool = True
    async for line in lines:
        verdict = _head_line(head, line, key, redactor)
        if verdict is not False:
            break
    if verdict is True or verdict is False:
        return _Opened(response, head, redactor, lines)
    return verdict


def _health(status: int, content: bytes) -> Health:
    if status != 200:
        kind = WrapperUnavailable if status >= 500 else WrapperError
        raise kind(f"the wrapper's /health answered HTTP {status}", status=status)
    try:
        document = json.loads(content)
    except ValueError:
        raise WrapperError("the wrapper's /health answer is not JSON", status=status) from None
    return Health.parse(document)
