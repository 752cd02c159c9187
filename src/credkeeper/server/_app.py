"""``create_app``: the HTTP service over one :class:`AsyncTokenManager` and one wrapper client.

Every route is a thin edge over the engine: it authenticates the caller, decodes the key,
calls the manager or the wrapper client, and shapes the answer. Nothing about refreshing is
decided here; errors become problem+json through the one table in ``_problems``. Only the
credential routes answer tokens, and always with ``Cache-Control: no-store``; each of their
calls is one line of the audit log (``_audit``).

What runs beside the requests (the sweeper, the webhooks' deliveries, the metrics' and the
webhooks' subscriptions to the manager's events) starts and stops with the application's
lifespan: an application that mounts this one runs its lifespan inside its own.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import anyio
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from credkeeper import __version__
from credkeeper._credentials import Credentials
from credkeeper._exceptions import (
    ConfigurationError,
    CredentialNotFound,
    CredkeeperError,
    FieldViolation,
)
from credkeeper._manager import AsyncTokenManager
from credkeeper._messages import OPTIONS, Event
from credkeeper._record import END_OF_TIME, Record, Status, check_key
from credkeeper._sweeper import AsyncSweeper
from credkeeper._wrapper import AsyncMessageStream, AsyncWrapperClient

from ._apikeys import ApiKey, ApiKeys
from ._asgi import ASGIApp, HTTPMiddleware, Receive, Scope, Send
from ._audit import audit
from ._metrics import CONTENT_TYPE_LATEST, MeasureRequests, ServiceMetrics, read_records
from ._problems import (
    BODY_TOO_LARGE,
    DEFAULT_RETRY_AFTER,
    FORBIDDEN_SCOPE,
    FORBIDDEN_TENANT,
    INTERNAL,
    MEDIA_TYPE,
    METHOD_NOT_ALLOWED,
    NO_WRAPPER,
    NOT_READY,
    PROBLEM_SCHEMA,
    ROUTE_NOT_FOUND,
    STORE_UNAVAILABLE,
    UNAUTHENTICATED,
    VALIDATION_FAILED,
    Kind,
    Problem,
    problem_body,
    problem_of,
    problem_responses,
    redact,
)
from ._webhooks import Webhooks

__all__ = ["create_app"]

_logger = logging.getLogger("credkeeper.server")


#: The request options a caller may put beside ``messages`` and ``stream``; ``timeout`` is the
#: service's.
MESSAGE_OPTIONS = frozenset(OPTIONS - {"timeout"})
#: What a streamed answer is: one JSON object per line, the wrapper's, as they arrive.
NDJSON = "application/x-ndjson"
#: The longest ``min_valid`` a caller may ask for: tokens live about 8 hours, and one asked to
#: stay valid longer than a fresh token does would be refreshed on every request.
MAX_MIN_VALID = 4 * 3600
#: ``GET /v1/users`` pages: the default and the largest.
DEFAULT_PAGE = 100
MAX_PAGE = 1000
# The key /readyz reads: any read proves the store answers, and this one is never stored.
_READY_PROBE = "credkeeper:readyz"
# How long /readyz waits for the store before calling it unavailable.
_READY_TIMEOUT = 5.0
_NO_STORE = {"Cache-Control": "no-store"}

_bearer = HTTPBearer(auto_error=False, description="An API key made by `credkeeper apikey`.")


def create_app(
    *,
    manager: AsyncTokenManager,
    wrapper: AsyncWrapperClient | None = None,
    api_keys: ApiKeys | None = None,
    max_body_bytes: int = 1_048_576,
    sweep: bool = False,
    webhooks: Webhooks | None = None,
) -> FastAPI:
    """The service's ASGI application, to run with uvicorn or mount in another application.

    ``wrapper`` is the client ``POST /v1/users/{key}/messages`` calls (without one that route
    answers 503); ``api_keys`` the keys callers authenticate with (without them nothing is
    checked, which ``credkeeper serve`` allows on loopback only). A request body larger than
    ``max_body_bytes`` is refused with 413. With ``sweep``, an :class:`AsyncSweeper` refreshes
    credentials in the background while the application runs; ``webhooks`` are told of the
    credentials' transitions this replica's writes make: the application's lifespan subscribes
    them to the manager, starts and closes them, so each application needs webhooks of its own.
    The manager and the wrapper client stay the caller's to close.
    """
    if not isinstance(manager, AsyncTokenManager):
        raise ConfigurationError("manager must be a credkeeper.AsyncTokenManager")
    if wrapper is not None and not isinstance(wrapper, AsyncWrapperClient):
        raise ConfigurationError("wrapper must be a credkeeper.AsyncWrapperClient or None")
    if api_keys is not None and not isinstance(api_keys, ApiKeys):
        raise ConfigurationError("api_keys must be a credkeeper.server.ApiKeys or None")
    if type(max_body_bytes) is not int or max_body_bytes < 1:
        raise ConfigurationError(f"max_body_bytes must be an int >= 1, got {max_body_bytes!r}")
    if webhooks is not None and not isinstance(webhooks, Webhooks):
        raise ConfigurationError("webhooks must be a credkeeper.server.Webhooks or None")
    metrics = ServiceMetrics(manager)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(manager.subscribe(metrics.engine))
            if webhooks is not None:
                await webhooks.start()
                stack.push_async_callback(webhooks.aclose)
                stack.callback(manager.subscribe(webhooks))
            if sweep:
                sweeper = AsyncSweeper(manager)
                task = asyncio.ensure_future(sweeper.run_forever(handle_signals=False))
                # Refreshes in flight finish: one cut off would leave its tokens in the journal
                # only. Stopped first, so that its last events still reach the webhooks.
                stack.push_async_callback(asyncio.shield, task)
                stack.callback(sweeper.stop)
            yield

    app = FastAPI(
        title="credkeeper",
        version=__version__,
        description="Fresh OAuth credentials for every user, and Claude Wrapper API calls "
        "made with them: one provider refresh per expiry across the whole fleet.",
        lifespan=lifespan,
    )
    service = _Service(manager, wrapper, api_keys, metrics)
    _handle_errors(app, who=service.who)
    service.route(app)
    # Innermost first. Every one shares the scope, into which the router writes the matched
    # route that MeasureRequests labels with; requests refused for their size are counted too.
    app.add_middleware(_RawPath)
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    app.add_middleware(MeasureRequests, metrics=metrics)
    _declare_schemas(app)
    return app


def _declare_schemas(app: FastAPI) -> None:
    """Put the schemas the routes' answers refer to in the API document FastAPI builds."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        # FastAPI keeps the document it built and answers it from then on: extended once.
        document = build()
        document.setdefault("components", {}).setdefault("schemas", {}).update(_SCHEMAS)
        return document

    # FastAPI's documented way to extend its document: replace the method that builds it.
    app.openapi = openapi  # type: ignore[method-assign]


