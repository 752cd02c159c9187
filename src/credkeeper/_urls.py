"""The one rule for URLs that tokens are sent to: https, or plain http on loopback only."""

from __future__ import annotations

import contextlib
from urllib.parse import SplitResult, urlsplit

from ._exceptions import ConfigurationError

__all__ = ["LOOPBACK", "secure_url", "shown_url"]

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def secure_url(value: object, *, option: str, hint: str = "") -> SplitResult:
    """The parts of ``value``, an absolute https URL, or an http one to a loopback host.

    Anything else raises :class:`ConfigurationError` naming ``option``, with ``hint`` appended:
    tokens sent over plain http to another host can be read by anyone on the way.
    """
    parts: SplitResult | None = None
    host: str | None = None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # a malformed IPv6 host, e.g. https://[::1/x
            parts = urlsplit(value)
            host = parts.hostname
    if parts is None or parts.scheme not in ("https", "http") or not host:
        shown = shown_url(parts) if parts is not None else value
        raise ConfigurationError(f"{option} must be an absolute http(s) URL, got {shown!r}{hint}")
    if parts.scheme == "http" and host not in LOOPBACK:
        raise ConfigurationError(
            f"{option} must use https (plain http is accepted only on loopback), "
            f"got {shown_url(parts)!r}{hint}"
        )
    return parts


def shown_url(url: str | SplitResult) -> str:
    """``url`` fit for a message or a log: without its user and password, and with its query
    cut to ``?...`` and no fragment, since receivers and proxies put secrets in them."""
    parts = urlsplit(url) if isinstance(url, str) else url
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc, query="..." if parts.query else "", fragment="").geturl()
