"""``MongoStore`` and ``AsyncMongoStore``: credentials in MongoDB through pymongo.

Both execute the plans of ``_layout`` with their kind of client (``MongoClient``,
``AsyncMongoClient``); this module adds clients, options, indexes, streaming scans, and the
translation of driver errors into credkeeper's.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeAlias
from urllib.parse import unquote

import pymongo
import pymongo.errors as mongo_errors
from bson.codec_options import CodecOptions
from bson.errors import BSONError
from pymongo import AsyncMongoClient, MongoClient, ReadPreference, WriteConcern
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.collection import Collection
from pymongo.common import get_validated_options

from credkeeper import (
    ConfigurationError,
    ConflictError,
    CredkeeperError,
    Record,
    StoreCorrupted,
    StoreError,
    StoreUnavailable,
    time_remaining,
)
from credkeeper._record import check_key

from ._layout import (
    DEFAULT_COLLECTION,
    Embedded,
    EmbeddedLayout,
    Find,
    Insert,
    Layout,
    ListIndexes,
    Operation,
    OwnCollection,
    Plan,
    Update,
)

__all__ = ["AsyncMongoStore", "MongoStore"]

_LAYOUT_OPTIONS = (
    "match_field",
    "field_path",
    "field_naming",
    "key_type",
    "expires_at_unit",
    "scopes_format",
    "upsert",
    "state_field",
)
_OPTIONS = frozenset(
    {
        "database",
        "collection",
        "write_concern",
        "batch_size",
        "create_index",
        "async",
        "plaintext",
        *_LAYOUT_OPTIONS,
    }
)
_KEYWORD_OPTIONS = frozenset({*_OPTIONS, "layout"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_SCHEMES = ("mongodb", "mongodb+srv")

# Client settings credkeeper picks unless the URL gives its own: fail over to StoreUnavailable
# within seconds instead of pymongo's 30 s, and name the application in server logs.
_CLIENT_DEFAULTS: Mapping[str, Any] = {
    "serverSelectionTimeoutMS": 10_000,
    "connectTimeoutMS": 10_000,
    "appname": "credkeeper",
}

# Server error codes that mean "not now": a primary stepping down or shutting down, a network
# or host failure seen by the server, a time limit. Retrying may work.
_UNAVAILABLE_CODES = frozenset(
    {6, 7, 50, 89, 91, 189, 202, 262, 9001, 10107, 11600, 11602, 13435, 13436}
)
_INDEX_EXISTS_CODES = frozenset({85, 86})  # IndexOptionsConflict, IndexKeySpecsConflict
_UNAUTHORIZED_CODES = frozenset({13, 18})
_CURSOR_NOT_FOUND = 43
_PATH_NOT_VIABLE = 28

_DRIVER_ERRORS = (mongo_errors.PyMongoError, BSONError, OSError, ValueError, OverflowError)

# The server's clock, as MongoDB documents it: $$NOW, evaluated on the primary, over
# $documents so that no collection is read (MongoDB 6.0+; SecantusDB has both). A server that
# refuses the pipeline (older, or only wire-compatible) is read through hello's localTime,
# the same clock, which every server since 4.4.2 answers without any privilege.
_NOW_PIPELINE: list[Mapping[str, Any]] = [
    {"$documents": [{}]},
    {"$project": {"_id": 0, "now": "$$NOW"}},
]

_READ_OPTIONS: CodecOptions[dict[str, Any]] = CodecOptions(tz_aware=True, tzinfo=UTC)

Client: TypeAlias = "MongoClient[dict[str, Any]] | AsyncMongoClient[dict[str, Any]]"


# -- options -----------------------------------------------------------------------------


def _flag(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ConfigurationError(f"MongoDB store option {name} must be true or false, got {value!r}")


def _write_concern(value: object) -> WriteConcern:
    wrong = ConfigurationError(
        "MongoDB store option write_concern must be 'majority', a number of nodes, a tag "
        f"name or a pymongo.WriteConcern, got {value!r}"
    )
    try:
        if isinstance(value, WriteConcern):
            concern = value
        elif isinstance(value, int) and not isinstance(value, bool):
            concern = WriteConcern(w=value)
        elif isinstance(value, str) and value:
            concern = WriteConcern(w=int(value) if value.isdigit() else value)
        else:
            raise wrong
    except (mongo_errors.PyMongoError, ValueError, TypeError):
        raise wrong from None
    if not concern.acknowledged:
        raise ConfigurationError(
            "MongoDB store option write_concern must acknowledge writes (w >= 1): "
            "compare-and-swap reads the matched count of every write"
        )
    return concern


_FORBIDDEN = {"database": '/\\. "$\x00', "collection": "$\x00"}


def _name(option: str, value: object) -> str:
    """A database or collection name MongoDB accepts, checked before any client exists."""
    forbidden = _FORBIDDEN[option]
    if not isinstance(value, str) or not value or any(char in forbidden for char in value):
        shown = " ".join(repr(char) for char in forbidden)
        raise ConfigurationError(
            f"MongoDB store option {option} must be a {option} name without {shown}, got {value!r}"
        )
    return value


@dataclass(frozen=True, slots=True)
class _Settings:
    """Store options, validated once."""

    database: str | None
    collection: str
    layout: EmbeddedLayout | None
    write_concern: WriteConcern | None
    batch_size: int
    create_index: bool
    asynchronous: bool | None
    plaintext: bool

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> _Settings:
        """Settings from URL and keyword options; an unknown option is a ConfigurationError."""
        given = dict(options)
        unknown = sorted(set(given) - _KEYWORD_OPTIONS)
        if unknown:
            raise ConfigurationError(
                f"unknown MongoDB store option(s) {', '.join(unknown)}; the options are "
                f"{', '.join(sorted(_KEYWORD_OPTIONS))}, and the URL may carry pymongo's own"
            )
        mapped = {name: given.pop(name) for name in _LAYOUT_OPTIONS if name in given}
        if "upsert" in mapped:
            mapped["upsert"] = _flag("upsert", mapped["upsert"])
        layout = given.pop("layout", None)
        if layout is not None and not isinstance(layout, EmbeddedLayout):
            raise ConfigurationError("layout must be a credkeeper_mongo.EmbeddedLayout")
        if mapped:
            if layout is not None:
                raise ConfigurationError(
                    f"give either layout= or the option(s) {', '.join(sorted(mapped))}, not both"
                )
            if "field_path" not in mapped:
                raise ConfigurationError(
                    "embedding credentials in existing documents needs field_path too, "
                    "e.g. field_path=claudeCredentials"
                )
            layout = EmbeddedLayout(**mapped)
        collection = given.pop("collection", None)
        if layout is not None and collection is None:
            raise ConfigurationError(
                "embedding credentials needs collection=<the collection holding the documents>, "
                "e.g. collection=users"
            )
        database = given.pop("database", None)
        batch_size = given.pop("batch_size", 500)
        if isinstance(batch_size, str):
            try:
                batch_size = int(batch_size)
            except ValueError:
                raise ConfigurationError(f"batch_size must be an int, got {batch_size!r}") from None
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be a positive int, got {batch_size!r}")
        concern = given.pop("write_concern", None)
        create_index = given.pop("create_index", None)
        asynchronous = given.pop("async", None)
        plaintext = given.pop("plaintext", False)
        return cls(
            database=None if database is None else _name("database", database),
            collection=_name("collection", collection or DEFAULT_COLLECTION),
            layout=layout,
            write_concern=None if concern is None else _write_concern(concern),
            batch_size=batch_size,
            create_index=(
                layout is None if create_index is None else _flag("create_index", create_index)
            ),
            asynchronous=None if asynchronous is None else _flag("async", asynchronous),
            plaintext=_flag("plaintext", plaintext),
        )


@dataclass(frozen=True, slots=True)
class _ParsedURL:
    """A store URL split into what pymongo gets and what credkeeper keeps."""

    client_url: str
    options: dict[str, str]
    client_options: tuple[tuple[str, str], ...]
    shown: str
    password: str | None


def _parse_url(url: object) -> _ParsedURL:
    """Split credkeeper's options out of a URL's query, leaving the rest to pymongo."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"MongoDB store URL must look like mongodb://host/database, got {url!r}"
            if not isinstance(url, str)
            else "MongoDB store URL must look like mongodb://host/database?collection=..."
        )
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in _SCHEMES:
        raise ConfigurationError(
            f"MongoDB store URL must start with mongodb:// or mongodb+srv://, not {scheme}://"
        )
    address, _, query = rest.partition("?")
    userinfo, at, hosts = address.rpartition("@")
    hosts, _, path = hosts.partition("/")
    password = unquote(userinfo.partition(":")[2]) if ":" in userinfo else None
    kept: list[str] = []
    ours: dict[str, str] = {}
    for part in re.split("[&;]", query) if query else []:
        if not part:
            continue
        name = unquote(part.partition("=")[0])
        if name in _OPTIONS:
            if name in ours:
                raise ConfigurationError(f"MongoDB store URL gives option {name!r} more than once")
            ours[name] = unquote(part.partition("=")[2])
        else:
            kept.append(part)
    database, _, collection = unquote(path).partition(".")
    for option, value in (("database", database), ("collection", collection)):
        if value:
            if option in ours:
                raise ConfigurationError(
                    f"MongoDB store URL names the {option} both in its path and as an option"
                )
            ours[option] = value
    client_url = f"{scheme}://{address}" + (f"?{'&'.join(kept)}" if kept else "")
    client_options = tuple(
        (unquote(part.partition("=")[0]), unquote(part.partition("=")[2])) for part in kept
    )
    user = f"{userinfo.partition(':')[0]}{':***' if password is not None else ''}{at}"
    shown = f"{scheme}://{user}{hosts}/{database}"
    return _ParsedURL(client_url, ours, client_options, shown, password or None)


