"""Embedded mode in the application's own terms: its formats, documents created at login, plaintext.

The documents here are written with pymongo the way other programs write them (a JavaScript
app's ``Date.now() + expires_in * 1000`` is a BSON double, its ``new Date(...)`` a BSON date,
its seconds an int32, a Java or Python program's milliseconds an int64; scopes as an array or
as the token response's space-separated string). After credkeeper refreshes, every field must
hold exactly what that program would have written, BSON type included.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bson
import pytest
from bson import Decimal128, Int64
from pymongo import MongoClient
from pymongo.collection import Collection

from credkeeper import (
    ConfigurationError,
    ConflictError,
    Credentials,
    CredentialStore,
    KeyRing,
    Record,
    StoreError,
    TokenManager,
    open_store,
)
from credkeeper.testing import AsyncStoreConformance, FakeProvider, StoreConformance, StoreFactory
from credkeeper_mongo import AsyncMongoStore, EmbeddedLayout, MongoStore

from .test_conformance import TIMEOUT
from .test_embedded import EXACT, PATH, new_record, raw

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
KEY = "user-1"


def epoch_ms(moment: datetime) -> int:
    """``moment`` in whole epoch milliseconds, as ``Date.getTime()`` gives it."""
    return (moment - EPOCH) // timedelta(milliseconds=1)


@dataclass(frozen=True)
class AppFormat:
    """How one application program writes ``expiresAt`` and ``scopes``, and the store's options
    for the unit it uses."""

    expires_at: Callable[[datetime], Any]
    scopes: Callable[[tuple[str, ...]], Any]
    options: dict[str, str] = field(default_factory=dict)


def space(scopes: tuple[str, ...]) -> str:
    """Scopes as the token response's ``scope`` string."""
    return " ".join(scopes)


FORMATS = {
    # The wrapper's guide in Node: Date.now() + expires_in * 1000, which BSON stores as a double.
    "node-ms-double-scope-string": AppFormat(lambda at: float(epoch_ms(at)), space),
    # new Date(Date.now() + expires_in * 1000), scopes split into an array.
    "node-date-scope-array": AppFormat(
        lambda at: EPOCH + timedelta(milliseconds=epoch_ms(at)), list
    ),
    # Math.floor(Date.now() / 1000) + expires_in: small enough for an int32.
    "node-seconds-int32-scope-string": AppFormat(
        lambda at: epoch_ms(at) // 1000, space, {"expires_at_unit": "s"}
    ),
    # A Java or Python program's long milliseconds.
    "int64-ms-scope-array": AppFormat(lambda at: Int64(epoch_ms(at)), list),
}


def app_document(shape: AppFormat, credentials: Credentials) -> dict[str, Any]:
    """A user's document as the application writes it, ``credentials`` in its formats."""
    return {
        "_id": KEY,
        "name": "Ada",
        "createdAt": datetime(2024, 2, 29, 23, 59, 59, 999000),
        "balance": Decimal128("12.50"),
        PATH: {
            "accessToken": credentials.access_token.get_secret_value(),
            "refreshToken": credentials.refresh_token.get_secret_value(),
            "expiresAt": shape.expires_at(credentials.expires_at),
            "scopes": shape.scopes(credentials.scopes),
            "subscriptionType": credentials.subscription_type,
            "source": "web-login",
        },
        "plan": "pro",
    }


def without_state(collection: Collection[dict[str, Any]], user_id: Any) -> bytes:
    """A stored document's BSON without credkeeper's state sub-document, which only it reads."""
    document = bson.decode(raw(collection, user_id), codec_options=EXACT)
    document[PATH].pop("credkeeper")
    return bson.encode(document, codec_options=EXACT)


def typed(encoded: bytes) -> Any:
    """BSON as (field, type, value) triples, so a failed comparison shows which type differs."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return [(name, type(item).__name__, walk(item)) for name, item in value.items()]
        if isinstance(value, list):
            return [(type(item).__name__, walk(item)) for item in value]
        return value

    return walk(bson.decode(encoded, codec_options=EXACT))


@pytest.fixture
def tokens(mongodb_url: str, mongodb_database: str) -> Iterator[Collection[dict[str, Any]]]:
    """An empty collection of the application's; dropped after the test."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_url)
    with contextlib.closing(client):
        collection = client[mongodb_database][f"tokens_{uuid.uuid4().hex[:8]}"]
        yield collection
        collection.drop()


def url_for(collection: Collection[dict[str, Any]], base: str, **options: str) -> str:
    """The store URL embedding credentials at ``claudeCredentials`` of ``collection``."""
    query = {"collection": collection.name, "field_path": PATH, **options}
    return f"{base}?{'&'.join(f'{name}={value}' for name, value in query.items())}"


