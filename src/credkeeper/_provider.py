"""``Provider``: how to ask an OAuth token endpoint for a refresh, and how to read its answer.

A provider builds requests and classifies responses; it never sends anything itself. The engine's
drivers send, so the same provider serves the sync and the async manager.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import parse_qsl, quote

import httpx

from ._credentials import Credentials
from ._exceptions import (
    ConfigurationError,
    CredentialsError,
    InvalidGrant,
    ProviderError,
    ProviderUnavailable,
)
from ._redact import Redactor, sealed
from ._secret import Secret
from ._urls import secure_url

__all__ = [
    "CLAUDE_CODE_CLIENT_ID",
    "CLAUDE_CODE_SCOPE",
    "CLAUDE_CODE_TOKEN_URL",
    "SETTING_PROFILES",
    "WRAPPER_GUIDE_TOKEN_URL",
    "Provider",
]

CLAUDE_CODE_TOKEN_URL = "https://platform.claude.com/v1/oauth/token"  # noqa: S105 - a URL
CLAUDE_CODE_CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
CLAUDE_CODE_SCOPE = (
    "user:profile user:inference user:sessions:claude_code user:mcp_servers user:file_upload"
)
WRAPPER_GUIDE_TOKEN_URL = "https://api.claude.ai/api/auth/oauth/token"  # noqa: S105 - a URL

# platform.claude.com is reported to answer 429 to clients whose User-Agent does not start
# with "claude-cli/"; the profile says who it really is after that prefix.
_CLAUDE_CODE_USER_AGENT = "claude-cli/2.0.34 (external, credkeeper)"

AuthMethod = Literal["none", "client_secret_post", "client_secret_basic"]
BodyFormat = Literal["form", "json"]

#: The profiles a provider setting names, and the URL query options each of them takes.
SETTING_PROFILES: Mapping[str, tuple[str, ...]] = {
    "claude-code": ("client_id", "scope", "timeout"),
    "wrapper-guide": ("timeout",),
    "oauth2": ("client_id", "scope", "auth_method", "body_format", "timeout"),
}
_SETTING_EXAMPLE = "oauth2+https://auth.example.com/oauth/token?client_id=ID"
_SECRET_METHODS = ("client_secret_post", "client_secret_basic")

_RETRYABLE = frozenset({408, 425, 429})
# A Retry-After beyond a day is a broken header, not a plan; it would overflow datetimes too.
_MAX_RETRY_AFTER = 86400.0


def _retry_after(response: httpx.Response, now: datetime) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), _MAX_RETRY_AFTER)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return min(max(0.0, (moment - now).total_seconds()), _MAX_RETRY_AFTER)


class SalvagedAnswer(ProviderError):
    """A 2xx answer that cannot be used whole but whose new tokens must be kept.

    ``credentials`` hold the answer's tokens (or, when its access token is unusable, the
    previous one), due at once (``expires_at`` is the time of the answer), so the next call
    refreshes with the new refresh token. Private: the engine stores them like any answer, then
    raises a plain :class:`ProviderError` to its caller, since it cannot say how long they live
    (a caller handing the wrapper an ``expires_at`` of now would have its CLI refresh by itself).
    """

    def __init__(
        self, message: str, *, status: int, excerpt: str, credentials: Credentials
    ) -> None:
        super().__init__(message, status=status, excerpt=excerpt)
        self.credentials = credentials


class Provider:
    """An OAuth 2.0 token endpoint that refreshes with ``grant_type=refresh_token``.

    The defaults follow RFC 6749: a form-encoded body and no client authentication.
    :meth:`claude_code` and :meth:`wrapper_guide` are the two Claude profiles.
    ``timeout`` bounds one request, in seconds.
    """

    def __init__(
        self,
        *,
        token_url: str,
        client_id: str | None = None,
        client_secret: str | None = None,
        auth_method: AuthMethod | None = None,
        body_format: BodyFormat = "form",
        scope: str | None = None,
        extra_params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 15.0,
        name: str | None = None,
    ) -> None:
        host = secure_url(token_url, option="token_url").hostname
        if client_secret is not None and not isinstance(client_secret, str):
            raise ConfigurationError(
                f"client_secret must be a str, not {type(client_secret).__name__}"
            )
        if auth_method is None:
            auth_method = "client_secret_basic" if client_secret else "none"
        if auth_method not in ("none", "client_secret_post", "client_secret_basic"):
            raise ConfigurationError(
                f"auth_method must be 'none', 'client_secret_post' or 'client_secret_basic', "
                f"got {auth_method!r}"
            )
        if auth_method != "none" and not (client_id and client_secret):
            raise ConfigurationError(
                f"auth_method {auth_method!r} needs both client_id and client_secret"
            )
        if auth_method == "none" and client_secret:
            raise ConfigurationError(
                "client_secret is set but auth_method is 'none'; choose "
                "'client_secret_post' or 'client_secret_basic'"
            )
        if body_format not in ("form", "json"):
            raise ConfigurationError(f"body_format must be 'form' or 'json', got {body_format!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigurationError(
                f"timeout must be a positive number of seconds, got {timeout!r}"
            )
        self.token_url = token_url
        self.client_id = client_id
        self._client_secret = Secret(client_secret) if client_secret else None
        self.auth_method: AuthMethod = auth_method
        self.body_format: BodyFormat = body_format
        self.scope = scope
        self.extra_params = dict(extra_params or {})
        self.headers = dict(headers or {})
        self.timeout = float(timeout)
        self.name = name or host

    def __repr__(self) -> str:
        return (
            f"Provider(name={self.name!r}, token_url={self.token_url!r}, "
            f"client_id={self.client_id!r}, auth_method={self.auth_method!r}, "
            f"body_format={self.body_format!r})"
        )

    @classmethod
    def claude_code(
        cls,
        *,
        token_url: str = CLAUDE_CODE_TOKEN_URL,
        client_id: str = CLAUDE_CODE_CLIENT_ID,
        scope: str = CLAUDE_CODE_SCOPE,
        timeout: float = 15.0,
        headers: Mapping[str, str] | None = None,
    ) -> Provider:
        """The endpoint Claude Code refreshes against: a JSON body with its client id and scope."""
        return cls(
            token_url=token_url,
            client_id=client_id,
            body_format="json",
            scope=scope,
            headers={"User-Agent": _CLAUDE_CODE_USER_AGENT, **(headers or {})},
            timeout=timeout,
            name="claude-code",
        )

    @classmethod
    def wrapper_guide(
        cls, *, token_url: str = WRAPPER_GUIDE_TOKEN_URL, timeout: float = 15.0
    ) -> Provider:
        """The endpoint the wrapper's refresh guide names: a JSON body without a client id."""
        return cls(token_url=token_url, body_format="json", timeout=timeout, name="wrapper-guide")

    @classmethod
    def from_setting(
        cls,
        value: str,
        *,
        client_secret: str | Secret | None = None,
        option: str = "provider",
        secret_option: str = "client_secret",  # noqa: S107 - a name for messages
    ) -> Provider:
        """The provider a one-line setting names: ``--provider``, ``CREDKEEPER_PROVIDER``.

        ``claude-code`` and ``wrapper-guide`` are the two Claude profiles at their own URLs;
        ``PROFILE+URL`` puts a profile at another token URL (a staging endpoint, say), and
        ``oauth2+URL`` is any RFC 6749 endpoint: a form body, no client id unless given. The
        URL's query holds the profile's options, not the endpoint's: ``client_id``, ``scope``
        (space-separated, ``+`` or ``%20`` in a URL), ``auth_method``, ``body_format`` and
        ``timeout`` (seconds), as :data:`SETTING_PROFILES` lists per profile. A bare URL is
        Claude Code's protocol at that URL, as it always was. The client secret never comes
        from the setting, which gets printed: it is ``client_secret``, for ``oauth2`` only.
        Errors name ``option`` (and ``secret_option`` for the secret) and the fix.
        """
        text = value.strip() if isinstance(value, str) else ""
        scheme, separator, rest = text.partition("://")
        profile, url = text.lower(), None
        if separator:
            named, plus, url_scheme = scheme.rpartition("+")
            # A bare URL keeps the meaning it had before profiles could be named.
            profile, url = (named.lower() if plus else "claude-code"), f"{url_scheme}://{rest}"
        if profile not in SETTING_PROFILES:
            raise ConfigurationError(
                f"{option} must be claude-code, wrapper-guide, or PROFILE+URL such as "
                f"{_SETTING_EXAMPLE} (PROFILE: {', '.join(SETTING_PROFILES)}), or a token URL "
                f"spoken to with Claude Code's protocol; got {profile if separator else value!r}"
            )
        options = {} if url is None else _setting_url(url, profile, option, secret_option)
        if "timeout" in options:
            options["timeout"] = _setting_timeout(options["timeout"], option=option)
        secret = Secret(client_secret) if client_secret else None
        if secret is not None and profile != "oauth2":
            raise ConfigurationError(
                f"{secret_option} is set, but the {profile} profile sends no client secret; "
                f"unset it, or name an RFC 6749 endpoint in {option} as {_SETTING_EXAMPLE}"
            )
        if profile == "claude-code":
            return cls.claude_code(**options)
        if profile == "wrapper-guide":
            return cls.wrapper_guide(**options)
        if url is None:
            raise ConfigurationError(
                f"{option}: oauth2 needs the endpoint's token URL, as {_SETTING_EXAMPLE}"
            )
        if options.get("auth_method") in _SECRET_METHODS and secret is None:
            raise ConfigurationError(
                f"{option}: auth_method={options['auth_method']} sends a client secret; "
                f"set it in {secret_option}"
            )
        if secret is not None and "client_id" not in options:
            raise ConfigurationError(
                f"{secret_option} is set, but {option} names no client id for it; add "
                "?client_id=ID to the token URL"
            )
        try:
            return cls(**options, client_secret=secret.get_secret_value() if secret else None)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{option}: {exc}") from None

    def build_request(self, refresh_token: str | Secret) -> httpx.Request:
        """The refresh request for ``refresh_token``, with this provider's timeout attached."""
        params: dict[str, Any] = {
            "grant_type": "refresh_token",
            "refresh_token": Secret(refresh_token).get_secret_value(),
        }
        if self.client_id and self.auth_method != "client_secret_basic":
            params["client_id"] = self.client_id
        if self.auth_method == "client_secret_post" and self._client_secret is not None:
            params["client_secret"] = self._client_secret.get_secret_value()
        if self.scope:
            params["scope"] = self.scope
        params.update(self.extra_params)
        headers = {"Accept": "application/json", **self.headers}
        auth_header = self._basic_auth()
        if auth_header:
            headers["Authorization"] = auth_header
        timeout = httpx.Timeout(self.timeout).as_dict()
        if self.body_format == "json":
            return httpx.Request(
                "POST",
                self.token_url,
                json=params,
                headers=headers,
                extensions={"timeout": timeout},
            )
        return httpx.Request(
            "POST", self.token_url, data=params, headers=headers, extensions={"timeout": timeout}
        )

    def _basic_auth(self) -> str | None:
        if self.auth_method != "client_secret_basic":
            return None
        # RFC 6749 section 2.3.1: form-encode the id and the secret before base64.
        secret = self._client_secret.get_secret_value() if self._client_secret else ""
        pair = f"{quote(self.client_id or '', safe='')}:{quote(secret, safe='')}"
        return "Basic " + base64.b64encode(pair.encode()).decode("ascii")

    def parse_response(
        self, response: httpx.Response, *, previous: Credentials, now: datetime
    ) -> Credentials:
        """The new credentials in ``response``, or the classified failure.

        Raises :class:`InvalidGrant` when the refresh token was refused,
        :class:`ProviderUnavailable` for 408/425/429/5xx (with ``retry_after`` when sent), and
        :class:`ProviderError` for anything else, quoting a redacted excerpt of the body. A 2xx
        answer whose access token is unusable but which carries a new refresh token raises
        :class:`SalvagedAnswer`, holding that token for the engine to store.
        """
        # No local here holds the body or a token in clear: this frame is on the traceback of
        # every error it raises, where tools that capture locals would find them.
        status = response.status_code
        if 200 <= status < 300:
            outcome = _read_answer(response.text, previous=previous, now=now)
            if isinstance(outcome, Credentials):
                return outcome
            # The answer holds the new tokens, maybe under names nobody expected.
            quoted = self._quote(response, previous, everything=True)
            if outcome.kept is not None:
                raise SalvagedAnswer(
                    f"{self.name} answered {status} with an unusable {outcome.field} "
                    f"({outcome.reason}); the tokens it holds were kept, due at once, so the next "
                    f"call refreshes with its refresh token: {quoted}",
                    status=status,
                    excerpt=quoted,
                    credentials=outcome.kept,
                )
            raise ProviderError(
                f"{self.name} answered {status} with a body credkeeper cannot use "
                f"({outcome.reason}): {quoted}",
                status=status,
                excerpt=quoted,
            )
        quoted = self._quote(response, previous, everything=False)
        error = _error_code(response.text)
        if status in (400, 401) and error == "invalid_grant":
            raise InvalidGrant(
                f"{self.name} refused the refresh token (HTTP {status} invalid_grant)",
                status=status,
                excerpt=quoted,
            )
        if status in _RETRYABLE or status >= 500:
            raise ProviderUnavailable(
                f"{self.name} is unavailable (HTTP {status}): {quoted}",
                status=status,
                excerpt=quoted,
                retry_after=_retry_after(response, now),
            )
        raise ProviderError(
            f"{self.name} rejected the refresh request (HTTP {status}"
            f"{' ' + error if error else ''}): {quoted}",
            status=status,
            excerpt=quoted,
        )

    def _quote(self, response: httpx.Response, previous: Credentials, *, everything: bool) -> str:
        """A redacted excerpt of the body, with every token of the exchange masked."""
        sent = Redactor((previous.refresh_token, previous.access_token, self._client_secret))
        return sent.harvesting(response.text, everything=everything).excerpt(response.text)

    def unavailable(self, exc: httpx.TransportError) -> ProviderUnavailable:
        """The error for a request that got no answer (timeout, refused, reset)."""
        kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
        return ProviderUnavailable(
            f"the request to {self.name} {kind} ({type(exc).__name__})", status=None
        )


