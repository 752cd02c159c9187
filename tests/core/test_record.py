"""Record: the document shape stores keep, and the rules for keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from credkeeper import ConfigurationError, MemoryStore, Record, Status, StoreCorrupted, TokenManager
from credkeeper._keyring import KeyRing
from credkeeper._migrate import migrate
from credkeeper._record import MAX_KEY_LENGTH, check_key
from credkeeper._rekey import rekey
from credkeeper.testing import FakeClock, FakeProvider

KEY = "user-42"
ACCESS = "ck1:k1:SEALEDaccessQZXJ"
REFRESH = "ck1:k1:SEALEDrefreshQZXJ"
EXPIRES = datetime(2030, 5, 17, 8, 30, 15, 123000, tzinfo=UTC)


def full_record() -> Record:
    return Record(
        key=KEY,
        access_token=ACCESS,
        refresh_token=REFRESH,
        expires_at=EXPIRES,
        scopes=("user:profile", "user:inference"),
        subscription_type="max",
        status=Status.NEEDS_REAUTH,
        lease_owner="host-1:pid-7:abc",
        lease_until=EXPIRES - timedelta(hours=8),
        failures=3,
        cooldown_until=EXPIRES - timedelta(hours=7, milliseconds=1),
        last_error="invalid_grant",
        refreshed_at=EXPIRES - timedelta(days=30, milliseconds=7),
        version="v1",
    )


def minimal_record() -> Record:
    return Record(key=KEY, access_token=ACCESS, refresh_token=REFRESH, expires_at=EXPIRES)


def document(**changes: Any) -> dict[str, Any]:
    doc = full_record().to_document()
    doc.update(changes)
    return doc


class TestDocument:
    def test_shape(self) -> None:
        """The document holds every field but key and version, times in epoch milliseconds."""
        assert {
            "access_token": ACCESS,
            "refresh_token": REFRESH,
            "expires_at": 1_905_237_015_123,
            "scopes": ["user:profile", "user:inference"],
            "subscription_type": "max",
            "status": "needs_reauth",
            "lease_owner": "host-1:pid-7:abc",
            "lease_until": 1_905_208_215_123,
            "failures": 3,
            "cooldown_until": 1_905_211_815_122,
            "last_error": "invalid_grant",
            "refreshed_at": 1_902_645_015_116,
        } == full_record().to_document()

    def test_round_trip(self) -> None:
        """A full record survives to_document and from_document."""
        assert full_record() == Record.from_document(KEY, full_record().to_document(), version="v1")

    def test_round_trip_minimal(self) -> None:
        """A record with every optional field unset survives the round trip."""
        record = minimal_record()

        assert record.replace(version="v9") == Record.from_document(
            KEY, record.to_document(), version="v9"
        )

    def test_version_from_argument(self) -> None:
        """from_document takes the key and version from its arguments."""
        record = Record.from_document("other", document(), version="v2")

        assert ("other", "v2") == (record.key, record.version)

    def test_defaults(self) -> None:
        """A new record is active, unleased, without failures and never stored."""
        record = minimal_record()

        assert (Status.ACTIVE, None, None, 0, None, None, None) == (
            record.status,
            record.lease_owner,
            record.lease_until,
            record.failures,
            record.cooldown_until,
            record.refreshed_at,
            record.version,
        )

    def test_times_come_back_aware_utc(self) -> None:
        """Times read from a document are aware UTC datetimes."""
        record = Record.from_document(KEY, document(), version="v1")

        assert (UTC, UTC, UTC, UTC) == (
            record.expires_at.tzinfo,
            record.lease_until.tzinfo if record.lease_until else None,
            record.cooldown_until.tzinfo if record.cooldown_until else None,
            record.refreshed_at.tzinfo if record.refreshed_at else None,
        )

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("access_token", 5),
            ("access_token", None),
            ("refresh_token", b"bytes"),
            ("expires_at", "2030-05-17T08:30:15Z"),
            ("expires_at", 1.5e12),
            ("expires_at", True),
            ("expires_at", None),
            ("scopes", "user:profile"),
            ("scopes", None),
            ("subscription_type", 5),
            ("status", 1),
            ("status", None),
            ("lease_owner", ["host"]),
            ("lease_until", "soon"),
            ("failures", "3"),
            ("failures", True),
            ("failures", None),
            ("failures", -1),
            ("cooldown_until", 1.0),
            ("last_error", {"code": 1}),
            ("refreshed_at", "2030-04-17T08:30:15Z"),
            ("refreshed_at", 1.9e12),
            ("refreshed_at", True),
        ],
    )
    def test_wrong_type(self, field: str, value: object) -> None:
        """A field of the wrong type raises StoreCorrupted naming the key and the field."""
        with pytest.raises(StoreCorrupted) as info:
            Record.from_document(KEY, document(**{field: value}), version="v1")

        assert (KEY, True, True) == (
            info.value.key,
            repr(KEY) in str(info.value),
            repr(field) in str(info.value),
        )

    @pytest.mark.parametrize(
        "field", ["access_token", "refresh_token", "expires_at", "scopes", "status", "failures"]
    )
    def test_missing_field(self, field: str) -> None:
        """A missing required field raises StoreCorrupted naming the key and the field."""
        doc = document()
        del doc[field]

        with pytest.raises(StoreCorrupted) as info:
            Record.from_document(KEY, doc, version="v1")

        assert (KEY, True) == (info.value.key, repr(field) in str(info.value))

    @pytest.mark.parametrize(
        "field",
        [
            "subscription_type",
            "lease_owner",
            "lease_until",
            "cooldown_until",
            "last_error",
            "refreshed_at",
        ],
    )
    def test_optional_field_absent(self, field: str) -> None:
        """An absent optional field reads as None."""
        doc = document()
        del doc[field]

        assert None is getattr(Record.from_document(KEY, doc, version="v1"), field)

    def test_scopes_of_non_strings(self) -> None:
        """Scopes holding a non-string raise StoreCorrupted naming scopes."""
        with pytest.raises(StoreCorrupted) as info:
            Record.from_document(KEY, document(scopes=["ok", 3]), version="v1")

        assert (KEY, True) == (info.value.key, "'scopes'" in str(info.value))

    def test_unknown_status(self) -> None:
        """An unknown status raises StoreCorrupted naming the key and status."""
        with pytest.raises(StoreCorrupted) as info:
            Record.from_document(KEY, document(status="paused"), version="v1")

        assert (KEY, True, True) == (
            info.value.key,
            repr(KEY) in str(info.value),
            "status" in str(info.value),
        )

    @pytest.mark.parametrize("value", [10**20, -(10**20), 10**400], ids=["1e20", "-1e20", "1e400"])
    def test_time_out_of_range(self, value: int) -> None:
        """An epoch value outside datetime's range raises StoreCorrupted."""
        with pytest.raises(StoreCorrupted):
            Record.from_document(KEY, document(expires_at=value), version="v1")

    def test_error_quotes_no_token(self) -> None:
        """A StoreCorrupted message does not quote the stored tokens."""
        with pytest.raises(StoreCorrupted) as info:
            Record.from_document(KEY, document(failures="x"), version="v1")

        assert "QZXJ" not in str(info.value)


