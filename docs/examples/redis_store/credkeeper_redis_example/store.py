"""``RedisStore`` and ``AsyncRedisStore``: credentials in Redis, through redis-py.

Layout, under a prefix (``credkeeper:`` unless the URL's ``?prefix=`` says otherwise):

- ``<prefix>record:<key>``, a hash per credential: ``version``, the compare-and-swap token, and
  ``document``, the JSON of :meth:`credkeeper.Record.to_document`;
- ``<prefix>due``, a sorted set of every key, scored by its ``expires_at`` in epoch
  milliseconds, which :meth:`RedisStore.scan_due` walks a page at a time.

Writes are Lua scripts: Redis runs each one atomically, in one round trip, so a record and its
place in the index never disagree and no other client's write lands between the compare and
the swap. Both classes share everything but their calls to their client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.exceptions as redis_errors
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.typing import EncodableT

from credkeeper import (
    ConfigurationError,
    ConflictError,
    Record,
    StoreCorrupted,
    StoreError,
    StoreUnavailable,
)
from credkeeper import storekit as kit

__all__ = ["DEFAULT_PREFIX", "AsyncRedisStore", "RedisStore"]

_STORE = "Redis store"

#: The key prefix of a store whose URL gives none.
DEFAULT_PREFIX = "credkeeper:"

_OPTIONS: dict[str, kit.Option[Any]] = {
    "prefix": kit.NAME,
    "page_size": kit.COUNT,
    "timeout": kit.SECONDS,
    "async": kit.FLAG,
}

# -- the scripts -------------------------------------------------------------------------------

# KEYS: the record's hash, the expiry index.
# ARGV: "1" to create or "0" to update, the version read, the new version, the document, the
# expiry in epoch ms, the key.
_PUT = """
local stored = redis.call('HGET', KEYS[1], 'version')
if ARGV[1] == '1' then
    if stored then return 0 end
elseif stored ~= ARGV[2] then
    return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[3], 'document', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[6])
return 1
"""

# KEYS: the record's hash, the expiry index. ARGV: the key.
_DELETE = """
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
"""

# One page of due keys, after the last one the previous page returned.
# KEYS: the expiry index. ARGV: the bound in epoch ms, the page size, and the last (score,
# member) returned, both empty for the first page. Returns members and scores, interleaved.
#
# The page starts at the rank of the first entry after (score, member) in the set's own order,
# found now rather than remembered: a member deleted or moved since the last page (a sweeper
# refreshing what the scan yields does exactly that) shifts the ranks of those after it, and
# an offset kept from one page to the next would then skip keys. Among entries of one score the
# set orders members byte by byte; Lua's own string comparison follows the server's locale,
# hence after().
_SCAN_PAGE = """
local function after(a, b)
    for i = 1, math.min(#a, #b) do
        local x, y = string.byte(a, i), string.byte(b, i)
        if x ~= y then return x > y end
    end
    return #a > #b
end
local due = redis.call('ZCOUNT', KEYS[1], '-inf', ARGV[1])
local first = 0
if ARGV[3] ~= '' then
    first = redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. ARGV[3])
    local stop = first + redis.call('ZCOUNT', KEYS[1], ARGV[3], ARGV[3])
    while first < stop do
        local middle = math.floor((first + stop) / 2)
        if after(redis.call('ZRANGE', KEYS[1], middle, middle)[1], ARGV[4]) then
            stop = middle
        else
            first = middle + 1
        end
    end
end
local last = math.min(first + tonumber(ARGV[2]), due) - 1
if last < first then return {} end
return redis.call('ZRANGE', KEYS[1], first, last, 'WITHSCORES')
"""


# -- options and URLs --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Options:
    """A store's options, read and checked once."""

    prefix: str
    page_size: int
    timeout: float
    asynchronous: bool | None

    @classmethod
    def read(cls, given: Mapping[str, object]) -> _Options:
        """The options ``given`` (the URL's query and keywords alike); unknown ones are refused."""
        values, _ = kit.read_options(given, _OPTIONS, store=_STORE)
        return cls(
            prefix=values.get("prefix", DEFAULT_PREFIX),
            page_size=values.get("page_size", 500),
            timeout=values.get("timeout", 5.0),
            asynchronous=values.get("async"),
        )


@dataclass(frozen=True, slots=True)
class _Target:
    """A store URL split into what redis-py gets and what the store keeps."""

    client_url: str
    options: _Options
    shown: str
    password: str | None


