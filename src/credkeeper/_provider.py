"""``Provider``: how to ask an OAuth token endpoint for a refresh, and how to read its answer.

A provider builds requests and classifies responses; it never sends anything itself. The engine's
drivers send, so the same provider serves the sync and the async manager.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import SplitResult, quote, urlsplit

import httpx

from ._credentials import Credentials
from ._exceptions import (
    ConfigurationError,
    CredentialsError,
    InvalidGrant,
    ProviderError,
    ProviderUnavailable,
)
from ._redact import excerpt

__all__ = [
    "CLAUDE_CODE_CLIENT_ID",
    "CLAUDE_CODE_SCOPE",
    "CLAUDE_CODE_TOKEN_URL",
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

_RETRYABLE = frozenset({408, 425, 429})
# A Retry-After beyond a day is a broken header, not a plan; it would overflow datetimes too.
_MAX_RETRY_AFTER = 86400.0
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


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
        parts: SplitResult | None = None
        host: str | None = None
        if isinstance(token_url, str):
            with contextlib.suppress(ValueError):  # a malformed IPv6 host, e.g. https://[::1/x
                parts = urlsplit(token_url)
                host = parts.hostname
        if parts is None or parts.scheme not in ("https", "http") or not host:
            raise ConfigurationError(
                f"token_url must be an absolute http(s) URL, got {token_url!r}"
            )
        if parts.scheme == "http" and host not in _LOOPBACK:
            raise ConfigurationError(
                "token_url must use https (plain http is accepted only on loopback), "
                f"got {token_url!r}"
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
        self._client_secret = client_secret
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

    def build_request(self, refresh_token: str) -> httpx.Request:
        """The refresh request for ``refresh_token``, with this provider's timeout attached."""
        params: dict[str, Any] = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if self.client_id and self.auth_method != "client_secret_basic":
            params["client_id"] = self.client_id
        if self.auth_method == "client_secret_post":
            params["client_secret"] = self._client_secret
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
        pair = f"{quote(self.client_id or '', safe='')}:{quote(self._client_secret or '', safe='')}"
        return "Basic " + base64.b64encode(pair.encode()).decode("ascii")

    def parse_response(
        self, response: httpx.Response, *, previous: Credentials, now: datetime
    ) -> Credentials:
        """The new credentials in ``response``, or the classified failure.

        Raises :class:`InvalidGrant` when the refresh token was refused,
        :class:`ProviderUnavailable` for 408/425/429/5xx (with ``retry_after`` when sent), and
        :class:`ProviderError` for anything else, quoting a redacted excerpt of the body.
        """
        status = response.status_code
        secrets = [
            previous.refresh_token.get_secret_value(),
            previous.access_token.get_secret_value(),
        ]
        if self._client_secret:
            secrets.append(self._client_secret)
        text = response.text
        quoted = excerpt(text, secrets)
        if 200 <= status < 300:
            try:
                return Credentials.from_token_response(text, previous=previous, now=now)
            except CredentialsError as exc:
                salvaged = _salvage(text, previous=previous, now=now, error=exc)
                if salvaged is not None:
                    return salvaged
                raise ProviderError(
                    f"{self.name} answered {status} with a body credkeeper cannot use "
                    f"({exc}): {quoted}",
                    status=status,
                    excerpt=quoted,
                ) from None
        error = _error_code(text)
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

    def unavailable(self, exc: httpx.TransportError) -> ProviderUnavailable:
        """The error for a request that got no answer (timeout, refused, reset)."""
        kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
        return ProviderUnavailable(
            f"the request to {self.name} {kind} ({type(exc).__name__})", status=None
        )


def _error_code(text: str) -> str | None:
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return None


def _salvage(
    text: str, *, previous: Credentials, now: datetime, error: CredentialsError
) -> Credentials | None:
    """The tokens of an answer whose other fields are unreadable, treated as already due.

    The provider has rotated the refresh token by the time it answers 200: refusing the whole
    answer over an unreadable ``expires_in`` or ``scope`` would drop the only copy of the new
    one. Scopes and subscription are kept from ``previous``.
    """
    if error.field in (None, "access_token", "refresh_token"):
        return None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    tokens = {name: document.get(name) for name in ("access_token", "refresh_token")}
    try:
        return Credentials.from_token_response(
            {**tokens, "expires_in": 0}, previous=previous, now=now
        )
    except CredentialsError:
        return None
