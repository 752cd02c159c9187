"""What the MongoDB store does beyond the conformance suite: URLs, options, errors, scans.

Everything runs against the session's real server. Server-side faults (a primary stepping
down, a dropped connection, a write concern timeout, an expired cursor) are injected by the
server itself through ``configureFailPoint``, scoped to one store's ``appname``; a server that
refuses the command skips those tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import uuid
import warnings
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from bson import Int64
from pymongo import AsyncMongoClient, MongoClient, WriteConcern
from pymongo.errors import DuplicateKeyError

from credkeeper import (
    ConfigurationError,
    ConflictError,
    CredentialStore,
    Record,
    StoreCorrupted,
    StoreError,
    StoreUnavailable,
    open_store,
)
from credkeeper_mongo import DEFAULT_COLLECTION, AsyncMongoStore, EmbeddedLayout, MongoStore

from .conftest import Commands, FailCommand, free_port

TOKEN = "sk-ant-ort01-do-not-leak-" + "x" * 40
LATER = datetime(2031, 1, 1, tzinfo=UTC)

StoreCall = Callable[[CredentialStore], object]


def record(key: str, **changes: Any) -> Record:
    """A never-stored record under ``key``."""
    fields: dict[str, Any] = {
        "key": key,
        "access_token": "access-token",
        "refresh_token": TOKEN,
        "expires_at": datetime(2030, 1, 1, tzinfo=UTC),
    }
    return Record(**{**fields, **changes})


def unique(prefix: str = "store") -> str:
    """A name no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def opened(url: str, **options: Any) -> Iterator[MongoStore]:
    """A synchronous store opened through ``open_store``, closed afterwards."""
    store = open_store(url, **options)
    assert isinstance(store, MongoStore)
    try:
        yield store
    finally:
        store.close()


def close_async(store: object) -> None:
    """Close an async store from sync code."""
    assert isinstance(store, AsyncMongoStore)
    asyncio.run(store.close())


@pytest.fixture
def collection_url(mongodb_store_url: str) -> str:
    """This session's database with a collection of the test's own."""
    return f"{mongodb_store_url}?collection={unique()}"


class FailPoints:
    """Arms the server's ``failCommand`` fail point for one application name at a time."""

    def __init__(self, fail_command: FailCommand, store_url: str) -> None:
        self.fail_command = fail_command
        self.store_url = store_url

    def store(self, **query: str) -> MongoStore:
        """A store whose commands carry a fresh appname, without pymongo's own retries."""
        self.app = unique("ck-fault")
        options = {
            "collection": "faults",
            "appname": self.app,
            "retryReads": "false",
            "retryWrites": "false",
            "serverSelectionTimeoutMS": "2000",
            **query,
        }
        store = open_store(f"{self.store_url}?{'&'.join(f'{k}={v}' for k, v in options.items())}")
        assert isinstance(store, MongoStore)
        return store

    def arm(self, *commands: str, **data: Any) -> None:
        """Fail the next matching command of the last store's appname, once."""
        self.fail_command(self.app, *commands, **data)


@pytest.fixture
def faults(fail_command: FailCommand, mongodb_store_url: str) -> FailPoints:
    """Fault injection by the server; skips when the server refuses ``configureFailPoint``."""
    return FailPoints(fail_command, mongodb_store_url)


# -- opening -------------------------------------------------------------------------------


