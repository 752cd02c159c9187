"""Embedded mode: credentials in a sub-document of the application's own ``users`` documents.

The application's documents here hold fields of many BSON types, some hold a credential the
application wrote itself the way the wrapper's guide does (camelCase, ``expiresAt`` as a
JavaScript number), and some hold none. credkeeper reads and refreshes through the
``claudeCredentials`` sub-document and leaves everything else as it was, byte for byte. Its
state there belongs to the refresh token credkeeper wrote: when the application logs the user in
again by setting new tokens, the old token's ``needs_reauth``, lease and failures no longer apply.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bson
import pytest
from bson import Binary, Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.raw_bson import RawBSONDocument
from bson.son import SON
from pymongo import MongoClient
from pymongo.collection import Collection

from credkeeper import (
    ConflictError,
    Credentials,
    CredentialStore,
    ReauthRequired,
    Record,
    Status,
    StoreCorrupted,
    StoreError,
    TokenManager,
    open_store,
)
from credkeeper.storekit import to_epoch_ms
from credkeeper.testing import FakeProvider, run_storm
from credkeeper_mongo import EmbeddedLayout, MongoStore

PATH = "claudeCredentials"
APP_REFRESH_TOKEN = "the app's own refresh token"
# What the guide's JavaScript stores: Date.now() + expires_in * 1000, a double in BSON.
APP_EXPIRES_AT = 1_893_456_000_000.0
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Exact decoding: dates as milliseconds, integers keeping their width, documents in order.
EXACT: CodecOptions[Any] = CodecOptions(
    document_class=SON, datetime_conversion=DatetimeConversion.DATETIME_MS
)


def alice() -> dict[str, Any]:
    """A user without a credential, with fields of every kind an application keeps."""
    return {
        "_id": "alice",
        "name": "Alice ✓",
        "email": "alice@example.com",
        "accountId": ObjectId("65f1a2b3c4d5e6f708192a3b"),
        "createdAt": datetime(2024, 2, 29, 23, 59, 59, 999000),
        "balance": Decimal128("1234.5600"),
        "avatar": Binary(b"\x89PNG\x00\x01\xff", 0),
        "deviceId": Binary(bytes(range(16)), 4),
        "visits": Int64(2**40),
        "score": -0.0,
        "ratio": 1.5e-300,
        "flags": [True, False, None],
        "tags": ["admin", {"since": Int64(7), "by": None}, [1, [2, [3]]]],
        "profile": {"address": {"city": "Zürich", "zip": "8001"}, "prefs": {}},
        "pattern": Regex("^a.*z$", "im"),
        "script": Code("function () { return 1; }"),
        "lastOplog": Timestamp(1_700_000_000, 3),
        "low": MinKey(),
        "high": MaxKey(),
        "empty": [],
    }


def bob() -> dict[str, Any]:
    """A user whose credential the application wrote itself, with a field of its own in it."""
    return {
        "_id": "bob",
        "name": "Bob",
        "plan": "pro",
        PATH: {
            "accessToken": "the app's own access token",
            "refreshToken": APP_REFRESH_TOKEN,
            "expiresAt": APP_EXPIRES_AT,
            "scopes": ["user:inference", "user:profile"],
            "subscriptionType": "pro",
            "source": "web-login",
        },
    }


def carol() -> dict[str, Any]:
    """A user whose credential field exists but is null."""
    return {"_id": "carol", "name": "Carol", PATH: None}


@pytest.fixture
def users(mongodb_url: str, mongodb_database: str) -> Iterator[Collection[dict[str, Any]]]:
    """The application's users collection with three documents; dropped after the test."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_url)
    with contextlib.closing(client):
        collection = client[mongodb_database][f"users_{uuid.uuid4().hex[:8]}"]
        collection.insert_many([alice(), bob(), carol()])
        yield collection
        collection.drop()


def store_url(users: Collection[dict[str, Any]], mongodb_store_url: str, **options: str) -> str:
    """The store URL mapping credkeeper onto ``users``; camelCase at ``claudeCredentials``."""
    query = {"collection": users.name, "field_path": PATH, **options}
    return f"{mongodb_store_url}?{'&'.join(f'{name}={value}' for name, value in query.items())}"


@pytest.fixture
def url(users: Collection[dict[str, Any]], mongodb_store_url: str) -> str:
    """The store URL for ``users`` with the default mapping."""
    return store_url(users, mongodb_store_url)