def _setting_url(url: str, profile: str, option: str, secret_option: str) -> dict[str, Any]:
    """The token URL of a provider setting and the options in its query, checked."""
    parts = secure_url(url, option=option)
    if "@" in parts.netloc:
        raise ConfigurationError(
            f"{option} must not hold a user or password, as it gets printed; give an oauth2 "
            f"endpoint's client id as ?client_id=ID and its secret in {secret_option}"
        )
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigurationError(
            f"{option}: the URL's query must be NAME=VALUE pairs joined by '&'"
        ) from None
    allowed = SETTING_PROFILES[profile]
    options: dict[str, Any] = {"token_url": parts._replace(query="").geturl()}
    for name, value in pairs:
        # Values are never quoted back: a secret put where it does not belong stays unprinted.
        if name == "client_secret":
            raise ConfigurationError(
                f"{option} must not hold the client secret, as it gets printed; give it in "
                f"{secret_option}"
            )
        if name not in allowed:
            raise ConfigurationError(
                f"{option}: the {profile} profile takes no option {name!r}; its options are "
                f"{', '.join(allowed)}"
            )
        if name in options:
            raise ConfigurationError(f"{option}: the option {name!r} is given twice")
        if not value:
            raise ConfigurationError(f"{option}: the option {name!r} needs a value")
        options[name] = value
    return options


