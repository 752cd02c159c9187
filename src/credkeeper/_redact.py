"""Redaction of token-shaped text before it is logged or put into an exception.

The one rule: every text built from a remote body is redacted with every token of that exchange,
the ones sent and the ones received, in each encoding a body may carry them in.
:class:`Redactor` holds those tokens for one exchange; :func:`sealed` turns the token fields of a
decoded body into :class:`Secret` values, so that no frame holds a received token in clear.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus

from ._secret import Secret

__all__ = ["Redactor", "excerpt", "harvest", "redact", "sealed", "secret_key"]

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

# A harvested value shorter than this is not masked: "x" would mask every x of a message,
# and real tokens are far longer.
_MIN_HARVESTED = 8
# In an answer that should have carried new tokens, any string this long without spaces may be
# one under a name nobody expected.
_MIN_LONG = 20
# What tokens are made of: base64, base64url, JWTs.
_TOKEN_RUN = re.compile(rf"[A-Za-z0-9._~+/=\-]{{{_MIN_LONG},}}")
# Named like a token but holding a word such as "Bearer".
_NOT_SECRET_KEYS = frozenset({"tokentype"})


def secret_key(name: object) -> bool:
    """Whether a JSON field ``name`` holds secrets: it mentions a token or a secret.

    The name is compared lowercased without ``_`` and ``-``, so ``access_token``,
    ``accessToken`` and ``Client-Secret`` all count.
    """
    if not isinstance(name, str):
        return False
    normalized = name.lower().replace("_", "").replace("-", "")
    return normalized not in _NOT_SECRET_KEYS and ("token" in normalized or "secret" in normalized)


def _encodings(secret: str) -> set[str]:
    """The forms ``secret`` takes in a body: plain, JSON-escaped (once or twice), URL-encoded."""
    json_once = json.dumps(secret)[1:-1]
    forms = {
        secret,
        json_once,
        json.dumps(secret, ensure_ascii=False)[1:-1],
        # Some encoders escape "/" (PHP's json_encode); a JSON text inside a JSON string
        # (or a Python repr of one, as the wrapper's timeout message is) doubles the escapes.
        json_once.replace("/", "\\/"),
        json.dumps(json_once)[1:-1],
        # Bytes that are not UTF-8 (a lone surrogate's) come out of a lenient decode as U+FFFD.
        secret.encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
    }
    for encode in (quote, quote_plus):
        try:
            forms.add(encode(secret, safe=""))
        except UnicodeEncodeError:
            # A lone surrogate has no URL encoding, so no body can hold it that way.
            continue
    return {form for form in forms if form}


def _strings(value: object) -> Iterator[tuple[str, bool]]:
    """Every string in a decoded JSON value, and whether it sits under a secret-named field.

    Iterative: a body nested a few hundred levels deep must not exhaust the stack.
    """
    stack: list[tuple[object, bool]] = [(value, False)]
    while stack:
        item, secret = stack.pop()
        if isinstance(item, str):
            yield item, secret
        elif isinstance(item, Secret):
            yield item.get_secret_value(), True
        elif isinstance(item, Mapping):
            stack.extend((child, secret or secret_key(name)) for name, child in item.items())
        elif isinstance(item, list | tuple):
            stack.extend((child, secret) for child in item)


def harvest(document: object, *, everything: bool = False) -> list[Secret]:
    """The token candidates in a decoded JSON body, as secrets.

    Every string under a field :func:`secret_key` names, at any depth and inside lists, and
    every :class:`Secret` already sealed. With ``everything``, also every long string without
    spaces anywhere: for an answer that should carry tokens but could not be read.
    """
    found: list[Secret] = []
    for text, secret in _strings(document):
        if len(text) < _MIN_HARVESTED:
            continue
        if secret or (everything and len(text) >= _MIN_LONG and not any(c.isspace() for c in text)):
            found.append(Secret(text))
    return found


def sealed(document: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a decoded JSON object whose secret-named fields hold :class:`Secret` values.

    Strings under a field :func:`secret_key` names, at any depth and inside lists, become
    secrets; everything else is kept. A frame holding the copy shows no token in a traceback's
    locals.
    """
    root: dict[str, Any] = {}
    # Iterative, as harvest is: json.loads accepts nesting deeper than a recursive copy could take.
    stack: list[tuple[Any, Any, bool]] = [(document, root, False)]
    while stack:
        source, target, secret = stack.pop()
        is_object = isinstance(source, Mapping)
        for name, child in source.items() if is_object else enumerate(source):
            inside = secret or (is_object and secret_key(name))
            copy: Any = child
            if isinstance(child, Mapping):
                copy = {}
                stack.append((child, copy, inside))
            elif isinstance(child, list):
                copy = [None] * len(child)
                stack.append((child, copy, inside))
            elif isinstance(child, str) and inside:
                copy = Secret(child)
            target[name] = copy
    return root


