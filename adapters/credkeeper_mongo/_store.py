"""``MongoStore`` and ``AsyncMongoStore``: credentials in MongoDB through pymongo.

Both execute the plans of ``_layout`` with their kind of client (``MongoClient``,
``AsyncMongoClient``); everything else they share is here, once: options, clients, indexes,
the scan's query, the server's clock, and :func:`_boundary`, the one place where driver errors
become credkeeper's. Each class keeps only its calls to its client.
"""

from __future__ import annotations

import contextlib
import re
import threading
import weakref
from collections.abc import AsyncIterator, Generator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Self, TypeAlias, TypeVar, cast
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
    Record,
    StoreCorrupted,
    StoreError,
    StoreUnavailable,
    time_remaining,
)
from credkeeper import storekit as kit

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

_STORE = "MongoDB store"
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

# The least time pymongo gets for an operation inside a call whose budget is (nearly) spent.
_LAST_ATTEMPT = 0.5
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

# The change stream of credkeeper's own collection: each write's key (documentKey) and the
# version it wrote, nothing else (the event's _id is its resume token, and stays).
_WATCH: list[Mapping[str, Any]] = [
    {"$match": {"operationType": {"$in": ["insert", "update", "replace", "delete"]}}},
    {
        "$project": {
            "documentKey": 1,
            "fullDocument.version": 1,
            "updateDescription.updatedFields.version": 1,
        }
    },
]

Client: TypeAlias = "MongoClient[dict[str, Any]] | AsyncMongoClient[dict[str, Any]]"


# -- options -----------------------------------------------------------------------------


def _write_concern(value: object) -> WriteConcern:
    """The write concern an option's value names; whether it acknowledges writes is checked
    apart (:func:`_acknowledged`), with a message of its own."""
    if isinstance(value, WriteConcern):
        return value
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            return WriteConcern(w=value)
        if isinstance(value, str) and value:
            return WriteConcern(w=int(value) if value.isdigit() else value)
    except mongo_errors.PyMongoError:
        raise ValueError(value) from None
    raise ValueError(value)


def _acknowledged(concern: WriteConcern) -> WriteConcern:
    """``concern``, if it acknowledges writes: the option's, or the one the URL's ``w`` sets."""
    if not concern.acknowledged:
        raise ConfigurationError(
            f"{_STORE} option write_concern must acknowledge writes (w >= 1): "
            "compare-and-swap reads the matched count of every write"
        )
    return concern


def _name(kind: str, forbidden: str) -> kit.Option[str]:
    """The option naming a ``kind`` (database, collection), checked before any client exists:
    a name without the ``forbidden`` characters MongoDB refuses in it."""

    def parse(value: object) -> str:
        if not isinstance(value, str) or not value or any(char in forbidden for char in value):
            raise ValueError(value)
        return value

    return kit.Option(parse, f"a {kind} name without {' '.join(repr(char) for char in forbidden)}")


def _layout(value: object) -> EmbeddedLayout:
    if not isinstance(value, EmbeddedLayout):
        raise TypeError(value)
    return value


def _as_given(value: object) -> object:
    return value


# The layout's options go to EmbeddedLayout, which checks them itself, naming its fields.
_LAYOUT_FIELD: kit.Option[object] = kit.Option(_as_given, "what EmbeddedLayout accepts")
_LAYOUT_OPTIONS: dict[str, kit.Option[Any]] = {
    "match_field": _LAYOUT_FIELD,
    "field_path": _LAYOUT_FIELD,
    "field_naming": _LAYOUT_FIELD,
    "key_type": _LAYOUT_FIELD,
    "expires_at_unit": _LAYOUT_FIELD,
    "scopes_format": _LAYOUT_FIELD,
    "upsert": kit.FLAG,
    "state_field": _LAYOUT_FIELD,
}
# The options a URL's query may give, beside pymongo's own; keywords may also give layout=.
_URL_OPTIONS: dict[str, kit.Option[Any]] = {
    "database": _name("database", '/\\. "$\x00'),
    "collection": _name("collection", "$\x00"),
    "write_concern": kit.Option(
        _write_concern, "'majority', a number of nodes, a tag name or a pymongo.WriteConcern"
    ),
    "batch_size": kit.COUNT,
    "create_index": kit.FLAG,
    "async": kit.FLAG,
    "plaintext": kit.FLAG,
    "notify": kit.FLAG,
    **_LAYOUT_OPTIONS,
}
_OPTIONS: dict[str, kit.Option[Any]] = {
    **_URL_OPTIONS,
    "layout": kit.Option(_layout, "a credkeeper_mongo.EmbeddedLayout"),
}