def _scrub(text: str, password: str | None) -> str:
    text = " ".join(text.split())
    if password:
        text = text.replace(password, "***")
    return text


def _check_client_options(parsed: _ParsedURL) -> None:
    """Refuse an unknown or invalid pymongo URL option, which pymongo would only warn about."""
    for name, value in parsed.client_options:
        try:
            get_validated_options({name: value}, warn=False, from_uri=True)
        except (mongo_errors.PyMongoError, ValueError, TypeError) as exc:
            secret = value if "password" in name.lower() else parsed.password
            raise ConfigurationError(
                f"MongoDB store URL option {name!r} is not valid: {_scrub(str(exc), secret)}"
            ) from None


def _make_client(parsed: _ParsedURL, *, asynchronous: bool) -> Client:
    _check_client_options(parsed)
    given = {name.lower() for name, _ in parsed.client_options}
    defaults = {
        name: value for name, value in _CLIENT_DEFAULTS.items() if name.lower() not in given
    }
    kind: Any = AsyncMongoClient if asynchronous else MongoClient
    try:
        # connect=False: opening a store does no I/O; the first call connects.
        client: Client = kind(parsed.client_url, connect=False, **defaults)
    except (mongo_errors.PyMongoError, ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"MongoDB store URL {parsed.shown!r} is not valid: {_scrub(str(exc), parsed.password)}"
        ) from None
    return client