def _setting_timeout(value: str, *, option: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(
            f"{option}: timeout must be a positive number of seconds, such as 15, got {value!r}"
        )
    return seconds


def _error_code(text: str) -> str | None:
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return None


@dataclass(frozen=True, slots=True)
class _Unusable:
    """Why a 2xx answer cannot be used, and the new refresh token to keep, if it has one."""

    reason: str
    field: str | None
    kept: Credentials | None = None


def _read_answer(text: str, *, previous: Credentials, now: datetime) -> Credentials | _Unusable:
    """The credentials in a 2xx body, or why there are none; never raises.

    The tokens are sealed as the body is decoded, and failures come back as values: the frames
    that held the decoded body are gone before the caller raises.
    """
    try:
        document = sealed(_object(text))
    except CredentialsError as exc:
        return _Unusable(str(exc), exc.field)
    try:
        return Credentials.from_token_response(document, previous=previous, now=now)
    except CredentialsError as exc:
        error = _Unusable(str(exc), exc.field)
    if error.field is None or error.field == "refresh_token":
        return error
    if error.field == "access_token":
        return _keep_refresh_token(document, previous=previous, now=now, error=error)
    salvaged = _salvage(document, previous=previous, now=now, error=error)
    if salvaged.kept is not None and not {"expires_in", "expires_at"} & document.keys():
        # RFC 6749 only recommends expires_in: an answer without any expiry is well formed,
        # its tokens served as due (each call refreshes), not refused.
        return salvaged.kept
    return salvaged


def _object(text: str) -> Mapping[str, Any]:
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CredentialsError(f"token response is not valid JSON: {type(exc).__name__}") from None
    if not isinstance(document, Mapping):
        raise CredentialsError(
            f"token response must be a JSON object, got {type(document).__name__}"
        )
    return document


def _keep_refresh_token(
    document: Mapping[str, Any], *, previous: Credentials, now: datetime, error: _Unusable
) -> _Unusable:
    """The new refresh token of an answer whose access token is unusable, due at once.

    The provider has rotated the refresh token by the time it answers: dropping the answer
    would leave only the spent one. The previous access token is kept (it may still work) with
    an expiry of ``now``, so the next call refreshes with the new refresh token.
    """
    refresh = document.get("refresh_token")
    if not isinstance(refresh, Secret):  # the document is sealed: a string is a Secret by now
        return error
    try:
        kept = Credentials(
            access_token=previous.access_token,
            refresh_token=refresh,
            expires_at=now,
            scopes=previous.scopes,
            subscription_type=previous.subscription_type,
        )
    except CredentialsError:
        return error
    if kept.refresh_token == previous.refresh_token:
        return error
    return _Unusable(error.reason, error.field, kept)


def _salvage(
    document: Mapping[str, Any], *, previous: Credentials, now: datetime, error: _Unusable
) -> _Unusable:
    """The tokens of an answer whose other fields are unreadable, to keep, already due.

    The provider has rotated the refresh token by the time it answers 200: refusing the whole
    answer over an unreadable ``expires_in`` or ``scope`` would drop the only copy of the new
    one. Scopes and subscription are kept from ``previous``.
    """
    tokens = {name: document.get(name) for name in ("access_token", "refresh_token")}
    try:
        kept = Credentials.from_token_response(
            {**tokens, "expires_in": 0}, previous=previous, now=now
        )
    except CredentialsError:
        return error
    return _Unusable(error.reason, error.field, kept)
