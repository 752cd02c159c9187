"""``Credentials``: one user's OAuth tokens, and the parsers for the shapes they arrive in."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from os import PathLike
from pathlib import Path
from typing import Any

from ._exceptions import CredentialsError
from ._redact import sealed
from ._secret import Secret

__all__ = ["Credentials", "from_epoch_ms", "to_epoch_ms"]

# Epoch values below this are seconds, above it milliseconds: 1e11 seconds is the year 5138,
# 1e11 milliseconds is 1973, so no real expiry is ambiguous.
_MS_THRESHOLD = 100_000_000_000


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)

# How a login document spells access token, refresh token, expiry, scopes, subscription type.
_Names = tuple[str, str, str, str, str]
_SNAKE: _Names = ("access_token", "refresh_token", "expires_at", "scopes", "subscription_type")
_CAMEL: _Names = ("accessToken", "refreshToken", "expiresAt", "scopes", "subscriptionType")


def to_epoch_ms(moment: datetime) -> int:
    """Milliseconds since the Unix epoch, the unit every wire format here uses.

    Integer arithmetic: ``timestamp() * 1000`` loses a millisecond to float rounding.
    """
    return (moment - _EPOCH) // _MILLISECOND


def from_epoch_ms(value: int) -> datetime:
    """The aware UTC datetime of an epoch value in milliseconds."""
    return _EPOCH + value * _MILLISECOND


def _aware(value: object, field_name: str) -> datetime:
    if not isinstance(value, datetime):
        raise CredentialsError(
            f"{field_name} must be a datetime, not {type(value).__name__}", field=field_name
        )
    if value.tzinfo is None or value.utcoffset() is None:
        raise CredentialsError(
            f"{field_name} is a naive datetime; pass an aware one, "
            "e.g. datetime.now(timezone.utc) + timedelta(hours=8)",
            field=field_name,
        )
    return value.astimezone(UTC)


def _token(value: object, field_name: str) -> Secret:
    # The value stays wrapped: this frame is on the traceback of the error it raises.
    secret = Secret(value) if isinstance(value, str) else value
    if not isinstance(secret, Secret):
        raise CredentialsError(
            f"{field_name} must be a non-empty string, got {type(value).__name__}",
            field=field_name,
        )
    problem = _token_problem(secret)
    if problem is not None:
        raise CredentialsError(f"{field_name} {problem}", field=field_name)
    return secret


def _token_problem(secret: Secret) -> str | None:
    """Why ``secret`` cannot be a token, or ``None``."""
    text = secret.get_secret_value()
    if not text.strip():
        return "must be a non-empty string, got an empty string"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Sealing and every store need UTF-8: such a token would be journaled, then fail forever.
        return "holds a lone surrogate (invalid Unicode); it could never be stored"
    return None


def _scopes(value: object, field_name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, Iterable) and not isinstance(value, bytes | Mapping):
        items = tuple(value)
        if all(isinstance(item, str) for item in items):
            return items
    raise CredentialsError(
        f"{field_name} must be a space-separated string or a list of strings", field=field_name
    )


def _number(value: object, field_name: str, *, numeric_strings: bool = False) -> float:
    if numeric_strings and isinstance(value, str) and value.strip().isascii():
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CredentialsError(
            f"{field_name} must be a number, got {type(value).__name__}", field=field_name
        )
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise CredentialsError(f"{field_name} must be a finite number", field=field_name)
    return number


def _epoch(value: object, field_name: str, *, seconds_allowed: bool) -> datetime:
    number = _number(value, field_name)
    if number < 0:
        raise CredentialsError(f"{field_name} must not be negative", field=field_name)
    if number < _MS_THRESHOLD:
        if not seconds_allowed:
            raise CredentialsError(
                f"{field_name} looks like seconds since the epoch; this format needs "
                "milliseconds (multiply by 1000)",
                field=field_name,
            )
        number *= 1000
    try:
        return from_epoch_ms(int(number))
    except (OverflowError, ValueError, OSError):
        raise CredentialsError(f"{field_name} is out of range", field=field_name) from None


def _optional_str(value: object, field_name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise CredentialsError(
        f"{field_name} must be a string or null, got {type(value).__name__}", field=field_name
    )


def _document(data: object, what: str) -> Mapping[str, Any]:
    if isinstance(data, str | bytes | bytearray):
        try:
            data = json.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CredentialsError(f"{what} is not valid JSON: {exc.__class__.__name__}") from None
    if not isinstance(data, Mapping):
        raise CredentialsError(f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def _require(data: Mapping[str, Any], name: str, what: str) -> Any:
    if name not in data or data[name] is None:
        raise CredentialsError(f"{what} has no {name!r} field", field=name)
    return data[name]


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """One user's OAuth credentials.

    Tokens are held as :class:`Secret`; pass plain strings to the constructor. ``expires_at`` is
    an aware datetime, kept in UTC; a naive one is refused rather than guessed.
    """

    access_token: Secret
    refresh_token: Secret
    expires_at: datetime
    scopes: tuple[str, ...] = ()
    subscription_type: str | None = None

    def __init__(
        self,
        *,
        access_token: str | Secret,
        refresh_token: str | Secret,
        expires_at: datetime,
        scopes: Iterable[str] | str = (),
        subscription_type: str | None = None,
    ) -> None:
        object.__setattr__(self, "access_token", _token(access_token, "access_token"))
        object.__setattr__(self, "refresh_token", _token(refresh_token, "refresh_token"))
        object.__setattr__(self, "expires_at", _aware(expires_at, "expires_at"))
        object.__setattr__(self, "scopes", _scopes(scopes, "scopes"))
        object.__setattr__(
            self, "subscription_type", _optional_str(subscription_type, "subscription_type")
        )

    def __repr__(self) -> str:
        return (
            f"Credentials(access_token=Secret('**********'), refresh_token=Secret('**********'), "
            f"expires_at={self.expires_at.isoformat()!r}, scopes={self.scopes!r}, "
            f"subscription_type={self.subscription_type!r})"
        )

    def expires_within(self, margin: timedelta, *, now: datetime) -> bool:
        """Whether the access token expires before ``now + margin``."""
        return self.expires_at <= now + margin

    # -- parsers -------------------------------------------------------------------------

    @classmethod
    def from_token_response(
        cls,
        data: Mapping[str, Any] | str | bytes,
        *,
        now: datetime,
        previous: Credentials | None = None,
    ) -> Credentials:
        """Parse a token endpoint's answer to a refresh.

        ``expires_in`` (seconds) is read relative to ``now``; an ``expires_at`` in seconds or
        milliseconds wins when present. A missing ``refresh_token``, ``scope`` or
        ``subscription_type`` keeps the ``previous`` value, as providers that do not rotate expect.
        """
        what = "token response"
        # Sealed as soon as it is read: the frames of a parse error then hold no token in clear.
        doc = sealed(_document(data, what))
        now = _aware(now, "now")
        access = _token(_require(doc, "access_token", what), "access_token")
        if doc.get("refresh_token") is not None:
            refresh = _token(doc["refresh_token"], "refresh_token")
        elif previous is not None:
            refresh = previous.refresh_token
        else:
            raise CredentialsError(
                f"{what} has no 'refresh_token' and there is no previous one to keep",
                field="refresh_token",
            )
        if doc.get("expires_at") is not None:
            expires_at = _epoch(doc["expires_at"], "expires_at", seconds_allowed=True)
        elif doc.get("expires_in") is not None:
            # Some providers (Azure AD v1) send it as a string of digits.
            seconds = _number(doc["expires_in"], "expires_in", numeric_strings=True)
            if seconds < 0 or seconds > 10 * 365 * 86400:
                raise CredentialsError(
                    "expires_in must be a number of seconds between 0 and ten years",
                    field="expires_in",
                )
            expires_at = now + timedelta(seconds=seconds)
        else:
            raise CredentialsError(
                f"{what} has neither 'expires_in' nor 'expires_at'", field="expires_in"
            )
        raw_scope = doc.get("scope", doc.get("scopes"))
        scopes = (
            _scopes(raw_scope, "scope")
            if raw_scope is not None
            else (previous.scopes if previous else ())
        )
        subscription = _optional_str(doc.get("subscription_type"), "subscription_type")
        if subscription is None and previous is not None:
            subscription = previous.subscription_type
        return cls(
            access_token=access,
            refresh_token=refresh,
            expires_at=expires_at,
            scopes=scopes,
            subscription_type=subscription,
        )

    @classmethod
    def from_wrapper(cls, data: Mapping[str, Any] | str | bytes) -> Credentials:
        """Parse the wrapper's ``oauth_credentials`` object (``expires_at`` in milliseconds).

        A document with the object nested under ``oauth_credentials`` is accepted too.
        """
        doc = _document(data, "oauth_credentials")
        if isinstance(doc.get("oauth_credentials"), Mapping):
            doc = doc["oauth_credentials"]
        return cls._from_login(doc, "oauth_credentials", _SNAKE)

    @classmethod
    def from_claude_code(cls, data: Mapping[str, Any] | str | bytes) -> Credentials:
        """Parse Claude Code's credentials document (``{"claudeAiOauth": {...}}``)."""
        doc = _document(data, "Claude Code credentials")
        inner = doc.get("claudeAiOauth")
        if not isinstance(inner, Mapping):
            raise CredentialsError(
                "Claude Code credentials have no 'claudeAiOauth' object", field="claudeAiOauth"
            )
        return cls._from_login(inner, "claudeAiOauth", _CAMEL)

    @classmethod
    def _from_login(cls, doc: Mapping[str, Any], what: str, names: _Names) -> Credentials:
        """A login document's credentials (``expires_at`` in ms), its fields spelled ``names``."""
        access, refresh, expires, scopes, subscription = names
        return cls(
            access_token=_token(_require(doc, access, what), access),
            refresh_token=_token(_require(doc, refresh, what), refresh),
            expires_at=_epoch(_require(doc, expires, what), expires, seconds_allowed=False),
            scopes=_scopes(doc[scopes], scopes) if doc.get(scopes) is not None else (),
            subscription_type=_optional_str(doc.get(subscription), subscription),
        )

    @classmethod
    def from_claude_code_file(cls, path: str | PathLike[str] | None = None) -> Credentials:
        """Read Claude Code's credentials file, ``~/.claude/.credentials.json`` by default."""
        target = Path(path) if path is not None else Path.home() / ".claude" / ".credentials.json"
        try:
            text = target.read_bytes()
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "invalid path"
            raise CredentialsError(
                f"cannot read Claude Code credentials at {target}: {reason}"
            ) from None
        return cls.from_claude_code(text)

    # -- emitters ------------------------------------------------------------------------

    def to_wrapper(self) -> dict[str, Any]:
        """The wrapper's ``oauth_credentials`` object, with the tokens in clear.

        An unknown ``subscription_type`` is left out rather than sent as ``null``, which the
        wrapper's model refuses (HTTP 422); the wrapper then assumes ``max``.
        """
        document: dict[str, Any] = {
            "access_token": self.access_token.get_secret_value(),
            "refresh_token": self.refresh_token.get_secret_value(),
            "expires_at": to_epoch_ms(self.expires_at),
            "scopes": list(self.scopes),
        }
        if self.subscription_type is not None:
            document["subscription_type"] = self.subscription_type
        return document

    def to_claude_code(self) -> dict[str, Any]:
        """Claude Code's credentials document, with the tokens in clear."""
        return {
            "claudeAiOauth": {
                "accessToken": self.access_token.get_secret_value(),
                "refreshToken": self.refresh_token.get_secret_value(),
                "expiresAt": to_epoch_ms(self.expires_at),
                "scopes": list(self.scopes),
                "subscriptionType": self.subscription_type,
            }
        }