@dataclass(slots=True)
class _Parts:
    """What both store classes are made of."""

    client: Client
    owned: bool
    database: Any
    collection: Any
    layout: Layout
    batch_size: int
    create_index: bool
    shown: str
    plaintext: bool


def _assemble(
    client: Client, settings: _Settings, database: str, *, owned: bool, shown: str
) -> _Parts:
    """The collection handle and layout for ``settings`` on ``client``."""
    concern = settings.write_concern
    if concern is None:
        document = client.write_concern.document
        if "w" in document:
            concern = _write_concern(client.write_concern)
        else:
            # Majority by default: a compare-and-swap acknowledged by one node can be rolled
            # back by a failover, and then two workers would both believe they won.
            concern = WriteConcern(
                "majority", wtimeout=document.get("wtimeout"), j=document.get("j")
            )
    collection = client.get_database(database).get_collection(
        settings.collection,
        codec_options=_READ_OPTIONS,
        # Reads decide compare-and-swap; a lagging secondary would only cause conflicts.
        read_preference=ReadPreference.PRIMARY,
        write_concern=concern,
    )
    # Every host reads one node's clock: the primary's.
    handle = client.get_database(
        database, codec_options=_READ_OPTIONS, read_preference=ReadPreference.PRIMARY
    )
    layout: Layout = OwnCollection() if settings.layout is None else Embedded(settings.layout)
    return _Parts(
        client,
        owned,
        handle,
        collection,
        layout,
        settings.batch_size,
        settings.create_index,
        shown,
        settings.plaintext,
    )