class TestRecord:
    @pytest.mark.parametrize("render", [repr, str], ids=["repr", "str"])
    def test_render_hides_tokens(self, render: Any) -> None:
        """repr and str of a record contain neither token."""
        assert "QZXJ" not in render(full_record())

    def test_repr_shows_coordination_state(self) -> None:
        """The repr shows the key, status, lease owner and version."""
        text = repr(full_record())

        assert (True, True, True, True) == (
            repr(KEY) in text,
            "'needs_reauth'" in text,
            "host-1:pid-7:abc" in text,
            "'v1'" in text,
        )

    def test_replace(self) -> None:
        """replace returns a changed copy and leaves the original alone."""
        record = minimal_record()

        changed = record.replace(failures=2, status=Status.NEEDS_REAUTH)

        assert ((2, Status.NEEDS_REAUTH), (0, Status.ACTIVE)) == (
            (changed.failures, changed.status),
            (record.failures, record.status),
        )

    def test_frozen(self) -> None:
        """A record cannot be changed in place."""
        with pytest.raises(AttributeError):
            minimal_record().failures = 1  # type: ignore[misc]

    def test_status_values(self) -> None:
        """Status values are the strings stores keep."""
        assert ["active", "needs_reauth"] == [status.value for status in Status]


class TestCheckKey:
    @pytest.mark.parametrize(
        "key",
        ["a", "x" * MAX_KEY_LENGTH, "user@example.com", "tenant/7:user 9", "ключ-ü-鍵"],
        ids=["one", "max", "email", "inner-space", "unicode"],
    )
    def test_accepted(self, key: str) -> None:
        """A key of 1 to 255 printable characters comes back unchanged."""
        assert key == check_key(key)

    def test_max_length(self) -> None:
        """The longest key is 255 characters."""
        assert 255 == MAX_KEY_LENGTH

    @pytest.mark.parametrize(
        "key",
        [
            "",
            "x" * 256,
            "a\nb",
            "a\x00b",
            "a\x7fb",
            "tab\there",
            " key",
            "key ",
            "\tkey",
            "key\n",
        ],
        ids=[
            "empty",
            "256",
            "newline",
            "nul",
            "del",
            "tab",
            "leading-space",
            "trailing-space",
            "leading-tab",
            "trailing-newline",
        ],
    )
    def test_rejected(self, key: str) -> None:
        """An empty, overlong, unprintable or space-padded key raises ConfigurationError."""
        with pytest.raises(ConfigurationError, match="key"):
            check_key(key)

    @pytest.mark.parametrize("key", [None, 42, b"key", ["key"]])
    def test_not_a_string(self, key: object) -> None:
        """A key that is not a str raises ConfigurationError."""
        with pytest.raises(ConfigurationError, match="key must be a str"):
            check_key(key)


