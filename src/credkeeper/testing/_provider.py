"""``FakeProvider``: a rotating OAuth token endpoint on loopback, faithful to Anthropic's.

It serves ``POST /v1/oauth/token`` over real HTTP the way ``platform.claude.com`` does (see
``wrapper-and-provider.md`` section 3): refresh tokens are single-use and rotate on every refresh,
a reused one gets HTTP 400 ``invalid_grant``, and optional switches reproduce the suspected
family revocation on reuse and the revocation of earlier access tokens. A fault schedule injects
429/5xx answers, timeouts, non-JSON bodies and dropped connections; a latency knob forces
concurrent refreshes into overlapping windows, which is how the races in section 4 happen.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import itertools
import json
import math
import secrets
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qs, unquote_plus

from credkeeper._clock import Clock, SystemClock
from credkeeper._credentials import Credentials
from credkeeper._secret import Secret

from ._http import FakeServer, Reply, Request, check_seconds, check_status, phrase, verbatim

if TYPE_CHECKING:
    from credkeeper._provider import Provider

__all__ = ["AccessTokenState", "FakeProvider", "Fault", "RefreshCall", "RefreshTokenState"]

AccessTokenState = Literal["valid", "expired", "revoked", "unknown"]
RefreshTokenState = Literal["current", "used", "revoked", "unknown"]

TOKEN_PATH = "/v1/oauth/token"
CLAUDE_CODE_CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
MALFORMED_BODY = "<html>upstream error</html>"
_TOKEN_PREFIXES = {"access": "sk-ant-oat01-", "refresh": "sk-ant-ort01-"}

# What a refused request gets: the status, and the description of its outcome, the "error".
_REFUSALS = {
    "invalid_request": (400, "Invalid request format"),
    "invalid_grant": (400, "Refresh token not found or invalid"),
    "unsupported_grant_type": (400, "Grant type not supported"),
    "invalid_client": (401, "Client authentication failed"),
}
_NOT_FOUND = {"type": "error", "error": {"type": "not_found_error", "message": "Not found"}}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


# -- public value types ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """One scheduled misbehaviour of the token endpoint; build it with a classmethod.

    ``consume`` says whether the refresh token is still rotated server-side, as when the provider
    did the work and only the answer got lost: the client then holds a dead token.
    """

    kind: Literal["status", "timeout", "malformed", "drop", "reshape"]
    code: int | None = None
    retry_after: float | str | None = None
    body: str | None = None
    seconds: float = 0.0
    consume: bool = False
    transform: Callable[[dict[str, Any]], object] | None = field(
        default=None, repr=False, compare=False
    )

    @classmethod
    def status(
        cls, code: int, *, retry_after: float | str | None = None, body: str | None = None
    ) -> Fault:
        """Answer with HTTP ``code`` (429, 500, 502, 503, ...) instead of refreshing.

        ``retry_after`` becomes a ``Retry-After`` header (seconds; a string is sent verbatim, for
        HTTP dates). ``body`` replaces the default Anthropic-style JSON error body.
        """
        check_status(code)
        if isinstance(retry_after, int | float) and (
            isinstance(retry_after, bool) or not math.isfinite(retry_after) or retry_after < 0
        ):
            raise ValueError(f"retry_after must be a number of seconds >= 0, got {retry_after!r}")
        return cls(kind="status", code=code, retry_after=retry_after, body=body)

    @classmethod
    def timeout(cls, seconds: float, *, consume: bool = False) -> Fault:
        """Hold the answer ``seconds`` of real time, so a client with a shorter timeout gives up.

        With ``consume`` the token is rotated when the request arrives and the normal answer is
        sent after the delay; without it nothing changes server-side and the late answer is a 504.
        """
        return cls(kind="timeout", seconds=check_seconds(seconds), consume=consume)

    @classmethod
    def malformed(cls, *, consume: bool = False) -> Fault:
        """Answer 200 with a body that is not JSON (``<html>upstream error</html>``)."""
        return cls(kind="malformed", consume=consume)

    @classmethod
    def drop(cls, *, consume: bool = False) -> Fault:
        """Close the connection without sending any response."""
        return cls(kind="drop", consume=consume)

    @classmethod
    def reshape(cls, transform: Callable[[dict[str, Any]], object]) -> Fault:
        """Refresh as usual (the token rotates), then answer 200 with ``transform(answer)``.

        ``transform`` gets the normal JSON answer and returns the body to send: a ``str`` as
        it is, anything else as JSON (a lone surrogate escaped, as JSON allows). For answers a
        client cannot read although they carry the new tokens: nested, renamed, a token in a
        list, an access token missing.
        """
        if not callable(transform):
            raise TypeError(f"transform must be callable, not {type(transform).__name__}")
        return cls(kind="reshape", transform=transform)

    @property
    def label(self) -> str:
        """The outcome recorded for a request this fault answered: ``fault:<code|kind>``."""
        return f"fault:{self.code if self.kind == 'status' else self.kind}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshCall:
    """One request to the token endpoint, as the fake saw it.

    ``outcome`` is ``"ok"``, ``"invalid_grant"``, ``"invalid_request"``,
    ``"unsupported_grant_type"``, ``"invalid_client"`` or ``"fault:<code|timeout|malformed|drop>"``.
    ``family`` names the token family of the presented refresh token (``None`` when unknown) and
    ``rotated`` says whether this request consumed it. The presented token itself is kept as a
    :class:`~credkeeper.Secret` and never appears in ``repr``; client secrets are not kept at all.
    """

    at: datetime
    outcome: str
    family: str | None = None
    rotated: bool = False
    refresh_token: Secret | None = field(default=None, repr=False)
    client_id: str | None = None
    client_auth: Literal["none", "client_secret_post", "client_secret_basic"] = "none"
    body_format: Literal["json", "form", "unknown"] = "unknown"
    scope: str | None = None
    user_agent: str | None = None


# -- internal state ----------------------------------------------------------------------


@dataclass(slots=True)
class _AccessToken:
    family: str
    expires_at: datetime
    revoked: bool = False


@dataclass(slots=True)
class _RefreshToken:
    family: str
    state: Literal["current", "used", "revoked"] = "current"


@dataclass(slots=True, kw_only=True)
class _Family:
    name: str
    scopes: tuple[str, ...]
    subscription_type: str | None
    account: dict[str, str]
    organization: dict[str, str]
    access_tokens: list[str] = field(default_factory=list)
    refresh_token: str = ""

    @property
    def access_token(self) -> str:
        return self.access_tokens[-1]


@dataclass(frozen=True, slots=True, kw_only=True)
class _TokenRequest:
    params: dict[str, str] | None
    body_format: Literal["json", "form", "unknown"]
    basic: tuple[str, str] | None
    basic_malformed: bool
    user_agent: str | None

    @classmethod
    def parse(cls, request: Request) -> _TokenRequest:
        headers, body = request.headers, request.body
        content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        body_format: Literal["json", "form", "unknown"] = "unknown"
        if content_type == "application/json" or content_type.endswith("+json"):
            body_format = "json"
        elif content_type == "application/x-www-form-urlencoded":
            body_format = "form"
        parse = {"json": _parse_json, "form": _parse_form}.get(body_format)
        params = None if parse is None or body is None else parse(body)
        scheme, _, credentials = (headers.get("Authorization") or "").partition(" ")
        basic = _parse_basic(credentials.strip()) if scheme.lower() == "basic" else None
        return cls(
            params=params,
            body_format=body_format,
            basic=basic,
            basic_malformed=basic is None and scheme.lower() == "basic",
            user_agent=headers.get("User-Agent"),
        )

    @property
    def refresh_token(self) -> str | None:
        return None if self.params is None else self.params.get("refresh_token")

    @property
    def client_auth(self) -> Literal["none", "client_secret_post", "client_secret_basic"]:
        if self.basic is not None or self.basic_malformed:
            return "client_secret_basic"
        if self.params is not None and "client_secret" in self.params:
            return "client_secret_post"
        return "none"

    @property
    def client_id(self) -> str | None:
        if self.basic is not None:
            return self.basic[0]
        return None if self.params is None else self.params.get("client_id")


def _json_reply(status: int, document: object, *headers: tuple[str, str]) -> Reply:
    no_store = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))
    return Reply(status, json.dumps(document).encode(), headers=no_store + headers)


def _fault_body(code: int) -> object:
    error_type = _ERROR_TYPES.get(code, "api_error")
    return {"type": "error", "error": {"type": error_type, "message": phrase(code)}}


def _token_value(token: object, part: Literal["access", "refresh"] | None = None) -> str:
    """The token in clear; with ``part``, credentials give their access or refresh token."""
    if part is not None and isinstance(token, Credentials):
        token = token.access_token if part == "access" else token.refresh_token
    if isinstance(token, Secret):
        return token.get_secret_value()
    if isinstance(token, str):
        return token
    raise TypeError(f"expected a token string or Secret, not {type(token).__name__}")


# -- request parsing ---------------------------------------------------------------------


def _parse_json(body: bytes) -> dict[str, str] | None:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(document, dict):
        return None
    params: dict[str, str] = {}
    for key, value in document.items():
        if isinstance(value, str):
            params[key] = value
        elif key in ("grant_type", "refresh_token", "client_id", "client_secret", "scope"):
            return None
    return params


def _parse_form(body: bytes) -> dict[str, str] | None:
    try:
        text = body.decode("ascii")
        parsed = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text))
    except (UnicodeDecodeError, ValueError):
        return None
    # RFC 6749 section 3.2: parameters must not be repeated.
    if any(len(values) != 1 for values in parsed.values()):
        return None
    return {key: values[0] for key, values in parsed.items()}


def _parse_basic(credentials: str) -> tuple[str, str] | None:
    try:
        decoded = base64.b64decode(credentials, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, colon, client_secret = decoded.partition(":")
    if not colon:
        return None
    # RFC 6749 section 2.3.1: both parts are form-encoded before base64.
    return unquote_plus(client_id), unquote_plus(client_secret)


# -- the fake ----------------------------------------------------------------------------


class FakeProvider(FakeServer[Fault, RefreshCall]):
    """An OAuth token endpoint with rotating, single-use refresh tokens, on ``127.0.0.1``.

    Start it with :meth:`start` or a ``with`` block, mint credentials with :meth:`issue`, point a
    client at :attr:`token_url`, and read what happened from :attr:`refresh_calls`,
    :meth:`access_token_state` and :meth:`refresh_token_state`. ``latency`` real seconds pass
    before each refresh request is checked, so concurrent refreshes overlap; ``clock`` decides
    issue times and access-token expiry. ``mint`` makes each new token, given ``"access"`` or
    ``"refresh"`` (default: ``sk-ant-oat01-``/``sk-ant-ort01-`` and 64 random characters), for
    tokens of other providers' shapes. Tokens are never printed, logged or shown in ``repr``.
    :meth:`handler` answers the same requests in-process, for ``httpx.MockTransport``.
    """

    _fault_type = Fault
    _max_body = 1 << 20

    def __init__(
        self,
        *,
        latency: float = 0.0,
        access_token_lifetime: float = 28800.0,
        clock: Clock | None = None,
        revoke_family_on_reuse: bool = False,
        revoke_previous_access_tokens: bool = False,
        client_id: str = CLAUDE_CODE_CLIENT_ID,
        require_client_id: bool = True,
        client_secret: str | None = None,
        scope: str = "user:inference user:profile user:sessions:claude_code",
        mint: Callable[[Literal["access", "refresh"]], str] | None = None,
    ) -> None:
        if not math.isfinite(latency) or latency < 0:
            raise ValueError(f"latency must be a number of seconds >= 0, got {latency!r}")
        if not math.isfinite(access_token_lifetime) or access_token_lifetime <= 0:
            raise ValueError(
                f"access_token_lifetime must be a positive number of seconds, "
                f"got {access_token_lifetime!r}"
            )
        self.latency = float(latency)
        self.access_token_lifetime = float(access_token_lifetime)
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.revoke_family_on_reuse = revoke_family_on_reuse
        self.revoke_previous_access_tokens = revoke_previous_access_tokens
        self.client_id = client_id
        self.require_client_id = require_client_id
        self._client_secret = client_secret
        self.scope = scope
        self._mint = mint

        super().__init__()
        self._families: dict[str, _Family] = {}
        self._access: dict[str, _AccessToken] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._family_numbers = itertools.count(1)
        self._in_flight = 0
        self._max_in_flight = 0

    def __repr__(self) -> str:
        return (
            f"FakeProvider(url={self._url_or_none()!r}, refresh_count={self.refresh_count}, "
            f"calls={self._count()}, families={len(self._families)})"
        )

    @property
    def token_url(self) -> str:
        """The token endpoint, ``url + "/v1/oauth/token"``."""
        return self.url + TOKEN_PATH

    def provider(self, **overrides: Any) -> Provider:
        """A Claude Code :class:`~credkeeper.Provider` profile pointed at this fake."""
        from credkeeper._provider import Provider  # noqa: PLC0415

        return Provider.claude_code(token_url=self.token_url, **overrides)

    # -- log -----------------------------------------------------------------------------

    @property
    def refresh_calls(self) -> list[RefreshCall]:
        """A snapshot of every token-endpoint request handled, in the order they were decided."""
        return self._logged()

    @property
    def refresh_count(self) -> int:
        """How many refreshes succeeded (outcome ``"ok"``)."""
        return self._count(lambda call: call.outcome == "ok")

    @property
    def max_in_flight(self) -> int:
        """The most refresh requests being handled at the same time since start or reset_log()."""
        with self._lock:
            return self._max_in_flight

    def reset_log(self) -> None:
        """Forget :attr:`refresh_calls` and :attr:`max_in_flight`; tokens and faults stay."""
        with self._lock:
            self._calls.clear()
            self._max_in_flight = self._in_flight

    # -- tokens --------------------------------------------------------------------------

    def issue(
        self,
        *,
        expires_in: float | None = None,
        expires_at: datetime | None = None,
        scopes: Iterable[str] = ("user:inference", "user:profile"),
        subscription_type: str | None = "max",
    ) -> Credentials:
        """Mint a new token family, as a login would, and return its credentials.

        The access token expires ``expires_in`` seconds from the provider's clock (default: the
        access-token lifetime; negative gives an already expired token), or at ``expires_at``.
        """
        if expires_in is not None and expires_at is not None:
            raise ValueError("pass expires_in or expires_at, not both")
        now = self.clock.now()
        if expires_at is not None:
            if expires_at.tzinfo is None or expires_at.utcoffset() is None:
                raise ValueError(
                    "expires_at is a naive datetime; pass an aware one, "
                    "e.g. datetime(2026, 1, 1, 8, tzinfo=timezone.utc)"
                )
            expiry = expires_at.astimezone(UTC)
        else:
            seconds = self.access_token_lifetime if expires_in is None else expires_in
            if not math.isfinite(seconds):
                raise ValueError(f"expires_in must be a finite number of seconds, got {seconds!r}")
            expiry = now + timedelta(seconds=seconds)
        scope_tuple = (scopes,) if isinstance(scopes, str) else tuple(scopes)
        with self._lock:
            number = next(self._family_numbers)
            family = _Family(
                name=f"family-{number}",
                scopes=scope_tuple,
                subscription_type=subscription_type,
                account={"uuid": str(uuid.uuid4()), "email_address": f"user{number}@example.com"},
                organization={"uuid": str(uuid.uuid4()), "name": f"Example Org {number}"},
            )
            self._mint_locked(family, expiry)
            self._families[family.name] = family
            return self._credentials_locked(family)

    def rotate(self, refresh_token: str | Secret | Credentials) -> Credentials | None:
        """Refresh in-process, as another client of the same account would; log it as a call.

        Returns the new credentials, or ``None`` when the token is refused (``invalid_grant``,
        with the same family revocation as over HTTP). For fakes that consume tokens behind the
        client's back, like the wrapper's CLI refreshing by itself.
        """
        token = _token_value(refresh_token, "refresh")
        with self._lock:
            outcome, family = self._grant_locked(token)
            self._record_locked(
                RefreshCall(
                    at=self.clock.now(),
                    outcome=outcome,
                    family=family,
                    rotated=outcome == "ok",
                    refresh_token=Secret(token),
                )
            )
            if outcome != "ok" or family is None:
                return None
            return self._credentials_locked(self._families[family])

    def access_token_state(self, token: str | Secret) -> AccessTokenState:
        """An access token's state here: ``valid``, ``expired``, ``revoked`` or ``unknown``.

        Expiry is judged by the provider's clock, so a :class:`FakeClock` can age a token.
        """
        value = _token_value(token)
        now = self.clock.now()
        with self._lock:
            entry = self._access.get(value)
            if entry is None:
                return "unknown"
            if entry.revoked:
                return "revoked"
            return "expired" if now >= entry.expires_at else "valid"

    def refresh_token_state(self, token: str | Secret) -> RefreshTokenState:
        """A refresh token's state: ``current`` (usable once), ``used``, ``revoked`` or ``unknown``.

        A token is ``used`` once it has been refreshed with, ``revoked`` with its family.
        """
        value = _token_value(token)
        with self._lock:
            entry = self._refresh.get(value)
            return "unknown" if entry is None else entry.state

    def family_of(self, token: str | Secret | Credentials) -> str | None:
        """The family name of an access or refresh token this fake issued, else ``None``."""
        value = _token_value(token, "access")
        with self._lock:
            return self._family_of_locked(value)

    def revoke(self, token: str | Secret | Credentials) -> None:
        """Revoke the whole family of a token: its current refresh token and every access token.

        ``token`` is an access or refresh token, or credentials; one this fake never issued is
        a ``KeyError``.
        """
        value = _token_value(token, "refresh")
        with self._lock:
            name = self._family_of_locked(value)
            if name is None:
                raise KeyError("the token is not one this FakeProvider issued")
            self._revoke_family_locked(self._families[name])

    def revoke_access_token(self, token: str | Secret | Credentials) -> None:
        """Revoke one access token and nothing else: its refresh token still works.

        What a server-side session reset or #58066's suspected revocation looks like to a
        client: the wrapper refuses the token before its ``expires_at``. One this fake never
        issued is a ``KeyError``.
        """
        value = _token_value(token, "access")
        with self._lock:
            entry = self._access.get(value)
            if entry is None:
                raise KeyError("the token is not an access token this FakeProvider issued")
            entry.revoked = True

    def all_tokens(self) -> set[str]:
        """Every access and refresh token this fake ever issued, in clear.

        For leak tests: search logs, reprs and files for each of them.
        """
        with self._lock:
            return set(self._access) | set(self._refresh)

    def current_credentials(self, family: str) -> Credentials:
        """The latest credentials of ``family``, whatever their state."""
        with self._lock:
            try:
                entry = self._families[family]
            except KeyError:
                raise KeyError(f"no token family named {family!r}") from None
            return self._credentials_locked(entry)

    # -- request handling ----------------------------------------------------------------

    def _respond(self, request: Request) -> Reply | None:
        if request.method == "POST" and request.path == TOKEN_PATH:
            return self._serve_token(request)
        return _json_reply(404, _NOT_FOUND)

    def _serve_token(self, raw: Request) -> Reply | None:
        request = _TokenRequest.parse(raw)
        fault = self._take_fault()
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            if self.latency and raw.wait(self.latency):
                return None
            if fault is None:
                return self._answer(request, None)
            if fault.kind == "reshape":
                return _reshaped(self._answer(request, fault.label), fault)
            if fault.consume:
                reply = self._answer(request, fault.label)
            else:
                with self._lock:
                    family = self._family_of_locked(request.refresh_token)
                    self._log_locked(request, fault.label, family, rotated=False)
                reply = _json_reply(504, _fault_body(504))
            if fault.kind == "status":
                return _status_reply(fault)
            if fault.kind == "timeout":
                return None if raw.wait(fault.seconds) else reply
            return verbatim(200, MALFORMED_BODY) if fault.kind == "malformed" else None
        finally:
            with self._lock:
                self._in_flight -= 1

    def _answer(self, request: _TokenRequest, label: str | None) -> Reply:
        """Validate, rotate when the grant is good, log (as ``label`` if given), and answer."""
        with self._lock:
            outcome, family = self._decide_locked(request)
            self._log_locked(request, label or outcome, family, rotated=outcome == "ok")
            if outcome != "ok" or family is None:
                status, description = _REFUSALS[outcome]
                # RFC 6749 section 5.2: a client that tried the Authorization header is challenged.
                basic = status == 401 and request.client_auth == "client_secret_basic"
                challenge = (("WWW-Authenticate", 'Basic realm="fake-provider"'),) if basic else ()
                document = {"error": outcome, "error_description": description}
                return _json_reply(status, document, *challenge)
            entry = self._families[family]
            return _json_reply(
                200,
                {
                    "access_token": entry.access_token,
                    "refresh_token": entry.refresh_token,
                    "expires_in": int(self.access_token_lifetime),
                    "scope": self.scope,
                    "token_type": "Bearer",
                    "account": dict(entry.account),
                    "organization": dict(entry.organization),
                },
            )

    def _decide_locked(self, request: _TokenRequest) -> tuple[str, str | None]:
        """The outcome of a token request, rotating on a good grant, and the token's family."""
        params, basic = request.params, request.basic
        if params is None:
            return "invalid_request", None
        family = self._family_of_locked(request.refresh_token)
        if request.basic_malformed:
            return "invalid_client", family
        if basic is not None and "client_secret" in params:
            # RFC 6749 section 2.3: a client must not use more than one auth method.
            return "invalid_request", family
        if basic is not None and params.get("client_id", basic[0]) != basic[0]:
            return "invalid_client", family
        if self._client_secret is not None:
            presented = basic[1] if basic else params.get("client_secret")
            if presented is None or not hmac.compare_digest(
                presented.encode(), self._client_secret.encode()
            ):
                return "invalid_client", family
        grant_type, token = params.get("grant_type"), params.get("refresh_token")
        if grant_type and grant_type != "refresh_token":
            return "unsupported_grant_type", family
        if not grant_type or not token:
            return "invalid_request", family
        if self.require_client_id and request.client_id != self.client_id:
            return "invalid_request", family
        return self._grant_locked(token)

    def _grant_locked(self, token: str) -> tuple[str, str | None]:
        """Consume ``token`` if it is current; return the outcome and its family."""
        entry = self._refresh.get(token)
        if entry is None:
            return "invalid_grant", None
        family = self._families[entry.family]
        if entry.state != "current":
            if entry.state == "used" and self.revoke_family_on_reuse:
                self._revoke_family_locked(family)
            return "invalid_grant", family.name
        entry.state = "used"
        if self.revoke_previous_access_tokens:
            for access in family.access_tokens:
                self._access[access].revoked = True
        self._mint_locked(family, self.clock.now() + timedelta(seconds=self.access_token_lifetime))
        family.scopes = tuple(self.scope.split())
        return "ok", family.name

    def _mint_locked(self, family: _Family, expiry: datetime) -> None:
        """Give ``family`` a new access token, expiring at ``expiry``, and refresh token."""
        access, refresh = self._new_token("access"), self._new_token("refresh")
        self._access[access] = _AccessToken(family.name, expiry)
        self._refresh[refresh] = _RefreshToken(family.name)
        family.access_tokens.append(access)
        family.refresh_token = refresh

    def _revoke_family_locked(self, family: _Family) -> None:
        current = self._refresh[family.refresh_token]
        if current.state == "current":
            current.state = "revoked"
        for access in family.access_tokens:
            self._access[access].revoked = True

    def _family_of_locked(self, token: str | None) -> str | None:
        if token is None:
            return None
        entry = self._refresh.get(token) or self._access.get(token)
        return None if entry is None else entry.family

    def _log_locked(
        self, request: _TokenRequest, outcome: str, family: str | None, *, rotated: bool
    ) -> None:
        presented = request.refresh_token
        params = request.params or {}
        self._record_locked(
            RefreshCall(
                at=self.clock.now(),
                outcome=outcome,
                family=family,
                rotated=rotated,
                refresh_token=Secret(presented) if presented is not None else None,
                client_id=request.client_id,
                client_auth=request.client_auth,
                body_format=request.body_format,
                scope=params.get("scope"),
                user_agent=request.user_agent,
            )
        )

    def _credentials_locked(self, family: _Family) -> Credentials:
        return Credentials(
            access_token=family.access_token,
            refresh_token=family.refresh_token,
            expires_at=self._access[family.access_token].expires_at,
            scopes=family.scopes,
            subscription_type=family.subscription_type,
        )

    def _new_token(self, kind: Literal["access", "refresh"]) -> str:
        if self._mint is None:
            return _TOKEN_PREFIXES[kind] + secrets.token_urlsafe(48)
        token = self._mint(kind)
        if not isinstance(token, str) or not token:
            raise TypeError(f"mint must return a non-empty str, not {type(token).__name__}")
        return token


def _reshaped(reply: Reply, fault: Fault) -> Reply:
    """A reshape fault's answer: the normal one through ``fault.transform``, if it refreshed."""
    if reply.status != 200 or fault.transform is None:
        return reply
    shaped = fault.transform(json.loads(reply.body))
    body = shaped if isinstance(shaped, str) else json.dumps(shaped)
    return verbatim(200, body, reply.headers)


def _status_reply(fault: Fault) -> Reply:
    """A status fault's answer: Anthropic's JSON error, or the fault's own body."""
    assert fault.code is not None
    headers: tuple[tuple[str, str], ...] = ()
    if isinstance(fault.retry_after, str):
        headers = (("Retry-After", fault.retry_after),)
    elif fault.retry_after is not None:
        value = fault.retry_after
        headers = (("Retry-After", str(int(value)) if value == int(value) else str(value)),)
    if fault.body is not None:
        return verbatim(fault.code, fault.body, headers)
    return _json_reply(fault.code, _fault_body(fault.code), *headers)
