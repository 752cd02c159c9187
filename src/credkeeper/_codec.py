"""``TokenCodec``: how token fields are kept in a store, when not by credkeeper's key ring."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ._exceptions import ConfigurationError

__all__ = ["TokenCodec", "probe_codec"]

# Surrounding spaces make the probe's key one ``check_key`` refuses, so it can never be a
# credential's key, whatever the codec binds to or records about the keys it sees.
_PROBE_KEY = " credkeeper codec probe "
_PROBE_VALUE = "credkeeper-codec-probe-value"
# The fields the protocol promises; a codec may rely on getting no other.
_PROBE_FIELDS = ("access_token", "refresh_token")


@runtime_checkable
class TokenCodec(Protocol):
    """**Protocol:** the application's own scheme for the token fields it stores.

    Give one to a manager as ``codec=`` when other code reads the same rows and encrypts
    tokens its own way (the wrapper guide's ``encrypt(refreshToken, SECRET_KEY)``, say): the
    manager then writes ``seal(token)`` into the store and reads ``unseal(value)`` back.
    ``key`` (the credential's store key) and ``field`` (``"access_token"`` or
    ``"refresh_token"``) are context the scheme may bind the value to, or ignore.
    :class:`KeyRing` is a codec too, and the default when a manager has a key ring.

    ``unseal`` may raise anything on a value it cannot open; the manager reports it as one
    opaque :class:`DecryptionError` naming the key and field, never the value.
    """

    def seal(self, plaintext: str, *, key: str, field: str) -> str:
        """The stored form of the token ``plaintext``."""
        ...

    def unseal(self, sealed: str, *, key: str, field: str) -> str:
        """The token a stored value ``seal`` produced."""
        ...


def probe_codec(codec: TokenCodec) -> None:
    """Seal then unseal a fixed test value for each field; ConfigurationError if that fails.

    Managers run this once when they are built, so a codec with a wrong secret, a wrong
    signature or an unreachable key service is found before any provider call, rather than
    after the provider rotated a refresh token that then could not be stored. The test value
    and key are no one's: no token is ever handed to the codec here.
    """
    for field in _PROBE_FIELDS:
        problem = _probe_field(codec, field)
        if problem is not None:
            raise ConfigurationError(
                f"the codec {type(codec).__name__} failed its check: {problem}; fix the codec "
                "(its secret, its key service) before giving it to a manager"
            )


def _probe_field(codec: TokenCodec, field: str) -> str | None:
    """What went wrong sealing then unsealing the test value as ``field``, or None."""
    try:
        sealed = codec.seal(_PROBE_VALUE, key=_PROBE_KEY, field=field)
    except Exception as exc:  # noqa: BLE001 - any failure is the finding, reported by type
        return f"seal(value, key=..., field={field!r}) raised {type(exc).__name__}"
    if not isinstance(sealed, str) or not sealed:
        return f"seal() gave no non-empty str for the {field} (got {type(sealed).__name__})"
    try:
        opened = codec.unseal(sealed, key=_PROBE_KEY, field=field)
    except Exception as exc:  # noqa: BLE001 - as above
        return f"unseal() of what seal() gave for the {field} raised {type(exc).__name__}"
    if opened != _PROBE_VALUE:
        return f"unseal() did not give back the value seal() was given for the {field}"
    return None