class TestOpening:
    def test_open_store_gives_a_sync_store(self, collection_url: str) -> None:
        """A mongodb:// URL opens a MongoStore."""
        with opened(collection_url) as store:
            assert isinstance(store, MongoStore)

    def test_async_option_gives_an_async_store(self, collection_url: str) -> None:
        """``async=true`` in the URL opens an AsyncMongoStore."""
        store = open_store(f"{collection_url}&async=true")
        close_async(store)

    def test_async_class_opens_async_by_default(self, collection_url: str) -> None:
        """AsyncMongoStore.from_url opens an AsyncMongoStore without the option."""
        store = AsyncMongoStore.from_url(collection_url)
        close_async(store)

    def test_constructor_reads_options_from_the_url(self, mongodb_store_url: str) -> None:
        """MongoStore(url) takes the collection and other options from the query string."""
        with MongoStore(f"{mongodb_store_url}?collection=ctor&batch_size=7&w=1") as store:
            assert ("ctor", WriteConcern(w=1)) == (
                store.collection.name,
                store.collection.write_concern,
            )

    def test_constructor_refuses_a_url_asking_for_the_other_kind(self, collection_url: str) -> None:
        """MongoStore(url) with async=true is a ConfigurationError naming AsyncMongoStore."""
        with pytest.raises(ConfigurationError, match="AsyncMongoStore"):
            MongoStore(f"{collection_url}&async=true")

    def test_database_and_collection_come_from_the_url(self, mongodb_store_url: str) -> None:
        """The path names the database, ``collection=`` the collection."""
        database = mongodb_store_url.rsplit("/", 1)[1]
        with opened(f"{mongodb_store_url}?collection=mine") as store:
            assert f"{database}.mine" == store.collection.full_name

    def test_collection_may_follow_the_database_in_the_path(self, mongodb_url: str) -> None:
        """``mongodb://host/db.collection`` names both."""
        with opened(f"{mongodb_url.rstrip('/')}/appdb.creds") as store:
            assert "appdb.creds" == store.collection.full_name

    def test_default_collection(self, mongodb_store_url: str) -> None:
        """Without ``collection=``, credentials go to credkeeper_credentials."""
        with opened(mongodb_store_url) as store:
            assert DEFAULT_COLLECTION == store.collection.name

    def test_a_database_is_required(self, mongodb_url: str) -> None:
        """A URL without a database is a ConfigurationError saying where to put it."""
        with pytest.raises(ConfigurationError, match="needs a database"):
            open_store(mongodb_url.rstrip("/") + "/?collection=x")

    def test_unknown_keyword_option_is_refused_by_name(self, collection_url: str) -> None:
        """An option the store does not know is a ConfigurationError naming it."""
        with pytest.raises(ConfigurationError, match="colection"):
            open_store(collection_url, colection="typo")

    def test_unknown_url_option_is_refused_by_name(self, collection_url: str) -> None:
        """A query option neither credkeeper nor pymongo knows is an error, not a warning."""
        with pytest.raises(ConfigurationError, match="'colection'"):
            open_store(f"{collection_url}&colection=typo")

    def test_an_option_given_twice_is_refused(self, collection_url: str) -> None:
        """The same option in the URL and as a keyword is a ConfigurationError."""
        with pytest.raises(ConfigurationError, match="both"):
            open_store(collection_url, collection="other")

    def test_an_option_given_twice_in_the_url_is_refused(self, collection_url: str) -> None:
        """The same credkeeper option twice in the query is a ConfigurationError naming it."""
        with pytest.raises(ConfigurationError, match="gives the option 'batch_size' twice"):
            open_store(f"{collection_url}&batch_size=5&batch_size=6")

    def test_an_unreadable_value_names_the_option_and_what_it_accepts(
        self, collection_url: str
    ) -> None:
        """A value an option cannot read gets the message every credkeeper store gives."""
        with pytest.raises(ConfigurationError) as raised:
            open_store(f"{collection_url}&batch_size=many")
        assert "MongoDB store option batch_size must be a positive whole number, got 'many'" == str(
            raised.value
        )

    def test_pymongo_options_in_the_url_reach_the_client(self, collection_url: str) -> None:
        """Query options credkeeper does not own go to MongoClient."""
        with opened(f"{collection_url}&serverSelectionTimeoutMS=1234") as store:
            assert 1.234 == store.client.options.server_selection_timeout

    def test_pymongo_options_reach_the_client_as_written(self, collection_url: str) -> None:
        """pymongo's rules hold for its options: readPreferenceTags repeats, a tag set each."""
        tags = "readPreferenceTags=dc:ny&readPreferenceTags="
        url = f"{collection_url}&readPreference=secondary&{tags}"
        with opened(url) as store:
            assert [{"dc": "ny"}, {}] == store.client.read_preference.tag_sets

    def test_short_client_timeouts_by_default(self, collection_url: str) -> None:
        """Without URL settings, server selection gives up after 10 s, not pymongo's 30 s."""
        with opened(collection_url) as store:
            assert 10.0 == store.client.options.server_selection_timeout

    def test_repr_hides_the_password(self, mongodb_store_url: str) -> None:
        """A store's repr shows hosts and database, never the password or query."""
        url = mongodb_store_url.replace("mongodb://", "mongodb://app:s3cret-pw@", 1)
        with opened(f"{url}?collection=c&tlsCertificateKeyFilePassword=other-secret") as store:
            shown = repr(store)
        assert (False, False, True) == ("s3cret" in shown, "other-secret" in shown, "***" in shown)

    def test_an_invalid_url_option_value_does_not_echo_the_password(
        self, mongodb_store_url: str
    ) -> None:
        """A pymongo URL error is a ConfigurationError without the URL's password."""
        url = mongodb_store_url.replace("mongodb://", "mongodb://app:s3cret-pw@", 1)
        with pytest.raises(ConfigurationError) as raised:
            open_store(f"{url}?serverSelectionTimeoutMS=soon")
        assert "s3cret-pw" not in str(raised.value)

    def test_a_client_given_stays_open_after_close(self, mongodb_url: str) -> None:
        """MongoStore(client) does not close a client it did not make."""
        client: MongoClient[dict[str, Any]] = MongoClient(mongodb_url)
        with contextlib.closing(client):
            MongoStore(client, database="x", collection=unique()).close()
            assert {"ok": 1.0} == {"ok": client.admin.command("ping")["ok"]}

    def test_a_client_of_the_wrong_kind_is_refused(self, mongodb_url: str) -> None:
        """AsyncMongoStore(MongoClient) is a ConfigurationError."""
        client: MongoClient[dict[str, Any]] = MongoClient(mongodb_url, connect=False)
        with contextlib.closing(client), pytest.raises(ConfigurationError, match="Async"):
            AsyncMongoStore(client, database="x")  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"batch_size": "0"}, "batch_size"),
            ({"field_path": "claudeCredentials"}, "collection=<"),
            ({"collection": "users", "match_field": "userId"}, "field_path too"),
            ({"collection": "users", "field_path": "$where"}, "field path"),
            ({"collection": "users", "field_path": "a", "field_naming": "kebab"}, "naming"),
            ({"collection": "users", "field_path": "a", "key_type": "uuid"}, "key_type"),
            ({"collection": "a$b"}, "collection"),
            ({"write_concern": "0"}, "acknowledge"),
            ({"create_index": "maybe"}, "create_index"),
            ({"async": "perhaps"}, "async"),
        ],
        ids=lambda value: str(value).replace(" ", ""),
    )
    def test_invalid_option_values_are_refused(
        self, mongodb_store_url: str, options: dict[str, str], message: str
    ) -> None:
        """Each bad option value is a ConfigurationError naming the option."""
        query = "&".join(f"{name}={value}" for name, value in options.items())
        with pytest.raises(ConfigurationError, match=message):
            open_store(f"{mongodb_store_url}?{query}")

    def test_layout_and_layout_options_together_are_refused(self, collection_url: str) -> None:
        """Either layout= or the layout's options, not both."""
        with pytest.raises(ConfigurationError, match="not both"):
            open_store(collection_url, layout=EmbeddedLayout(), field_path="x")