def _given(**keywords: object) -> dict[str, object]:
    """The keyword options a caller gave: those not left at ``None``."""
    return {name: value for name, value in keywords.items() if value is not None}


@dataclass(frozen=True, slots=True)
class _StoreOptions:
    """Store options, read and checked once."""

    database: str | None
    collection: str
    layout: EmbeddedLayout | None
    write_concern: WriteConcern | None
    batch_size: int
    create_index: bool
    asynchronous: bool | None
    plaintext: bool
    notify: bool

    @classmethod
    def read(cls, given: Mapping[str, object]) -> _StoreOptions:
        """The options ``given`` (URL query options and keywords alike); an unknown one is a
        ConfigurationError."""
        values, unknown = kit.read_options(given, _OPTIONS, store=_STORE, others="return")
        if unknown:
            raise ConfigurationError(
                f"unknown {_STORE} option(s) {', '.join(sorted(unknown))}; the options are "
                f"{', '.join(sorted(_OPTIONS))}, and the URL may carry pymongo's own"
            )
        mapped = {name: values[name] for name in _LAYOUT_OPTIONS if name in values}
        layout: EmbeddedLayout | None = values.get("layout")
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
        if values.get("notify") and layout is not None:
            raise ConfigurationError(
                "notify=true needs credkeeper's own collection: credentials embedded in the "
                "application's documents have no change notices"
            )
        if layout is not None and "collection" not in values:
            raise ConfigurationError(
                "embedding credentials needs collection=<the collection holding the documents>, "
                "e.g. collection=users"
            )
        concern = values.get("write_concern")
        return cls(
            database=values.get("database"),
            collection=values.get("collection", DEFAULT_COLLECTION),
            layout=layout,
            write_concern=None if concern is None else _acknowledged(concern),
            batch_size=values.get("batch_size", 500),
            create_index=values.get("create_index", layout is None),
            asynchronous=values.get("async"),
            plaintext=values.get("plaintext", False),
            # Off by default: a change stream is a cursor each process keeps polling.
            notify=values.get("notify", False),
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
    """Split credkeeper's options out of a URL's query, leaving the rest to pymongo.

    pymongo's options pass on as written: pymongo reads them by its own rules (``;`` between
    options, ``readPreferenceTags`` given once per tag set, ``authMechanismProperties`` left
    encoded), which reading them as credkeeper's options would break.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"{_STORE} URL must look like mongodb://host/database, got {url!r}"
            if not isinstance(url, str)
            else f"{_STORE} URL must look like mongodb://host/database?collection=..."
        )
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in _SCHEMES:
        raise ConfigurationError(
            f"{_STORE} URL must start with mongodb:// or mongodb+srv://, not {scheme}://"
        )
    address, _, query = rest.partition("?")
    userinfo, at, hosts = address.rpartition("@")
    hosts, _, path = hosts.partition("/")
    password = unquote(userinfo.partition(":")[2]) if ":" in userinfo else None
    ours: list[str] = []
    kept: list[str] = []
    for part in re.split("[&;]", query) if query else []:
        if part:
            (ours if unquote(part.partition("=")[0]) in _URL_OPTIONS else kept).append(part)
    options = kit.query_options("&".join(ours), store=_STORE)
    database, _, collection = unquote(path).partition(".")
    for option, value in (("database", database), ("collection", collection)):
        if value:
            if option in options:
                raise ConfigurationError(
                    f"{_STORE} URL names the {option} both in its path and as an option"
                )
            options[option] = value
    client_url = f"{scheme}://{address}" + (f"?{'&'.join(kept)}" if kept else "")
    client_options = tuple(
        (unquote(part.partition("=")[0]), unquote(part.partition("=")[2])) for part in kept
    )
    user = f"{userinfo.partition(':')[0]}{':***' if password is not None else ''}{at}"
    shown = f"{scheme}://{user}{hosts}/{database}"
    return _ParsedURL(client_url, options, client_options, shown, password or None)


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
                f"{_STORE} URL option {name!r} is not valid: {_scrub(str(exc), secret)}"
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
            f"{_STORE} URL {parsed.shown!r} is not valid: {_scrub(str(exc), parsed.password)}"
        ) from None
    return client


# -- what both classes are made of ---------------------------------------------------------


@dataclass(slots=True)
class _Parts:
    """What both store classes are made of, and what they learn while they run: whether the
    indexes exist, and whether the server's clock must be read through ``hello``."""

    client: Client
    owned: bool
    database: Any
    collection: Any
    layout: Layout
    batch_size: int
    indexed: bool
    shown: str
    plaintext: bool
    notify: bool
    now_by_hello: bool = False

    @contextlib.contextmanager
    def reading_now(self) -> Iterator[None]:
        """Around reading ``$$NOW``: a server that refuses the pipeline itself is read through
        ``hello`` instead, from then on; the block then ends early and without an error."""
        try:
            yield
        except mongo_errors.PyMongoError as exc:
            if not _refuses_pipeline(exc):
                raise
            self.now_by_hello = True


def _assemble(
    client: Client, options: _StoreOptions, database: str, *, owned: bool, shown: str
) -> _Parts:
    """The collection handle and layout for ``options`` on ``client``."""
    concern = options.write_concern
    if concern is None:
        document = client.write_concern.document
        if "w" in document:
            concern = _acknowledged(client.write_concern)
        else:
            # Majority by default: a compare-and-swap acknowledged by one node can be rolled
            # back by a failover, and then two workers would both believe they won.
            concern = WriteConcern(
                "majority", wtimeout=document.get("wtimeout"), j=document.get("j")
            )
    collection = client.get_database(database).get_collection(
        options.collection,
        codec_options=_READ_OPTIONS,
        # Reads decide compare-and-swap; a lagging secondary would only cause conflicts.
        read_preference=ReadPreference.PRIMARY,
        write_concern=concern,
    )
    # Every host reads one node's clock: the primary's.
    handle = client.get_database(
        database, codec_options=_READ_OPTIONS, read_preference=ReadPreference.PRIMARY
    )
    layout: Layout = OwnCollection() if options.layout is None else Embedded(options.layout)
    return _Parts(
        client,
        owned,
        handle,
        collection,
        layout,
        options.batch_size,
        not options.create_index,
        shown,
        options.plaintext,
        options.notify,
    )


def _database(options: _StoreOptions, fallback: str | None) -> str:
    database = options.database or fallback
    if database is None:
        raise ConfigurationError(
            f"the {_STORE} needs a database: put it in the URL's path "
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
    store_options = _StoreOptions.read(
        kit.merge_options(parsed.options, _given(**options), store=_STORE)
    )
    asynchronous = (
        default_async if store_options.asynchronous is None else store_options.asynchronous
    )
    if fixed and asynchronous != default_async:
        wanted = "AsyncMongoStore" if asynchronous else "MongoStore"
        raise ConfigurationError(f"this URL asks for {wanted}; open it with that class")
    _check_notify(store_options, asynchronous=asynchronous)
    database = _database(store_options, None)
    client = _make_client(parsed, asynchronous=asynchronous)
    parts = _assemble(client, store_options, database, owned=True, shown=parsed.shown)
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
    store_options = _StoreOptions.read(options)
    _check_notify(store_options, asynchronous=asynchronous)
    database = _database(store_options, _default_database(target))
    return _assemble(target, store_options, database, owned=False, shown=f"<{kind.__name__}>")


def _check_notify(options: _StoreOptions, *, asynchronous: bool) -> None:
    """Refuse change notices where the store has none rather than ignore the option."""
    if options.notify and asynchronous:
        raise ConfigurationError(
            "notify=true is MongoStore's: AsyncMongoStore has no change notices (its callers "
            "wait on their schedule); drop the option or open a MongoStore"
        )


def _default_database(client: Client) -> str | None:
    try:
        return client.get_default_database().name
    except mongo_errors.ConfigurationError:
        return None


# -- running plans -------------------------------------------------------------------------


class _Steps:
    """A plan run by a store one operation at a time: iterating gives each operation to
    execute, and the store sets :attr:`answer` to its result before taking the next.

    :attr:`operation` is the operation under way, so that its errors are translated knowing
    it; :attr:`value` is what the plan returned.
    """

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self.operation: Operation | None = None
        self.answer: Any = None
        self.value: Any = None

    def __iter__(self) -> Iterator[Operation]:
        while True:
            try:
                self.operation = self._plan.send(self.answer)
            except StopIteration as stop:
                self.value = stop.value
                return
            yield self.operation


def _within_budget() -> contextlib.AbstractContextManager[object]:
    """pymongo's own deadline set to what is left of the credkeeper call, if one is running.

    Server selection, connection checkout and pymongo's retryable reads and writes then stop
    with the call instead of running their own clocks (10 s of server selection by default).
    """
    remaining = time_remaining()
    if remaining is None:
        return contextlib.nullcontext()
    # A budget nearly spent still allows one ordinary round trip, as the other stores let their
    # last statement finish: cut shorter, a healthy server answering slowly under load fails
    # the call as if it were down.
    return pymongo.timeout(max(remaining, _LAST_ATTEMPT))


@contextlib.contextmanager
def _unless_exists() -> Iterator[None]:
    """Around creating an index: one that exists already, even with other options, will do."""
    try:
        yield
    except mongo_errors.OperationFailure as exc:
        if exc.code not in _INDEX_EXISTS_CODES:
            raise


def _feed(collection: Collection[dict[str, Any]]) -> kit.Feed:
    """The change feed of credkeeper's own ``collection``; it ends when the stream does (the
    collection dropped or renamed), and the listener opens it again."""

    def feed() -> Generator[tuple[str, str | None] | None, None, None]:
        with collection.watch(_WATCH, max_await_time_ms=500) as stream:
            while stream.alive:
                yield None
                change = stream.try_next()
                if change is not None:
                    yield _notice(change)

    return feed


def _notice(change: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """The key and the version a change event of credkeeper's own collection announces."""
    key = (change.get("documentKey") or {}).get("_id")
    if not isinstance(key, str):
        return None
    updated = (change.get("updateDescription") or {}).get("updatedFields") or {}
    version = (change.get("fullDocument") or {}).get("version") or updated.get("version")
    return key, version if isinstance(version, str) else None


def _key_of(layout: Layout, document: Mapping[str, Any]) -> str | None:
    """The key of a document a scan found; ``None`` for an id that no key can name."""
    key = layout.key_of(document)
    if key is None:
        return None
    try:
        return kit.check_key(key)
    except ConfigurationError:
        return None


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


# -- errors ------------------------------------------------------------------------------


def _boundary(
    key: str | None, steps: _Steps | None = None
) -> contextlib.AbstractContextManager[None]:
    """Translate whatever pymongo and bson raise inside the block (:func:`_translate`), for
    ``key`` and, while ``steps`` runs a plan, its operation under way; credkeeper's own errors
    pass."""
    return kit.error_boundary(
        lambda exc: _translate(exc, key, None if steps is None else steps.operation),
        *_DRIVER_ERRORS,
    )


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
        return StoreError(f"the {_STORE} is closed or misused ({detail})", key=key)
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
        return StoreUnavailable(f"the {_STORE} failed{about}: {detail}; retry later", key=key)
    if isinstance(exc, mongo_errors.OperationFailure):
        if code in _UNAVAILABLE_CODES or exc.has_error_label("RetryableWriteError"):
            return StoreUnavailable(f"the {_STORE} failed{about}: {detail}; retry later", key=key)
        if code in _UNAUTHORIZED_CODES:
            return StoreError(
                f"the MongoDB user may not do this{about} ({detail}); it needs readWrite on the "
                "store's collection (and createIndex, unless create_index=false)",
                key=key,
            )
    if isinstance(exc, BSONError | ValueError | OverflowError):
        return StoreError(
            f"the {_STORE} cannot store a value{about} ({type(exc).__name__})", key=key
        )
    return StoreError(f"the {_STORE} failed{about}: {detail}", key=key)


# -- what both classes share ----------------------------------------------------------------

ClientT = TypeVar("ClientT", MongoClient[dict[str, Any]], AsyncMongoClient[dict[str, Any]])


class _MongoStoreBase(Generic[ClientT]):
    """What :class:`MongoStore` and :class:`AsyncMongoStore` share: the constructor and its
    options, what a store is made of (:class:`_Parts`), ``from_url``, how a store shows; each
    class adds only its calls to its client."""

    _asynchronous: ClassVar[bool]
    client: ClientT

    def __init__(
        self,
        client: ClientT | str,
        *,
        database: str | None = None,
        collection: str | None = None,
        layout: EmbeddedLayout | None = None,
        write_concern: WriteConcern | str | int | None = None,
        batch_size: int | None = None,
        create_index: bool | None = None,
        plaintext: bool | None = None,
        notify: bool | None = None,
    ) -> None:
        options = _given(
            database=database,
            collection=collection,
            layout=layout,
            write_concern=write_concern,
            batch_size=batch_size,
            create_index=create_index,
            plaintext=plaintext,
            notify=notify,
        )
        self._setup(_from_target(client, options, asynchronous=self._asynchronous))

    def _setup(self, parts: _Parts) -> None:
        self.client = cast(ClientT, parts.client)
        self.collection = parts.collection
        self._parts = parts

    @classmethod
    def _with(cls, parts: _Parts) -> Self:
        store = cls.__new__(cls)
        store._setup(parts)
        return store

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MongoStore | AsyncMongoStore:
        """Open a store from a URL: ``mongodb://host/database?collection=...``.

        Options go as keywords or in the query string, which is otherwise pymongo's (``w``,
        ``replicaSet``, ``tls``, ``serverSelectionTimeoutMS``, ...): ``database``,
        ``collection``, ``write_concern``, ``batch_size``, ``create_index``, ``plaintext``,
        ``notify``, ``async`` (``true`` gives an :class:`AsyncMongoStore`, ``false`` a
        :class:`MongoStore`; without it, the class's own kind), and for credentials embedded
        in existing documents ``field_path`` with ``match_field``, ``field_naming``,
        ``key_type``, ``expires_at_unit``, ``scopes_format``, ``upsert`` and ``state_field``
        (or ``layout=EmbeddedLayout(...)``).
        """
        parts, asynchronous = _from_url(url, options, default_async=cls._asynchronous, fixed=False)
        return (AsyncMongoStore if asynchronous else MongoStore)._with(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._parts.shown!r}, collection={self.collection.name!r})"

    @property
    def plaintext(self) -> bool:
        """Whether the application keeps this store's tokens in plain text (option
        ``plaintext``): the engine then neither seals tokens nor expects sealed ones."""
        return self._parts.plaintext


# -- sync --------------------------------------------------------------------------------


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


class MongoStore(kit.ClosingStore, _MongoStoreBase[MongoClient[dict[str, Any]]]):
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

    _asynchronous = False
    collection: Collection[dict[str, Any]]

    def _setup(self, parts: _Parts) -> None:
        super()._setup(parts)
        self._index_lock = threading.Lock()
        self._listener: kit.ChangeListener | None = None
        if parts.notify:
            name = f"MongoDB collection {self.collection.full_name}"
            self._listener = kit.ChangeListener(name, _feed(self.collection))
            # A store dropped without close() stops listening too.
            weakref.finalize(self, self._listener.close)

    def changes(self) -> kit.ChangeNotices | None:
        """The store's change notices (see :class:`~credkeeper.storekit.ChangeNotices`) with
        option ``notify`` (off by default): a change stream on credkeeper's own collection,
        opened by the first call and polled every half second from then on; ``None`` without
        the option or for credentials embedded in the application's documents. A server
        without change streams (a standalone ``mongod``) logs a warning once and posts
        nothing: waiters keep their schedule."""
        return None if self._listener is None else self._listener.notices()

    def _ensure_indexes(self) -> None:
        if self._parts.indexed:
            return
        with self._index_lock:
            if self._parts.indexed:
                return
            for keys in self._parts.layout.indexes():
                with _unless_exists():
                    self.collection.create_index(keys)
            self._parts.indexed = True

    def _run(self, key: str, plan: Plan) -> Any:
        steps = _Steps(plan)
        with _boundary(key, steps), _within_budget():
            self._ensure_indexes()
            for operation in steps:
                steps.answer = _execute(self.collection, operation)
        return steps.value

    def get(self, key: str) -> Record | None:
        """See :meth:`credkeeper.CredentialStore.get`."""
        kit.check_key(key)
        return self._run(key, self._parts.layout.get(key))  # type: ignore[no-any-return]

    def put(self, record: Record) -> Record:
        """See :meth:`credkeeper.CredentialStore.put`: an insert, or a filtered update."""
        key = kit.check_record(record).key
        return self._run(key, self._parts.layout.put(record))  # type: ignore[no-any-return]

    def delete(self, key: str) -> bool:
        """See :meth:`credkeeper.CredentialStore.delete`."""
        kit.check_key(key)
        return self._run(key, self._parts.layout.delete(key))  # type: ignore[no-any-return]

    def scan_due(self, before: datetime) -> Iterator[str]:
        """See :meth:`credkeeper.CredentialStore.scan_due`: one cursor on the expiry index,
        read ``batch_size`` documents at a time."""
        return self._scan(kit.check_moment("before", before))

    def _scan(self, before: datetime) -> Iterator[str]:
        layout = self._parts.layout
        condition, projection = layout.due(before)
        with _boundary(None):
            self._ensure_indexes()
            with self.collection.find(
                condition, projection, batch_size=self._parts.batch_size
            ) as cursor:
                for document in cursor:
                    key = _key_of(layout, document)
                    if key is not None:
                        yield key

    def now(self) -> datetime:
        """The MongoDB server's clock (aware, UTC, millisecond precision), in one round trip.

        ``$$NOW`` on the primary; on a server that refuses that pipeline, ``hello``'s
        ``localTime``. Leases are judged on it, so hosts whose clocks disagree agree on when a
        lease ends.
        """
        with _boundary(None), _within_budget():
            if not self._parts.now_by_hello:
                with (
                    self._parts.reading_now(),
                    self._parts.database.aggregate(_NOW_PIPELINE) as cursor,
                ):
                    return _server_time(next(cursor, None), "now")
            hello = self.client.admin.command("hello", codec_options=_READ_OPTIONS)
            return _server_time(hello, "localTime")

    def close(self) -> None:
        """Stop listening for changes; close the client, if the store made it."""
        if self._listener is not None:
            self._listener.close()
        if self._parts.owned:
            with _boundary(None):
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


class AsyncMongoStore(kit.AsyncClosingStore, _MongoStoreBase[AsyncMongoClient[dict[str, Any]]]):
    """The :class:`~credkeeper.AsyncCredentialStore` twin of :class:`MongoStore`, on pymongo's
    native ``AsyncMongoClient``; same options, same documents."""

    _asynchronous = True
    collection: AsyncCollection[dict[str, Any]]

    async def _ensure_indexes(self) -> None:
        # Creating twice under a race is harmless: createIndexes is idempotent.
        if self._parts.indexed:
            return
        for keys in self._parts.layout.indexes():
            with _unless_exists():
                await self.collection.create_index(keys)
        self._parts.indexed = True

    async def _run(self, key: str, plan: Plan) -> Any:
        steps = _Steps(plan)
        with _boundary(key, steps), _within_budget():
            await self._ensure_indexes()
            for operation in steps:
                steps.answer = await _execute_async(self.collection, operation)
        return steps.value

    async def get(self, key: str) -> Record | None:
        """See :meth:`credkeeper.AsyncCredentialStore.get`."""
        kit.check_key(key)
        return await self._run(key, self._parts.layout.get(key))  # type: ignore[no-any-return]

    async def put(self, record: Record) -> Record:
        """See :meth:`credkeeper.AsyncCredentialStore.put`."""
        key = kit.check_record(record).key
        return await self._run(key, self._parts.layout.put(record))  # type: ignore[no-any-return]

    async def delete(self, key: str) -> bool:
        """See :meth:`credkeeper.AsyncCredentialStore.delete`."""
        kit.check_key(key)
        return await self._run(key, self._parts.layout.delete(key))  # type: ignore[no-any-return]

    def scan_due(self, before: datetime) -> AsyncIterator[str]:
        """See :meth:`MongoStore.scan_due`."""
        return self._scan(kit.check_moment("before", before))

    async def _scan(self, before: datetime) -> AsyncIterator[str]:
        layout = self._parts.layout
        condition, projection = layout.due(before)
        with _boundary(None):
            await self._ensure_indexes()
            async with self.collection.find(
                condition, projection, batch_size=self._parts.batch_size
            ) as cursor:
                async for document in cursor:
                    key = _key_of(layout, document)
                    if key is not None:
                        yield key

    async def now(self) -> datetime:
        """See :meth:`MongoStore.now`."""
        with _boundary(None), _within_budget():
            if not self._parts.now_by_hello:
                with self._parts.reading_now():
                    async with await self._parts.database.aggregate(_NOW_PIPELINE) as cursor:
                        return _server_time(await anext(cursor, None), "now")
            hello = await self.client.admin.command("hello", codec_options=_READ_OPTIONS)
            return _server_time(hello, "localTime")

    async def close(self) -> None:
        """Close the client, if the store made it."""
        if self._parts.owned:
            with _boundary(None):
                await self.client.close()
