"""The exceptions credkeeper raises, and nothing else escapes its API.

The tree::

    CredkeeperError
    ├── ConfigurationError (ValueError)      an option, URL or scheme is wrong; the message names it
    │   ├── UnknownSchemeError                no store is registered for a URL scheme
    │   └── InvalidKey                        a key no store, or not this one, can hold
    ├── CredentialsError (ValueError)         a credential document is malformed; names the field
    ├── DecryptionError                       a sealed value failed to open
    ├── StoreError                            a credential store failed
    │   ├── StoreUnavailable                  cannot be reached now; retrying may work
    │   │   └── StoreContention               writes kept conflicting until the call's deadline
    │   ├── ConflictError                     compare-and-swap lost: the stored version moved
    │   └── StoreCorrupted                    the stored data is not credkeeper's, or is damaged
    ├── ProviderError                         the token endpoint answered something unusable
    │   ├── InvalidGrant                      the refresh token was refused (``invalid_grant``)
    │   └── ProviderUnavailable               429, 5xx or a timeout, after the retries allowed
    ├── CredentialNotFound (KeyError)         no credential is stored under a key
    ├── ReauthRequired                        the user must log in again; nothing was deleted
    ├── RefreshTimeout (TimeoutError)         another worker's refresh did not finish in time
    ├── WrapperError                          the Claude Wrapper API answered with an error
    │   ├── InvalidRequest (ValueError)       the request breaks the wrapper's rules; lists fields
    │   ├── AuthFailed                        credentials refused again after a refresh
    │   ├── UsageLimitReached                 the account hit a usage limit; no refresh helps
    │   ├── WrapperCLIError                   the wrapper's CLI failed for another reason
    │   ├── UnsafeFilePath (ValueError)       a returned file would land outside its directory
    │   └── WrapperUnavailable                5xx, connection failure or timeout; retry later
    └── WebhookVerificationError (ValueError) a received webhook's headers or signature fail

No message ever contains a token: messages name keys, fields and HTTP statuses, and provider
bodies are quoted only after redaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "AuthFailed",
    "ConfigurationError",
    "ConflictError",
    "CredentialNotFound",
    "CredentialsError",
    "CredkeeperError",
    "DecryptionError",
    "FieldViolation",
    "InvalidGrant",
    "InvalidKey",
    "InvalidRequest",
    "ProviderError",
    "ProviderUnavailable",
    "ReauthRequired",
    "RefreshTimeout",
    "StoreContention",
    "StoreCorrupted",
    "StoreError",
    "StoreUnavailable",
    "UnknownSchemeError",
    "UnsafeFilePath",
    "UsageLimitReached",
    "WebhookVerificationError",
    "WrapperCLIError",
    "WrapperError",
    "WrapperUnavailable",
]


class CredkeeperError(Exception):
    """Base of every exception credkeeper raises."""


class ConfigurationError(CredkeeperError, ValueError):
    """An option, URL or scheme is wrong; the message names it and the fix."""


class UnknownSchemeError(ConfigurationError):
    """No store is registered for a URL scheme; the message names the extra to install."""

    def __init__(self, message: str, *, scheme: str) -> None:
        super().__init__(message)
        self.scheme = scheme


class InvalidKey(ConfigurationError):
    """A key no store can hold (not a str, empty, too long, unprintable), or one this store
    cannot (not a value of its key column); the message names the rule. The caller's input,
    unlike other configuration errors: the service answers it with 422."""


class CredentialsError(CredkeeperError, ValueError):
    """A credential document is malformed; ``field`` names the offending field."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class DecryptionError(CredkeeperError):
    """A sealed value could not be opened.

    Deliberately opaque, like ``cryptography.fernet.InvalidToken``: a wrong key, a tampered
    ciphertext and a value moved to another key or field all look the same to the caller.
    """


class StoreError(CredkeeperError):
    """A credential store failed; ``key`` names the credential concerned, when there is one."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class StoreUnavailable(StoreError):
    """The store cannot be reached now (connection lost, timeout, throttled); retrying may work."""


class StoreContention(StoreUnavailable):
    """Writes on ``key`` kept losing compare-and-swap until the call's deadline.

    Other writers moved the record each time it was read; the message says which step kept
    failing. Nothing was lost: retrying later may work.
    """


class ConflictError(StoreError):
    """Compare-and-swap lost: the stored record's version is not the one the write expected."""