# -- errors ------------------------------------------------------------------------------


def _problem_response(problem: Problem) -> JSONResponse:
    headers = dict(problem.headers)
    if problem.kind is UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    if problem.kind.status == 503:
        headers.setdefault("Retry-After", str(DEFAULT_RETRY_AFTER))
    return JSONResponse(
        problem_body(problem),
        status_code=problem.kind.status,
        headers=headers,
        media_type=MEDIA_TYPE,
    )


def _handle_errors(app: FastAPI, *, who: Callable[[Request], ApiKey | None]) -> None:
    """Every error the application answers, as problem+json; ``who`` names the API key of a
    request refused before its route ran, for the audit line."""

    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        _log_failure(request, exc, exc.detail)
        return _problem_response(exc)

    async def on_credkeeper(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, CredkeeperError)
        problem = problem_of(exc)
        # The client's detail says little on purpose (see problem_of): the log says what.
        _log_failure(request, problem, f"{type(exc).__name__}: {exc}", exc)
        return _problem_response(problem)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        # Only where and what: pydantic's "input" member would echo what was sent.
        errors = [
            FieldViolation(_field(error.get("loc", ())), str(error.get("msg", "invalid")))
            for error in exc.errors()
        ]
        problem = _invalid(errors)
        _audit_line(request, who(request), problem.kind.status, problem.kind.code)
        return _problem_response(problem)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kinds = {404: ROUTE_NOT_FOUND, 405: METHOD_NOT_ALLOWED}
        kind = kinds.get(exc.status_code) or Kind(exc.status_code, "http_error", "HTTP error")
        return _problem_response(Problem(kind, str(exc.detail), headers=dict(exc.headers or {})))

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(CredkeeperError, on_credkeeper)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)