@pytest.fixture
def store(url: str) -> Iterator[MongoStore]:
    """A store on the mapping."""
    opened = open_store(url)
    assert isinstance(opened, MongoStore)
    with contextlib.closing(opened):
        yield opened


@pytest.fixture
def manager(store: CredentialStore, fake: FakeProvider, tmp_path: Path) -> Iterator[TokenManager]:
    """A token manager on the mapping, without a key ring: the app reads the fields plainly."""
    with TokenManager(store, fake.provider(), journal=tmp_path / "journal") as opened:
        yield opened


def raw(users: Collection[dict[str, Any]], user_id: Any) -> bytes:
    """The stored BSON of one document, as the server returns it."""
    found = users.with_options(codec_options=CodecOptions(document_class=RawBSONDocument)).find_one(
        {"_id": user_id}
    )
    assert found is not None
    return bytes(found.raw)


def others(users: Collection[dict[str, Any]], user_id: Any) -> bytes:
    """The BSON of a document without the credential sub-document: what credkeeper must keep."""
    document = bson.decode(raw(users, user_id), codec_options=EXACT)
    document.pop(PATH, None)
    return bson.encode(document, codec_options=EXACT)


def stored(users: Collection[dict[str, Any]], user_id: Any) -> Any:
    """The credential sub-document of one document, decoded."""
    document = users.find_one({"_id": user_id})
    assert document is not None
    return document.get(PATH)


def new_record(key: str, **changes: Any) -> Record:
    """A never-stored record for ``key``."""
    fields: dict[str, Any] = {
        "key": key,
        "access_token": "access-token",
        "refresh_token": "refresh-token",
        "expires_at": datetime(2030, 1, 1, tzinfo=UTC),
    }
    return Record(**{**fields, **changes})


