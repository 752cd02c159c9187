"""``open_store``: from a URL to a store, through the ``credkeeper.stores`` entry points."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType
from typing import Any, Protocol, cast

from ._exceptions import ConfigurationError, UnknownSchemeError
from ._store import AsyncCredentialStore, CredentialStore

__all__ = ["ENTRY_POINT_GROUP", "KNOWN_SCHEMES", "open_store"]

logger = logging.getLogger("credkeeper")

ENTRY_POINT_GROUP = "credkeeper.stores"

#: Schemes served by credkeeper's optional stores, and the extra that installs each.
KNOWN_SCHEMES: Mapping[str, str] = MappingProxyType(
    {
        "sqlite": "sql",
        "postgresql": "sql",
        "postgres": "sql",
        "mysql": "sql",
        "mariadb": "sql",
        "mongodb": "mongo",
        "mongodb+srv": "mongo",
        "aws-sm": "aws",
    }
)


class _StoreFactory(Protocol):
    def from_url(self, url: str, **options: Any) -> CredentialStore | AsyncCredentialStore: ...


def _entry_point(scheme: str) -> EntryPoint | None:
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for name in (scheme, scheme.split("+", 1)[0]):
        if name in found:
            return found[name]
    return None


def open_store(url: str, **options: Any) -> CredentialStore | AsyncCredentialStore:
    """Open the store a URL names, e.g. ``file:///var/lib/app/creds.json`` or ``memory://``.

    The scheme is looked up in the ``credkeeper.stores`` entry-point group, first whole
    (``postgresql+psycopg``), then the part before ``+`` (``postgresql``). First-party and
    third-party stores register the same way. ``options`` go to the store's ``from_url``.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"store URL must look like scheme://..., got {url!r}; e.g. file:///path/to/creds.json"
        )
    # Not urlsplit: driver names such as psycopg_async hold characters it refuses in a scheme.
    scheme = url.split("://", 1)[0].lower()
    entry = _entry_point(scheme)
    if entry is None:
        base = scheme.split("+", 1)[0]
        extra = KNOWN_SCHEMES.get(scheme) or KNOWN_SCHEMES.get(base)
        if extra is not None:
            raise UnknownSchemeError(
                f"the {scheme!r} store is not installed; install it with "
                f"pip install 'credkeeper[{extra}]'",
                scheme=scheme,
            )
        available = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
        raise UnknownSchemeError(
            f"no credential store is registered for scheme {scheme!r}; "
            f"registered: {', '.join(available) or 'none'}",
            scheme=scheme,
        )
    try:
        factory = cast(_StoreFactory, entry.load())
    except ImportError as exc:
        extra = KNOWN_SCHEMES.get(scheme) or KNOWN_SCHEMES.get(scheme.split("+", 1)[0])
        hint = f"pip install 'credkeeper[{extra}]'" if extra else f"install {entry.value}'s package"
        raise UnknownSchemeError(
            f"the store for scheme {scheme!r} failed to import ({exc.name or exc}); {hint}",
            scheme=scheme,
        ) from exc
    logger.debug("opening %s store %s", scheme, entry.value)
    return factory.from_url(url, **options)
