"""What a credential store is made of: the kit every first-party store is built from.

A store keeps :class:`~credkeeper.Record` objects and offers compare-and-swap on their version
(``docs/custom-stores.md`` states the contract, :class:`credkeeper.testing.StoreConformance`
checks it). Around that core every store needs the same few pieces, and getting one of them
subtly different makes stores disagree; so they live here, public, for first-party and custom
stores alike:

- **input checks**: :func:`check_key`, :func:`check_record` and :func:`check_moment`, which
  every store method runs on what it is given, so that every store refuses the same misuse
  with the same :class:`~credkeeper.ConfigurationError`;
- **conversions**: :func:`to_epoch_ms` and :func:`from_epoch_ms` (the one time unit on every
  wire), :func:`read_epoch_ms` for a stored value that may be damaged, :func:`stored_record`
  for a record read back (what ``Record`` refuses there is ``StoreCorrupted``);
- **versions**: :func:`new_version` for compare-and-swap, :func:`token_digest` to notice a
  token that changed without keeping it;
- **options**: :func:`query_options`, :func:`merge_options` and :func:`read_options` read a
  store's options from its URL's query and from keywords with one set of rules and messages
  (:data:`FLAG`, :data:`SECONDS`, :data:`COUNT`, :data:`NAME`);
- **errors**: :func:`error_boundary`, the one place a store translates its driver's
  exceptions into credkeeper's;
- **context managers**: :class:`ClosingStore` and :class:`AsyncClosingStore`, optional bases
  that make ``with store:`` and ``async with store:`` close the store;
- **async**: :func:`as_async_store` gives a sync-only store the async interface;
- **change notices**: :class:`ChangeNotices`, for a store whose database announces changes
  (``LISTEN``/``NOTIFY``, change streams, pub/sub): its ``changes()`` method returns one, its
  listener posts each changed key there, and callers waiting on a peer's refresh of that key
  read it again at once instead of on a schedule; :class:`ChangeListener` runs that listener
  (a thread per process, reconnecting with backoff) around the store's own feed.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Generic, Literal, Self, TypeVar
from urllib.parse import parse_qsl

from ._closing import Closing
from ._credentials import from_epoch_ms, to_epoch_ms
from ._exceptions import ConfigurationError, CredkeeperError, InvalidKey
from ._notices import ChangeListener, ChangeNotices, Feed
from ._record import (
    MAX_KEY_LENGTH,
    Record,
    check_key,
    check_moment,
    read_epoch_ms,
    stored_record,
)
from ._store import AsyncCredentialStore, as_async_store

__all__ = [
    "COUNT",
    "FLAG",
    "MAX_KEY_LENGTH",
    "NAME",
    "SECONDS",
    "AsyncClosingStore",
    "ChangeListener",
    "ChangeNotices",
    "ClosingStore",
    "Feed",
    "InvalidKey",
    "Option",
    "as_async_store",
    "check_key",
    "check_moment",
    "check_record",
    "error_boundary",
    "from_epoch_ms",
    "merge_options",
    "new_version",
    "query_options",
    "read_epoch_ms",
    "read_options",
    "stored_record",
    "to_epoch_ms",
    "token_digest",
]

T = TypeVar("T")


# -- input checks ------------------------------------------------------------------------


def check_record(record: object) -> Record:
    """Return ``record`` if it is a :class:`~credkeeper.Record`, else raise ConfigurationError.

    A record validates its own fields when it is made, so this is all ``put`` needs to check.
    """
    if not isinstance(record, Record):
        raise ConfigurationError(f"record must be a credkeeper.Record, not {type(record).__name__}")
    return record


# -- conversions and versions --------------------------------------------------------------


def new_version() -> str:
    """A fresh compare-and-swap version: 32 random hex digits, never reused."""
    return uuid.uuid4().hex


def token_digest(token: str) -> str:
    """16 hex digits of the SHA-256 of ``token``: enough to notice that a stored token changed,
    useless for recovering it (tokens are long and random), so safe to keep beside a version."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


# -- options -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Option(Generic[T]):
    """How one store option is read: ``parse`` turns a keyword's value or a URL query's text
    into the option's value, raising ``ValueError`` or ``TypeError`` when it cannot;
    ``expects`` says what it accepts, for the error message."""

    parse: Callable[[object], T]
    expects: str


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ValueError(value)


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(value)
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(value)
    return number


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(value)
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


def _name(value: object) -> str:
    if not isinstance(value, str) or not value or value != value.strip():
        raise ValueError(value)
    return value


