"""A :class:`credkeeper.TokenCodec` for tokens the application encrypts itself.

The same scheme as ``app_cipher.mjs``, the application's ``encrypt(token, SECRET_KEY)``:
AES-256-GCM under SHA-256 of the secret key, a random 96-bit nonce per value, stored as
``base64(iv):base64(tag):base64(ciphertext)``. Give it to the manager, and credkeeper writes
refreshed tokens exactly as the application's own code would, and reads what that code wrote::

    TokenManager(store, Provider.claude_code(), codec=AppCipher(os.environ["SECRET_KEY"]))

The scheme binds nothing to the row (the application's does not): ``key`` and ``field`` are
ignored, which is the application's choice, not credkeeper's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_NONCE_BYTES = 12
_TAG_BYTES = 16


class AppCipher:
    """The application's ``encrypt``/``decrypt`` as a credkeeper codec."""

    def __init__(self, secret_key: str) -> None:
        if not secret_key:
            raise ValueError("secret_key must be a non-empty string (the app's SECRET_KEY)")
        self._aead = AESGCM(hashlib.sha256(secret_key.encode()).digest())

    def __repr__(self) -> str:
        return "AppCipher(secret_key='**********')"

    def seal(self, plaintext: str, *, key: str, field: str) -> str:
        """``encrypt(plaintext, SECRET_KEY)``."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), None)
        body, tag = sealed[:-_TAG_BYTES], sealed[-_TAG_BYTES:]
        return ":".join(base64.b64encode(part).decode() for part in (nonce, tag, body))

    def unseal(self, sealed: str, *, key: str, field: str) -> str:
        """``decrypt(sealed, SECRET_KEY)``; ValueError for anything it cannot open."""
        try:
            nonce, tag, body = (base64.b64decode(part, validate=True) for part in sealed.split(":"))
            return self._aead.decrypt(nonce, body + tag, None).decode()
        except (ValueError, binascii.Error, InvalidTag, UnicodeDecodeError):
            raise ValueError("not a value this SECRET_KEY sealed") from None