def _parse_url(url: object, keywords: Mapping[str, object]) -> _Target:
    """The URL without its query (redis-py's part), the store's options from the query and
    ``keywords``, and the URL fit to show (no user or password)."""
    if not isinstance(url, str) or urlsplit(url).scheme.lower() != "redis":
        raise ConfigurationError(f"{_STORE} URL must look like redis://host:6379/0?prefix=app:")
    parts = urlsplit(url)
    options = _Options.read(
        kit.merge_options(kit.query_options(parts.query, store=_STORE), keywords, store=_STORE)
    )
    try:
        port = parts.port or 6379
    except ValueError:
        raise ConfigurationError(f"{_STORE} URL has a port that is not a number") from None
    shown = f"redis://{parts.hostname or 'localhost'}:{port}{parts.path or '/0'}"
    client_url = urlunsplit(parts._replace(query="", fragment=""))
    return _Target(client_url, options, shown, parts.password)


def _client_settings(options: _Options, *, asynchronous: bool) -> dict[str, Any]:
    """What every client this store makes is given."""
    retry: Any = AsyncRetry if asynchronous else Retry
    return {
        "socket_timeout": options.timeout,
        "socket_connect_timeout": options.timeout,
        # No retries inside redis-py: a put whose reply was lost may have been applied, and
        # sending it again would answer ConflictError to the writer that won. An outage is
        # StoreUnavailable at once, and the engine's own deadline decides what happens next.
        "retry": retry(NoBackoff(), 0),
    }


def _make_client(target: _Target, *, asynchronous: bool) -> Any:
    kind: Any = redis.asyncio.Redis if asynchronous else redis.Redis
    try:
        # from_url connects on the first command, not here: opening a store does no I/O.
        return kind.from_url(
            target.client_url, **_client_settings(target.options, asynchronous=asynchronous)
        )
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"{_STORE} URL {target.shown!r} is not valid: {_scrub(str(exc), target.password)}"
        ) from None


# -- errors ------------------------------------------------------------------------------------

_DRIVER_ERRORS = (redis_errors.RedisError, OSError)

# Replies that mean "not now": a replica that cannot take writes during a failover, a server
# out of memory, loading its data or busy with another script. Retrying later may work.
_UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,
    OSError,
)
_REFUSED = (
    redis_errors.AuthenticationError,
    redis_errors.AuthorizationError,
    redis_errors.NoPermissionError,
)


def _scrub(text: str, password: str | None) -> str:
    text = " ".join(text.split())
    return text.replace(password, "***") if password else text


def _translate(exc: Exception, key: str | None, password: str | None) -> StoreError:
    """A redis-py error as credkeeper's. Redis's replies never quote a command's arguments, so
    their text is kept; the URL's password is taken out in case a connection error shows it."""
    about = f" for key {key!r}" if key is not None else ""
    detail = f"{type(exc).__name__}: {_scrub(str(exc), password)}"
    if isinstance(exc, _REFUSED):
        return StoreError(
            f"Redis refused the {_STORE}'s login or command{about} ({detail}); check the "
            "URL's user and password, and that the user's ACL allows EVALSHA, SCRIPT LOAD, "
            "HMGET and TIME",
            key=key,
        )
    if isinstance(exc, _UNAVAILABLE) or str(exc).startswith(("BUSY", "LOADING", "MASTERDOWN")):
        return StoreUnavailable(f"the {_STORE} failed{about} ({detail}); retry later", key=key)
    if str(exc).startswith("WRONGTYPE"):
        return StoreCorrupted(
            f"a Redis key of the {_STORE}{about} holds a value credkeeper did not write; "
            "give the store a prefix of its own (?prefix=)",
            key=key,
        )
    return StoreError(f"the {_STORE} failed{about} ({detail})", key=key)


# -- what both classes share -------------------------------------------------------------------


def _text(value: bytes | str, key: str | None) -> str:
    try:
        return value.decode() if isinstance(value, bytes) else value
    except UnicodeDecodeError:
        raise StoreCorrupted(
            f"the {_STORE} index holds a member that is not UTF-8; credkeeper did not write it",
            key=key,
        ) from None


