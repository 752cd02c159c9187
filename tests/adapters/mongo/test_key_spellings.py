"""Keys of integer and ObjectId ids: only the id's own spelling names its document.

``int("0123")`` and ``ObjectId("65F1...")`` name the same ids as ``"123"`` and ``"65f1..."``, but
credkeeper keeps a credential's state under the key string: two spellings of one document would
be two credentials in one place. Any other spelling is refused, naming the canonical one.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from bson import Int64, ObjectId
from pymongo import MongoClient
from pymongo.collection import Collection

from credkeeper import ConfigurationError, StoreError
from credkeeper_mongo import MongoStore

from .test_embedded import PATH, new_record, stored

USER_ID = 123
OBJECT_ID = ObjectId("65f1a2b3c4d5e6f708192a3b")


@pytest.fixture
def users(mongodb_url: str, mongodb_database: str) -> Iterator[Collection[dict[str, Any]]]:
    """The application's users: one with an integer id, one with an ObjectId; dropped after."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_url)
    with contextlib.closing(client):
        collection = client[mongodb_database][f"users_{uuid.uuid4().hex[:8]}"]
        collection.insert_many([{"_id": Int64(USER_ID), "name": "Ada"}, {"_id": OBJECT_ID}])
        yield collection
        collection.drop()


@contextlib.contextmanager
def by(
    users: Collection[dict[str, Any]], mongodb_store_url: str, key_type: str
) -> Iterator[MongoStore]:
    """A store matching ``_id`` with ``key_type``, closed afterwards."""
    url = f"{mongodb_store_url}?collection={users.name}&field_path={PATH}&key_type={key_type}"
    with MongoStore(url) as store:
        yield store


@pytest.mark.parametrize("key", ["0123", "+123", "1_23", "١٢٣"])
def test_an_integer_key_in_another_spelling_is_refused(
    key: str, users: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """int() reads these as 123; the key must be '123', named in the message."""
    with (
        by(users, mongodb_store_url, "int") as store,
        pytest.raises(ConfigurationError) as raised,
    ):
        store.put(new_record(key))

    assert (
        f"key {key!r} is not how _id (key_type=int) spells it: use '123', its canonical form, "
        "so that a document answers to one key"
    ) == str(raised.value)


@pytest.mark.parametrize("operation", ["get", "delete"])
def test_reads_and_deletes_refuse_another_spelling_too(
    operation: str, users: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """get and delete refuse '0123' as put does, rather than answering for the document."""
    with (
        by(users, mongodb_store_url, "int") as store,
        pytest.raises(ConfigurationError, match="use '123'"),
    ):
        getattr(store, operation)("0123")


def test_an_uppercase_object_id_is_refused(
    users: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """An ObjectId's key is its lowercase hex, as str(ObjectId) spells it."""
    key = str(OBJECT_ID).upper()
    with (
        by(users, mongodb_store_url, "objectid") as store,
        pytest.raises(ConfigurationError) as raised,
    ):
        store.put(new_record(key))

    assert (
        f"key {key!r} is not how _id (key_type=objectid) spells it: use {str(OBJECT_ID)!r}, its "
        "canonical form, so that a document answers to one key"
    ) == str(raised.value)


@pytest.mark.parametrize(
    ("key_type", "key", "user_id"),
    [("int", "123", Int64(USER_ID)), ("objectid", str(OBJECT_ID), OBJECT_ID)],
)
def test_the_canonical_spelling_stores_and_reads(
    key_type: str, key: str, user_id: Any, users: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """The id's own spelling names its document for put and get."""
    with by(users, mongodb_store_url, key_type) as store:
        created = store.put(new_record(key))
        read = store.get(key)

    assert (created, "refresh-token") == (read, stored(users, user_id)["refreshToken"])


@pytest.mark.parametrize(
    ("key_type", "key"), [("int", "-123"), ("int", "12ab"), ("objectid", "65f1")]
)
def test_a_key_no_id_of_the_type_has_matches_nothing(
    key_type: str, key: str, users: Collection[dict[str, Any]], mongodb_store_url: str
) -> None:
    """A key that is no id of the key type reads as absent, and is not stored."""
    with by(users, mongodb_store_url, key_type) as store:
        read = store.get(key)
        with pytest.raises(StoreError, match=f"with key_type={key_type} keys are"):
            store.put(new_record(key))

    assert read is None