def _database(settings: _Settings, fallback: str | None) -> str:
    database = settings.database or fallback
    if database is None:
        raise ConfigurationError(
            "the MongoDB store needs a database: put it in the URL's path "
            "(mongodb://host/<database>) or pass database=..."
        )
    return database


def _from_url(
    url: str, options: Mapping[str, Any], *, default_async: bool, fixed: bool
) -> tuple[_Parts, bool]:
    """A store's parts from a URL and keyword options, and whether the store is async.

    The ``async`` option picks the kind, ``default_async`` when it is absent; with ``fixed``
    (a class's constructor) an ``async`` option asking for the other kind is an error.
    """
    parsed = _parse_url(url)
    twice = sorted(set(parsed.options) & set(options))
    if twice:
        raise ConfigurationError(
            f"MongoDB store option(s) {', '.join(twice)} given both in the URL and as keywords"
        )
    settings = _Settings.parse({**parsed.options, **options})
    asynchronous = default_async if settings.asynchronous is None else settings.asynchronous
    if fixed and asynchronous != default_async:
        wanted = "AsyncMongoStore" if asynchronous else "MongoStore"
        raise ConfigurationError(f"this URL asks for {wanted}; open it with that class")
    database = _database(settings, None)
    client = _make_client(parsed, asynchronous=asynchronous)
    parts = _assemble(client, settings, database, owned=True, shown=parsed.shown)
    return parts, asynchronous


def _from_target(target: object, options: Mapping[str, Any], *, asynchronous: bool) -> _Parts:
    """A store's parts from a constructor's URL or client and its keyword options."""
    if isinstance(target, str):
        return _from_url(target, options, default_async=asynchronous, fixed=True)[0]
    kind = AsyncMongoClient if asynchronous else MongoClient
    if not isinstance(target, kind):
        raise ConfigurationError(
            f"client must be a pymongo {kind.__name__} or a mongodb:// URL, "
            f"not {type(target).__name__}"
        )
    settings = _Settings.parse(options)
    database = _database(settings, _default_database(target))
    return _assemble(target, settings, database, owned=False, shown=f"<{kind.__name__}>")


def _default_database(client: Client) -> str | None:
    try:
        return client.get_default_database().name
    except mongo_errors.ConfigurationError:
        return None


# -- errors ------------------------------------------------------------------------------