class TestEmbedded:
    def test_other_fields_are_identical_after_import_refreshes_and_delete(
        self, users: Collection[dict[str, Any]], manager: TokenManager, fake: FakeProvider
    ) -> None:
        """Alice's other fields, compared as BSON, survive every step of the life cycle."""
        original = others(users, "alice")
        snapshots = []

        manager.put("alice", fake.issue(expires_in=60))
        snapshots.append(others(users, "alice"))
        manager.get("alice")
        snapshots.append(others(users, "alice"))
        manager.refresh("alice")
        snapshots.append(others(users, "alice"))
        manager.delete("alice")
        snapshots.append(others(users, "alice"))

        assert (2, [original] * 4) == (fake.refresh_count, snapshots)

    def test_other_documents_are_byte_identical_after_a_life_cycle(
        self, users: Collection[dict[str, Any]], manager: TokenManager, fake: FakeProvider
    ) -> None:
        """Bob's and Carol's documents are untouched, byte for byte, by Alice's credential."""
        before = [raw(users, "bob"), raw(users, "carol")]

        manager.put("alice", fake.issue(expires_in=60))
        manager.get("alice")
        manager.delete("alice")

        assert before == [raw(users, "bob"), raw(users, "carol")]

    def test_delete_removes_the_sub_document_it_created(
        self, users: Collection[dict[str, Any]], manager: TokenManager, fake: FakeProvider
    ) -> None:
        """After import and delete, Alice's whole document is byte-identical to the original."""
        original = raw(users, "alice")

        manager.put("alice", fake.issue(expires_in=3600))
        manager.delete("alice")

        assert original == raw(users, "alice")

    def test_refresh_writes_the_guides_camel_case_fields(
        self, users: Collection[dict[str, Any]], manager: TokenManager, fake: FakeProvider
    ) -> None:
        """The sub-document holds the guide's fields, expiresAt in ms, credkeeper's state beside."""
        manager.put("alice", fake.issue(expires_in=60))

        refreshed = manager.get("alice")

        credential = stored(users, "alice")
        assert (
            [
                "accessToken",
                "refreshToken",
                "expiresAt",
                "scopes",
                "subscriptionType",
                "credkeeper",
            ],
            refreshed.access_token.get_secret_value(),
            (refreshed.expires_at - EPOCH) // timedelta(milliseconds=1),
            ["version", "status", "leaseOwner", "leaseUntil", "failures"],
        ) == (
            list(credential),
            credential["accessToken"],
            credential["expiresAt"],
            list(credential["credkeeper"])[:5],
        )

    def test_reads_a_credential_the_application_wrote(self, store: CredentialStore) -> None:
        """Bob's guide-shaped credential, expiresAt a JavaScript number, reads as a record."""
        record = store.get("bob")

        assert record is not None
        assert (
            APP_REFRESH_TOKEN,
            datetime(2030, 1, 1, tzinfo=UTC),
            ("user:inference", "user:profile"),
            "pro",
        ) == (record.refresh_token, record.expires_at, record.scopes, record.subscription_type)

    def test_a_refresh_keeps_the_applications_own_fields_in_the_sub_document(
        self, users: Collection[dict[str, Any]], manager: TokenManager, fake: FakeProvider
    ) -> None:
        """A field the application keeps inside the credential sub-document survives a refresh."""
        issued = fake.issue(expires_in=60)
        users.update_one(
            {"_id": "bob"},
            {"$set": {f"{PATH}.refreshToken": issued.refresh_token.get_secret_value()}},
        )

        manager.refresh("bob")

        assert (1, "web-login") == (fake.refresh_count, stored(users, "bob")["source"])

    def test_documents_without_a_credential_read_as_absent(self, store: CredentialStore) -> None:
        """A missing or null credential sub-document, and an unknown id, are no record."""
        assert [None, None, None] == [store.get("alice"), store.get("carol"), store.get("nobody")]

    def test_a_null_sub_document_is_filled_on_create(
        self, users: Collection[dict[str, Any]], store: CredentialStore
    ) -> None:
        """Creating Carol's credential replaces her null field with the sub-document."""
        created = store.put(new_record("carol"))

        assert (created, "refresh-token") == (
            store.get("carol"),
            stored(users, "carol")["refreshToken"],
        )

    def test_no_document_is_ever_inserted(
        self, users: Collection[dict[str, Any]], store: CredentialStore
    ) -> None:
        """Creating a credential for an id the collection does not have is refused, clearly."""
        with pytest.raises(StoreError, match="never inserts"):
            store.put(new_record("nobody"))

        assert 3 == users.count_documents({})

    def test_create_over_an_application_credential_conflicts(
        self, users: Collection[dict[str, Any]], store: CredentialStore
    ) -> None:
        """Creating (version None) where the application already stored a credential conflicts."""
        with pytest.raises(ConflictError):
            store.put(new_record("bob"))

        assert APP_REFRESH_TOKEN == stored(users, "bob")["refreshToken"]

    def test_a_relogin_by_the_application_wins_over_a_stale_write(
        self, users: Collection[dict[str, Any]], store: CredentialStore
    ) -> None:
        """CAS on the stored refresh token: a write based on the replaced token conflicts."""
        read = store.get("bob")
        assert read is not None
        users.update_one({"_id": "bob"}, {"$set": {f"{PATH}.refreshToken": "re-login token"}})

        with pytest.raises(ConflictError):
            store.put(read.replace(access_token="stale", refresh_token="stale"))

        assert "re-login token" == stored(users, "bob")["refreshToken"]

    def test_a_replaced_sub_document_wins_over_a_stale_credkeeper_write(
        self, users: Collection[dict[str, Any]], store: CredentialStore
    ) -> None:
        """After credkeeper wrote, the app replacing the sub-document makes older versions stale."""
        current = store.put(new_record("alice"))
        users.update_one({"_id": "alice"}, {"$set": {PATH: bob()[PATH]}})

        with pytest.raises(ConflictError):
            store.put(current.replace(failures=1))

        assert APP_REFRESH_TOKEN == stored(users, "alice")["refreshToken"]

    def test_a_sub_document_of_another_type_is_left_alone(
        self, users: Collection[dict[str, Any]], store: CredentialStore
    ) -> None:
        """A credential field holding a string is corrupt for credkeeper, and is not overwritten."""
        users.update_one({"_id": "carol"}, {"$set": {PATH: "not a document"}})

        with pytest.raises(StoreCorrupted):
            store.put(new_record("carol"))

        assert "not a document" == stored(users, "carol")

    def test_scan_due_yields_documents_holding_a_due_credential(
        self, store: CredentialStore
    ) -> None:
        """scan_due finds Bob's application-written credential; Alice and Carol have none."""
        store.put(new_record("carol", expires_at=datetime(2040, 1, 1, tzinfo=UTC)))

        due = store.scan_due(datetime(2031, 1, 1, tzinfo=UTC))

        assert ["bob"] == sorted(due)

    def test_snake_case_fields_matched_by_user_id(
        self, users: Collection[dict[str, Any]], mongodb_store_url: str
    ) -> None:
        """With field_naming=snake and match_field=userId, fields and state are snake_case."""
        users.insert_one({"_id": ObjectId(), "userId": "dave", "name": "Dave"})
        url = store_url(users, mongodb_store_url, match_field="userId", field_naming="snake")

        with contextlib.closing(open_store(url)) as store:
            assert isinstance(store, MongoStore)
            created = store.put(new_record("dave"))
            read = store.get("dave")
        document = users.find_one({"userId": "dave"})

        assert document is not None
        assert (created, ["access_token", "refresh_token", "expires_at"], "lease_owner") == (
            read,
            list(document[PATH])[:3],
            list(document[PATH]["credkeeper"])[2],
        )

    def test_object_id_keys(self, users: Collection[dict[str, Any]], store: MongoStore) -> None:
        """key_type=objectid matches ObjectId ids by their hex form, and scans them back so."""
        user_id = ObjectId()
        users.insert_one({"_id": user_id, "name": "Erin"})
        layout = EmbeddedLayout(key_type="objectid")
        with MongoStore(store.client, collection=users.name, layout=layout) as by_id:
            by_id.put(new_record(str(user_id)))
            due = list(by_id.scan_due(datetime(2031, 1, 1, tzinfo=UTC)))

        assert ([str(user_id)], "refresh-token") == (due, stored(users, user_id)["refreshToken"])

    def test_expires_at_as_a_bson_date(
        self, users: Collection[dict[str, Any]], mongodb_store_url: str
    ) -> None:
        """expires_at_unit=date stores expiresAt as a BSON date and reads it back."""
        url = store_url(users, mongodb_store_url, expires_at_unit="date")
        moment = datetime(2031, 5, 17, 8, 30, 12, 345000, tzinfo=UTC)

        with contextlib.closing(open_store(url)) as store:
            assert isinstance(store, MongoStore)
            store.put(new_record("alice", expires_at=moment))
            read = store.get("alice")

        assert read is not None
        assert (moment, moment.replace(tzinfo=None)) == (
            read.expires_at,
            stored(users, "alice")["expiresAt"],
        )

    def test_nested_field_path(
        self, users: Collection[dict[str, Any]], mongodb_store_url: str
    ) -> None:
        """A dotted field_path creates the credential under an existing parent, beside siblings."""
        users.update_one({"_id": "alice"}, {"$set": {"integrations": {"slack": {"team": "T1"}}}})
        url = store_url(users, mongodb_store_url).replace(
            f"field_path={PATH}", "field_path=integrations.claude"
        )

        with contextlib.closing(open_store(url)) as store:
            assert isinstance(store, MongoStore)
            created = store.put(new_record("alice"))
            read = store.get("alice")
        document = users.find_one({"_id": "alice"})

        assert document is not None
        assert (created, ["slack", "claude"]) == (read, list(document["integrations"]))

    def test_lease_fields_round_trip(self, store: CredentialStore) -> None:
        """Lease, status and failure bookkeeping written beside the credential read back."""
        created = store.put(new_record("alice"))
        leased = created.replace(
            lease_owner="host:1:2",
            lease_until=datetime(2031, 1, 1, 0, 0, 0, 1000, tzinfo=UTC),
            failures=3,
            last_error="HTTP 503",
            cooldown_until=datetime(2031, 1, 1, 0, 5, tzinfo=UTC),
        )

        written = store.put(leased)

        assert written == store.get("alice")

    def test_the_last_refresh_is_kept_in_the_state_sub_document(
        self, users: Collection[dict[str, Any]], store: CredentialStore
    ) -> None:
        """refreshed_at is written as credkeeper.refreshedAt, Int64 epoch ms, and reads back."""
        moment = datetime(2031, 1, 1, 0, 0, 0, 7000, tzinfo=UTC)

        written = store.put(new_record("alice", refreshed_at=moment))

        assert (Int64(to_epoch_ms(moment)), written) == (
            stored(users, "alice")["credkeeper"]["refreshedAt"],
            store.get("alice"),
        )

    def test_an_application_credential_has_no_known_last_refresh(
        self, store: CredentialStore
    ) -> None:
        """Bob's credential, written by the application without credkeeper's state, reads None."""
        record = store.get("bob")

        assert (True, None) == (record is not None, record and record.refreshed_at)

    def test_a_relogin_by_the_application_voids_the_last_refresh(
        self, users: Collection[dict[str, Any]], store: CredentialStore
    ) -> None:
        """New tokens the application stored itself: credkeeper's refreshedAt no longer applies."""
        store.put(new_record("alice", refreshed_at=datetime(2031, 1, 1, tzinfo=UTC)))
        users.update_one({"_id": "alice"}, {"$set": {f"{PATH}.refreshToken": "a new login"}})

        record = store.get("alice")

        assert (True, None) == (record is not None, record and record.refreshed_at)

    def test_app_written_version_changes_when_credkeeper_writes(
        self, store: CredentialStore
    ) -> None:
        """A version read from an app-written credential is replaced by credkeeper's first write."""
        read = store.get("bob")
        assert read is not None

        written = store.put(read.replace(failures=1))

        assert (True, written) == (written.version != read.version, store.get("bob"))

    def test_expiry_seconds_unit(
        self, users: Collection[dict[str, Any]], mongodb_store_url: str
    ) -> None:
        """expires_at_unit=s stores whole epoch seconds."""
        url = store_url(users, mongodb_store_url, expires_at_unit="s")
        moment = datetime(2031, 5, 17, 8, 30, 12, tzinfo=UTC)

        with contextlib.closing(open_store(url)) as store:
            assert isinstance(store, MongoStore)
            store.put(new_record("alice", expires_at=moment + timedelta(milliseconds=999)))

        assert int(moment.timestamp()) == stored(users, "alice")["expiresAt"]


