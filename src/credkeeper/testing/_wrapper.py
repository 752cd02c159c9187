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
import dataclasses
import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import ClassVar, Literal, TypedDict, cast

from credkeeper._clock import Clock
from credkeeper._credentials import from_epoch_ms, to_epoch_ms
from credkeeper._messages import _mcp_rule
from credkeeper._secret import Secret

from ._http import FakeServer, Reply, Request, check_seconds, check_status, phrase, verbatim
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
# A validator returns the value it accepts, or _INVALID after adding its errors.
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
_BOOL_STRINGS = dict.fromkeys(("1", "on", "t", "true", "y", "yes"), True) | dict.fromkeys(
    ("0", "off", "f", "false", "n", "no"), False
)


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


def _refuse(errors: _Errors, kind: str, loc: _Loc, value: object) -> object:
    errors.append(_error(kind, loc, value))
    return _INVALID


def _string(value: object, loc: _Loc, errors: _Errors) -> object:
    return value if isinstance(value, str) else _refuse(errors, "string_type", loc, value)


def _integer(value: object, loc: _Loc, errors: _Errors) -> object:
    # Lax mode, as FastAPI runs it: bools, integral floats and numeric strings pass.
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    if isinstance(value, float):
        kind = "int_from_float" if math.isfinite(value) else "finite_number"
    elif isinstance(value, str):
        match = _INT_STRING.fullmatch(value.strip())
        if match:
            return int(match.group(1))
        kind = "int_parsing"
    else:
        kind = "int_type"
    return _refuse(errors, kind, loc, value)


def _boolean(value: object, loc: _Loc, errors: _Errors) -> object:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _BOOL_STRINGS:
        return _BOOL_STRINGS[value.lower()]
    kind = "bool_parsing" if isinstance(value, int | float | str) else "bool_type"
    return _refuse(errors, kind, loc, value)


def _list_of(item: _Validator) -> _Validator:
    def validate(value: object, loc: _Loc, errors: _Errors) -> object:
        if not isinstance(value, list):
            return _refuse(errors, "list_type", loc, value)
        items = [item(element, (*loc, index), errors) for index, element in enumerate(value)]
        return _INVALID if _INVALID in items else items

    return validate


def _dict_of(item: _Validator) -> _Validator:
    def validate(value: object, loc: _Loc, errors: _Errors) -> object:
        if not isinstance(value, dict):
            return _refuse(errors, "dict_type", loc, value)
        items = {key: item(element, (*loc, key), errors) for key, element in value.items()}
        return _INVALID if _INVALID in items.values() else items

    return validate


def _model(
    *fields: tuple[str, _Validator, object],
    check: Callable[[Mapping[str, object]], str | None] | None = None,
) -> _Validator:
    """A BaseModel: every field checked, errors collected, then an after-validator.

    A field whose default is ``None`` is ``Optional``: it takes ``null`` as well.
    """

    def validate(value: object, loc: _Loc, errors: _Errors) -> object:
        if not isinstance(value, dict):
            return _refuse(errors, "model_attributes_type", loc, value)
        result: dict[str, object] = {}
        for name, validator, default in fields:
            if name not in value:
                result[name] = default
                if default is _REQUIRED:
                    _refuse(errors, "missing", (*loc, name), value)
            elif value[name] is None and default is None:
                result[name] = None
            else:
                result[name] = validator(value[name], (*loc, name), errors)
        if any(field is _INVALID or field is _REQUIRED for field in result.values()):
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


_OAUTH_CREDENTIALS = _model(
    ("access_token", _string, _REQUIRED),
    ("refresh_token", _string, _REQUIRED),
    ("expires_at", _integer, _REQUIRED),
    ("scopes", _list_of(_string), ("user:inference", "user:profile")),
    ("subscription_type", _string, "max"),
)
_MESSAGE = _model(("role", _string, _REQUIRED), ("content", _string, _REQUIRED))
_MCP_SERVER = _model(
    ("command", _string, None),
    ("args", _list_of(_string), None),
    ("env", _dict_of(_string), None),
    ("url", _string, None),
    ("transport", _string, None),
    ("auth_type", _string, None),
    ("auth_token", _string, None),
    ("streamable_http_path", _string, "/mcp"),
    check=_mcp_problem,
)
_MESSAGE_REQUEST = _model(
    ("oauth_credentials", _OAUTH_CREDENTIALS, _REQUIRED),
    ("messages", _list_of(_MESSAGE), _REQUIRED),
    ("session_id", _string, None),
    ("model", _string, "sonnet"),
    ("mcp_servers", _dict_of(_MCP_SERVER), None),
    ("stream", _boolean, False),
    ("fallback_model", _string, None),
    ("thinking", _boolean, None),
    ("include_files", _boolean, False),
)