def _read_record(
    key: str, version: bytes | str | None, document: bytes | str | None
) -> Record | None:
    """The record in a hash's two fields, ``None`` when there is no hash; anything else
    there is ``StoreCorrupted`` naming the key (never a value)."""
    if version is None and document is None:
        return None
    if version is None or document is None:
        raise StoreCorrupted(
            f"stored record for key {key!r} lacks its version or document", key=key
        )
    try:
        fields = json.loads(document)
    except (ValueError, UnicodeDecodeError):
        fields = None
    if not isinstance(fields, dict):
        raise StoreCorrupted(f"stored record for key {key!r} is not a JSON object", key=key)
    return Record.from_document(key, fields, version=_text(version, key))


def _moment(seconds: int, microseconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=microseconds)


class _RedisStoreBase:
    """What :class:`RedisStore` and :class:`AsyncRedisStore` share: options, key names, the
    arguments of each script, the error boundary and how a store shows."""

    _asynchronous: ClassVar[bool]
    _client: Any

    def __init__(self, url: str, **options: Any) -> None:
        target = _parse_url(url, options)
        if target.options.asynchronous not in (None, self._asynchronous):
            wanted = "AsyncRedisStore" if target.options.asynchronous else "RedisStore"
            raise ConfigurationError(f"this URL asks for {wanted}; open it with that class")
        self._open(target)

    def _open(self, target: _Target) -> None:
        self.prefix = target.options.prefix
        self.page_size = target.options.page_size
        self._due = f"{self.prefix}due"
        self._shown = target.shown
        self._password = target.password
        self._client = _make_client(target, asynchronous=self._asynchronous)
        self._scripts()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisStore | AsyncRedisStore:
        """Open a store from ``redis://[[user]:password@]host[:port][/db]``.

        Options, in the URL's query or as keywords: ``prefix`` (of every Redis key the store
        uses, default ``credkeeper:``), ``page_size`` (keys per round trip of ``scan_due``,
        default 500), ``timeout`` (seconds to connect or to wait for a reply, default 5) and
        ``async`` (``true`` gives an :class:`AsyncRedisStore`, ``false`` a
        :class:`RedisStore`; without it, the class's own kind). The classes' constructors take
        the same URL and options.
        """
        target = _parse_url(url, options)
        asynchronous = target.options.asynchronous
        if asynchronous is None:
            asynchronous = cls._asynchronous
        kind: type[RedisStore | AsyncRedisStore] = AsyncRedisStore if asynchronous else RedisStore
        store = kind.__new__(kind)
        store._open(target)
        return store

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._shown!r}, prefix={self.prefix!r})"

    def _scripts(self) -> None:
        raise NotImplementedError

    def _record_key(self, key: str) -> str:
        return f"{self.prefix}record:{key}"

    def _boundary(self, key: str | None) -> AbstractContextManager[None]:
        """Translate whatever redis-py raises inside the block (:func:`_translate`)."""
        return kit.error_boundary(lambda exc: _translate(exc, key, self._password), *_DRIVER_ERRORS)

    def _put_arguments(self, record: Record, version: str) -> tuple[list[str], list[EncodableT]]:
        arguments: list[EncodableT] = [
            "1" if record.version is None else "0",
            record.version or "",
            version,
            json.dumps(record.to_document(), separators=(",", ":")),
            kit.to_epoch_ms(record.expires_at),
            record.key,
        ]
        return [self._record_key(record.key), self._due], arguments

    def _stored(self, record: Record, version: str, swapped: object) -> Record:
        if not swapped:
            raise ConflictError(
                f"the record under key {record.key!r} "
                + ("already exists" if record.version is None else "changed since it was read"),
                key=record.key,
            )
        return record.replace(version=version)

    def _page_arguments(self, before: int, last: tuple[bytes, bytes] | None) -> list[EncodableT]:
        score, member = last or (b"", b"")
        return [before, self.page_size, score, member]


# -- sync --------------------------------------------------------------------------------------


