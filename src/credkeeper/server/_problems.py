"""The service's errors as RFC 9457 ``application/problem+json``, decided in one table.

Every exception credkeeper raises maps to one :class:`Kind` (an HTTP status, a stable ``code``
and a title) in :data:`TABLE`, most specific class first, as the command line's exit codes do.
What the service refuses by itself (no API key, a missing scope, a body too large) is a
:class:`Problem` raised with its kind. Every ``detail`` goes through the redactor: credkeeper's
messages hold no token by construction, and a masked token-shaped string costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from credkeeper._exceptions import (
    AuthFailed,
    ConfigurationError,
    CredentialNotFound,
    CredentialsError,
    CredkeeperError,
    DecryptionError,
    FieldViolation,
    InvalidGrant,
    InvalidKey,
    InvalidRequest,
    ProviderError,
    ProviderUnavailable,
    ReauthRequired,
    RefreshTimeout,
    StoreCorrupted,
    StoreError,
    StoreUnavailable,
    UsageLimitReached,
    WrapperError,
    WrapperUnavailable,
)
from credkeeper._redact import Redactor

__all__ = [
    "KINDS",
    "MEDIA_TYPE",
    "PROBLEM_SCHEMA",
    "TABLE",
    "Kind",
    "Problem",
    "kind_of",
    "problem_body",
    "problem_of",
    "problem_responses",
    "redact",
]

MEDIA_TYPE = "application/problem+json"
# When an unavailable dependency gave no delay of its own: long enough for a store failover or
# a provider's hiccup, short enough that a client does not give up on a healthy service.
DEFAULT_RETRY_AFTER = 5


@dataclass(frozen=True, slots=True)
class Kind:
    """One row of the table: what a client sees for one kind of failure."""

    status: int
    code: str
    title: str

    @property
    def type(self) -> str:
        """The problem's ``type`` URI; stable, one per ``code``."""
        return f"urn:credkeeper:problem:{self.code}"


UNAUTHENTICATED = Kind(401, "unauthenticated", "A valid API key is required")
FORBIDDEN_SCOPE = Kind(403, "forbidden_scope", "The API key lacks the scope this route needs")
FORBIDDEN_TENANT = Kind(403, "forbidden_tenant", "The API key does not cover this credential")
CREDENTIAL_NOT_FOUND = Kind(404, "credential_not_found", "No credential is stored under the key")
ROUTE_NOT_FOUND = Kind(404, "not_found", "No such route")
METHOD_NOT_ALLOWED = Kind(405, "method_not_allowed", "The route does not take this method")
REAUTH_REQUIRED = Kind(409, "reauth_required", "The user must log in again")
BODY_TOO_LARGE = Kind(413, "body_too_large", "The request body is too large")
VALIDATION_FAILED = Kind(422, "validation_failed", "The request is invalid")
USAGE_LIMIT = Kind(429, "usage_limit_reached", "The account reached a usage limit")
INTERNAL = Kind(500, "internal_error", "The service failed")
WRAPPER_ERROR = Kind(502, "wrapper_error", "The Claude Wrapper API answered with an error")
NO_WRAPPER = Kind(503, "no_wrapper", "No Claude Wrapper API is configured")
NOT_READY = Kind(503, "not_ready", "The service cannot serve requests now")
STORE_UNAVAILABLE = Kind(503, "store_unavailable", "The credential store is unavailable")
PROVIDER_UNAVAILABLE = Kind(503, "provider_unavailable", "The token endpoint is unavailable")

#: Exception class to kind, most specific first: InvalidRequest is also a WrapperError,
#: StoreContention a StoreUnavailable, CredentialNotFound a KeyError.
TABLE: tuple[tuple[type[CredkeeperError], Kind], ...] = (
    (CredentialNotFound, CREDENTIAL_NOT_FOUND),
    (ReauthRequired, REAUTH_REQUIRED),
    # The flow turns a refused refresh token into ReauthRequired; one escaping as such means
    # the same thing to the client.
    (InvalidGrant, REAUTH_REQUIRED),
    (StoreUnavailable, STORE_UNAVAILABLE),
    (RefreshTimeout, Kind(503, "refresh_timeout", "Another worker's refresh did not finish")),
    (StoreCorrupted, Kind(500, "store_corrupted", "The stored record is damaged")),
    (StoreError, Kind(500, "store_error", "The credential store failed")),
    (DecryptionError, Kind(500, "decryption_failed", "The stored tokens cannot be opened")),
    (ProviderUnavailable, PROVIDER_UNAVAILABLE),
    (ProviderError, Kind(502, "provider_error", "The token endpoint answered an error")),
    (InvalidRequest, VALIDATION_FAILED),
    (UsageLimitReached, USAGE_LIMIT),
    (AuthFailed, Kind(502, "wrapper_auth_failed", "The wrapper refused fresh credentials")),
    (WrapperUnavailable, Kind(502, "wrapper_unavailable", "The wrapper is unavailable")),
    (WrapperError, WRAPPER_ERROR),
    (CredentialsError, VALIDATION_FAILED),
    # A key the store cannot hold is the caller's; any other ConfigurationError is the
    # deployment's (a table missing, a privilege revoked).
    (InvalidKey, VALIDATION_FAILED),
    (ConfigurationError, Kind(500, "configuration_error", "The service is misconfigured")),
    (CredkeeperError, INTERNAL),
)