def _log_failure(
    request: Request, problem: Problem, what: str, exc: BaseException | None = None
) -> None:
    """Log an answer of 500 or more, redacted: a 500 at ERROR with ``exc``'s traceback, a 502
    or 503 at WARNING."""
    status = problem.kind.status
    if status < 500:
        return
    _logger.log(
        logging.ERROR if status == 500 else logging.WARNING,
        "%s %s answered %s %s: %s",
        request.method,
        _template(request),
        status,
        problem.kind.code,
        redact(what),
        exc_info=exc if status == 500 else None,
    )


def _field(location: object) -> str:
    """A pydantic error location as a dotted field, without FastAPI's ``body``/``query``."""
    parts = [str(part) for part in location] if isinstance(location, list | tuple) else []
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts) or "body"


# -- middleware --------------------------------------------------------------------------


class _RawPath(HTTPMiddleware):
    """Route on the path as sent, so that ``%2F`` inside ``{key}`` stays inside that segment.

    ASGI servers hand over the path already decoded, where a key's encoded ``/`` would split
    it in two; routes then decode ``{key}`` themselves (:func:`_decode_key`).
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path")
        if isinstance(raw, bytes):
            scope["path"] = raw.split(b"?", 1)[0].decode("latin-1")
        await self.app(scope, receive, send)


class _BodyLimit(HTTPMiddleware):
    """Refuse a request body above ``limit`` bytes with 413, declared or streamed.

    A declared ``Content-Length`` is refused before anything is read; a chunked body is
    counted as it is read, and the route reading it gets the :class:`Problem`.
    """

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        super().__init__(app)
        self.limit = limit

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = _problem_response(self._too_large())
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._too_large()
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> Problem:
        return Problem(
            BODY_TOO_LARGE, f"the request body is larger than the limit of {self.limit} bytes"
        )


# -- the routes --------------------------------------------------------------------------


def _invalid(errors: list[FieldViolation]) -> Problem:
    """The 422 listing ``errors``. Each reads ``field (message)``: ``field: message`` would
    look like a token's field to the redactor when the field's name holds ``access_token``."""
    listed = "; ".join(f"{error.field} ({error.message})" for error in errors)
    return Problem(VALIDATION_FAILED, f"invalid request: {listed}", errors=errors)


def _decode_key(raw: str) -> str:
    """The credential key of a ``{key}`` path segment, percent-decoded and checked."""
    try:
        key = unquote(raw, errors="strict")
        return check_key(key)
    except (UnicodeDecodeError, ConfigurationError) as exc:
        reason = str(exc) if isinstance(exc, ConfigurationError) else "is not UTF-8 once decoded"
        raise Problem(
            VALIDATION_FAILED,
            f"the key in the path is invalid: {reason}",
            errors=[FieldViolation("key", reason)],
        ) from None


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def _json_object(request: Request, *, required: bool) -> dict[str, Any]:
    """The request body as a JSON object; ``{}`` for an empty optional body."""
    raw = await request.body()
    if not raw.strip():
        if required:
            raise Problem(
                VALIDATION_FAILED,
                "the request needs a JSON object body",
                errors=[FieldViolation("body", "required")],
            )
        return {}
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        raise Problem(
            VALIDATION_FAILED,
            "the request body is not valid JSON",
            errors=[FieldViolation("body", "must be a JSON object")],
        ) from None
    if not isinstance(document, dict):
        raise Problem(
            VALIDATION_FAILED,
            "the request body must be a JSON object",
            errors=[FieldViolation("body", "must be a JSON object")],
        )
    return document


def _body_schema(schema: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body itself."""
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": schema}},
        }
    }


_WRAPPER_CREDENTIALS = {
    "type": "object",
    "required": ["access_token", "refresh_token", "expires_at"],
    "properties": {
        "access_token": {"type": "string"},
        "refresh_token": {"type": "string"},
        "expires_at": {"type": "integer", "description": "milliseconds since the epoch"},
        "scopes": {"type": "array", "items": {"type": "string"}},
        "subscription_type": {"type": ["string", "null"]},
    },
}
_CLAUDE_CODE = {
    "type": "object",
    "required": ["claudeAiOauth"],
    "properties": {
        "claudeAiOauth": {
            "type": "object",
            "required": ["accessToken", "refreshToken", "expiresAt"],
            "properties": {
                "accessToken": {"type": "string"},
                "refreshToken": {"type": "string"},
                "expiresAt": {"type": "integer"},
                "scopes": {"type": "array", "items": {"type": "string"}},
                "subscriptionType": {"type": ["string", "null"]},
            },
        }
    },
}