def _decoded(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def redact(text: str, secrets: Iterable[str | Secret] = ()) -> str:
    """Return ``text`` with every known secret and every token-shaped substring masked.

    Each secret is masked in every encoding a body may use (see :class:`Redactor`).
    """
    return Redactor(secrets).redact(text)


def excerpt(text: str, secrets: Iterable[str | Secret] = (), *, limit: int = 200) -> str:
    """A short, redacted, single-line piece of ``text`` fit for an exception message.

    Redaction runs on the whole text first so that a token cut in half by the limit is still masked.
    """
    return Redactor(secrets).excerpt(text, limit=limit)


class Redactor:
    """Masks the tokens of one exchange, in every encoding, and token-shaped text.

    Give it the tokens sent (``None`` and empty values are skipped); :meth:`harvesting` adds the
    ones a body carries. Each is masked plain, JSON-escaped and URL-encoded. It holds them so
    that code quoting a server's answer never keeps them in plain local variables, where tools
    that capture a traceback's locals would find them; its ``repr`` shows only how many it holds.
    """

    __slots__ = ("_count", "_forms", "_secrets")

    def __init__(self, secrets: Iterable[str | Secret | None] = ()) -> None:
        values = (s.get_secret_value() if isinstance(s, Secret) else s for s in secrets)
        self._secrets = tuple(value for value in values if value)
        self._count = len(self._secrets)
        # Built on first use: most exchanges succeed and never quote anything.
        self._forms: tuple[str, ...] | None = None

    def _masked(self) -> tuple[str, ...]:
        """Every form of every secret, longest first, so a secret that is a prefix of another
        cannot leave the other's tail."""
        if self._forms is None:
            forms: set[str] = set()
            for secret in self._secrets:
                forms |= _encodings(secret)
            self._forms = tuple(sorted(forms, key=len, reverse=True))
        return self._forms

    def __repr__(self) -> str:
        return f"Redactor({self._count} secrets)"

    def harvesting(self, body: str | bytes | None, *, everything: bool = False) -> Redactor:
        """A redactor masking these secrets and the token candidates in ``body`` as well.

        A JSON body is walked by :func:`harvest`; a form-encoded one gives the values of its
        secret-named fields. With ``everything`` (an answer that should have carried tokens),
        a body that is not JSON also gives every run of token characters at least 20 long.
        """
        if body is None:
            return self
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        document = _decoded(text)
        if document is not None:
            return self.including(harvest(document, everything=everything))
        found = [value for name, value in parse_qsl(text) if secret_key(name)]
        if everything:
            found.extend(match.group() for match in _TOKEN_RUN.finditer(text))
        return self.including(found)

    def including(self, secrets: Iterable[str | Secret | None]) -> Redactor:
        """A redactor masking these secrets and ``secrets`` too."""
        extra = Redactor(secrets)
        if not extra._secrets:
            return self
        combined = Redactor()
        combined._secrets = self._secrets + extra._secrets
        combined._count = self._count + extra._count
        return combined

    def redact(self, text: str) -> str:
        """``text`` with every secret and every token-shaped substring masked."""
        for form in self._masked():
            text = text.replace(form, _MASK)
        for pattern in _PATTERNS:
            text = pattern.sub(
                lambda m: (m.group("k") if "k" in m.groupdict() else "") + _MASK, text
            )
        return text

    def excerpt(self, text: str, *, limit: int = 200) -> str:
        """A short, redacted, single-line piece of ``text`` fit for an exception message.

        Redaction runs on the whole text first, so a token cut in half by the limit is still
        masked.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        cleaned = " ".join(self.redact(text).split())
        return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"