@contextlib.contextmanager
def opened(url: str, **options: Any) -> Iterator[MongoStore]:
    """A sync store on ``url``, closed afterwards."""
    store = open_store(url, **options)
    assert isinstance(store, MongoStore)
    with contextlib.closing(store):
        yield store


def stored(collection: Collection[dict[str, Any]], user_id: Any) -> Any:
    """The credential sub-document of one document, decoded."""
    document = collection.find_one({"_id": user_id})
    assert document is not None
    return document.get(PATH)


# -- formats -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(FORMATS.values()), ids=list(FORMATS))
def test_a_refresh_writes_every_field_as_the_application_would(
    shape: AppFormat,
    tokens: Collection[dict[str, Any]],
    mongodb_store_url: str,
    fake: FakeProvider,
    tmp_path: Path,
) -> None:
    """After a refresh the document's BSON is what the app writing that format would store."""
    tokens.insert_one(app_document(shape, fake.issue(expires_in=60)))
    url = url_for(tokens, mongodb_store_url, **shape.options)

    with (
        opened(url) as store,
        TokenManager(store, fake.provider(), journal=tmp_path / "journal") as manager,
    ):
        refreshed = manager.refresh(KEY)

    expected = bson.encode(app_document(shape, refreshed))
    actual = without_state(tokens, KEY)
    assert (typed(expected), expected) == (typed(actual), actual)