class TestWriteConcern:
    def test_majority_by_default(self, collection_url: str) -> None:
        """Without a setting, writes wait for a majority."""
        with opened(collection_url) as store:
            assert WriteConcern("majority") == store.collection.write_concern

    def test_the_urls_w_is_honoured(self, collection_url: str) -> None:
        """``w=1`` in the URL sets the write concern."""
        with opened(f"{collection_url}&w=1") as store:
            assert WriteConcern(w=1) == store.collection.write_concern

    def test_majority_keeps_the_urls_timeout(self, collection_url: str) -> None:
        """``wtimeoutMS`` without ``w`` keeps majority, with that timeout."""
        with opened(f"{collection_url}&wtimeoutMS=5000") as store:
            assert WriteConcern("majority", wtimeout=5000) == store.collection.write_concern

    def test_the_option_wins(self, collection_url: str) -> None:
        """``write_concern=`` sets it, a number meaning that many nodes."""
        with opened(collection_url, write_concern=1) as store:
            assert WriteConcern(w=1) == store.collection.write_concern

    def test_reads_go_to_the_primary(self, collection_url: str) -> None:
        """A readPreference in the URL does not move compare-and-swap reads off the primary."""
        with opened(f"{collection_url}&readPreference=secondaryPreferred") as store:
            assert "primary" == store.collection.read_preference.mongos_mode


# -- documents and indexes -------------------------------------------------------------------