# What the routes answer, for the API document; refusals are _problems' Problem.
_MOMENT = {"type": ["string", "null"], "format": "date-time"}
_SCHEMAS: dict[str, dict[str, Any]] = {
    "Problem": PROBLEM_SCHEMA,
    "CredentialsAnswer": {
        "type": "object",
        "required": ["oauth_credentials", "expires_in"],
        "properties": {
            "oauth_credentials": _WRAPPER_CREDENTIALS,
            "expires_in": {
                "type": "integer",
                "minimum": 0,
                "description": "seconds the access token stays valid",
            },
        },
    },
    "CredentialState": {
        "type": "object",
        "required": [
            "key",
            "status",
            "expires_at",
            "expires_in",
            "refreshed_at",
            "next_refresh_at",
            "failures",
            "cooldown_until",
            "last_error",
            "scopes",
            "subscription_type",
        ],
        "properties": {
            "key": {"type": "string"},
            "status": {"type": "string", "enum": [status.value for status in Status]},
            "expires_at": {"type": "string", "format": "date-time"},
            "expires_in": {"type": "integer"},
            "refreshed_at": _MOMENT,
            "next_refresh_at": _MOMENT,
            "failures": {"type": "integer", "minimum": 0},
            "cooldown_until": _MOMENT,
            "last_error": {"type": ["string", "null"]},
            "scopes": {"type": "array", "items": {"type": "string"}},
            "subscription_type": {"type": ["string", "null"]},
        },
    },
    "UserPage": {
        "type": "object",
        "required": ["users", "next_cursor"],
        "properties": {
            "users": {"type": "array", "items": {"$ref": "#/components/schemas/CredentialState"}},
            "next_cursor": {"type": ["string", "null"]},
        },
    },
}


def _answer(schema: str, description: str | None = None) -> dict[str, Any]:
    """A JSON answer of one of :data:`_SCHEMAS`, for a route's ``responses``."""
    reference = {"$ref": f"#/components/schemas/{schema}"}
    answer: dict[str, Any] = {"content": {"application/json": {"schema": reference}}}
    if description is not None:
        answer["description"] = description
    return answer


# What a route on one credential may refuse with; one that may refresh, also a login gone
# (409) and the provider's failure (502).
_KEYED = (401, 403, 404, 422, 500, 503)
_REFRESHING = (*_KEYED, 409, 502)


