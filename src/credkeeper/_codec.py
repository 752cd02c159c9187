"""``TokenCodec``: how token fields are kept in a store, when not by credkeeper's key ring."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["TokenCodec"]


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