class TestDocuments:
    def test_own_collection_document_shape(
        self, collection_url: str, mongo_client: MongoClient[dict[str, Any]]
    ) -> None:
        """One document per key: _id the key, times as Int64 epoch ms, a string version."""
        with opened(collection_url) as store:
            stored = store.put(record("alice", lease_until=LATER))
            document = mongo_client[store.collection.database.name][store.collection.name].find_one(
                {"_id": "alice"}
            )
        assert document is not None
        assert (
            ["_id", "access_token", "refresh_token", "expires_at", "scopes"],
            (Int64, Int64, type(None)),
            stored.version,
        ) == (
            list(document)[:5],
            tuple(type(document[name]) for name in ("expires_at", "lease_until", "cooldown_until")),
            document["version"],
        )

    def test_the_expiry_index_is_created_on_first_use(self, collection_url: str) -> None:
        """credkeeper's own collection gets an index on (expires_at, _id)."""
        with opened(collection_url) as store:
            store.get("anyone")
            keys = [dict(index["key"]) for index in store.collection.list_indexes()]
        assert {"expires_at": 1, "_id": 1} in keys

    def test_create_index_false_creates_none(self, collection_url: str) -> None:
        """With create_index=false only MongoDB's own _id index exists."""
        with opened(f"{collection_url}&create_index=false") as store:
            store.put(record("alice"))
            names = [index["name"] for index in store.collection.list_indexes()]
        assert ["_id_"] == names

    def test_a_document_not_written_by_credkeeper_is_corrupted(self, collection_url: str) -> None:
        """A foreign document under a key reads as StoreCorrupted, not a driver error."""
        with opened(collection_url) as store:
            store.collection.insert_one({"_id": "foreign", "hello": "world"})
            with pytest.raises(StoreCorrupted):
                store.get("foreign")

    def test_scan_due_skips_ids_that_are_not_keys(self, collection_url: str) -> None:
        """A document whose _id is not a string never comes out of scan_due."""
        with opened(collection_url) as store:
            store.put(record("alice"))
            store.collection.insert_one({"_id": 42, "expires_at": Int64(0)})
            assert ["alice"] == list(store.scan_due(LATER))

    def test_scan_due_refuses_a_naive_datetime_at_the_call(self, collection_url: str) -> None:
        """scan_due(before) with a naive datetime is a ConfigurationError before any iteration."""
        with opened(collection_url) as store, pytest.raises(ConfigurationError, match="aware"):
            store.scan_due(datetime(2030, 1, 1))

    def test_async_scan_due_refuses_a_naive_datetime_at_the_call(self, collection_url: str) -> None:
        """AsyncMongoStore.scan_due(before) refuses a naive datetime before any iteration."""
        store = AsyncMongoStore(f"{collection_url}&async=true")
        try:
            with pytest.raises(ConfigurationError, match="aware"):
                store.scan_due(datetime(2030, 1, 1))
        finally:
            close_async(store)


class TestScanStreams:
    def test_scan_due_reads_one_batch_at_a_time(self, mongodb_url: str) -> None:
        """With batch_size=10, the first key arrives after one find and no getMore."""
        listener = Commands()
        client: MongoClient[dict[str, Any]] = MongoClient(mongodb_url, event_listeners=[listener])
        with contextlib.closing(client):
            store = MongoStore(client, database=unique("scan"), collection="c", batch_size=10)
            for index in range(35):
                store.put(record(f"key-{index:02d}"))
            listener.names.clear()
            scan = store.scan_due(LATER)
            next(scan)
            first = list(listener.names)
            rest = list(scan)
            client.drop_database(store.collection.database.name)
        assert (["find"], 34, 3) == (first, len(rest), listener.names.count("getMore"))

    def test_an_abandoned_scan_closes_its_cursor(self, mongodb_url: str) -> None:
        """Leaving scan_due early kills the server cursor instead of leaving it open."""
        listener = Commands()
        client: MongoClient[dict[str, Any]] = MongoClient(mongodb_url, event_listeners=[listener])
        with contextlib.closing(client):
            store = MongoStore(client, database=unique("scan"), collection="c", batch_size=2)
            for index in range(5):
                store.put(record(f"key-{index}"))
            scan = cast(Generator[str, None, None], store.scan_due(LATER))
            next(scan)
            scan.close()
            client.drop_database(store.collection.database.name)
        assert 1 == listener.names.count("killCursors")


# -- errors ----------------------------------------------------------------------------------