class _Service:
    """The routes' shared state: the manager, the wrapper client and the API keys."""

    def __init__(
        self,
        manager: AsyncTokenManager,
        wrapper: AsyncWrapperClient | None,
        api_keys: ApiKeys | None,
        metrics: ServiceMetrics,
    ) -> None:
        self.manager = manager
        self.wrapper = wrapper
        self.api_keys = api_keys
        self.metrics = metrics

    # -- authentication ------------------------------------------------------------------

    def caller(self, scope: str) -> Callable[..., Awaitable[ApiKey | None]]:
        """A dependency: the API key the request presents, holding ``scope`` and covering
        the request's ``{key}``; ``None`` when the service checks no keys."""

        async def authenticate(
            request: Request,
            bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
        ) -> ApiKey | None:
            if self.api_keys is None:
                return None
            api_key: ApiKey | None = None
            try:
                if bearer is None or bearer.scheme.lower() != "bearer":
                    raise Problem(
                        UNAUTHENTICATED, "send an API key as 'Authorization: Bearer <key>'"
                    )
                api_key = self.api_keys.verify(bearer.credentials)
                if api_key is None:
                    raise Problem(UNAUTHENTICATED, "the API key is unknown or was revoked")
                if not api_key.allows(scope):
                    raise Problem(
                        FORBIDDEN_SCOPE,
                        f"the API key {api_key.name!r} lacks the {scope!r} scope this route needs",
                    )
                raw = request.path_params.get("key")
                if isinstance(raw, str) and not api_key.covers(_decode_key(raw)):
                    raise Problem(
                        FORBIDDEN_TENANT,
                        f"the API key {api_key.name!r} does not cover this credential key",
                    )
            except Problem as refusal:
                # A refused attempt on a credential is as much the audit's business as a read.
                _audit_line(request, api_key, refusal.kind.status, refusal.kind.code)
                raise
            return api_key

        return authenticate

    # -- answers -------------------------------------------------------------------------

    def credentials_answer(self, credentials: Credentials) -> JSONResponse:
        seconds = (credentials.expires_at - self.manager.policy.now()).total_seconds()
        return JSONResponse(
            {
                "oauth_credentials": credentials.to_wrapper(),
                "expires_in": max(0, math.floor(seconds)),
            },
            headers=_NO_STORE,
        )

    def state(self, record: Record) -> dict[str, Any]:
        """A record's state without a token: what an operator needs to act on it."""
        now = self.manager.policy.now()
        due = record.expires_at - self.manager.policy.leeway
        return {
            "key": record.key,
            "status": record.status.value,
            "expires_at": _iso(record.expires_at),
            "expires_in": math.floor((record.expires_at - now).total_seconds()),
            "refreshed_at": _iso(record.refreshed_at),
            "next_refresh_at": _iso(due) if record.status is Status.ACTIVE else None,
            "failures": record.failures,
            "cooldown_until": _iso(record.cooldown_until),
            "last_error": record.last_error and redact(record.last_error),
            "scopes": list(record.scopes),
            "subscription_type": record.subscription_type,
        }

    def who(self, request: Request) -> ApiKey | None:
        """The API key a request presents, if valid: for an audit line written before (or
        without) the route's own authentication."""
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if self.api_keys is None or scheme.lower() != "bearer":
            return None
        return self.api_keys.verify(presented.strip())

    @contextlib.asynccontextmanager
    async def audited(self, request: Request, caller: ApiKey | None) -> AsyncIterator[_Handed]:
        """Write the audit line of a credential route once it has answered or failed. The
        route decodes its key and reads its body inside, so an invalid one is audited too."""
        handed = _Handed()
        status, outcome = 200, "ok"
        try:
            yield handed
            status = handed.status
        except (Problem, CredkeeperError) as exc:
            problem = exc if isinstance(exc, Problem) else problem_of(exc)
            status, outcome = problem.kind.status, problem.kind.code
            raise
        except asyncio.CancelledError:
            # The client went away: nothing was answered (nginx's "client closed request").
            status, outcome = 499, "client_closed"
            raise
        except BaseException:
            status, outcome = 500, "internal_error"
            raise
        finally:
            _audit_line(request, caller, status, outcome, handed.credentials)

    async def record(self, key: str) -> Record:
        record = await self.manager.store.get(key)
        if record is None:
            raise CredentialNotFound(key)
        return record

    # -- routes --------------------------------------------------------------------------

    def route(self, app: FastAPI) -> None:
        manager = self.manager
        read = Depends(self.caller("credentials:read"))
        write = Depends(self.caller("credentials:write"))
        admin = Depends(self.caller("admin"))
        messages_scope = Depends(self.caller("messages"))
        metrics_scope = Depends(self.caller("metrics"))

        @app.get("/healthz", tags=["health"])
        async def healthz() -> dict[str, str]:
            """Liveness: the process answers."""
            return {"status": "ok"}

        @app.get("/readyz", tags=["health"], responses=problem_responses(503))
        async def readyz() -> JSONResponse:
            """Readiness: the store answers and the rescue journal can keep tokens."""
            try:
                await asyncio.wait_for(manager.store.get(_READY_PROBE), _READY_TIMEOUT)
            except (TimeoutError, CredkeeperError) as exc:
                reason = "did not answer in time"
                if not isinstance(exc, TimeoutError):
                    # Answered to anyone: what failed where (hosts, databases, users) is logged.
                    _logger.warning("readiness: the store failed: %s", redact(str(exc)))
                    reason = f"it failed ({type(exc).__name__}); see the service's log"
                raise Problem(
                    STORE_UNAVAILABLE,
                    f"the store is not ready: {reason}",
                    headers={"Retry-After": "5"},
                ) from None
            problems = await asyncio.to_thread(manager.journal.problems)
            if problems:
                raise Problem(NOT_READY, "the rescue journal is not ready: " + "; ".join(problems))
            return JSONResponse({"status": "ready"})

        @app.get(
            "/metrics",
            tags=["health"],
            response_class=Response,
            responses={
                200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
                **problem_responses(401, 403, 500),
            },
        )
        async def prometheus(caller: ApiKey | None = metrics_scope) -> Response:
            """Prometheus metrics: refreshes, provider latency, credentials by status, requests
            by route and status. No label carries a credential key or a token."""
            return Response(await self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

        @app.get(
            "/v1/users/{key}/credentials",
            tags=["credentials"],
            responses={200: _answer("CredentialsAnswer"), **problem_responses(*_REFRESHING)},
        )
        async def get_credentials(
            key: str,
            request: Request,
            min_valid: int | None = Query(
                None,
                ge=0,
                le=MAX_MIN_VALID,
                description="Seconds the access token must stay valid (at most 4 hours: "
                "tokens live about 8).",
            ),
            force: bool = Query(False, description="Refresh now, whatever the expiry."),
            caller: ApiKey | None = read,
        ) -> JSONResponse:
            """Credentials valid for at least the leeway (or ``min_valid``), as the wrapper's
            ``oauth_credentials`` object."""
            async with self.audited(request, caller) as handed:
                name = _decode_key(key)
                if force:
                    credentials = await manager.refresh(name)
                else:
                    credentials = await manager.get(name, min_valid=min_valid)
                handed.credentials = credentials
            return self.credentials_answer(credentials)

        @app.post(
            "/v1/users/{key}/credentials/refresh",
            tags=["credentials"],
            responses={
                200: _answer("CredentialsAnswer"),
                **problem_responses(*_REFRESHING, 413),
            },
            openapi_extra=_body_schema(
                {
                    "type": "object",
                    "properties": {"failed_access_token": {"type": "string"}},
                },
                required=False,
            ),
        )
        async def refresh_credentials(
            key: str, request: Request, caller: ApiKey | None = read
        ) -> JSONResponse:
            """Refresh after the wrapper refused ``failed_access_token``, unless a peer already
            did; without it, refresh now. Answers as the GET."""
            async with self.audited(request, caller) as handed:
                name = _decode_key(key)
                body = await _json_object(request, required=False)
                unknown = sorted(body.keys() - {"failed_access_token"})
                failed = body.get("failed_access_token")
                problems = [FieldViolation(field, "unknown field") for field in unknown]
                if failed is not None and (not isinstance(failed, str) or not failed):
                    problems.append(
                        FieldViolation("failed_access_token", "must be a non-empty string")
                    )
                if problems:
                    raise _invalid(problems)
                handed.credentials = await manager.refresh(name, failed=failed)
            return self.credentials_answer(handed.credentials)

        @app.put(
            "/v1/users/{key}/credentials",
            tags=["credentials"],
            status_code=200,
            responses={
                200: _answer("CredentialState", "The credential was replaced"),
                201: _answer("CredentialState", "A new credential was stored"),
                **problem_responses(401, 403, 413, 422, 500, 503),
            },
            openapi_extra=_body_schema({"oneOf": [_WRAPPER_CREDENTIALS, _CLAUDE_CODE]}),
        )
        async def put_credentials(
            key: str, request: Request, caller: ApiKey | None = write
        ) -> JSONResponse:
            """Store a login: the wrapper's ``oauth_credentials`` object or Claude Code's
            ``{"claudeAiOauth": {...}}``. Answers the state, never a token."""
            async with self.audited(request, caller) as handed:
                name = _decode_key(key)
                body = await _json_object(request, required=True)
                if "claudeAiOauth" in body:
                    credentials = Credentials.from_claude_code(body)
                else:
                    credentials = Credentials.from_wrapper(body)
                created = await manager.put(name, credentials)
                state = self.state(await self.record(name))
                handed.status = 201 if created else 200
            return JSONResponse(state, status_code=handed.status)

        @app.delete(
            "/v1/users/{key}/credentials",
            tags=["credentials"],
            status_code=204,
            responses=problem_responses(*_KEYED),
        )
        async def delete_credentials(
            key: str, request: Request, caller: ApiKey | None = write
        ) -> Response:
            """Delete the credential; 404 when there was none."""
            async with self.audited(request, caller) as handed:
                name = _decode_key(key)
                if not await manager.delete(name):
                    raise CredentialNotFound(name)
                handed.status = 204
            return Response(status_code=204)

        @app.get(
            "/v1/users/{key}",
            tags=["users"],
            responses={200: _answer("CredentialState"), **problem_responses(*_KEYED)},
        )
        async def get_user(key: str, caller: ApiKey | None = admin) -> dict[str, Any]:
            """One credential's state: status, expiry, last refresh, failures; never a token."""
            return self.state(await self.record(_decode_key(key)))

        @app.get(
            "/v1/users",
            tags=["users"],
            responses={200: _answer("UserPage"), **problem_responses(401, 403, 422, 500, 503)},
        )
        async def list_users(
            status: Status | None = Query(None, description="Only credentials in this state."),  # noqa: B008
            limit: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE),
            cursor: str | None = Query(None, description="next_cursor of the previous page."),
            caller: ApiKey | None = admin,
        ) -> dict[str, Any]:
            """Every credential's state, in key order, ``limit`` at a time."""
            after = _read_cursor(cursor)
            keys = sorted([key async for key in manager.store.scan_due(END_OF_TIME)])
            keys = [
                key
                for key in keys
                if (after is None or key > after) and (caller is None or caller.covers(key))
            ]
            users: list[dict[str, Any]] = []
            last: str | None = None
            for start in range(0, len(keys), limit):
                batch = keys[start : start + limit]
                records = await read_records(manager.store, batch)
                for key, record in zip(batch, records, strict=True):
                    last = key
                    if record is None or (status is not None and record.status is not status):
                        continue
                    users.append(self.state(record))
                    if len(users) == limit:
                        break
                if len(users) == limit:
                    break
            more = last is not None and last != keys[-1]
            return {"users": users, "next_cursor": _make_cursor(last) if last and more else None}

        @app.post(
            "/v1/users/{key}/messages",
            tags=["messages"],
            responses={
                200: {
                    "description": "The wrapper's reply; with stream, its events, one a line",
                    "content": {
                        "application/json": {"schema": {"type": "object"}},
                        NDJSON: {"schema": {"type": "string"}},
                    },
                },
                **problem_responses(*_REFRESHING, 413, 429),
            },
            openapi_extra=_body_schema(
                {
                    "type": "object",
                    "required": ["messages"],
                    "properties": {
                        "messages": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "role": {"type": "string", "enum": ["user", "assistant"]},
                                    "content": {"type": "string", "minLength": 1},
                                },
                                "required": ["role", "content"],
                            },
                        },
                        "model": {"type": "string"},
                        "stream": {"type": "boolean"},
                        "session_id": {"type": ["string", "null"]},
                        "thinking": {"type": ["boolean", "null"]},
                        "fallback_model": {"type": ["string", "null"]},
                        "include_files": {"type": "boolean"},
                        "mcp_servers": {"type": ["object", "null"]},
                    },
                }
            ),
        )
        async def messages(
            key: str, request: Request, caller: ApiKey | None = messages_scope
        ) -> Response:
            """The wrapper's ``/v1/messages`` with this user's fresh credentials attached;
            the wrapper's JSON body unchanged. With ``"stream": true``, ``application/x-ndjson``:
            the wrapper's objects one per line as they arrive, a failure after the first line
            as a last ``{"type": "error", "error": {"code", "message"}}`` line."""
            name = _decode_key(key)
            body = await _json_object(request, required=True)
            if "oauth_credentials" in body:
                raise Problem(
                    VALIDATION_FAILED,
                    "the body must not carry oauth_credentials: the service attaches them",
                    errors=[FieldViolation("oauth_credentials", "must be left out")],
                )
            stream = body.pop("stream", False)
            if not isinstance(stream, bool):
                raise Problem(
                    VALIDATION_FAILED,
                    "invalid request: stream: must be true or false",
                    errors=[FieldViolation("stream", "must be true or false")],
                )
            if self.wrapper is None:
                raise Problem(
                    NO_WRAPPER,
                    "the service has no Claude Wrapper API configured (--wrapper-url)",
                    headers={"Retry-After": "60"},
                )
            conversation = body.pop("messages", None)
            unknown = sorted(body.keys() - MESSAGE_OPTIONS)
            if unknown:
                raise _invalid([FieldViolation(field, "unknown field") for field in unknown])
            if not stream:
                message = await self.wrapper.messages.create(name, conversation, **body)
                return JSONResponse(message.raw)
            events = self.wrapper.messages.stream(name, conversation, **body)
            # The first event is awaited here: until then the call may still be refused (no
            # credential, re-auth required, the wrapper's error) with a status of its own, and
            # an auth failure is refreshed and retried before the client has seen a line.
            first = await anext(events)
            # No proxy may hold the lines back (nginx buffers unless told not to).
            headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
            return StreamingResponse(_relay(events, first), media_type=NDJSON, headers=headers)