class StoreCorrupted(StoreError):
    """The stored data is damaged or belongs to something else; credkeeper will not overwrite it."""


class ProviderError(CredkeeperError):
    """The token endpoint answered something credkeeper cannot use.

    ``status`` is the HTTP status (``None`` when no response came back) and ``excerpt`` a short,
    redacted piece of the body.
    """

    def __init__(self, message: str, *, status: int | None = None, excerpt: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.excerpt = excerpt


class InvalidGrant(ProviderError):
    """The provider refused the refresh token (``invalid_grant``): used already, or revoked."""


class ProviderUnavailable(ProviderError):
    """The provider is throttling (429), failing (5xx) or not answering in time.

    ``retry_after`` is the delay in seconds the provider asked for, when it did.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        excerpt: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, excerpt=excerpt)
        self.retry_after = retry_after


class CredentialNotFound(CredkeeperError, KeyError):
    """No credential is stored under ``key``."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"no credential is stored under key {self.key!r}; store one with put() first"


class ReauthRequired(CredkeeperError):
    """The provider refused the credential under ``key``; the user must log in again.

    The stored record is kept, marked ``needs_reauth``; storing new credentials for the key
    (``put``) makes it active again.
    """

    def __init__(self, key: str) -> None:
        super().__init__(
            f"the credential under key {key!r} was refused by the provider (invalid_grant); "
            "the user must log in again and the new credentials be stored with put()"
        )
        self.key = key


class RefreshTimeout(CredkeeperError, TimeoutError):
    """Another worker held the refresh lease for ``key`` and did not finish before the deadline."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"waited too long for another worker to refresh the credential under key {key!r}; "
            "raise refresh_timeout or check that worker"
        )
        self.key = key


class WrapperError(CredkeeperError):
    """The Claude Wrapper API answered with an error.

    ``status`` is the HTTP status (``None`` when no response came back, or for an error the
    client found before sending), ``code`` the wrapper's error code (``cli_error``,
    ``stream_error``, ...), ``key`` the credential the call was made for, and ``excerpt`` a
    short, redacted piece of what the wrapper said.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        key: str | None = None,
        excerpt: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.key = key
        self.excerpt = excerpt


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One rule a request broke: ``field`` is a dotted path such as ``messages.0.content``."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class InvalidRequest(WrapperError, ValueError):
    """The request breaks the wrapper's validation rules; ``errors`` lists every field.

    Raised before anything is sent when the client can tell, and from the wrapper's HTTP 422
    otherwise.
    """

    def __init__(
        self, errors: Iterable[FieldViolation], *, status: int | None = None, key: str | None = None
    ) -> None:
        self.errors = tuple(errors)
        listed = "; ".join(str(error) for error in self.errors)
        source = "the wrapper rejected the request (HTTP 422)" if status else "invalid request"
        super().__init__(f"{source}: {listed}", status=status, key=key)


class AuthFailed(WrapperError):
    """The wrapper refused the credentials under ``key``, and again after a fresh refresh."""


class UsageLimitReached(WrapperError):
    """The account behind ``key`` hit a usage limit (a weekly limit, say); no refresh can help."""


class WrapperCLIError(WrapperError):
    """The wrapper's CLI failed for a reason that is neither authentication nor a usage limit.

    The wrapper runs the Claude Code CLI and answers its failures with a ``cli_error``; this is
    not about credkeeper's own command line.
    """


class UnsafeFilePath(WrapperError, ValueError):
    """A file returned by the wrapper names a path outside the directory it is saved to."""


class WrapperUnavailable(WrapperError):
    """The wrapper failed (5xx), could not be reached, or did not answer in time; retry later."""


class WebhookVerificationError(CredkeeperError, ValueError):
    """A received webhook failed verification: a header is missing, the timestamp is outside
    the tolerance, no signature matches, or the body is not a JSON object. Answer it with 400
    or 401 and do not act on it; the message never repeats the secret or a signature."""