#: ``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``), or a bool.
FLAG: Option[bool] = Option(_flag, "true or false")
#: A positive, finite number of seconds.
SECONDS: Option[float] = Option(_seconds, "a positive number of seconds")
#: A positive whole number.
COUNT: Option[int] = Option(_count, "a positive whole number")
#: A non-empty name without surrounding spaces (a table, a collection, a prefix).
NAME: Option[str] = Option(_name, "a non-empty name without surrounding spaces")


def query_options(query: str, *, store: str) -> dict[str, str]:
    """The options in a store URL's ``query`` (the text after ``?``), each given once.

    ``store`` names the store in messages (``"SQL store"``). A malformed query or an option
    given twice is a :class:`~credkeeper.ConfigurationError`.
    """
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigurationError(
            f"the {store} URL's query is malformed; write options as ?name=value&other=value"
        ) from None
    options: dict[str, str] = {}
    for name, value in pairs:
        if name in options:
            raise ConfigurationError(f"the {store} URL gives the option {name!r} twice")
        options[name] = value
    return options


def merge_options(
    from_url: Mapping[str, Any], keywords: Mapping[str, Any], *, store: str
) -> dict[str, Any]:
    """The options of a store's URL and its keyword options, together.

    ``store`` names the store in messages (``"SQL store"``). An option given both ways is a
    :class:`~credkeeper.ConfigurationError`: neither silently wins.
    """
    twice = sorted(set(from_url) & set(keywords))
    if twice:
        raise ConfigurationError(
            f"{store} option(s) {', '.join(twice)} given both in the URL and as keywords"
        )
    return {**from_url, **keywords}


def read_options(
    given: Mapping[str, object],
    options: Mapping[str, Option[Any]],
    *,
    store: str,
    others: Literal["refuse", "return"] = "refuse",
) -> tuple[dict[str, Any], dict[str, object]]:
    """Read the ``options`` a store knows from ``given`` (URL query options and keywords alike).

    Returns the values read, by name, and the options ``given`` that ``options`` does not
    name: with ``others="refuse"`` (the default) any such option is a
    :class:`~credkeeper.ConfigurationError` listing the known ones; with ``"return"`` they are
    handed back for the caller (a driver's own URL options). A value an option cannot read is
    a ``ConfigurationError`` naming the store, the option, what it expects and what it got.
    """
    values: dict[str, Any] = {}
    rest: dict[str, object] = {}
    for name, value in given.items():
        option = options.get(name)
        if option is None:
            rest[name] = value
            continue
        try:
            values[name] = option.parse(value)
        except (ValueError, TypeError, OverflowError):
            raise ConfigurationError(
                f"{store} option {name} must be {option.expects}, got {value!r}"
            ) from None
    if rest and others == "refuse":
        raise ConfigurationError(
            f"unknown {store} option(s) {', '.join(sorted(rest))}; "
            f"the options are {', '.join(sorted(options))}"
        )
    return values, rest


# -- errors --------------------------------------------------------------------------------


def error_boundary(
    translate: Callable[[Exception], CredkeeperError], *driver_errors: type[Exception]
) -> AbstractContextManager[None]:
    """Translate the ``driver_errors`` raised inside the block with ``translate``.

    A store wraps every driver call in one boundary (``with self._boundary(key): ...``), so
    that its whole error mapping is one function and no driver exception escapes it.
    credkeeper's own exceptions pass through untouched. The driver's exception is kept as the
    ``__cause__`` for debugging; ``translate`` must not quote values it may contain.
    """
    return _ErrorBoundary(translate, driver_errors)


class _ErrorBoundary:
    """:func:`error_boundary`'s context manager: a class, as every store call enters one, and
    a generator-based one costs a microsecond more, a percent of a SQLite read."""

    __slots__ = ("_driver_errors", "_translate")

    def __init__(
        self,
        translate: Callable[[Exception], CredkeeperError],
        driver_errors: tuple[type[Exception], ...],
    ) -> None:
        self._translate = translate
        self._driver_errors = driver_errors

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        exc = exc_info[1]
        if isinstance(exc, self._driver_errors) and not isinstance(exc, CredkeeperError):
            raise self._translate(exc) from exc


# -- context managers ----------------------------------------------------------------------


class ClosingStore(Closing):
    """An optional base of a sync store: ``with store: ...`` closes it when the block ends,
    however it ends. The store defines ``close()``, as :class:`~credkeeper.CredentialStore`
    asks."""


class AsyncClosingStore:
    """An optional base of an async store: ``async with store: ...`` awaits its ``close()``
    when the block ends, however it ends."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self: AsyncCredentialStore, *exc_info: object) -> None:
        await self.close()