class _Handed:
    """What a credential route tells its audit line: the credentials handed out, the status."""

    __slots__ = ("credentials", "status")

    def __init__(self) -> None:
        self.credentials: Credentials | None = None
        self.status = 200


# What a bool query parameter takes for true (pydantic's lax mode, which FastAPI uses).
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})

# The credential routes the audit log records, by method and route template.
_AUDITED = {
    ("GET", "/v1/users/{key}/credentials"): "read",
    ("POST", "/v1/users/{key}/credentials/refresh"): "refresh",
    ("PUT", "/v1/users/{key}/credentials"): "write",
    ("DELETE", "/v1/users/{key}/credentials"): "delete",
}


def _audit_line(
    request: Request,
    caller: ApiKey | None,
    status: int,
    outcome: str,
    credentials: Credentials | None = None,
) -> None:
    """The audit line of a request to a credential route; nothing for other routes."""
    template = _template(request)
    action = _AUDITED.get((request.method, template))
    raw = request.path_params.get("key")
    if action is None or not isinstance(raw, str):
        return
    if action == "read" and request.query_params.get("force", "").lower() in _TRUE:
        # Read as the route reads it, for a request refused before the route ran too.
        action = "forced_refresh"
    audit(
        action=action,
        api_key=caller.name if caller is not None else None,
        key=unquote(raw, errors="replace"),
        route=template,
        status=status,
        outcome=outcome,
        credentials=credentials,
    )