def relogin(users: Collection[dict[str, Any]], user_id: str, credentials: Credentials) -> None:
    """The application's own login handler: the guide's fields set straight in the document."""
    users.update_one(
        {"_id": user_id},
        {
            "$set": {
                f"{PATH}.accessToken": credentials.access_token.get_secret_value(),
                f"{PATH}.refreshToken": credentials.refresh_token.get_secret_value(),
                f"{PATH}.expiresAt": float(to_epoch_ms(credentials.expires_at)),
            }
        },
    )


def refused(manager: TokenManager, fake: FakeProvider, key: str) -> None:
    """Store a credential under ``key`` whose refresh the provider refuses: needs_reauth."""
    issued = fake.issue(expires_in=60)
    manager.put(key, issued)
    fake.revoke(issued)
    with pytest.raises(ReauthRequired):
        manager.get(key)


FUTURE = datetime(2031, 1, 1, tzinfo=UTC)


def stuck(key: str) -> Record:
    """A never-stored record of ``key`` held back by every kind of coordination state."""
    return new_record(
        key,
        refresh_token="old refresh token",
        status=Status.NEEDS_REAUTH,
        lease_owner="crashed-host:1:2",
        lease_until=FUTURE,
        failures=3,
        cooldown_until=FUTURE,
        last_error="invalid_grant",
    )