class RedisStore(kit.ClosingStore, _RedisStoreBase):
    """A :class:`~credkeeper.CredentialStore` in Redis, through redis-py's ``Redis`` client.

    Open it with :meth:`from_url` or ``credkeeper.open_store("redis://host:6379/0")``. One
    store is safe to share between threads: redis-py gives each command a connection of its
    pool. Processes and hosts sharing the Redis database and prefix share the credentials.
    """

    _asynchronous = False
    _client: redis.Redis

    def _scripts(self) -> None:
        self._put = self._client.register_script(_PUT)
        self._delete = self._client.register_script(_DELETE)
        self._scan_page = self._client.register_script(_SCAN_PAGE)

    def get(self, key: str) -> Record | None:
        """See :meth:`credkeeper.CredentialStore.get`: one ``HMGET``."""
        kit.check_key(key)
        with self._boundary(key):
            version, document = self._client.hmget(self._record_key(key), ["version", "document"])
        return _read_record(key, version, document)

    def put(self, record: Record) -> Record:
        """See :meth:`credkeeper.CredentialStore.put`: compare-and-swap in one script."""
        kit.check_record(record)
        version = kit.new_version()
        keys, arguments = self._put_arguments(record, version)
        with self._boundary(record.key):
            swapped = self._put(keys=keys, args=arguments)
        return self._stored(record, version, swapped)

    def delete(self, key: str) -> bool:
        """See :meth:`credkeeper.CredentialStore.delete`: the record and its index entry."""
        kit.check_key(key)
        with self._boundary(key):
            removed = self._delete(keys=[self._record_key(key), self._due], args=[key])
        return bool(removed)

    def scan_due(self, before: datetime) -> Iterator[str]:
        """See :meth:`credkeeper.CredentialStore.scan_due`: ``page_size`` keys per round trip,
        never more in memory."""
        return self._scan(kit.to_epoch_ms(kit.check_moment("before", before)))

    def _scan(self, before: int) -> Iterator[str]:
        last: tuple[bytes, bytes] | None = None
        while True:
            with self._boundary(None):
                page = self._scan_page(keys=[self._due], args=self._page_arguments(before, last))
            for member in page[::2]:
                yield _text(member, None)
            if len(page) < 2 * self.page_size:
                return
            last = (page[-1], page[-2])

    def now(self) -> datetime:
        """The Redis server's clock (``TIME``), aware UTC: leases are judged on it, so hosts
        whose clocks disagree still agree on when a lease ends."""
        with self._boundary(None):
            seconds, microseconds = self._client.time()
        return _moment(seconds, microseconds)

    def close(self) -> None:
        """Close the client and its connections."""
        with self._boundary(None):
            self._client.close()


# -- async -------------------------------------------------------------------------------------


class AsyncRedisStore(kit.AsyncClosingStore, _RedisStoreBase):
    """The :class:`~credkeeper.AsyncCredentialStore` twin of :class:`RedisStore`, on
    ``redis.asyncio``; same options, same keys, so both kinds can share one database."""

    _asynchronous = True
    _client: redis.asyncio.Redis

    def _scripts(self) -> None:
        self._put = self._client.register_script(_PUT)
        self._delete = self._client.register_script(_DELETE)
        self._scan_page = self._client.register_script(_SCAN_PAGE)

    async def get(self, key: str) -> Record | None:
        """See :meth:`credkeeper.AsyncCredentialStore.get`."""
        kit.check_key(key)
        with self._boundary(key):
            version, document = await self._client.hmget(
                self._record_key(key), ["version", "document"]
            )
        return _read_record(key, version, document)

    async def put(self, record: Record) -> Record:
        """See :meth:`RedisStore.put`."""
        kit.check_record(record)
        version = kit.new_version()
        keys, arguments = self._put_arguments(record, version)
        with self._boundary(record.key):
            swapped = await self._put(keys=keys, args=arguments)
        return self._stored(record, version, swapped)

    async def delete(self, key: str) -> bool:
        """See :meth:`RedisStore.delete`."""
        kit.check_key(key)
        with self._boundary(key):
            removed = await self._delete(keys=[self._record_key(key), self._due], args=[key])
        return bool(removed)

    def scan_due(self, before: datetime) -> AsyncIterator[str]:
        """See :meth:`RedisStore.scan_due`."""
        return self._scan(kit.to_epoch_ms(kit.check_moment("before", before)))

    async def _scan(self, before: int) -> AsyncIterator[str]:
        last: tuple[bytes, bytes] | None = None
        while True:
            with self._boundary(None):
                page = await self._scan_page(
                    keys=[self._due], args=self._page_arguments(before, last)
                )
            for member in page[::2]:
                yield _text(member, None)
            if len(page) < 2 * self.page_size:
                return
            last = (page[-1], page[-2])

    async def now(self) -> datetime:
        """See :meth:`RedisStore.now`."""
        with self._boundary(None):
            seconds, microseconds = await self._client.time()
        return _moment(seconds, microseconds)

    async def close(self) -> None:
        """Close the client and its connections."""
        with self._boundary(None):
            await self._client.aclose()