#: Every kind the service answers with: those of its own refusals, then the table's.
KINDS: tuple[Kind, ...] = tuple(
    dict.fromkeys(
        (
            UNAUTHENTICATED,
            FORBIDDEN_SCOPE,
            FORBIDDEN_TENANT,
            ROUTE_NOT_FOUND,
            METHOD_NOT_ALLOWED,
            BODY_TOO_LARGE,
            NO_WRAPPER,
            NOT_READY,
            *(kind for _, kind in TABLE),
        )
    )
)

#: What :func:`problem_body` answers, as JSON Schema for the API document.
PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}

# Headers some answers always carry (a 401's challenge) or may carry (a 503's delay).
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    503: {"Retry-After": {"schema": {"type": "string"}}},
}

_REDACTOR = Redactor()


def redact(text: str) -> str:
    """``text`` without anything token-shaped, for a problem's detail or the service's log."""
    return _REDACTOR.redact(text)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's ``responses`` for the API document: each of ``statuses`` as problem+json,
    described by the codes of :data:`KINDS` with that status."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        codes = sorted(kind.code for kind in KINDS if kind.status == status)
        if not codes:
            raise ValueError(f"no kind of problem has status {status}")
        response: dict[str, Any] = {
            "description": ", ".join(codes),
            "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        if status in _HEADERS:
            response["headers"] = _HEADERS[status]
        responses[status] = response
    return responses


class Problem(Exception):
    """A refusal of the service's own, raised in a route and answered as problem+json.

    ``errors`` lists the offending fields for a 422; ``headers`` are added to the answer.
    """

    def __init__(
        self,
        kind: Kind,
        detail: str,
        *,
        errors: Sequence[FieldViolation] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.errors = tuple(errors)
        self.headers = dict(headers or {})


def kind_of(exc: CredkeeperError) -> Kind:
    """The table's kind for ``exc``."""
    for cls, kind in TABLE:
        if isinstance(exc, cls):
            return kind
    return INTERNAL  # pragma: no cover - the table ends with CredkeeperError


def problem_of(exc: CredkeeperError) -> Problem:
    """``exc`` as the :class:`Problem` the client is answered with."""
    kind = kind_of(exc)
    errors: tuple[FieldViolation, ...] = ()
    headers: dict[str, str] = {}
    if isinstance(exc, InvalidRequest):
        errors = exc.errors
    elif isinstance(exc, CredentialsError):
        errors = (FieldViolation(exc.field or "body", str(exc)),)
    if kind.status == 503:
        delay = exc.retry_after if isinstance(exc, ProviderUnavailable) else None
        headers["Retry-After"] = str(
            DEFAULT_RETRY_AFTER if delay is None else max(1, math.ceil(delay))
        )
    detail = str(exc)
    if isinstance(exc, CredentialNotFound):
        # The library's text names put(); an HTTP caller stores a login with PUT.
        detail = (
            f"no credential is stored under key {exc.key!r}; "
            "store one with PUT /v1/users/{key}/credentials"
        )
    if kind.status == 500:
        # The text is for the operator's log, not the client: it can name hosts, databases
        # and users, and the client can do nothing about it.
        detail = f"the service failed ({type(exc).__name__}); see the service's log"
    return Problem(kind, detail, errors=errors, headers=headers)


def problem_body(problem: Problem, *, instance: str | None = None) -> dict[str, Any]:
    """The RFC 9457 document for ``problem``; its texts redacted."""
    kind = problem.kind
    body: dict[str, Any] = {
        "type": kind.type,
        "title": kind.title,
        "status": kind.status,
        "detail": _REDACTOR.redact(problem.detail),
        "code": kind.code,
    }
    if instance is not None:
        body["instance"] = instance
    if problem.errors:
        body["errors"] = [
            {"field": error.field, "message": _REDACTOR.redact(error.message)}
            for error in problem.errors
        ]
    return body