def state(record: Record | None) -> tuple[Any, ...]:
    """The coordination state of ``record``."""
    assert record is not None
    return (
        record.status,
        record.lease_owner,
        record.lease_until,
        record.failures,
        record.cooldown_until,
        record.last_error,
    )


FRESH = (Status.ACTIVE, None, None, 0, None, None)


class TestRelogin:
    def test_a_relogin_by_the_application_ends_needs_reauth(
        self, users: Collection[dict[str, Any]], manager: TokenManager, fake: FakeProvider
    ) -> None:
        """After invalid_grant, the tokens the app's re-login set are served, not refused."""
        refused(manager, fake, "alice")
        login = fake.issue(expires_at=FUTURE)
        relogin(users, "alice", login)

        served = manager.get("alice")

        assert (login.access_token, login.refresh_token) == (
            served.access_token,
            served.refresh_token,
        )

    def test_the_next_refresh_after_a_relogin_works(
        self,
        users: Collection[dict[str, Any]],
        store: CredentialStore,
        manager: TokenManager,
        fake: FakeProvider,
    ) -> None:
        """The re-login's refresh token refreshes, and credkeeper stores the rotated tokens."""
        refused(manager, fake, "alice")
        relogin(users, "alice", fake.issue())

        refreshed = manager.refresh("alice")

        stored_record = store.get("alice")
        assert stored_record is not None
        assert ("ok", refreshed.refresh_token.get_secret_value(), FRESH) == (
            fake.refresh_calls[-1].outcome,
            stored_record.refresh_token,
            state(stored_record),
        )

    def test_a_relogin_voids_failures_and_cooldown_but_keeps_a_lease(
        self, users: Collection[dict[str, Any]], store: CredentialStore, fake: FakeProvider
    ) -> None:
        """Failures, cooldown and error of the old token are void; a lease ends by itself."""
        store.put(stuck("alice"))
        relogin(users, "alice", fake.issue())

        kept = (Status.ACTIVE, "crashed-host:1:2", FUTURE, 0, None, None)
        assert kept == state(store.get("alice"))

    def test_the_same_refresh_token_set_again_keeps_the_state(
        self, users: Collection[dict[str, Any]], store: CredentialStore
    ) -> None:
        """The app setting the refresh token it already had is no re-login: state holds."""
        store.put(stuck("alice"))
        users.update_one(
            {"_id": "alice"},
            {
                "$set": {
                    f"{PATH}.accessToken": "another access token",
                    f"{PATH}.refreshToken": "old refresh token",
                }
            },
        )

        assert state(stuck("alice")) == state(store.get("alice"))

    def test_a_write_based_on_the_old_token_still_conflicts(
        self, users: Collection[dict[str, Any]], store: CredentialStore, fake: FakeProvider
    ) -> None:
        """A record read before the re-login cannot be written back over the app's tokens."""
        login = fake.issue()
        read = store.put(stuck("alice"))
        relogin(users, "alice", login)

        with pytest.raises(ConflictError):
            store.put(read.replace(lease_owner=None, lease_until=None))

        assert login.refresh_token.get_secret_value() == stored(users, "alice")["refreshToken"]

    def test_a_state_versioned_before_the_upgrade_always_applies(
        self, users: Collection[dict[str, Any]], store: CredentialStore, fake: FakeProvider
    ) -> None:
        """A state whose version names no token (an older credkeeper's) is never voided."""
        store.put(stuck("alice"))
        users.update_one(
            {"_id": "alice"}, {"$set": {f"{PATH}.credkeeper.version": uuid.uuid4().hex}}
        )
        relogin(users, "alice", fake.issue())

        assert state(stuck("alice")) == state(store.get("alice"))