CALLS: dict[str, StoreCall] = {
    "get": lambda store: store.get("alice"),
    "put": lambda store: store.put(record("alice")),
    "delete": lambda store: store.delete("alice"),
    "scan_due": lambda store: list(store.scan_due(LATER)),
}


class TestErrors:
    @pytest.mark.parametrize("call", list(CALLS.values()), ids=list(CALLS))
    def test_a_closed_port_is_store_unavailable(self, call: StoreCall) -> None:
        """Nothing listening: each call raises StoreUnavailable once server selection gives up."""
        url = f"mongodb://127.0.0.1:{free_port()}/db?serverSelectionTimeoutMS=200"
        with opened(url) as store, pytest.raises(StoreUnavailable):
            call(store)

    def test_a_closed_port_is_store_unavailable_for_the_async_store(self) -> None:
        """The async store translates ServerSelectionTimeoutError the same way."""
        url = f"mongodb://127.0.0.1:{free_port()}/db?serverSelectionTimeoutMS=200&async=true"

        async def call() -> None:
            store = open_store(url)
            assert isinstance(store, AsyncMongoStore)
            try:
                await store.get("alice")
            finally:
                await store.close()

        # pymongo's async monitor leaks the socket it is connecting with when close() cancels
        # it; collect that socket here, its ResourceWarning being pymongo's, not the store's.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            with pytest.raises(StoreUnavailable):
                asyncio.run(call())
            gc.collect()

    def test_a_primary_stepping_down_is_store_unavailable(self, faults: FailPoints) -> None:
        """NotWritablePrimary (10107) from the server is StoreUnavailable."""
        with contextlib.closing(faults.store()) as store:
            store.get("warm-up")
            faults.arm("find", errorCode=10107)
            with pytest.raises(StoreUnavailable):
                store.get("alice")

    def test_a_dropped_connection_is_store_unavailable(self, faults: FailPoints) -> None:
        """The server closing the connection mid-write (AutoReconnect) is StoreUnavailable."""
        with contextlib.closing(faults.store()) as store:
            created = store.put(record(unique("key")))
            faults.arm("update", closeConnection=True)
            with pytest.raises(StoreUnavailable):
                store.put(created.replace(failures=1))

    def test_a_network_timeout_is_store_unavailable(self, faults: FailPoints) -> None:
        """A reply slower than socketTimeoutMS (NetworkTimeout) is StoreUnavailable."""
        with contextlib.closing(faults.store(socketTimeoutMS="200")) as store:
            store.get("warm-up")
            faults.arm("find", blockConnection=True, blockTimeMS=1000)
            with pytest.raises(StoreUnavailable):
                store.get("alice")

    def test_a_write_concern_timeout_is_store_unavailable_and_says_so(
        self, faults: FailPoints
    ) -> None:
        """wtimeout (WTimeoutError) is StoreUnavailable, warning the write may be applied."""
        with contextlib.closing(faults.store()) as store:
            created = store.put(record(unique("key")))
            faults.arm(
                "update",
                writeConcernError={
                    "code": 64,
                    "codeName": "WriteConcernFailed",
                    "errmsg": "waiting for replication timed out",
                    "errInfo": {"wtimeout": True},
                },
            )
            with pytest.raises(StoreUnavailable, match="may still be applied"):
                store.put(created.replace(failures=1))

    def test_an_expired_scan_cursor_is_store_unavailable(self, faults: FailPoints) -> None:
        """CursorNotFound on getMore is StoreUnavailable asking for a new scan."""
        with contextlib.closing(faults.store(batch_size="2")) as store:
            for index in range(5):
                store.put(record(f"{faults.app}-{index}"))
            faults.arm("getMore", errorCode=43)
            with pytest.raises(StoreUnavailable, match="scan again"):
                list(store.scan_due(LATER))

    def test_missing_privileges_are_a_store_error(self, faults: FailPoints) -> None:
        """Unauthorized (13) is a StoreError naming the role needed, not StoreUnavailable."""
        with contextlib.closing(faults.store()) as store:
            store.get("warm-up")
            faults.arm("find", errorCode=13)
            with pytest.raises(StoreError, match="readWrite") as raised:
                store.get("alice")
        assert not isinstance(raised.value, StoreUnavailable)

    def test_a_duplicate_key_on_create_is_a_conflict(self, collection_url: str) -> None:
        """Creating an existing key: the server's DuplicateKeyError becomes ConflictError."""
        with opened(collection_url) as store:
            store.put(record("alice"))
            with pytest.raises(ConflictError) as raised:
                store.put(record("alice"))
        assert isinstance(raised.value.__cause__, DuplicateKeyError)

    def test_a_value_bson_cannot_encode_is_a_store_error(self, collection_url: str) -> None:
        """A token with a lone surrogate is a StoreError, not a bson or Unicode error."""
        with opened(collection_url) as store, pytest.raises(StoreError):
            store.put(record("alice", access_token="half a pair \ud800"))

    def test_a_closed_store_raises_store_error(self, collection_url: str) -> None:
        """Using a store after close() is a StoreError, not pymongo's InvalidOperation."""
        store = open_store(collection_url)
        store.close()
        with pytest.raises(StoreError, match="closed"):
            store.get("alice")