@pytest.mark.parametrize("before", [None, {"expiresAt": None, "source": "web-login"}])
def test_a_credential_without_stored_formats_takes_the_options(
    before: Any, tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """Where nothing stored shows a format, expires_at_unit and scopes_format decide it."""
    tokens.insert_one({"_id": KEY, PATH: before})
    url = url_for(tokens, mongodb_store_url, expires_at_unit="date", scopes_format="space")
    moment = datetime(2031, 5, 17, 8, 30, 12, 345000, tzinfo=UTC)

    with opened(url) as store:
        store.put(new_record(KEY, expires_at=moment, scopes=("user:inference", "user:profile")))
    credential = stored(tokens, KEY)

    assert (moment.replace(tzinfo=None), "user:inference user:profile") == (
        credential["expiresAt"],
        credential["scopes"],
    )


def test_scopes_are_an_array_by_default(
    tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """Without a stored format or scopes_format, scopes are written as an array."""
    tokens.insert_one({"_id": KEY})

    with opened(url_for(tokens, mongodb_store_url)) as store:
        store.put(new_record(KEY, scopes=("user:inference", "user:profile")))

    assert ["user:inference", "user:profile"] == stored(tokens, KEY)["scopes"]


def test_an_unknown_scopes_format_is_refused(mongodb_store_url: str) -> None:
    """scopes_format other than array or space is a ConfigurationError naming both."""
    url = f"{mongodb_store_url}?collection=users&field_path={PATH}&scopes_format=json"

    with pytest.raises(ConfigurationError, match="scopes_format must be 'array' or 'space'"):
        open_store(url)


def test_a_missing_subscription_type_stays_missing(
    tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """A credential the app stored without subscriptionType gets none added by a write."""
    credential = {"accessToken": "a", "refreshToken": "r", "expiresAt": 1.8934560e12}
    tokens.insert_one({"_id": KEY, PATH: credential})

    with opened(url_for(tokens, mongodb_store_url)) as store:
        read = store.get(KEY)
        assert read is not None
        store.put(read.replace(failures=1))

    assert ["accessToken", "refreshToken", "expiresAt", "scopes", "credkeeper"] == list(
        stored(tokens, KEY)
    )


def test_scan_due_finds_dates_and_numbers_alike(
    tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """scan_due yields due credentials whichever BSON type their expiresAt has."""
    due = datetime(2030, 1, 1, tzinfo=UTC)
    expiries = {
        "date": due,
        "double": float(epoch_ms(due)),
        "int64": Int64(epoch_ms(due)),
        "later": due + timedelta(days=1),
    }
    tokens.insert_many(
        {"_id": name, PATH: {"accessToken": "a", "refreshToken": "r", "expiresAt": expiry}}
        for name, expiry in expiries.items()
    )

    with opened(url_for(tokens, mongodb_store_url)) as store:
        found = sorted(store.scan_due(due))

    assert ["date", "double", "int64"] == found


# -- documents created at login ------------------------------------------------------------


def test_without_upsert_a_missing_document_is_refused_naming_the_option(
    tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """Storing for a key no document has raises StoreError telling of upsert=true."""
    with (
        opened(url_for(tokens, mongodb_store_url)) as store,
        pytest.raises(StoreError, match="upsert=true"),
    ):
        store.put(new_record(KEY))

    assert 0 == tokens.count_documents({})


def test_upsert_creates_the_document_with_the_key_and_the_credential_only(
    tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """With upsert=true a new key gets a document of its _id and the credential sub-document."""
    with opened(url_for(tokens, mongodb_store_url, upsert="true")) as store:
        created = store.put(new_record(KEY))
        read = store.get(KEY)
    document = tokens.find_one({"_id": KEY})

    assert document is not None
    assert (created, ["_id", PATH], "refresh-token") == (
        read,
        list(document),
        document[PATH]["refreshToken"],
    )


def test_upsert_by_another_field_stores_the_key_in_its_type(
    tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """With match_field=userId and key_type=int, the created document's userId is an integer."""
    tokens.create_index("userId", unique=True)
    url = url_for(tokens, mongodb_store_url, upsert="true", match_field="userId", key_type="int")

    with opened(url) as store:
        created = store.put(new_record("42"))
        read = store.get("42")
    document = tokens.find_one({"userId": 42})

    assert document is not None
    assert (created, ["_id", "userId", PATH], Int64) == (
        read,
        list(document),
        type(document["userId"]),
    )


def test_upsert_under_a_nested_path_creates_the_parents(
    tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """A dotted field_path becomes nested sub-documents in the created document."""
    url = url_for(tokens, mongodb_store_url, upsert="true").replace(
        f"field_path={PATH}", "field_path=integrations.claude"
    )

    with opened(url) as store:
        created = store.put(new_record(KEY))
        read = store.get(KEY)
    document = tokens.find_one({"_id": KEY})

    assert document is not None
    assert (created, ["claude"]) == (read, list(document["integrations"]))


def test_upsert_needs_a_unique_index_on_the_match_field(
    tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """Without a unique index on match_field two creates could insert two documents: refused."""
    tokens.create_index("userId")
    url = url_for(tokens, mongodb_store_url, upsert="true", match_field="userId")

    with (
        opened(url) as store,
        pytest.raises(ConfigurationError, match=r"createIndex\(\{userId: 1\}, \{unique: true"),
    ):
        store.put(new_record(KEY))

    assert 0 == tokens.count_documents({})


def test_upsert_refused_by_another_unique_index_is_no_conflict(
    tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """A unique index on a field created documents lack is a StoreError naming it, not a race."""
    tokens.create_index("email", unique=True)

    with opened(url_for(tokens, mongodb_store_url, upsert="true")) as store:
        store.put(new_record("first"))
        with pytest.raises(StoreError, match="unique index on email") as raised:
            store.put(new_record("second"))

    assert (False, 1) == (
        isinstance(raised.value, ConflictError),
        tokens.count_documents({}),
    )


def test_upsert_create_over_a_stored_credential_conflicts(
    tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """A create (version None) where the document holds a credential raises ConflictError."""
    credential = {"accessToken": "a", "refreshToken": "the app's", "expiresAt": 1.8934560e12}
    tokens.insert_one({"_id": KEY, PATH: credential})

    with (
        opened(url_for(tokens, mongodb_store_url, upsert="true")) as store,
        pytest.raises(ConflictError),
    ):
        store.put(new_record(KEY))

    assert "the app's" == stored(tokens, KEY)["refreshToken"]


def test_upsert_never_recreates_a_document_a_version_was_read_from(
    tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """An update (version set) whose document was deleted since raises ConflictError."""
    with opened(url_for(tokens, mongodb_store_url, upsert="true")) as store:
        created = store.put(new_record(KEY))
        tokens.delete_one({"_id": KEY})
        with pytest.raises(ConflictError):
            store.put(created.replace(failures=1))

    assert 0 == tokens.count_documents({})


@pytest.mark.parametrize("match_field", ["_id", "userId"])
def test_concurrent_creates_make_one_document_and_one_winner(
    match_field: str, tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """Eight threads creating one new key: one wins, seven conflict, one document exists."""
    if match_field != "_id":  # _id is unique already, and mongod refuses the option on it
        tokens.create_index(match_field, unique=True)
    url = url_for(tokens, mongodb_store_url, upsert="true", match_field=match_field)
    start = threading.Barrier(8)
    outcomes: list[Record | BaseException] = []

    def create(store: CredentialStore, index: int) -> None:
        start.wait()
        try:
            outcomes.append(store.put(new_record(KEY, access_token=f"token-{index}")))
        except ConflictError as exc:
            outcomes.append(exc)

    with opened(url) as store:
        threads = [
            threading.Thread(target=create, args=(store, index), daemon=True) for index in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        winners = [outcome for outcome in outcomes if isinstance(outcome, Record)]
        read = store.get(KEY)

    assert ([read], 7, 1) == (
        winners,
        sum(isinstance(outcome, ConflictError) for outcome in outcomes),
        tokens.count_documents({}),
    )


class TestEmbeddedUpsertConformance(StoreConformance):
    """The whole store contract on documents credkeeper creates itself (upsert=true)."""

    concurrency_timeout = TIMEOUT
    url: str

    @pytest.fixture(autouse=True)
    def backend(self, mongodb_store_url: str) -> None:
        """This session's database, credentials embedded in a collection of the app's."""
        self.url = (
            f"{mongodb_store_url}?collection=conformance_embedded&field_path={PATH}&upsert=true"
        )

    def make_store(self) -> CredentialStore:
        store = open_store(self.url)
        assert isinstance(store, MongoStore)
        return store

    def store_factory(self) -> StoreFactory:
        return functools.partial(open_store, self.url)


class TestAsyncEmbeddedUpsertConformance(AsyncStoreConformance):
    """The async store's contract on documents it creates itself, by userId."""

    concurrency_timeout = TIMEOUT
    url: str

    @pytest.fixture(autouse=True)
    def backend(self, mongodb_url: str, mongodb_database: str, mongodb_store_url: str) -> None:
        """A collection of the app's with a unique userId, four connections per store."""
        client: MongoClient[dict[str, Any]] = MongoClient(mongodb_url)
        with contextlib.closing(client):
            client[mongodb_database]["conformance_embedded_async"].create_index(
                "userId", unique=True
            )
        self.url = (
            f"{mongodb_store_url}?collection=conformance_embedded_async&field_path={PATH}"
            "&match_field=userId&upsert=true&async=true&maxPoolSize=4"
        )

    def make_async_store(self) -> AsyncMongoStore:
        store = open_store(self.url)
        assert isinstance(store, AsyncMongoStore)
        return store

    def store_factory(self) -> StoreFactory:
        return functools.partial(open_store, self.url)


# -- the plaintext declaration -------------------------------------------------------------


@pytest.mark.parametrize("shape", list(FORMATS.values()), ids=list(FORMATS))
def test_a_plaintext_store_refreshed_with_a_key_ring_keeps_the_apps_document(
    shape: AppFormat,
    tokens: Collection[dict[str, Any]],
    mongodb_store_url: str,
    fake: FakeProvider,
    tmp_path: Path,
) -> None:
    """plaintext=true: tokens stay plain although the manager holds a key ring for its journal."""
    tokens.insert_one(app_document(shape, fake.issue(expires_in=60)))
    url = url_for(tokens, mongodb_store_url, plaintext="true", **shape.options)

    with (
        opened(url) as store,
        TokenManager(
            store, fake.provider(), keyring=KeyRing.generate(), journal=tmp_path / "journal"
        ) as manager,
    ):
        refreshed = manager.refresh(KEY)

    expected = bson.encode(app_document(shape, refreshed))
    assert typed(expected) == typed(without_state(tokens, KEY))


def test_plaintext_defaults_to_false(mongodb_store_url: str) -> None:
    """A store not declared plaintext says so."""
    with opened(mongodb_store_url) as store:
        assert False is store.plaintext


@pytest.mark.parametrize("layout", ["", f"&collection=users&field_path={PATH}"])
def test_plaintext_from_the_url(layout: str, mongodb_store_url: str) -> None:
    """?plaintext=true declares either layout's store plaintext."""
    with opened(f"{mongodb_store_url}?plaintext=true{layout}") as store:
        assert True is store.plaintext


def test_plaintext_as_a_keyword(mongodb_store_url: str) -> None:
    """plaintext=True as a keyword of open_store or of the class declares the store plaintext."""
    with (
        opened(mongodb_store_url, plaintext=True) as by_url,
        MongoStore(mongodb_store_url, plaintext=True) as by_class,
    ):
        assert (True, True) == (by_url.plaintext, by_class.plaintext)


def test_an_async_store_declares_plaintext(mongodb_store_url: str) -> None:
    """AsyncMongoStore shows the declaration too."""
    store = AsyncMongoStore(f"{mongodb_store_url}?plaintext=yes")
    declared = store.plaintext
    asyncio.run(store.close())

    assert True is declared


def test_plaintext_must_be_a_boolean(mongodb_store_url: str) -> None:
    """plaintext=maybe is a ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match="plaintext must be true or false, got 'maybe'"):
        open_store(f"{mongodb_store_url}?plaintext=maybe")


def test_plaintext_is_read_only(mongodb_store_url: str) -> None:
    """The declaration cannot be changed on an open store."""
    with opened(mongodb_store_url) as store, pytest.raises(AttributeError):
        store.plaintext = True  # type: ignore[misc]


def test_upsert_must_be_a_boolean(mongodb_store_url: str) -> None:
    """upsert=maybe is a ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match="upsert must be true or false, got 'maybe'"):
        open_store(f"{mongodb_store_url}?collection=users&field_path={PATH}&upsert=maybe")


def test_a_field_path_inside_the_match_field_is_refused() -> None:
    """The credential cannot live inside the key's own field, which holds the key itself."""
    with pytest.raises(ConfigurationError, match="field_path must lie outside match_field"):
        EmbeddedLayout(match_field="profile", field_path="profile.claude")


# -- the unit of a numeric expiry ----------------------------------------------------------

# 2030-01-01T00:00:00Z in each unit.
SECONDS = 1_893_456_000
MILLISECONDS = SECONDS * 1000


def credential_expiring(expires_at: Any) -> dict[str, Any]:
    """A credential the application wrote, expiring at ``expires_at``."""
    return {
        "accessToken": "the access token",
        "refreshToken": "the refresh token",
        "expiresAt": expires_at,
    }


@pytest.mark.parametrize("stored_seconds", [SECONDS, float(SECONDS), Int64(SECONDS)])
def test_seconds_read_as_milliseconds_are_refused(
    stored_seconds: Any, tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """An int32, double or int64 of epoch seconds under expires_at_unit=ms names the fix."""
    tokens.insert_one({"_id": KEY, PATH: credential_expiring(stored_seconds)})

    with (
        opened(url_for(tokens, mongodb_store_url)) as store,
        pytest.raises(ConfigurationError) as raised,
    ):
        store.get(KEY)

    assert (
        f"the expiry of key {KEY!r} in field {PATH}.expiresAt is {SECONDS}, which is epoch seconds "
        "(as milliseconds it would fall in 1970-1973), but expires_at_unit=ms reads numbers as "
        "milliseconds: set expires_at_unit=s"
    ) == str(raised.value)


def test_milliseconds_read_as_seconds_are_refused(
    tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """A number of epoch milliseconds under expires_at_unit=s names the fix."""
    tokens.insert_one({"_id": KEY, PATH: credential_expiring(float(MILLISECONDS))})

    with (
        opened(url_for(tokens, mongodb_store_url, expires_at_unit="s")) as store,
        pytest.raises(ConfigurationError) as raised,
    ):
        store.get(KEY)

    assert (
        f"the expiry of key {KEY!r} in field {PATH}.expiresAt is {MILLISECONDS}, which is epoch "
        "milliseconds (as seconds it would fall after the year 5000), but expires_at_unit=s "
        "reads it as seconds: set expires_at_unit=ms"
    ) == str(raised.value)


def test_a_wrong_unit_refuses_a_write_and_leaves_the_document(
    tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """A put over a credential in the other unit is refused before anything is written."""
    tokens.insert_one({"_id": KEY, PATH: credential_expiring(SECONDS)})
    before = raw(tokens, KEY)

    with opened(url_for(tokens, mongodb_store_url)) as store, pytest.raises(ConfigurationError):
        store.put(new_record(KEY))

    assert before == raw(tokens, KEY)


def test_the_unit_refusal_never_shows_a_token(
    tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """The message names the key, field and value, never the document's tokens."""
    tokens.insert_one({"_id": KEY, PATH: credential_expiring(SECONDS)})

    with (
        opened(url_for(tokens, mongodb_store_url)) as store,
        pytest.raises(ConfigurationError) as raised,
    ):
        store.get(KEY)

    assert (False, False) == (
        "the access token" in str(raised.value),
        "the refresh token" in str(raised.value),
    )


@pytest.mark.parametrize("unit", ["ms", "s", "date"])
def test_zero_still_reads_as_expired(
    unit: str, tokens: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """0, which programs write for "expired", reads as the epoch in every unit."""
    tokens.insert_one({"_id": KEY, PATH: credential_expiring(0)})

    with opened(url_for(tokens, mongodb_store_url, expires_at_unit=unit)) as store:
        record = store.get(KEY)

    assert record is not None
    assert EPOCH == record.expires_at