def older_digest(token: str) -> str:
    """The refresh token's digest as versions written before credkeeper.storekit spelled it."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class TestVersionsWrittenBefore:
    def test_a_state_named_by_the_older_digest_still_applies(
        self, users: Collection[dict[str, Any]], store: CredentialStore
    ) -> None:
        """A state version naming its token by the digest older code computed keeps the state."""
        store.put(stuck("alice"))
        users.update_one(
            {"_id": "alice"},
            {
                "$set": {
                    f"{PATH}.credkeeper.version": f"{'a' * 15}:{older_digest('old refresh token')}"
                }
            },
        )

        assert state(stuck("alice")) == state(store.get("alice"))

    def test_a_version_read_by_older_code_still_wins_its_write(
        self, users: Collection[dict[str, Any]], store: CredentialStore
    ) -> None:
        """A record version built with the older digest is the version the store reads now."""
        written = store.put(stuck("alice"))
        state_version = stored(users, "alice")["credkeeper"]["version"]
        read_before = written.replace(
            version=f"{state_version}.{older_digest('old refresh token')}"
        )

        assert (
            "new refresh token"
            == store.put(read_before.replace(refresh_token="new refresh token")).refresh_token
        )

    def test_a_token_that_is_not_unicode_is_a_store_error_and_writes_nothing(
        self, users: Collection[dict[str, Any]], store: CredentialStore
    ) -> None:
        """A refresh token with a lone surrogate, which BSON cannot hold, changes nothing."""
        before = raw(users, "alice")

        with pytest.raises(StoreError, match="cannot store a value"):
            store.put(new_record("alice", refresh_token="refresh-\ud800"))

        assert before == raw(users, "alice")


@pytest.mark.slow
@pytest.mark.parametrize("repetition", range(3))
def test_storm_through_embedded_documents(
    repetition: int, users: Collection[dict[str, Any]], url: str, tmp_path: Path
) -> None:
    """64 callers on a user's document without version fields: still exactly one refresh."""
    report = run_storm(url, directory=tmp_path, key="carol")

    assert (1, ("ok",), (), 64, 64) == (
        report.refreshes,
        report.outcomes,
        report.errors,
        report.callers,
        report.holding_current,
    )