class _Credentials(TypedDict):
    access_token: str
    refresh_token: str
    expires_at: int
    scopes: Sequence[str]
    subscription_type: str


class _Message(TypedDict):
    role: str
    content: str


class _Body(TypedDict):
    """A request body as validation leaves it, defaults filled in (the fields the fake reads)."""

    oauth_credentials: _Credentials
    messages: list[_Message]
    model: str
    mcp_servers: dict[str, object] | None
    stream: bool
    fallback_model: str | None
    thinking: bool | None
    include_files: bool


def _validated(content_type: str | None, raw: bytes) -> _Body | Reply:
    """The body after FastAPI's decoding and validation, or its answer refusing the request."""
    mime = (content_type or "application/json").split(";")[0].strip().lower()
    document: object = None
    if raw and (
        mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))
    ):
        try:
            document = json.loads(raw)
        except json.JSONDecodeError as exc:
            error = {
                "type": "json_invalid",
                "loc": ["body", exc.pos],
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": exc.msg},
            }
            return _json_reply(422, {"detail": [error]})
        except ValueError:
            return _json_reply(400, {"detail": "There was an error parsing the body"})
    elif raw:
        # FastAPI validates the raw bytes, which are no object.
        document = raw.decode("utf-8", "replace")
    errors: _Errors = []
    if document is None:
        body = _refuse(errors, "missing", ("body",), None)
    else:
        body = _MESSAGE_REQUEST(document, ("body",), errors)
    return _json_reply(422, {"detail": errors}) if errors else cast("_Body", body)


def _expires_at(credentials: _Credentials) -> datetime | None:
    try:
        return from_epoch_ms(credentials["expires_at"])
    except OverflowError:
        return None


def _flatten(messages: list[_Message]) -> str:
    """The one prompt string the server passes to the CLI; other roles are dropped."""
    prefixes = {"user": "", "assistant": "Assistant: "}
    return "\n\n".join(
        prefixes[m["role"]] + m["content"] for m in messages if m["role"] in prefixes
    )


def _pieces(text: str) -> list[str]:
    """``text`` cut word by word, whitespace kept, so the deltas join back to it."""
    return re.findall(r"\S+\s*|\s+", text)


def _file_document(path: str, data: bytes) -> dict[str, object]:
    try:
        content, encoding = data.decode(), "text"
    except UnicodeDecodeError:
        content, encoding = base64.b64encode(data).decode("ascii"), "base64"
    return {"path": path, "content": content, "encoding": encoding, "size": len(data)}


# -- replies -------------------------------------------------------------------------------


def _compact(document: object) -> bytes:
    # Starlette's JSONResponse and the CLI's JSON.stringify: compact, non-ASCII kept.
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def _json_reply(status: int, document: object, *headers: tuple[str, str]) -> Reply:
    return Reply(status, _compact(document), headers=headers)


def _cli_error_document(message: str, code: str = "cli_error") -> dict[str, object]:
    return {"type": "error", "error": {"message": message, "code": code}}


def _stream(objects: list[dict[str, object]], *, keepalive: bool, gap: float = 0.0) -> Reply:
    """A streamed answer: SSE events then ``[DONE]`` on keepalive, else NDJSON in one chunk,
    or one line per chunk ``gap`` seconds apart."""
    if keepalive:
        # The keepalive endpoint writes f"data: {json.dumps(event)}\n\n".
        events = (b"data: " + json.dumps(obj).encode() + b"\n\n" for obj in objects)
        chunks: tuple[bytes, ...] = (*events, b"data: [DONE]\n\n")
    elif gap:
        chunks = tuple(_compact(obj) + b"\n" for obj in objects)
    else:
        chunks = (b"".join(_compact(obj) + b"\n" for obj in objects),)
    return Reply(200, content_type="text/event-stream; charset=utf-8", chunks=chunks, gap=gap)


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


# -- the fake ------------------------------------------------------------------------------