class TestValidation:
    """A Record checks its own fields when it is made, so no store ever sees a bad one."""

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("key", ""),
            ("key", 42),
            ("access_token", None),
            ("refresh_token", b"bytes"),
            ("expires_at", datetime(2030, 1, 1)),
            ("expires_at", 1_893_456_000_000),
            ("expires_at", datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5)))),
            ("lease_until", datetime(2030, 1, 1)),
            ("cooldown_until", "2030-01-01T00:00:00Z"),
            ("refreshed_at", datetime(2030, 1, 1)),
            ("refreshed_at", 1_893_456_000_000),
            ("scopes", ["user:inference"]),
            ("scopes", ("user:inference", 7)),
            ("status", "active"),
            ("failures", -1),
            ("failures", True),
            ("subscription_type", 3),
            ("version", 1),
        ],
    )
    def test_a_bad_field_is_a_configuration_error(self, field: str, value: object) -> None:
        """Each field of the wrong type or value is refused with a ConfigurationError."""
        with pytest.raises(ConfigurationError):
            minimal_record().replace(**{field: value})

    def test_the_message_names_the_field_and_no_token(self) -> None:
        """The message names the field and the fix, never a token."""
        with pytest.raises(ConfigurationError) as caught:
            minimal_record().replace(expires_at=datetime(2030, 1, 1))
        message = str(caught.value)
        assert (True, True, False) == (
            "Record.expires_at" in message,
            "aware" in message,
            ACCESS in message or REFRESH in message,
        )

    def test_an_aware_datetime_in_any_zone_is_accepted(self) -> None:
        """An aware datetime in another zone is the same instant, accepted as given."""
        tokyo = EXPIRES.astimezone(timezone(timedelta(hours=9)))
        assert EXPIRES == minimal_record().replace(expires_at=tokyo).expires_at


class TestRefreshedAt:
    """When the tokens of a record were obtained: set by the engine, kept by rekey and migrate."""

    def test_put_records_when_the_login_was_stored(
        self, store: MemoryStore, manager: TokenManager, fake: FakeProvider, clock: FakeClock
    ) -> None:
        """put() stores the credentials with refreshed_at = the manager's clock."""
        manager.put(KEY, fake.issue())
        record = store.get(KEY)

        assert clock.now() == (record.refreshed_at if record else None)

    def test_a_refresh_records_when_it_happened(
        self, store: MemoryStore, manager: TokenManager, fake: FakeProvider, clock: FakeClock
    ) -> None:
        """A refresh an hour after the login moves refreshed_at to the refresh's time."""
        manager.put(KEY, fake.issue())
        refreshed = clock.advance(3600)

        manager.refresh(KEY)
        record = store.get(KEY)

        assert refreshed == (record.refreshed_at if record else None)

    def test_a_read_of_fresh_credentials_leaves_it_alone(
        self, store: MemoryStore, manager: TokenManager, fake: FakeProvider, clock: FakeClock
    ) -> None:
        """get() of credentials valid beyond the leeway is no refresh: refreshed_at stays."""
        manager.put(KEY, fake.issue())
        stored_at = clock.now()
        clock.advance(3600)

        manager.get(KEY)
        record = store.get(KEY)

        assert stored_at == (record.refreshed_at if record else None)

    def test_rekey_keeps_it(self) -> None:
        """Re-sealing under a new primary key keeps refreshed_at as it was."""
        old = KeyRing.generate("old")
        store = MemoryStore()
        store.put(
            full_record().replace(
                access_token=old.seal("a", key=KEY, field="access_token"),
                refresh_token=old.seal("r", key=KEY, field="refresh_token"),
                status=Status.ACTIVE,
                version=None,
            )
        )

        rekey(store, old.rotated("new"))
        record = store.get(KEY)

        assert full_record().refreshed_at == (record.refreshed_at if record else None)

    def test_migrate_keeps_it(self) -> None:
        """A migrated credential arrives with its refreshed_at."""
        source, destination = MemoryStore(), MemoryStore()
        source.put(full_record().replace(version=None))

        migrate(source, destination)
        record = destination.get(KEY)

        assert full_record().refreshed_at == (record.refreshed_at if record else None)