def _translate(exc: BaseException, key: str | None, operation: Operation | None) -> StoreError:
    """A driver error as credkeeper's; the message never quotes the server's text or values."""
    about = f" for key {key!r}" if key is not None else ""
    code = getattr(exc, "code", None)
    detail = f"{type(exc).__name__}{f' code {code}' if isinstance(code, int) else ''}"
    if isinstance(exc, mongo_errors.DuplicateKeyError) and isinstance(operation, Insert):
        pattern = (exc.details or {}).get("keyPattern")
        if isinstance(pattern, Mapping) and operation.key_field not in pattern:
            # Not a lost race: some other unique index of the application's refuses every
            # document credkeeper creates, and retrying would fail the same way.
            return StoreError(
                f"the document{about} cannot be created: the collection's unique index on "
                f"{', '.join(map(str, pattern))} refuses it ({detail}); documents created with "
                "upsert=true hold only the match field and the credential, so other unique "
                "indexes must be sparse or partial",
                key=key,
            )
        return ConflictError(f"a record{about} already exists ({detail})", key=key)
    if isinstance(exc, mongo_errors.InvalidOperation):
        return StoreError(f"the MongoDB store is closed or misused ({detail})", key=key)
    if isinstance(exc, mongo_errors.WTimeoutError):
        return StoreUnavailable(
            f"the MongoDB write{about} was not acknowledged by enough nodes in time ({detail}); "
            "it may still be applied: read the record again",
            key=key,
        )
    if code == _PATH_NOT_VIABLE:
        return StoreCorrupted(
            f"a field on the credential's path{about} holds something other than a "
            f"sub-document ({detail}); credkeeper will not overwrite it",
            key=key,
        )
    if code == _CURSOR_NOT_FOUND:
        return StoreUnavailable(
            f"the MongoDB scan cursor expired on the server ({detail}); start the scan again",
            key=key,
        )
    if isinstance(exc, mongo_errors.ConnectionFailure | mongo_errors.ExecutionTimeout | OSError):
        return StoreUnavailable(f"the MongoDB store failed{about}: {detail}; retry later", key=key)
    if isinstance(exc, mongo_errors.OperationFailure):
        if code in _UNAVAILABLE_CODES or exc.has_error_label("RetryableWriteError"):
            return StoreUnavailable(
                f"the MongoDB store failed{about}: {detail}; retry later", key=key
            )
        if code in _UNAUTHORIZED_CODES:
            return StoreError(
                f"the MongoDB user may not do this{about} ({detail}); it needs readWrite on the "
                "store's collection (and createIndex, unless create_index=false)",
                key=key,
            )
    if isinstance(exc, BSONError | ValueError | OverflowError):
        return StoreError(
            f"the MongoDB store cannot store a value{about} ({type(exc).__name__})", key=key
        )
    return StoreError(f"the MongoDB store failed{about}: {detail}", key=key)


def _is_key(value: str | None) -> bool:
    if value is None:
        return False
    try:
        check_key(value)
    except ConfigurationError:
        return False
    return True


def _check_before(before: object) -> datetime:
    if not isinstance(before, datetime) or before.utcoffset() is None:
        raise ConfigurationError("scan_due(before) needs a timezone-aware datetime")
    return before


def _refuses_pipeline(exc: mongo_errors.PyMongoError) -> bool:
    """Whether ``exc`` is the server refusing the $$NOW pipeline itself, not being unavailable."""
    return (
        isinstance(exc, mongo_errors.OperationFailure)
        and exc.code not in _UNAVAILABLE_CODES
        and not isinstance(exc, mongo_errors.ExecutionTimeout)
    )


def _server_time(document: Mapping[str, Any] | None, field: str) -> datetime:
    value = None if document is None else document.get(field)
    if not isinstance(value, datetime):
        raise StoreError(f"the MongoDB server answered without a time in {field!r}")
    return value.astimezone(UTC)


# -- sync --------------------------------------------------------------------------------


def _within_budget() -> contextlib.AbstractContextManager[object]:
    """pymongo's own deadline set to what is left of the credkeeper call, if one is running.

    Server selection, connection checkout and pymongo's retryable reads and writes then stop
    with the call instead of running their own clocks (10 s of server selection by default).
    """
    remaining = time_remaining()
    if remaining is None:
        return contextlib.nullcontext()
    # A spent budget still allows one quick attempt, as the other stores do.
    return pymongo.timeout(max(remaining, 0.001))


def _execute(collection: Collection[dict[str, Any]], operation: Operation) -> Any:
    if isinstance(operation, Find):
        return collection.find_one(operation.filter, operation.projection)
    if isinstance(operation, Insert):
        collection.insert_one(operation.document)
        return None
    if isinstance(operation, Update):
        return collection.update_one(operation.filter, operation.update).matched_count
    if isinstance(operation, ListIndexes):
        return list(collection.list_indexes())
    return collection.delete_one(operation.filter).deleted_count