def _template(request: Request) -> str:
    """The matched route's template, which names no credential."""
    return getattr(request.scope.get("route"), "path", None) or request.url.path


def _line(event: Event) -> bytes:
    return json.dumps(event.raw, separators=(",", ":"), default=dict).encode() + b"\n"


async def _relay(events: AsyncMessageStream, first: Event) -> AsyncIterator[bytes]:
    """The stream's events as NDJSON lines, each sent as it is read; a failure after the first
    line, when the status is long sent, becomes a last line in the wrapper's own error shape."""
    problem: Problem | None = None
    try:
        yield _line(first)
        async for event in events:
            yield _line(event)
    except CredkeeperError as exc:
        problem = problem_of(exc)
    except Exception:
        _logger.exception("a stream through the service failed after its first line")
        problem = Problem(INTERNAL, "the service failed mid-stream; see the service's log")
    finally:
        # Shielded: a client gone away cancels this generator, and the wrapper's connection
        # must be released all the same.
        with anyio.CancelScope(shield=True):
            await events.aclose()
    if problem is not None:
        # Built here, out of the handler: no frame of the failure stays referenced.
        error = {"code": problem.kind.code, "message": problem_body(problem)["detail"]}
        yield json.dumps({"type": "error", "error": error}, separators=(",", ":")).encode() + b"\n"


_CURSOR = re.compile(r"[A-Za-z0-9_-]+")


def _make_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode("utf-8")).decode("ascii").rstrip("=")


def _read_cursor(cursor: str | None) -> str | None:
    """The last key of the previous page; an unreadable cursor is a 422 naming it."""
    if cursor is None:
        return None
    try:
        if not _CURSOR.fullmatch(cursor):
            # urlsafe_b64decode would drop the other characters, and read "@@" as page one.
            raise ValueError(cursor)
        padded = cursor + "=" * (-len(cursor) % 4)
        return base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeError):
        raise Problem(
            VALIDATION_FAILED,
            "the cursor is not one this service made",
            errors=[FieldViolation("cursor", "must be the next_cursor of a previous page")],
        ) from None
