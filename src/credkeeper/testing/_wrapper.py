"""``FakeWrapper``: the Claude Wrapper API on loopback, quirks included.

It serves ``GET /health``, ``POST /v1/messages`` and ``POST /v1/messages/keepalive`` over real
HTTP the way the wrapper's FastAPI server does (``wrapper-and-provider.md`` sections 1.2 to 1.8):
FastAPI/pydantic 422 bodies for malformed requests, authentication failures reported as HTTP 200
``cli_error`` bodies with the CLI's own texts, the raw-JSON reply quirk, buffered NDJSON for
``stream: true``, real SSE for keepalive, and a workspace snapshot for ``include_files``.
Access tokens are judged by a :class:`FakeProvider`, which can also play the CLI refreshing by
itself, consuming the client's refresh token without handing back the new one. A fault schedule
injects 5xx/401 answers (one echoing the tokens, as the real timeout message does), CLI errors,
delays and mid-stream errors.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal, cast

from credkeeper._clock import Clock
from credkeeper._credentials import from_epoch_ms, to_epoch_ms
from credkeeper._messages import _mcp_rule
from credkeeper._secret import Secret

from ._http import FakeServer, Reply, Request, check_seconds, check_status, content_type_of, phrase
from ._provider import FakeProvider

__all__ = ["FakeWrapper", "WrapperCall", "WrapperFault"]

VERSION = "v36-files-watcher"
MESSAGES_PATH = "/v1/messages"
KEEPALIVE_PATH = "/v1/messages/keepalive"

INVALID_API_KEY = "Invalid API key · Please run /login"
TOKEN_EXPIRED = (
    'Failed to authenticate. API Error: 401 {"type":"error","error":{"type":'
    '"authentication_error","message":"OAuth token has expired. Please obtain a new token '
    'or refresh your existing token."}}'
)
# What the CLI prints for a revoked token in non-interactive (--print) mode, the wrapper's.
TOKEN_REVOKED = (
    "Your account does not have access to Claude. Please login again or contact your administrator."
)
EMPTY_PROMPT = (
    "Error: Input must be provided either through stdin or as a prompt argument when using --print"
)
OPUS_WEEKLY_LIMIT = "Opus weekly limit reached ∙ resets Nov 10, 5pm"

# Claude Code refreshes when now + 5 min >= expiresAt (isOAuthTokenExpired in client.ts).
SELF_REFRESH_WINDOW = timedelta(minutes=5)
MODEL_IDS = {
    "opus": "claude-opus-4-20250514",
    "sonnet": "claude-sonnet-4-5-20250929",
    "haiku": "claude-3-5-haiku-20241022",
}
_ROUTES = {"/health": "GET", MESSAGES_PATH: "POST", KEEPALIVE_PATH: "POST"}
_AUTH_FAILURES = {
    "unknown": ("invalid_api_key", INVALID_API_KEY),
    "expired": ("token_expired", TOKEN_EXPIRED),
    "revoked": ("token_revoked", TOKEN_REVOKED),
}
_DEFAULT_DETAILS = {
    401: "Invalid OAuth token format",
    500: "Server error: simulated failure",
}


# -- public value types ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WrapperFault:
    """One scheduled misbehaviour of the wrapper; build it with a classmethod.

    Faults are taken by requests that pass validation (FastAPI answers a 422 before the handler
    runs), one per request, in the order they were queued.
    """

    kind: Literal["status", "cli_timeout", "cli_error", "delay", "stream_error"]
    code: int | None = None
    detail: str | None = None
    body: str | None = None
    message: str | None = None
    seconds: float = 0.0
    after_deltas: int = 0

    @classmethod
    def status(
        cls, code: int, detail: str | None = None, *, body: str | None = None
    ) -> WrapperFault:
        """Answer HTTP ``code`` with FastAPI's ``{"detail": detail}``, as an exception would.

        The default detail is ``Server error: simulated failure`` for 500 and
        ``Invalid OAuth token format`` for 401. ``body`` replaces the whole body verbatim, for
        answers from something in front of the wrapper (a load balancer's HTML page).
        """
        check_status(code)
        if detail is not None and body is not None:
            raise ValueError("pass detail or body, not both")
        if detail is None and body is None:
            detail = _DEFAULT_DETAILS.get(code) or phrase(code)
        return cls(kind="status", code=code, detail=detail, body=body)

    @classmethod
    def cli_timeout(cls) -> WrapperFault:
        """Answer 500 ``Server error: Command '[...]' timed out after 180 seconds``.

        The argv in that message is the one the real server builds, so it holds the request's
        access and refresh tokens in clear: a client must redact the body before logging it.
        """
        return cls(kind="cli_timeout", code=500)

    @classmethod
    def cli_error(cls, message: str) -> WrapperFault:
        """Answer HTTP 200 ``{"type":"error","error":{"message":message,"code":"cli_error"}}``.

        This is how every CLI failure arrives, such as :attr:`FakeWrapper.OPUS_WEEKLY_LIMIT`;
        on keepalive the CLI's in-band report instead (a synthetic assistant message and an
        ``is_error`` result).
        """
        if not isinstance(message, str):
            raise TypeError(f"message must be a str, not {type(message).__name__}")
        return cls(kind="cli_error", message=message)

    @classmethod
    def delay(cls, seconds: float) -> WrapperFault:
        """Hold the request ``seconds`` of real time, then answer it normally.

        For client timeouts; the CLI can run for up to 180 s and Cloud Run cuts at 300 s.
        """
        return cls(kind="delay", seconds=check_seconds(seconds))

    @classmethod
    def stream_error(
        cls, message: str = "API Error: Connection error.", *, after_deltas: int = 2
    ) -> WrapperFault:
        """Break a stream after ``after_deltas`` text deltas with an in-band error.

        The error is ``{"type":"error","error":{"message":message,"code":"stream_error"}}`` and
        no ``result`` follows (keepalive still ends with ``[DONE]``). A non-streaming request
        taking this fault gets ``message`` as a ``cli_error``, as a CLI that died would give.
        """
        if not isinstance(message, str):
            raise TypeError(f"message must be a str, not {type(message).__name__}")
        if isinstance(after_deltas, bool) or not isinstance(after_deltas, int) or after_deltas < 0:
            raise ValueError(f"after_deltas must be an int >= 0, got {after_deltas!r}")
        return cls(kind="stream_error", message=message, after_deltas=after_deltas)

    @property
    def label(self) -> str:
        """How the call log names this fault: ``fault:<code|cli_timeout|cli_error|...>``."""
        return f"fault:{self.code if self.kind == 'status' else self.kind}"


@dataclass(frozen=True, slots=True, kw_only=True)
class WrapperCall:
    """One request to ``/v1/messages`` or ``/v1/messages/keepalive``, as the fake saw it.

    ``outcome`` is ``"ok"``, ``"invalid_request"`` (a 422 or 400), ``"invalid_api_key"``,
    ``"token_expired"``, ``"token_revoked"``, ``"empty_prompt"``, ``"server_error"`` (the
    ``reply`` callable raised) or the label of the fault that answered (``"fault:500"``,
    ``"fault:cli_timeout"``, ...); ``fault`` names the fault the request took, even one that
    only delayed it. ``stream`` is true when the answer was a stream. ``expires_at`` is the sent
    ``oauth_credentials.expires_at`` and ``self_refreshed`` says whether the CLI consumed the
    refresh token. Credential fields are ``None`` for requests that failed validation; the
    tokens are kept as :class:`~credkeeper.Secret` and never appear in ``repr``.
    """

    at: datetime
    path: str
    outcome: str
    model: str | None = None
    stream: bool = False
    expires_at: datetime | None = None
    self_refreshed: bool = False
    fault: str | None = None
    access_token: Secret | None = field(default=None, repr=False)
    refresh_token: Secret | None = field(default=None, repr=False)

    @property
    def expires_in(self) -> timedelta | None:
        """How long the sent access token still had to live when the request arrived."""
        return None if self.expires_at is None else self.expires_at - self.at


# -- request validation, the way pydantic 2.5 under FastAPI 0.109 reports it ---------------

_Loc = tuple[str | int, ...]
_Errors = list[dict[str, object]]
_Validator = Callable[[object, _Loc, _Errors], object]

_INVALID = object()
_REQUIRED = object()
_PYDANTIC_URL = "https://errors.pydantic.dev/2.5/v/"
_MESSAGES = {
    "missing": "Field required",
    "string_type": "Input should be a valid string",
    "int_type": "Input should be a valid integer",
    "int_parsing": "Input should be a valid integer, unable to parse string as an integer",
    "int_from_float": "Input should be a valid integer, got a number with a fractional part",
    "finite_number": "Input should be a finite number",
    "bool_type": "Input should be a valid boolean",
    "bool_parsing": "Input should be a valid boolean, unable to interpret input",
    "list_type": "Input should be a valid list",
    "dict_type": "Input should be a valid dictionary",
    # FastAPI validates with from_attributes=True, hence this wording for non-objects.
    "model_attributes_type": (
        "Input should be a valid dictionary or object to extract attributes from"
    ),
}
_INT_STRING = re.compile(r"([+-]?\d+)(?:\.0*)?")
_TRUE_STRINGS = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE_STRINGS = frozenset({"0", "off", "f", "false", "n", "no"})


def _error(
    kind: str, loc: _Loc, value: object, *, msg: str | None = None, ctx: object = None
) -> dict[str, object]:
    error: dict[str, object] = {
        "type": kind,
        "loc": list(loc),
        "msg": msg or _MESSAGES[kind],
        "input": value,
    }
    if ctx is not None:
        error["ctx"] = ctx
    error["url"] = _PYDANTIC_URL + kind
    return error


def _string(value: object, loc: _Loc, errors: _Errors) -> object:
    if isinstance(value, str):
        return value
    errors.append(_error("string_type", loc, value))
    return _INVALID


def _integer(value: object, loc: _Loc, errors: _Errors) -> object:
    # Lax mode, as FastAPI runs it: bools, integral floats and numeric strings pass.
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            kind = "finite_number"
        elif value.is_integer():
            return int(value)
        else:
            kind = "int_from_float"
    elif isinstance(value, str):
        match = _INT_STRING.fullmatch(value.strip())
        if match:
            return int(match.group(1))
        kind = "int_parsing"
    else:
        kind = "int_type"
    errors.append(_error(kind, loc, value))
    return _INVALID


def _boolean(value: object, loc: _Loc, errors: _Errors) -> object:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        if value in (0, 1):
            return bool(value)
        kind = "bool_parsing"
    elif isinstance(value, str):
        lowered = value.lower()
        if lowered in _TRUE_STRINGS or lowered in _FALSE_STRINGS:
            return lowered in _TRUE_STRINGS
        kind = "bool_parsing"
    else:
        kind = "bool_type"
    errors.append(_error(kind, loc, value))
    return _INVALID


def _optional(validator: _Validator) -> _Validator:
    def validate(value: object, loc: _Loc, errors: _Errors) -> object:
        return None if value is None else validator(value, loc, errors)

    return validate


def _list_of(item: _Validator) -> _Validator:
    def validate(value: object, loc: _Loc, errors: _Errors) -> object:
        if not isinstance(value, list):
            errors.append(_error("list_type", loc, value))
            return _INVALID
        items = [item(element, (*loc, index), errors) for index, element in enumerate(value)]
        return _INVALID if any(element is _INVALID for element in items) else items

    return validate


def _dict_of(item: _Validator) -> _Validator:
    def validate(value: object, loc: _Loc, errors: _Errors) -> object:
        if not isinstance(value, dict):
            errors.append(_error("dict_type", loc, value))
            return _INVALID
        items = {key: item(element, (*loc, key), errors) for key, element in value.items()}
        return _INVALID if any(element is _INVALID for element in items.values()) else items

    return validate


def _model(
    fields: tuple[tuple[str, _Validator, object], ...],
    check: Callable[[Mapping[str, object]], str | None] | None = None,
) -> _Validator:
    """A BaseModel: every field checked, errors collected, then an after-validator."""

    def validate(value: object, loc: _Loc, errors: _Errors) -> object:
        if not isinstance(value, dict):
            errors.append(_error("model_attributes_type", loc, value))
            return _INVALID
        result: dict[str, object] = {}
        valid = True
        for name, validator, default in fields:
            if name not in value:
                if default is _REQUIRED:
                    errors.append(_error("missing", (*loc, name), value))
                    valid = False
                else:
                    result[name] = default
                continue
            checked = validator(value[name], (*loc, name), errors)
            valid = valid and checked is not _INVALID
            result[name] = checked
        if not valid:
            return _INVALID
        problem = None if check is None else check(result)
        if problem is not None:
            # jsonable_encoder turns the ValueError in ctx into {}.
            msg = f"Value error, {problem}"
            errors.append(_error("value_error", loc, value, msg=msg, ctx={"error": {}}))
            return _INVALID
        return result

    return validate


def _mcp_problem(server: Mapping[str, object]) -> str | None:
    """MCPServer.validate_mcp_config's message for the first rule ``server`` breaks, if any.

    The rules are the ones the client checks before sending, so the two cannot drift apart.
    """
    rule = _mcp_rule(server)
    return None if rule is None else rule[2]


_OPTIONAL_STRING = _optional(_string)
_OAUTH_CREDENTIALS = _model(
    (
        ("access_token", _string, _REQUIRED),
        ("refresh_token", _string, _REQUIRED),
        ("expires_at", _integer, _REQUIRED),
        ("scopes", _list_of(_string), ("user:inference", "user:profile")),
        ("subscription_type", _string, "max"),
    )
)
_MESSAGE = _model((("role", _string, _REQUIRED), ("content", _string, _REQUIRED)))
_MCP_SERVER = _model(
    (
        ("command", _OPTIONAL_STRING, None),
        ("args", _optional(_list_of(_string)), None),
        ("env", _optional(_dict_of(_string)), None),
        ("url", _OPTIONAL_STRING, None),
        ("transport", _OPTIONAL_STRING, None),
        ("auth_type", _OPTIONAL_STRING, None),
        ("auth_token", _OPTIONAL_STRING, None),
        ("streamable_http_path", _string, "/mcp"),
    ),
    _mcp_problem,
)
_MESSAGE_REQUEST = _model(
    (
        ("oauth_credentials", _OAUTH_CREDENTIALS, _REQUIRED),
        ("messages", _list_of(_MESSAGE), _REQUIRED),
        ("session_id", _OPTIONAL_STRING, None),
        ("model", _string, "sonnet"),
        ("mcp_servers", _optional(_dict_of(_MCP_SERVER)), None),
        ("stream", _boolean, False),
        ("fallback_model", _OPTIONAL_STRING, None),
        ("thinking", _optional(_boolean), None),
        ("include_files", _boolean, False),
    )
)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Request:
    access_token: str
    refresh_token: str
    expires_at_ms: int
    scopes: tuple[str, ...]
    subscription_type: str
    messages: tuple[tuple[str, str], ...]
    model: str
    stream: bool
    thinking: bool
    fallback_model: str | None
    include_files: bool
    mcp: bool

    @classmethod
    def of(cls, fields: Mapping[str, Any]) -> _Request:
        credentials = fields["oauth_credentials"]
        return cls(
            access_token=credentials["access_token"],
            refresh_token=credentials["refresh_token"],
            expires_at_ms=credentials["expires_at"],
            scopes=tuple(credentials["scopes"]),
            subscription_type=credentials["subscription_type"],
            messages=tuple((message["role"], message["content"]) for message in fields["messages"]),
            model=fields["model"],
            stream=fields["stream"],
            thinking=bool(fields["thinking"]),
            fallback_model=fields["fallback_model"],
            include_files=fields["include_files"],
            mcp=bool(fields["mcp_servers"]),
        )

    @property
    def expires_at(self) -> datetime | None:
        try:
            return from_epoch_ms(self.expires_at_ms)
        except OverflowError:
            return None


def _flatten(messages: tuple[tuple[str, str], ...]) -> str:
    """The one prompt string the server passes to the CLI; other roles are dropped."""
    parts: list[str] = []
    for role, content in messages:
        if role == "user":
            parts.append(content)
        elif role == "assistant":
            parts.append(f"Assistant: {content}")
    return "\n\n".join(parts)


def _default_reply(messages: tuple[tuple[str, str], ...], prompt: str) -> str:
    users = [content for role, content in messages if role == "user"]
    return f"You said: {users[-1] if users else prompt}"


def _pieces(text: str) -> list[str]:
    """``text`` cut word by word, whitespace kept, so the deltas join back to it."""
    return re.findall(r"\S+\s*|\s+", text)


# -- replies -------------------------------------------------------------------------------


def _json_reply(status: int, document: object, *headers: tuple[str, str]) -> Reply:
    # Starlette's JSONResponse rendering.
    body = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    return Reply(status, body, headers=headers)


def _cli_error_document(message: str, code: str = "cli_error") -> dict[str, object]:
    return {"type": "error", "error": {"message": message, "code": code}}


def _ndjson_line(document: object) -> bytes:
    # The CLI's stream-json is JSON.stringify output: compact, non-ASCII kept.
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _sse_event(document: object) -> bytes:
    # The keepalive endpoint writes f"data: {json.dumps(event)}\n\n".
    return b"data: " + json.dumps(document).encode() + b"\n\n"


_SSE_DONE = b"data: [DONE]\n\n"
_EVENT_STREAM = "text/event-stream; charset=utf-8"


@dataclass(frozen=True, slots=True)
class _File:
    path: str
    data: bytes

    def document(self) -> dict[str, object]:
        try:
            content, encoding = self.data.decode(), "text"
        except UnicodeDecodeError:
            content, encoding = base64.b64encode(self.data).decode("ascii"), "base64"
        return {"path": self.path, "content": content, "encoding": encoding, "size": len(self.data)}


def _decode_body(content_type: str | None, raw: bytes) -> tuple[object, Reply | None]:
    """The body as FastAPI hands it to validation, or the reply that ends the request."""
    if not raw:
        return None, None
    mime = (content_type or "application/json").split(";")[0].strip().lower()
    if mime != "application/json" and not (
        mime.startswith("application/") and mime.endswith("+json")
    ):
        # FastAPI validates the raw bytes, which are no object.
        return raw.decode("utf-8", "replace"), None
    try:
        return json.loads(raw), None
    except json.JSONDecodeError as exc:
        error = {
            "type": "json_invalid",
            "loc": ["body", exc.pos],
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": exc.msg},
        }
        return None, _json_reply(422, {"detail": [error]})
    except ValueError:
        return None, _json_reply(400, {"detail": "There was an error parsing the body"})


# -- the fake ------------------------------------------------------------------------------


class FakeWrapper(FakeServer[WrapperFault, WrapperCall]):
    """The Claude Wrapper API on ``127.0.0.1``, checking access tokens against a FakeProvider.

    Start it with :meth:`start` or a ``with`` block, point a client at :attr:`url`, and read
    what happened from :attr:`calls` and :attr:`self_refresh_count`. With ``self_refresh`` it
    plays the wrapper's CLI refreshing by itself when the sent ``expires_at`` is within five
    minutes of ``clock`` (default: the provider's): the client's refresh token is consumed at
    the provider and the new tokens are never returned. ``reply`` maps the prompt the server
    builds to the model's answer (default ``"You said: <last user message>"``); ``latency``
    real seconds pass before each message request is handled. Token validity is the
    provider's verdict. Tokens are never printed, logged or shown in ``repr``. :meth:`handler`
    answers the same requests in-process, for ``httpx.MockTransport``.
    """

    _fault_type = WrapperFault
    _persistent = True
    # FastAPI has no body limit; this only keeps a runaway test from exhausting memory.
    _max_body = 64 << 20
    _server_header = "uvicorn"

    #: The CLI's text for an access token the provider does not know.
    INVALID_API_KEY: ClassVar[str] = INVALID_API_KEY
    #: The CLI's text for an expired access token.
    TOKEN_EXPIRED: ClassVar[str] = TOKEN_EXPIRED
    #: The CLI's text for a revoked access token.
    TOKEN_REVOKED: ClassVar[str] = TOKEN_REVOKED
    #: The CLI's text when the flattened prompt is empty (for example, no messages).
    EMPTY_PROMPT: ClassVar[str] = EMPTY_PROMPT
    #: A quota error as the CLI reports it, for :meth:`WrapperFault.cli_error`.
    OPUS_WEEKLY_LIMIT: ClassVar[str] = OPUS_WEEKLY_LIMIT

    def __init__(
        self,
        provider: FakeProvider,
        *,
        self_refresh: bool = False,
        clock: Clock | None = None,
        latency: float = 0.0,
        reply: Callable[[str], str] | None = None,
    ) -> None:
        if not isinstance(provider, FakeProvider):
            raise TypeError(f"provider must be a FakeProvider, not {type(provider).__name__}")
        if isinstance(latency, bool) or not isinstance(latency, int | float):
            raise TypeError(f"latency must be a number, not {type(latency).__name__}")
        if not math.isfinite(latency) or latency < 0:
            raise ValueError(f"latency must be a number of seconds >= 0, got {latency!r}")
        if reply is not None and not callable(reply):
            raise TypeError(f"reply must be callable, not {type(reply).__name__}")
        self.provider = provider
        self.self_refresh = self_refresh
        self.clock: Clock = clock if clock is not None else provider.clock
        self.latency = float(latency)
        self.reply = reply
        super().__init__()
        self._files: dict[str, _File] = {}

    def __repr__(self) -> str:
        with self._lock:
            calls = len(self._calls)
            refreshes = sum(1 for call in self._calls if call.self_refreshed)
        return (
            f"FakeWrapper(url={self._url_or_none()!r}, calls={calls}, "
            f"self_refresh={self.self_refresh}, self_refresh_count={refreshes})"
        )

    # -- workspace -----------------------------------------------------------------------

    def add_file(self, path: str, content: str | bytes) -> None:
        """Put a file in the workspace snapshot that ``include_files`` returns.

        ``path`` is returned exactly as given, hostile ones (``../escape.txt``, ``/etc/x``)
        included, so a client's refusal can be tested. ``str`` content and UTF-8 ``bytes`` come
        back as ``encoding: "text"``, other bytes as base64. Adding a path again replaces it.
        """
        if not isinstance(path, str) or not path:
            raise ValueError(f"path must be a non-empty str, got {path!r}")
        if isinstance(content, str):
            data = content.encode()
        elif isinstance(content, bytes):
            data = content
        else:
            raise TypeError(f"content must be str or bytes, not {type(content).__name__}")
        with self._lock:
            self._files[path] = _File(path, data)

    def clear_files(self) -> None:
        """Empty the workspace snapshot."""
        with self._lock:
            self._files.clear()

    # -- log -----------------------------------------------------------------------------

    @property
    def calls(self) -> list[WrapperCall]:
        """A snapshot of every message request answered, in the order they were decided."""
        return self._logged()

    @property
    def self_refresh_count(self) -> int:
        """How many requests had the CLI consume the client's refresh token."""
        with self._lock:
            return sum(1 for call in self._calls if call.self_refreshed)

    # -- request handling ----------------------------------------------------------------

    def _respond(self, request: Request) -> Reply | None:
        if request.body is None:
            return Reply(413, b'{"detail":"Request body too large"}', close=True)
        allowed = _ROUTES.get(request.path)
        if allowed is None:
            return _json_reply(404, {"detail": "Not Found"})
        if request.method != allowed:
            return _json_reply(405, {"detail": "Method Not Allowed"}, ("Allow", allowed))
        if request.path == "/health":
            return self._health()
        return self._serve_messages(request)

    def _health(self) -> Reply:
        document = {
            "status": "healthy",
            "version": VERSION,
            "security_level": "BALANCED",
            "timestamp": self.clock.now().timestamp(),
        }
        return _json_reply(200, document)

    def _serve_messages(self, raw: Request) -> Reply | None:
        arrived, path = self.clock.now(), raw.path
        assert raw.body is not None
        document, reply = _decode_body(raw.headers.get("Content-Type"), raw.body)
        errors: _Errors = []
        fields: object = _INVALID
        if reply is None:
            if document is None:
                errors.append(_error("missing", ("body",), None))
            else:
                fields = _MESSAGE_REQUEST(document, ("body",), errors)
        if reply is not None or fields is _INVALID:
            with self._lock:
                self._record_locked(
                    WrapperCall(
                        at=arrived,
                        path=path,
                        outcome="invalid_request",
                        stream=path == KEEPALIVE_PATH,
                    )
                )
            return reply or _json_reply(422, {"detail": errors})
        request = _Request.of(cast("dict[str, Any]", fields))
        fault = self._take_fault()
        if self.latency and raw.wait(self.latency):
            return None
        if fault is not None and fault.kind == "delay" and raw.wait(fault.seconds):
            return None
        keepalive = path == KEEPALIVE_PATH
        outcome, self_refreshed, reply = self._answer(request, fault, keepalive=keepalive)
        with self._lock:
            self._record_locked(
                WrapperCall(
                    at=arrived,
                    path=path,
                    outcome=outcome,
                    model=request.model,
                    stream=keepalive or (request.stream and reply.chunks is not None),
                    expires_at=request.expires_at,
                    self_refreshed=self_refreshed,
                    fault=None if fault is None else fault.label,
                    access_token=Secret(request.access_token),
                    refresh_token=Secret(request.refresh_token),
                )
            )
        return reply

    def _answer(
        self, request: _Request, fault: WrapperFault | None, *, keepalive: bool
    ) -> tuple[str, bool, Reply]:
        """Decide one valid request: ``(outcome, self_refreshed, reply)``."""
        if fault is not None and fault.kind == "status":
            assert fault.code is not None
            if fault.body is not None:
                reply = Reply(fault.code, fault.body.encode(), content_type_of(fault.body))
                return fault.label, False, reply
            return fault.label, False, _json_reply(fault.code, {"detail": fault.detail})
        if fault is not None and fault.kind == "cli_timeout":
            return fault.label, False, _json_reply(500, {"detail": _timeout_detail(request)})
        if fault is not None and fault.kind == "cli_error":
            assert fault.message is not None
            return fault.label, False, _cli_error(fault.message, keepalive=keepalive)
        prompt = _flatten(request.messages)
        if not prompt:
            return "empty_prompt", False, _cli_error(EMPTY_PROMPT, keepalive=keepalive)
        self_refreshed, failure = self._authenticate(request)
        if failure is not None:
            outcome, message = failure
            return outcome, False, _cli_error(message, keepalive=keepalive)
        try:
            text = self._reply_text(request, prompt)
        except Exception as exc:  # noqa: BLE001 - any failure of the test's callable is a 500
            detail = f"Server error: {type(exc).__name__}: {exc}"
            return "server_error", self_refreshed, _json_reply(500, {"detail": detail})
        cut = fault if fault is not None and fault.kind == "stream_error" else None
        outcome = "ok" if cut is None else cut.label
        if not keepalive and not request.stream:
            if cut is not None:
                assert cut.message is not None
                return outcome, self_refreshed, _cli_error(cut.message, keepalive=False)
            return outcome, self_refreshed, self._message_reply(request, text)
        files = self._file_events() if keepalive and request.include_files else []
        objects = _conversation(request, prompt, text, cut, files)
        return outcome, self_refreshed, _stream(objects, keepalive=keepalive)

    def _authenticate(self, request: _Request) -> tuple[bool, tuple[str, str] | None]:
        """``(self_refreshed, failure)``: what the CLI would make of these credentials."""
        window_ms = SELF_REFRESH_WINDOW // timedelta(milliseconds=1)
        # The rotated tokens stay in the wrapper's workspace; the client never sees them.
        if (
            self.self_refresh
            and request.expires_at_ms - window_ms <= to_epoch_ms(self.clock.now())
            and self.provider.rotate(request.refresh_token) is not None
        ):
            return True, None
        state = self.provider.access_token_state(request.access_token)
        if state == "valid":
            return False, None
        return False, _AUTH_FAILURES[state]

    def _reply_text(self, request: _Request, prompt: str) -> str:
        if self.reply is None:
            return _default_reply(request.messages, prompt)
        text = self.reply(prompt)
        if not isinstance(text, str):
            raise TypeError(f"reply must return a str, not {type(text).__name__}")
        return text

    def _message_reply(self, request: _Request, text: str) -> Reply:
        # The server json.loads the CLI's stdout first: a reply that is JSON is the whole body.
        try:
            return _json_reply(200, json.loads(text))
        except ValueError:
            pass
        document: dict[str, object] = {
            "type": "message",
            "content": [{"type": "text", "text": text.strip()}],
            "model": request.model,
            "usage": {},
        }
        if request.include_files:
            files = self._snapshot()
            document["files"] = [file.document() for file in files]
            document["files_summary"] = {
                "total": len(files),
                "total_size": sum(len(file.data) for file in files),
            }
        return _json_reply(200, document)

    def _snapshot(self) -> list[_File]:
        with self._lock:
            return list(self._files.values())

    def _file_events(self) -> list[dict[str, object]]:
        """Keepalive's in-band file events: one ``file_created`` each, then a ``files_batch``."""
        snapshot = self._snapshot()
        documents = [file.document() for file in snapshot]
        timestamp = self.clock.now().timestamp()
        events: list[dict[str, object]] = [
            {
                "type": "file_created",
                **document,
                "hash": hashlib.sha256(file.data).hexdigest(),
                "timestamp": timestamp,
            }
            for file, document in zip(snapshot, documents, strict=True)
        ]
        events.append({"type": "files_batch", "files": documents, "count": len(documents)})
        return events


def _cli_error(message: str, *, keepalive: bool) -> Reply:
    """A CLI failure: a 200 JSON body, or on keepalive what the CLI itself streams.

    In stream-json mode the CLI reports a failed API call in band: ``system/init``, a synthetic
    ``assistant`` message carrying the error text, then a ``result`` with ``is_error`` set,
    before the server's ``[DONE]``.
    """
    if not keepalive:
        return _json_reply(200, _cli_error_document(message))
    session_id = str(uuid.uuid4())
    objects: list[dict[str, object]] = [
        {"type": "system", "subtype": "init", "session_id": session_id, "model": "<synthetic>"},
        {
            "type": "assistant",
            "message": {
                "id": str(uuid.uuid4()),
                "model": "<synthetic>",
                "role": "assistant",
                "type": "message",
                "content": [{"type": "text", "text": message}],
            },
            "isApiErrorMessage": True,
            "session_id": session_id,
        },
        {
            "type": "result",
            "subtype": "success",
            "is_error": True,
            "result": message,
            "num_turns": 1,
            "duration_ms": 1,
            "session_id": session_id,
        },
    ]
    return _stream(objects, keepalive=True)


def _stream(objects: list[dict[str, object]], *, keepalive: bool) -> Reply:
    """A streamed answer: SSE events then ``[DONE]`` on keepalive, else NDJSON in one chunk."""
    if keepalive:
        chunks = (*(_sse_event(obj) for obj in objects), _SSE_DONE)
    else:
        chunks = (b"".join(_ndjson_line(obj) for obj in objects),)
    return Reply(200, content_type=_EVENT_STREAM, chunks=chunks)


def _timeout_detail(request: _Request) -> str:
    """The real 500 detail: str(subprocess.TimeoutExpired), whose argv holds the tokens."""
    settings: dict[str, object] = {
        "credentials": {
            "accessToken": request.access_token,
            "refreshToken": request.refresh_token,
            "expiresAt": request.expires_at_ms,
            "scopes": list(request.scopes),
            "subscriptionType": request.subscription_type,
        }
    }
    if request.thinking:
        settings["alwaysThinkingEnabled"] = True
    argv = ["claude", "--print", "--model", MODEL_IDS.get(request.model, request.model)]
    argv += ["--settings", json.dumps(settings)]
    if request.fallback_model is not None:
        fallback = request.fallback_model
        argv += ["--fallback-model", MODEL_IDS.get(fallback, fallback)]
    if request.mcp:
        argv.append("--dangerously-skip-permissions")
    argv.append(_flatten(request.messages))
    return f"Server error: Command '{argv}' timed out after 180 seconds"


def _conversation(
    request: _Request,
    prompt: str,
    text: str,
    cut: WrapperFault | None,
    files: list[dict[str, object]],
) -> list[dict[str, object]]:
    """The CLI's stream-json objects, with the ``files`` events just before the ``result``.

    A ``cut`` stream stops after ``cut.after_deltas`` text deltas with its in-band error instead.
    """
    started = time.perf_counter()
    session_id = str(uuid.uuid4())
    model_id = MODEL_IDS.get(request.model, request.model)
    pieces = _pieces(text)
    usage = {
        "input_tokens": max(1, len(prompt.split())),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": max(1, len(pieces)),
    }
    objects: list[dict[str, object]] = [
        {
            "type": "system",
            "subtype": "init",
            "cwd": "/workspaces/" + hashlib.sha256(request.access_token.encode()).hexdigest()[:16],
            "session_id": session_id,
            "tools": [],
            "mcp_servers": [],
            "model": model_id,
            "permissionMode": "default",
            "slash_commands": [],
            "apiKeySource": "none",
            "output_style": "default",
            "uuid": str(uuid.uuid4()),
        }
    ]

    def event(kind: str, **fields: object) -> None:
        """One Anthropic streaming event, wrapped as the CLI wraps it."""
        objects.append(
            {
                "type": "stream_event",
                "event": {"type": kind, **fields},
                "session_id": session_id,
                "parent_tool_use_id": None,
                "uuid": str(uuid.uuid4()),
            }
        )

    def delta(index: int, kind: str, **fields: object) -> None:
        event("content_block_delta", index=index, delta={"type": kind, **fields})

    message: dict[str, object] = {
        "id": "msg_" + uuid.uuid4().hex[:24],
        "type": "message",
        "role": "assistant",
        "model": model_id,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    event("message_start", message=message)
    content: list[dict[str, object]] = []
    if request.thinking:
        thinking = f"The user wrote {len(prompt.split())} words. I will answer them."
        signature = base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()
        block = {"type": "thinking", "thinking": "", "signature": ""}
        event("content_block_start", index=0, content_block=block)
        for piece in _pieces(thinking):
            delta(0, "thinking_delta", thinking=piece)
        delta(0, "signature_delta", signature=signature)
        event("content_block_stop", index=0)
        content.append({"type": "thinking", "thinking": thinking, "signature": signature})
    index = len(content)
    event("content_block_start", index=index, content_block={"type": "text", "text": ""})
    for piece in pieces if cut is None else pieces[: cut.after_deltas]:
        delta(index, "text_delta", text=piece)
    if cut is not None:
        assert cut.message is not None
        return [*objects, _cli_error_document(cut.message, "stream_error")]
    event("content_block_stop", index=index)
    stop = {"stop_reason": "end_turn", "stop_sequence": None}
    event("message_delta", delta=stop, usage={"output_tokens": usage["output_tokens"]})
    event("message_stop")
    content.append({"type": "text", "text": text})
    objects.append(
        {
            "type": "assistant",
            "message": {**message, "content": content, "stop_reason": "end_turn", "usage": usage},
            "parent_tool_use_id": None,
            "session_id": session_id,
            "uuid": str(uuid.uuid4()),
        }
    )
    elapsed_ms = int((time.perf_counter() - started) * 1000)
    result: dict[str, object] = {
        "type": "result",
        "subtype": "success",
        "is_error": False,
        "duration_ms": elapsed_ms + 1,
        "duration_api_ms": elapsed_ms,
        "num_turns": 1,
        "result": text,
        "session_id": session_id,
        "total_cost_usd": (usage["input_tokens"] * 3 + usage["output_tokens"] * 15) / 1_000_000,
        "usage": {
            **usage,
            "server_tool_use": {"web_search_requests": 0},
            "service_tier": "standard",
        },
        "permission_denials": [],
        "uuid": str(uuid.uuid4()),
    }
    return [*objects, *files, result]
