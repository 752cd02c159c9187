"""Redaction of token-shaped text before it is logged or put into an exception."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["Redactor", "excerpt", "redact"]

_MASK = "[REDACTED]"

# Anthropic tokens (sk-ant-oat01-..., sk-ant-ort01-...), JSON token fields, bearer headers,
# and form-encoded token parameters: what a provider or wrapper error body is known to echo.
_PATTERNS = (
    re.compile(r"sk-ant-[A-Za-z0-9]+-[A-Za-z0-9_\-]+"),
    re.compile(
        r"""(?P<k>["']?(?:access_?token|refresh_?token|id_?token|client_?secret|accessToken|refreshToken|auth_token)["']?\s*[:=]\s*["']?)[^"'\s,&}]+""",
        re.IGNORECASE,
    ),
    re.compile(r"(?P<k>[Bb]earer\s+)[A-Za-z0-9._~+/\-]+=*"),
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Return ``text`` with every known secret and every token-shaped substring masked."""
    # Longest first, so a secret that is a prefix of another cannot leave the other's tail.
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, _MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: (m.group("k") if "k" in m.groupdict() else "") + _MASK, text)
    return text


def excerpt(text: str, secrets: Iterable[str] = (), *, limit: int = 200) -> str:
    """A short, redacted, single-line piece of ``text`` fit for an exception message.

    Redaction runs on the whole text first so that a token cut in half by the limit is still masked.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    cleaned = " ".join(redact(text, secrets).split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


class Redactor:
    """Masks a fixed set of secrets, and token-shaped text, in what it quotes.

    It holds the secrets of one call so that code quoting a server's answer never keeps them
    in plain local variables, where tools that capture a traceback's locals would find them;
    its ``repr`` shows only how many it holds.
    """

    __slots__ = ("_secrets",)

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = tuple(secrets)

    def __repr__(self) -> str:
        return f"Redactor({len(self._secrets)} secrets)"

    def excerpt(self, text: str, *, limit: int = 200) -> str:
        """:func:`excerpt` of ``text`` with this redactor's secrets."""
        return excerpt(text, self._secrets, limit=limit)