class FakeWrapper(FakeServer[WrapperFault, WrapperCall]):
    """The Claude Wrapper API on ``127.0.0.1``, checking access tokens against a FakeProvider.

    Start it with :meth:`start` or a ``with`` block, point a client at :attr:`url`, and read
    what happened from :attr:`calls` and :attr:`self_refresh_count`. With ``self_refresh`` it
    plays the wrapper's CLI refreshing by itself when the sent ``expires_at`` is within five
    minutes of ``clock`` (default: the provider's): the client's refresh token is consumed at
    the provider and the new tokens are never returned. ``reply`` maps the prompt the server
    builds to the model's answer (default ``"You said: <last user message>"``); ``latency``
    real seconds pass before each message request is handled, and ``stream_gap`` between the
    lines of a streamed answer (the real wrapper sends them in one go: 0, the default, does
    too). With ``hang_after_result`` a keepalive stream never ends after its ``result``, as the
    real endpoint's can (its CLI is left running): no ``[DONE]``, and over HTTP the connection
    held open until the fake stops (in-process, the body just ends). Token validity is the
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
        stream_gap: float = 0.0,
        hang_after_result: bool = False,
    ) -> None:
        if not isinstance(provider, FakeProvider):
            raise TypeError(f"provider must be a FakeProvider, not {type(provider).__name__}")
        for name, value in (("latency", latency), ("stream_gap", stream_gap)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, not {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if reply is not None and not callable(reply):
            raise TypeError(f"reply must be callable, not {type(reply).__name__}")
        self.provider = provider
        self.self_refresh = self_refresh
        self.clock: Clock = clock if clock is not None else provider.clock
        self.latency = float(latency)
        self.stream_gap = float(stream_gap)
        self.hang_after_result = hang_after_result
        self.reply = reply
        super().__init__()
        self._files: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return (
            f"FakeWrapper(url={self._url_or_none()!r}, calls={self._count()}, "
            f"self_refresh={self.self_refresh}, self_refresh_count={self.self_refresh_count})"
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
        if not isinstance(content, str | bytes):
            raise TypeError(f"content must be str or bytes, not {type(content).__name__}")
        with self._lock:
            self._files[path] = content.encode() if isinstance(content, str) else content

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
        return self._count(lambda call: call.self_refreshed)

    # -- request handling ----------------------------------------------------------------

    def _respond(self, request: Request) -> Reply | None:
        if request.body is None:
            return Reply(413, b'{"detail":"Request body too large"}', close=True)
        allowed = _ROUTES.get(request.path)
        if allowed is None:
            return _json_reply(404, {"detail": "Not Found"})
        if request.method != allowed:
            return _json_reply(405, {"detail": "Method Not Allowed"}, ("Allow", allowed))
        if request.path != "/health":
            return self._serve_messages(request, request.body)
        health = {"status": "healthy", "version": VERSION, "security_level": "BALANCED"}
        return _json_reply(200, {**health, "timestamp": self.clock.now().timestamp()})

    def _serve_messages(self, raw: Request, content: bytes) -> Reply | None:
        arrived, keepalive = self.clock.now(), raw.path == KEEPALIVE_PATH
        request = _validated(raw.headers.get("Content-Type"), content)
        if isinstance(request, Reply):
            call = WrapperCall(
                at=arrived, path=raw.path, outcome="invalid_request", stream=keepalive
            )
            with self._lock:
                self._record_locked(call)
            return request
        fault = self._take_fault()
        if self.latency and raw.wait(self.latency):
            return None
        if fault is not None and fault.kind == "delay" and raw.wait(fault.seconds):
            return None
        outcome, self_refreshed, reply = self._answer(request, fault, keepalive=keepalive)
        if keepalive and self.hang_after_result and reply.chunks is not None:
            # The real endpoint never closes its CLI's stdin: no [DONE], no end.
            reply = dataclasses.replace(reply, chunks=reply.chunks[:-1], hold=True)
        credentials = request["oauth_credentials"]
        call = WrapperCall(
            at=arrived,
            path=raw.path,
            outcome=outcome,
            model=request["model"],
            stream=keepalive or (request["stream"] and reply.chunks is not None),
            expires_at=_expires_at(credentials),
            self_refreshed=self_refreshed,
            fault=None if fault is None else fault.label,
            access_token=Secret(credentials["access_token"]),
            refresh_token=Secret(credentials["refresh_token"]),
        )
        with self._lock:
            self._record_locked(call)
        return reply

    def _answer(
        self, request: _Body, fault: WrapperFault | None, *, keepalive: bool
    ) -> tuple[str, bool, Reply]:
        """Decide one valid request: ``(outcome, self_refreshed, reply)``."""
        if fault is not None and fault.kind == "status":
            assert fault.code is not None
            if fault.body is not None:
                return fault.label, False, verbatim(fault.code, fault.body)
            return fault.label, False, _json_reply(fault.code, {"detail": fault.detail})
        if fault is not None and fault.kind == "cli_timeout":
            return fault.label, False, _json_reply(500, {"detail": _timeout_detail(request)})
        if fault is not None and fault.kind == "cli_error":
            assert fault.message is not None
            return fault.label, False, _cli_error(fault.message, keepalive=keepalive)
        prompt = _flatten(request["messages"])
        if not prompt:
            return "empty_prompt", False, _cli_error(EMPTY_PROMPT, keepalive=keepalive)
        self_refreshed, failure = self._authenticate(request["oauth_credentials"])
        if failure is not None:
            outcome, message = failure
            return outcome, False, _cli_error(message, keepalive=keepalive)
        try:
            text = self._reply_text(request["messages"], prompt)
        except Exception as exc:  # noqa: BLE001 - any failure of the test's callable is a 500
            detail = f"Server error: {type(exc).__name__}: {exc}"
            return "server_error", self_refreshed, _json_reply(500, {"detail": detail})
        cut = fault if fault is not None and fault.kind == "stream_error" else None
        outcome = "ok" if cut is None else cut.label
        if not keepalive and not request["stream"]:
            if cut is not None:
                assert cut.message is not None
                return outcome, self_refreshed, _cli_error(cut.message, keepalive=False)
            return outcome, self_refreshed, self._message_reply(request, text)
        files = self._file_events() if keepalive and request["include_files"] else []
        objects = _conversation(request, prompt, text, cut, files)
        return outcome, self_refreshed, _stream(objects, keepalive=keepalive, gap=self.stream_gap)

    def _authenticate(self, credentials: _Credentials) -> tuple[bool, tuple[str, str] | None]:
        """``(self_refreshed, failure)``: what the CLI would make of these credentials."""
        window_ms = SELF_REFRESH_WINDOW // timedelta(milliseconds=1)
        # The rotated tokens stay in the wrapper's workspace; the client never sees them.
        if (
            self.self_refresh
            and credentials["expires_at"] - window_ms <= to_epoch_ms(self.clock.now())
            and self.provider.rotate(credentials["refresh_token"]) is not None
        ):
            return True, None
        state = self.provider.access_token_state(credentials["access_token"])
        return False, None if state == "valid" else _AUTH_FAILURES[state]

    def _reply_text(self, messages: list[_Message], prompt: str) -> str:
        if self.reply is None:
            users = [message["content"] for message in messages if message["role"] == "user"]
            return f"You said: {users[-1] if users else prompt}"
        text = self.reply(prompt)
        if not isinstance(text, str):
            raise TypeError(f"reply must return a str, not {type(text).__name__}")
        return text

    def _message_reply(self, request: _Body, text: str) -> Reply:
        # The server json.loads the CLI's stdout first: a reply that is JSON is the whole body.
        try:
            return _json_reply(200, json.loads(text))
        except ValueError:
            pass
        document: dict[str, object] = {
            "type": "message",
            "content": [{"type": "text", "text": text.strip()}],
            "model": request["model"],
            "usage": {},
        }
        if request["include_files"]:
            files = self._snapshot()
            document["files"] = [_file_document(*file) for file in files]
            document["files_summary"] = {
                "total": len(files),
                "total_size": sum(len(data) for _, data in files),
            }
        return _json_reply(200, document)

    def _snapshot(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self._files.items())

    def _file_events(self) -> list[dict[str, object]]:
        """Keepalive's in-band file events: one ``file_created`` each, then a ``files_batch``."""
        snapshot = self._snapshot()
        documents = [_file_document(*file) for file in snapshot]
        timestamp = self.clock.now().timestamp()
        events: list[dict[str, object]] = [
            {
                "type": "file_created",
                **document,
                "hash": hashlib.sha256(data).hexdigest(),
                "timestamp": timestamp,
            }
            for (_, data), document in zip(snapshot, documents, strict=True)
        ]
        events.append({"type": "files_batch", "files": documents, "count": len(documents)})
        return events