class TestNoTokenInErrors:
    def test_a_server_error_quoting_the_document_is_not_echoed(
        self, mongodb_store_url: str, mongo_client: MongoClient[dict[str, Any]]
    ) -> None:
        """The server's message quoting a field holding a token never reaches the exception."""
        collection = unique("users")
        database = mongodb_store_url.rsplit("/", 1)[1]
        mongo_client[database][collection].insert_one({"_id": "alice", "integrations": TOKEN})
        url = f"{mongodb_store_url}?collection={collection}&field_path=integrations.claude"
        with opened(url) as store, pytest.raises(StoreCorrupted) as raised:
            store.put(record("alice", refresh_token="a-new-token"))
        cause = str(raised.value.__cause__)
        assert (True, False, False) == (
            TOKEN in cause,
            TOKEN in str(raised.value),
            "a-new-token" in str(raised.value),
        )

    def test_an_unencodable_token_is_not_echoed(self, collection_url: str) -> None:
        """The StoreError for a value bson refuses does not quote the value."""
        token = TOKEN + "\ud800"
        with opened(collection_url) as store, pytest.raises(StoreError) as raised:
            store.put(record("alice", access_token=token))
        assert TOKEN not in str(raised.value)

    def test_conflicts_and_corruption_do_not_quote_tokens(self, collection_url: str) -> None:
        """ConflictError and StoreCorrupted name keys and fields, never token values."""
        messages = []
        with opened(collection_url) as store:
            created = store.put(record("alice"))
            store.put(created.replace(failures=1))
            with pytest.raises(ConflictError) as conflict:
                store.put(created.replace(failures=2))
            messages.append(str(conflict.value))
            store.collection.update_one({"_id": "alice"}, {"$set": {"failures": TOKEN}})
            with pytest.raises(StoreCorrupted) as corrupted:
                store.get("alice")
            messages.append(str(corrupted.value))
        assert [False, False] == [TOKEN in message for message in messages]

    def test_record_repr_after_a_round_trip_hides_tokens(self, collection_url: str) -> None:
        """A record read back from MongoDB shows no token in its repr."""
        with opened(collection_url) as store:
            store.put(record("alice"))
            read = store.get("alice")
        assert TOKEN not in repr(read)


class TestAsyncStore:
    def test_async_scan_due_closes_its_cursor_when_left(self, mongodb_url: str) -> None:
        """Leaving ``async for`` over scan_due early kills the server cursor."""
        listener = Commands()
        database = unique("scan")

        async def scan() -> None:
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
                mongodb_url, event_listeners=[listener]
            )
            store = AsyncMongoStore(client, database=database, collection="c", batch_size=2)
            for index in range(5):
                await store.put(record(f"key-{index}"))
            keys = cast(AsyncGenerator[str, None], store.scan_due(LATER))
            await anext(keys)
            await keys.aclose()
            await client.drop_database(database)
            await client.close()

        asyncio.run(scan())
        assert 1 == listener.names.count("killCursors")

    def test_async_store_round_trips_a_record(self, collection_url: str) -> None:
        """The async store reads back what it wrote, with the same document shape."""

        async def round_trip() -> tuple[Record, Record | None]:
            store = AsyncMongoStore(collection_url)
            try:
                stored = await store.put(record("alice", expires_at=LATER - timedelta(days=1)))
                return stored, await store.get("alice")
            finally:
                await store.close()

        stored, read = asyncio.run(round_trip())
        assert stored == read