class MongoStore:
    """A :class:`~credkeeper.CredentialStore` in MongoDB, through pymongo's ``MongoClient``.

    ``client`` is a ``mongodb://`` or ``mongodb+srv://`` URL, or a ``MongoClient`` you already
    have (it stays open on :meth:`close`). The database comes from the URL's path or
    ``database``. By default credentials live in credkeeper's own ``collection``
    (``credkeeper_credentials``), one document per key; with ``layout`` they live in a
    sub-document of the application's documents in ``collection`` instead (see
    :class:`EmbeddedLayout`).

    Writes use ``write_concern`` (a ``pymongo.WriteConcern``, ``"majority"``, a number or a
    tag); without it, the URL's ``w``, or ``"majority"`` when the URL sets none. Reads go to the
    primary. ``batch_size`` is the cursor batch of :meth:`scan_due`. ``create_index`` (default:
    true for credkeeper's own collection, false in the application's) creates the index on the
    expiry field on first use. ``plaintext=True`` declares that the application keeps its tokens
    in plain text, so the engine must neither seal what it writes nor expect sealed values; the
    store itself stores whatever it is given either way, and shows the declaration as
    :attr:`plaintext`. Options in the URL's query string count as keywords.
    """

    def __init__(
        self,
        client: MongoClient[dict[str, Any]] | str,
        *,
        database: str | None = None,
        collection: str | None = None,
        layout: EmbeddedLayout | None = None,
        write_concern: WriteConcern | str | int | None = None,
        batch_size: int | None = None,
        create_index: bool | None = None,
        plaintext: bool | None = None,
    ) -> None:
        given = {
            "database": database,
            "collection": collection,
            "layout": layout,
            "write_concern": write_concern,
            "batch_size": batch_size,
            "create_index": create_index,
            "plaintext": plaintext,
        }
        options = {name: value for name, value in given.items() if value is not None}
        self._setup(_from_target(client, options, asynchronous=False))

    def _setup(self, parts: _Parts) -> None:
        self.client: MongoClient[dict[str, Any]] = parts.client  # type: ignore[assignment]
        self.collection: Collection[dict[str, Any]] = parts.collection
        self._parts = parts
        self._indexed = not parts.create_index
        self._index_lock = threading.Lock()
        self._now_by_hello = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MongoStore | AsyncMongoStore:
        """Open a store from a URL: ``mongodb://host/database?collection=...``.

        Options go as keywords or in the query string, which is otherwise pymongo's (``w``,
        ``replicaSet``, ``tls``, ``serverSelectionTimeoutMS``, ...): ``database``,
        ``collection``, ``write_concern``, ``batch_size``, ``create_index``, ``plaintext``,
        ``async`` (``true`` gives an :class:`AsyncMongoStore`), and for credentials embedded in
        existing documents ``field_path`` with ``match_field``, ``field_naming``, ``key_type``,
        ``expires_at_unit``, ``scopes_format``, ``upsert`` and ``state_field`` (or
        ``layout=EmbeddedLayout(...)``).
        """
        parts, asynchronous = _from_url(url, options, default_async=False, fixed=False)
        return AsyncMongoStore._with(parts) if asynchronous else cls._with(parts)

    @classmethod
    def _with(cls, parts: _Parts) -> MongoStore:
        store = cls.__new__(cls)
        store._setup(parts)
        return store

    def __repr__(self) -> str:
        return f"MongoStore({self._parts.shown!r}, collection={self.collection.name!r})"

    @property
    def plaintext(self) -> bool:
        """Whether the application keeps this store's tokens in plain text (option
        ``plaintext``): the engine then neither seals tokens nor expects sealed ones."""
        return self._parts.plaintext

    def __enter__(self) -> MongoStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _ensure_indexes(self) -> None:
        if self._indexed:
            return
        with self._index_lock:
            if self._indexed:
                return
            for keys in self._parts.layout.indexes():
                try:
                    self.collection.create_index(keys)
                except mongo_errors.OperationFailure as exc:
                    if exc.code not in _INDEX_EXISTS_CODES:
                        raise
            self._indexed = True

    def _run(self, key: str, plan: Plan) -> Any:
        operation: Operation | None = None
        result: Any = None
        try:
            with _within_budget():
                self._ensure_indexes()
                while True:
                    try:
                        operation = plan.send(result)
                    except StopIteration as stop:
                        return stop.value
                    result = _execute(self.collection, operation)
        except CredkeeperError:
            raise
        except _DRIVER_ERRORS as exc:
            raise _translate(exc, key, operation) from exc

    def get(self, key: str) -> Record | None:
        """See :meth:`credkeeper.CredentialStore.get`."""
        check_key(key)
        return self._run(key, self._parts.layout.get(key))  # type: ignore[no-any-return]

    def put(self, record: Record) -> Record:
        """See :meth:`credkeeper.CredentialStore.put`: an insert, or a filtered update."""
        check_key(record.key)
        return self._run(record.key, self._parts.layout.put(record))  # type: ignore[no-any-return]

    def delete(self, key: str) -> bool:
        """See :meth:`credkeeper.CredentialStore.delete`."""
        check_key(key)
        return self._run(key, self._parts.layout.delete(key))  # type: ignore[no-any-return]

    def scan_due(self, before: datetime) -> Iterator[str]:
        """See :meth:`credkeeper.CredentialStore.scan_due`: one cursor on the expiry index,
        read ``batch_size`` documents at a time."""
        layout = self._parts.layout
        condition, projection = layout.due(_check_before(before))
        try:
            self._ensure_indexes()
            with self.collection.find(
                condition, projection, batch_size=self._parts.batch_size
            ) as cursor:
                for document in cursor:
                    key = layout.key_of(document)
                    if _is_key(key):
                        yield key  # type: ignore[misc]
        except CredkeeperError:
            raise
        except _DRIVER_ERRORS as exc:
            raise _translate(exc, None, None) from exc

    def now(self) -> datetime:
        """The MongoDB server's clock (aware, UTC, millisecond precision), in one round trip.

        ``$$NOW`` on the primary; on a server that refuses that pipeline, ``hello``'s
        ``localTime``. Leases are judged on it, so hosts whose clocks disagree agree on when a
        lease ends.
        """
        try:
            with _within_budget():
                if not self._now_by_hello:
                    try:
                        with self._parts.database.aggregate(_NOW_PIPELINE) as cursor:
                            return _server_time(next(cursor, None), "now")
                    except mongo_errors.PyMongoError as exc:
                        if not _refuses_pipeline(exc):
                            raise
                        self._now_by_hello = True
                hello = self.client.admin.command("hello", codec_options=_READ_OPTIONS)
                return _server_time(hello, "localTime")
        except CredkeeperError:
            raise
        except _DRIVER_ERRORS as exc:
            raise _translate(exc, None, None) from exc

    def close(self) -> None:
        """Close the client, if the store made it."""
        if self._parts.owned:
            self.client.close()