def _timeout_detail(request: _Body) -> str:
    """The real 500 detail: str(subprocess.TimeoutExpired), whose argv holds the tokens."""
    credentials = request["oauth_credentials"]
    settings: dict[str, object] = {
        "credentials": {
            "accessToken": credentials["access_token"],
            "refreshToken": credentials["refresh_token"],
            "expiresAt": credentials["expires_at"],
            "scopes": list(credentials["scopes"]),
            "subscriptionType": credentials["subscription_type"],
        }
    }
    if request["thinking"]:
        settings["alwaysThinkingEnabled"] = True
    argv = ["claude", "--print", "--model", _model_id(request["model"])]
    argv += ["--settings", json.dumps(settings)]
    if request["fallback_model"] is not None:
        argv += ["--fallback-model", _model_id(request["fallback_model"])]
    if request["mcp_servers"]:
        argv.append("--dangerously-skip-permissions")
    argv.append(_flatten(request["messages"]))
    return f"Server error: Command '{argv}' timed out after 180 seconds"


def _model_id(model: str) -> str:
    return MODEL_IDS.get(model, model)


def _conversation(
    request: _Body,
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
    model_id = _model_id(request["model"])
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
            "cwd": "/workspaces/"
            + hashlib.sha256(request["oauth_credentials"]["access_token"].encode()).hexdigest()[
                :16
            ],
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
    if request["thinking"]:
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
