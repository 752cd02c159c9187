"""Codec factories for ``--codec`` in the command-line tests: ``tests.cli.app_codecs:NAME``.

The working codec the tests use is the documentation's own, ``tests.examples:app_cipher``;
these are the ways an application's factory can go wrong, and a key ring given as the codec.
"""

from __future__ import annotations

from credkeeper import KeyRing

#: What a failing factory quotes in its error, which the command line must not repeat.
FACTORY_SECRET = "the-factory-secret-4f1c"


class SealOnly:
    """Half a codec: it can seal, but has no unseal."""

    def seal(self, plaintext: str, *, key: str, field: str) -> str:
        """The token reversed."""
        return plaintext[::-1]


class WrongSecret(SealOnly):
    """A codec built with the wrong secret: it opens nothing, not even what it sealed."""

    def unseal(self, sealed: str, *, key: str, field: str) -> str:
        """Never opens."""
        raise ValueError("not a value this secret sealed")


def failing() -> SealOnly:
    """A factory that cannot reach its key service, and says so quoting its secret."""
    raise RuntimeError(f"key service unreachable with {FACTORY_SECRET}")


def seal_only() -> SealOnly:
    """A factory returning half a codec."""
    return SealOnly()


def wrong_secret() -> WrongSecret:
    """A factory returning a codec that fails the manager's check."""
    return WrongSecret()


def key_ring() -> KeyRing:
    """The application's key ring, from APP_KEYS, given as the codec."""
    return KeyRing.from_env("APP_KEYS")