# -- async -------------------------------------------------------------------------------


async def _execute_async(collection: AsyncCollection[dict[str, Any]], operation: Operation) -> Any:
    if isinstance(operation, Find):
        return await collection.find_one(operation.filter, operation.projection)
    if isinstance(operation, Insert):
        await collection.insert_one(operation.document)
        return None
    if isinstance(operation, Update):
        return (await collection.update_one(operation.filter, operation.update)).matched_count
    if isinstance(operation, ListIndexes):
        return await (await collection.list_indexes()).to_list()
    return (await collection.delete_one(operation.filter)).deleted_count


class AsyncMongoStore:
    """The :class:`~credkeeper.AsyncCredentialStore` twin of :class:`MongoStore`, on pymongo's
    native ``AsyncMongoClient``; same options, same documents."""

    def __init__(
        self,
        client: AsyncMongoClient[dict[str, Any]] | str,
        *,
        database: str | None = None,
        collection: str | None = None,
        layout: EmbeddedLayout | None = None,
        write_concern: WriteConcern | str | int | None = None,
        batch_size: int | None = None,
        create_index: bool | None = None,
        plaintext: bool | None = None,
    ) -> None:
        given = {
            "database": database,
            "collection": collection,
            "layout": layout,
            "write_concern": write_concern,
            "batch_size": batch_size,
            "create_index": create_index,
            "plaintext": plaintext,
        }
        options = {name: value for name, value in given.items() if value is not None}
        self._setup(_from_target(client, options, asynchronous=True))

    def _setup(self, parts: _Parts) -> None:
        self.client: AsyncMongoClient[dict[str, Any]] = parts.client  # type: ignore[assignment]
        self.collection: AsyncCollection[dict[str, Any]] = parts.collection
        self._parts = parts
        self._indexed = not parts.create_index
        self._now_by_hello = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MongoStore | AsyncMongoStore:
        """See :meth:`MongoStore.from_url`; here ``async`` defaults to true."""
        parts, asynchronous = _from_url(url, options, default_async=True, fixed=False)
        return cls._with(parts) if asynchronous else MongoStore._with(parts)

    @classmethod
    def _with(cls, parts: _Parts) -> AsyncMongoStore:
        store = cls.__new__(cls)
        store._setup(parts)
        return store

    def __repr__(self) -> str:
        return f"AsyncMongoStore({self._parts.shown!r}, collection={self.collection.name!r})"

    @property
    def plaintext(self) -> bool:
        """Whether the application keeps this store's tokens in plain text (option
        ``plaintext``): the engine then neither seals tokens nor expects sealed ones."""
        return self._parts.plaintext

    async def __aenter__(self) -> AsyncMongoStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _ensure_indexes(self) -> None:
        # Creating twice under a race is harmless: createIndexes is idempotent.
        if self._indexed:
            return
        for keys in self._parts.layout.indexes():
            try:
                await self.collection.create_index(keys)
            except mongo_errors.OperationFailure as exc:
                if exc.code not in _INDEX_EXISTS_CODES:
                    raise
        self._indexed = True

    async def _run(self, key: str, plan: Plan) -> Any:
        operation: Operation | None = None
        result: Any = None
        try:
            with _within_budget():
                await self._ensure_indexes()
                while True:
                    try:
                        operation = plan.send(result)
                    except StopIteration as stop:
                        return stop.value
                    result = await _execute_async(self.collection, operation)
        except CredkeeperError:
            raise
        except _DRIVER_ERRORS as exc:
            raise _translate(exc, key, operation) from exc

    async def get(self, key: str) -> Record | None:
        """See :meth:`credkeeper.AsyncCredentialStore.get`."""
        check_key(key)
        return await self._run(key, self._parts.layout.get(key))  # type: ignore[no-any-return]

    async def put(self, record: Record) -> Record:
        """See :meth:`credkeeper.AsyncCredentialStore.put`."""
        check_key(record.key)
        return await self._run(record.key, self._parts.layout.put(record))  # type: ignore[no-any-return]

    async def delete(self, key: str) -> bool:
        """See :meth:`credkeeper.AsyncCredentialStore.delete`."""
        check_key(key)
        return await self._run(key, self._parts.layout.delete(key))  # type: ignore[no-any-return]

    async def scan_due(self, before: datetime) -> AsyncIterator[str]:
        """See :meth:`MongoStore.scan_due`."""
        layout = self._parts.layout
        condition, projection = layout.due(_check_before(before))
        try:
            await self._ensure_indexes()
            cursor = self.collection.find(condition, projection, batch_size=self._parts.batch_size)
            try:
                async for document in cursor:
                    key = layout.key_of(document)
                    if _is_key(key):
                        yield key  # type: ignore[misc]
            finally:
                await cursor.close()
        except CredkeeperError:
            raise
        except _DRIVER_ERRORS as exc:
            raise _translate(exc, None, None) from exc

    async def now(self) -> datetime:
        """See :meth:`MongoStore.now`."""
        try:
            with _within_budget():
                if not self._now_by_hello:
                    try:
                        cursor = await self._parts.database.aggregate(_NOW_PIPELINE)
                        async with cursor:
                            return _server_time(await anext(cursor, None), "now")
                    except mongo_errors.PyMongoError as exc:
                        if not _refuses_pipeline(exc):
                            raise
                        self._now_by_hello = True
                hello = await self.client.admin.command("hello", codec_options=_READ_OPTIONS)
                return _server_time(hello, "localTime")
        except CredkeeperError:
            raise
        except _DRIVER_ERRORS as exc:
            raise _translate(exc, None, None) from exc

    async def close(self) -> None:
        """Close the client, if the store made it."""
        if self._parts.owned:
            await self.client.close()
