"""What the Secrets Manager store does beyond the conformance suite.

Names, options, the stored document and tag, secrets credkeeper did not write, the
compare-and-swap protocol's corners, scans, errors and the write-rate estimate. Everything runs
against moto's server over HTTP, except throttling, which moto cannot produce on demand.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.stub
import pytest
from hypothesis import given
from hypothesis import strategies as st

from credkeeper import (
    ConfigurationError,
    ConflictError,
    Record,
    StoreCorrupted,
    StoreError,
    StoreUnavailable,
    open_store,
)
from credkeeper.storekit import MAX_KEY_LENGTH
from credkeeper.testing import FakeClock
from credkeeper_aws import SecretsManagerStore, estimate_write_rate
from credkeeper_aws._document import EXPIRY_TAG, encode
from credkeeper_aws._names import (
    HASHED,
    MAX_NAME_LENGTH,
    NAME_ALPHABET,
    check_prefix,
    decode_name,
    encode_key,
    is_hashed_name_of,
)

from .conftest import REGION, new_prefix, store_url

EXPIRES_AT = datetime(2039, 6, 13, 18, 17, 20, 686000, tzinfo=UTC)
BEFORE = datetime(2030, 1, 1, tzinfo=UTC)
PREFIX = "credkeeper/prod/"
ACCESS_TOKEN = "sk-ant-oat01-ACCESS-never-shown-4f1c"
REFRESH_TOKEN = "sk-ant-ort01-REFRESH-never-shown-9b2e"

# Keys that break naive encodings, and pairs a lossy one would merge.
AWKWARD_KEYS = [
    "tenant/user/42",
    "../../etc/passwd",
    "user:42:claude",
    "john smith",
    "100%25%2F",
    'it\'s "quoted"',
    "a\\b",
    "*?[a-z].+$^{1}|",
    '{"a": [1, null]}',
    "a=b",
    "=61",
    "=H" + "0" * 64,
    "user-abcdef",
    "-abcdef",
    "usér-ключ-鍵-🔑",
    "A/B",
    "a/b",
    "a%2Fb",
    "\u00e9",
    "e\u0301",
    "straße",
    "strasse",
    "k" * MAX_KEY_LENGTH,
    ("ключ-鍵-🔑-é" * MAX_KEY_LENGTH)[:MAX_KEY_LENGTH],
]

KEYS = st.text(
    st.characters(codec="utf-8", categories=["L", "M", "N", "P", "S", "Zs"]),
    min_size=1,
    max_size=MAX_KEY_LENGTH,
).filter(lambda key: key == key.strip() and key.isprintable())


def record(key: str, **changes: Any) -> Record:
    """A never-stored record under ``key`` holding the recognisable test tokens."""
    fields: dict[str, Any] = {
        "key": key,
        "access_token": ACCESS_TOKEN,
        "refresh_token": REFRESH_TOKEN,
        "expires_at": EXPIRES_AT,
    }
    return Record(**{**fields, **changes})


def unique_key() -> str:
    """A key no other test uses."""
    return f"user-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def prefix() -> str:
    """This test's own secret name prefix."""
    return new_prefix()


@pytest.fixture
def url(aws_endpoint: str, prefix: str) -> str:
    """The store URL of this test's prefix."""
    return store_url(aws_endpoint, prefix)


@pytest.fixture
def store(url: str, prefix: str, sm_client: Any) -> Iterator[SecretsManagerStore]:
    """A store on this test's prefix; every secret under the prefix is deleted afterwards."""
    opened = open_store(url)
    assert isinstance(opened, SecretsManagerStore)
    yield opened
    opened.close()
    for page in sm_client.get_paginator("list_secrets").paginate(
        Filters=[{"Key": "name", "Values": [prefix]}]
    ):
        for entry in page["SecretList"]:
            sm_client.delete_secret(SecretId=entry["Name"], ForceDeleteWithoutRecovery=True)


def write_by_hand(client: Any, name: str, stored: Record, *, replaces: str) -> str:
    """Write ``stored`` as the new AWSCURRENT version the way the store does, minus the tag."""
    new = str(uuid.uuid4())
    client.put_secret_value(
        SecretId=name,
        SecretString=encode(stored, replaces=replaces),
        ClientRequestToken=new,
        VersionStages=["CREDKEEPER_PENDING"],
    )
    client.update_secret_version_stage(
        SecretId=name, VersionStage="AWSCURRENT", MoveToVersionId=new, RemoveFromVersionId=replaces
    )
    return new


def stubbed_store(clock: FakeClock) -> tuple[SecretsManagerStore, botocore.stub.Stubber]:
    """A store on a client whose answers a botocore Stubber supplies (never sent anywhere)."""
    client = boto3.client(
        "secretsmanager",
        region_name=REGION,
        endpoint_url="http://127.0.0.1:9",
        config=botocore.config.Config(retries={"total_max_attempts": 1}),
    )
    store = SecretsManagerStore(PREFIX, client=client, clock=clock, retry_timeout=2.0)
    return store, botocore.stub.Stubber(client)


def chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and every exception it was raised from or during."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


# -- names -----------------------------------------------------------------------------------


class TestNames:
    def test_a_key_in_the_alphabet_stays_readable(self) -> None:
        """Letters, digits and /_+.@- are kept as they are."""
        assert "tenant/user_42.v2@example+x" == encode_key(
            "tenant/user_42.v2@example+x", prefix=PREFIX
        )

    def test_other_characters_become_utf8_escapes(self) -> None:
        """A space, an accented letter and the escape character itself are =XX escaped."""
        assert "john=20smith=20=C3=A9=3D" == encode_key("john smith é=", prefix=PREFIX)

    def test_a_hyphen_and_six_characters_at_the_end_are_escaped(self) -> None:
        """A name never ends like an ARN's random suffix ("-" and six characters)."""
        assert "user=2Dabcdef" == encode_key("user-abcdef", prefix=PREFIX)

    def test_a_name_too_long_for_secrets_manager_is_hashed(self) -> None:
        """A 255-character key of emoji (12 characters each, escaped) gets a 66-character name."""
        key = "🔑" * MAX_KEY_LENGTH
        encoded = encode_key(key, prefix=PREFIX)
        assert (66, True) == (len(encoded), is_hashed_name_of(encoded, key))

    @pytest.mark.parametrize("key", AWKWARD_KEYS)
    def test_names_decode_to_their_keys(self, key: str) -> None:
        """decode_name inverts encode_key; a hashed name decodes to the HASHED marker."""
        encoded = encode_key(key, prefix=PREFIX)
        decoded = decode_name(encoded, prefix=PREFIX)
        assert key == (key if decoded is HASHED else decoded)

    def test_awkward_keys_get_distinct_names(self) -> None:
        """Keys differing in case, escaping, normalisation or a last character never share one."""
        names = {encode_key(key, prefix=PREFIX) for key in AWKWARD_KEYS}
        assert len(AWKWARD_KEYS) == len(names)

    @given(key=KEYS)
    def test_every_name_is_valid_for_secrets_manager(self, key: str) -> None:
        """Any key's name uses only the allowed characters and fits in 512 of them."""
        name = PREFIX + encode_key(key, prefix=PREFIX)
        assert (True, True) == (set(name) <= NAME_ALPHABET, len(name) <= MAX_NAME_LENGTH)

    @given(key=KEYS)
    def test_every_readable_name_decodes_to_its_key(self, key: str) -> None:
        """Round trip for any printable key: the readable form decodes back exactly."""
        decoded = decode_name(encode_key(key, prefix=PREFIX), prefix=PREFIX)
        assert key == (key if decoded is HASHED else decoded)

    @pytest.mark.parametrize("encoded", ["=61", "a b", "=zz", "=2", "=C3", "a=3d", "", "x=0A"])
    def test_a_name_the_store_did_not_make_decodes_to_none(self, encoded: str) -> None:
        """Non-canonical escapes, bad bytes, foreign characters and control keys are not keys."""
        assert None is decode_name(encoded, prefix=PREFIX)


class TestPrefix:
    @pytest.mark.parametrize(
        ("prefix", "message"),
        [
            ("", "needs a name prefix"),
            ("has space/", "characters Secrets Manager does not allow"),
            ("tenant%2F/", "characters Secrets Manager does not allow"),
            ("clé/", "characters Secrets Manager does not allow"),
            ("credkeeper", "must end with '/'"),
            ("p" * 446 + "/", "at most 446"),
        ],
    )
    def test_a_bad_prefix_is_refused_with_the_reason(self, prefix: str, message: str) -> None:
        """A prefix Secrets Manager cannot use, or that could cover another, is refused."""
        with pytest.raises(ConfigurationError, match=message):
            check_prefix(prefix)

    def test_the_url_path_is_the_prefix(self, aws_endpoint: str) -> None:
        """aws-sm://REGION/PREFIX/ opens that Region and prefix."""
        opened = open_store(store_url(aws_endpoint, "credkeeper/prod/"))
        assert isinstance(opened, SecretsManagerStore)
        with opened:
            assert (REGION, "credkeeper/prod/") == (opened.region, opened.prefix)


class TestOptions:
    @pytest.mark.parametrize(
        ("url", "message"),
        [
            ("aws-sm://us-east-1/p/?colour=blue", "unknown Secrets Manager store option"),
            ("aws-sm://us-east-1/p/?profile=a&profile=b", "gives the option 'profile' twice"),
            ("aws-sm://US-EAST-1/p/", "option region must be an AWS Region name"),
            ("aws-sm://user@us-east-1/p/", "has no user, port or fragment"),
            ("aws-sm://us-east-1/p/?endpoint_url=ftp://x", "must be an http:// or https:// URL"),
            ("aws-sm://us-east-1/p/?retry_timeout=soon", "must be a positive number of seconds"),
            ("aws-sm://us-east-1/p/?retry_timeout=0", "must be a positive number of seconds"),
            ("aws-sm://us-east-1/p/?profile=", "option profile must be a non-empty name"),
            ("aws-sm://us-east-1/p/?profile=no-such-profile", "is not in the AWS config"),
        ],
    )
    def test_a_bad_url_is_refused_with_the_reason(
        self, aws_credentials: None, url: str, message: str
    ) -> None:
        """Unknown, repeated or malformed options and URL parts name what is wrong."""
        with pytest.raises(ConfigurationError, match=message):
            SecretsManagerStore.from_url(url)

    def test_an_option_given_twice_is_refused(self, aws_credentials: None) -> None:
        """The same option in the URL and as a keyword is an error, not a silent choice."""
        with pytest.raises(ConfigurationError, match="both in the URL and as keywords"):
            SecretsManagerStore.from_url("aws-sm://us-east-1/p/?retry_timeout=3", retry_timeout=4)

    def test_without_a_region_boto3_chooses(self, aws_endpoint: str) -> None:
        """aws-sm:///PREFIX/ takes the Region from boto3's chain (AWS_DEFAULT_REGION here)."""
        with SecretsManagerStore.from_url(f"aws-sm:///p/?endpoint_url={aws_endpoint}") as opened:
            assert REGION == opened.region

    def test_a_given_client_excludes_client_options(self, sm_client: Any) -> None:
        """Region, profile or endpoint belong to the client when one is given."""
        with pytest.raises(ConfigurationError, match="pass region to the client"):
            SecretsManagerStore(PREFIX, client=sm_client, region="eu-west-1")

    def test_close_leaves_a_given_client_open(self, sm_client: Any) -> None:
        """A client the caller made is the caller's to close."""
        SecretsManagerStore(PREFIX, client=sm_client).close()
        assert "SecretList" in sm_client.list_secrets(MaxResults=1)

    def test_repr_names_the_region_and_prefix(self, store: SecretsManagerStore) -> None:
        """repr shows where the store keeps credentials, nothing else."""
        assert f"SecretsManagerStore(region='{REGION}', prefix='{store.prefix}')" == repr(store)


# -- what a secret holds -------------------------------------------------------------------------


class TestStoredSecret:
    def test_the_secret_is_named_after_the_key(
        self, store: SecretsManagerStore, sm_client: Any
    ) -> None:
        """The secret's name is the prefix and the escaped key, readable in the console."""
        store.put(record("john smith"))
        names = [entry["Name"] for entry in sm_client.list_secrets()["SecretList"]]
        assert [f"{store.prefix}john=20smith"] == [n for n in names if n.startswith(store.prefix)]

    def test_the_value_is_credkeepers_json_document(
        self, store: SecretsManagerStore, sm_client: Any
    ) -> None:
        """SecretString is a JSON object with a format marker, the key and the record."""
        key = unique_key()
        store.put(record(key))
        value = sm_client.get_secret_value(SecretId=store.prefix + key)["SecretString"]
        document = json.loads(value)
        assert ("credkeeper.aws-sm", 1, key, None, ACCESS_TOKEN) == (
            document["format"],
            document["format_version"],
            document["key"],
            document["replaces"],
            document["record"]["access_token"],
        )

    def test_the_version_is_the_awscurrent_version_id(
        self, store: SecretsManagerStore, sm_client: Any
    ) -> None:
        """A record's version is the VersionId that carries AWSCURRENT."""
        key = unique_key()
        created = store.put(record(key))
        updated = store.put(created.replace(failures=1))
        current = sm_client.get_secret_value(SecretId=store.prefix + key, VersionStage="AWSCURRENT")
        assert current["VersionId"] == updated.version

    def test_the_expiry_tag_names_the_current_version(
        self, store: SecretsManagerStore, sm_client: Any
    ) -> None:
        """After a write the tag holds the expiry in epoch ms and the version it belongs to."""
        key = unique_key()
        created = store.put(record(key))
        updated = store.put(created.replace(expires_at=BEFORE))
        tags = sm_client.describe_secret(SecretId=store.prefix + key)["Tags"]
        assert [f"1893456000000/{updated.version}"] == [
            tag["Value"] for tag in tags if tag["Key"] == EXPIRY_TAG
        ]

    def test_at_most_one_version_carries_the_pending_label(
        self, store: SecretsManagerStore, sm_client: Any
    ) -> None:
        """Losing writes leave no label behind but the one fixed label, on one version."""
        key = unique_key()
        created = store.put(record(key))
        store.put(created.replace(failures=1))
        for failures in range(2, 6):
            with pytest.raises(ConflictError):
                store.put(created.replace(failures=failures))
        stages = sm_client.describe_secret(SecretId=store.prefix + key)["VersionIdsToStages"]
        assert 1 >= sum("CREDKEEPER_PENDING" in labels for labels in stages.values())

    def test_kms_key_id_encrypts_new_secrets(
        self, aws_endpoint: str, prefix: str, sm_client: Any
    ) -> None:
        """kms_key_id is passed to CreateSecret."""
        key = unique_key()
        url = store_url(aws_endpoint, prefix) + "&kms_key_id=alias/credkeeper-test"
        with SecretsManagerStore.from_url(url) as opened:
            opened.put(record(key))
            described = sm_client.describe_secret(SecretId=prefix + key)
            opened.delete(key)
        assert "alias/credkeeper-test" == described["KmsKeyId"]

    def test_delete_leaves_nothing_scheduled(
        self, store: SecretsManagerStore, sm_client: Any
    ) -> None:
        """Deletion skips the recovery window, so the name is free at once."""
        key = unique_key()
        store.put(record(key))
        store.delete(key)
        with pytest.raises(sm_client.exceptions.ResourceNotFoundException):
            sm_client.describe_secret(SecretId=store.prefix + key)

    def test_a_secret_scheduled_for_deletion_reads_as_absent(
        self, store: SecretsManagerStore, sm_client: Any
    ) -> None:
        """A secret someone scheduled for deletion is no credential."""
        key = unique_key()
        store.put(record(key))
        sm_client.delete_secret(SecretId=store.prefix + key, RecoveryWindowInDays=7)
        assert None is store.get(key)

    def test_a_record_too_large_for_a_secret_is_refused(self, store: SecretsManagerStore) -> None:
        """A record over 65,536 bytes fails with StoreError before anything is sent."""
        with pytest.raises(StoreError, match="a secret holds at most 65536"):
            store.put(record(unique_key(), access_token="x" * 70_000))


# -- secrets credkeeper did not write --------------------------------------------------------


class TestForeignSecrets:
    @pytest.fixture
    def foreign(self, store: SecretsManagerStore, sm_client: Any) -> str:
        """A secret under the store's prefix holding an application's own JSON; its key."""
        key = unique_key()
        sm_client.create_secret(
            Name=store.prefix + key, SecretString='{"username": "app", "password": "hunter2"}'
        )
        return key

    def value(self, store: SecretsManagerStore, sm_client: Any, key: str) -> str:
        """The secret's current value, read behind the store's back."""
        response = sm_client.get_secret_value(SecretId=store.prefix + key)
        return str(response["SecretString"])

    def test_reading_it_is_refused_clearly(self, store: SecretsManagerStore, foreign: str) -> None:
        """get() raises StoreCorrupted naming the secret and saying it was left untouched."""
        with pytest.raises(StoreCorrupted, match=r"does not hold a credkeeper record .*untouched"):
            store.get(foreign)

    def test_creating_over_it_leaves_it_intact(
        self, store: SecretsManagerStore, sm_client: Any, foreign: str
    ) -> None:
        """put() of a new record under its key raises StoreCorrupted; the value is unchanged."""
        with pytest.raises(StoreCorrupted):
            store.put(record(foreign))
        assert '{"username": "app", "password": "hunter2"}' == self.value(store, sm_client, foreign)

    def test_deleting_it_is_refused(
        self, store: SecretsManagerStore, sm_client: Any, foreign: str
    ) -> None:
        """delete() raises StoreCorrupted and the secret stays."""
        with pytest.raises(StoreCorrupted):
            store.delete(foreign)
        assert '{"username": "app", "password": "hunter2"}' == self.value(store, sm_client, foreign)

    def test_text_that_is_not_json_is_refused(
        self, store: SecretsManagerStore, sm_client: Any
    ) -> None:
        """A plain-text secret is reported as not JSON."""
        key = unique_key()
        sm_client.create_secret(Name=store.prefix + key, SecretString="hunter2")
        with pytest.raises(StoreCorrupted, match="its value is not JSON"):
            store.get(key)

    def test_another_keys_record_is_refused(
        self, store: SecretsManagerStore, sm_client: Any
    ) -> None:
        """A credkeeper document of key A found under key B's name is not B's record."""
        key = unique_key()
        sm_client.create_secret(
            Name=store.prefix + key, SecretString=encode(record("someone-else"), replaces=None)
        )
        with pytest.raises(StoreCorrupted, match="belongs to key 'someone-else'"):
            store.get(key)

    def test_scans_pass_it_by(self, store: SecretsManagerStore, foreign: str) -> None:
        """scan_due lists only credkeeper's secrets under the prefix."""
        assert [] == list(store.scan_due(EXPIRES_AT + timedelta(days=1)))

    def test_a_secret_without_a_value_reads_as_absent(
        self, store: SecretsManagerStore, sm_client: Any
    ) -> None:
        """A secret created with no value holds no record: get() finds none."""
        key = unique_key()
        sm_client.create_secret(Name=store.prefix + key)
        assert None is store.get(key)

    def test_creating_over_a_secret_without_a_value_is_refused_clearly(
        self, store: SecretsManagerStore, sm_client: Any
    ) -> None:
        """put() of a new record there raises StoreCorrupted, not a conflict, and adds nothing."""
        key = unique_key()
        sm_client.create_secret(Name=store.prefix + key)
        with pytest.raises(StoreCorrupted, match="exists but holds no value"):
            store.put(record(key))
        described = sm_client.describe_secret(SecretId=store.prefix + key)
        assert {} == described.get("VersionIdsToStages", {})


# -- compare-and-swap corners ----------------------------------------------------------------


class TestCompareAndSwap:
    def test_a_move_whose_answer_was_lost_is_found_to_have_landed(
        self, store: SecretsManagerStore, sm_client: Any
    ) -> None:
        """Following the chain of versions shows a write landed, even after a later one."""
        key = unique_key()
        created = store.put(record(key))
        name = store.prefix + key
        mine = write_by_hand(sm_client, name, record(key, failures=1), replaces=created.version)
        store.put(record(key, failures=2, version=mine))
        assert "landed" == store._settle(name, key, expected=created.version, new=mine)

    def test_a_move_that_lost_to_another_writer_is_found_lost(
        self, store: SecretsManagerStore, sm_client: Any
    ) -> None:
        """When another version followed the expected one, the write did not land."""
        key = unique_key()
        created = store.put(record(key))
        store.put(created.replace(failures=1))
        assert "lost" == store._settle(
            store.prefix + key, key, expected=created.version, new=str(uuid.uuid4())
        )

    def test_a_move_that_never_happened_is_found_not_applied(
        self, store: SecretsManagerStore
    ) -> None:
        """While AWSCURRENT is still on the expected version, the write can be tried again."""
        key = unique_key()
        created = store.put(record(key))
        assert "not applied" == store._settle(
            store.prefix + key, key, expected=created.version, new=str(uuid.uuid4())
        )

    def test_a_version_rolled_back_by_hand_can_be_written_again(
        self, store: SecretsManagerStore, sm_client: Any
    ) -> None:
        """A version the store saw replaced is writable again once read back as current."""
        key = unique_key()
        created = store.put(record(key))
        updated = store.put(created.replace(failures=1))
        sm_client.update_secret_version_stage(
            SecretId=store.prefix + key,
            VersionStage="AWSCURRENT",
            MoveToVersionId=created.version,
            RemoveFromVersionId=updated.version,
        )
        current = store.get(key)
        assert current is not None
        assert 5 == store.put(current.replace(failures=5)).failures

    def test_a_stale_version_conflicts_again_and_again(self, store: SecretsManagerStore) -> None:
        """A version once replaced never matches again."""
        key = unique_key()
        created = store.put(record(key))
        store.put(created.replace(failures=1))
        outcomes = []
        for failures in (2, 3):
            with pytest.raises(ConflictError) as raised:
                store.put(created.replace(failures=failures))
            outcomes.append(raised.value.key)
        assert [key, key] == outcomes


# -- scan_due ----------------------------------------------------------------------------------


class TestScan:
    def test_a_due_value_behind_a_lagging_tag_is_found(
        self, store: SecretsManagerStore, sm_client: Any
    ) -> None:
        """A tag that names an older version is not trusted: the value says the key is due."""
        key = unique_key()
        created = store.put(record(key))
        write_by_hand(
            sm_client,
            store.prefix + key,
            record(key, expires_at=BEFORE - timedelta(hours=1)),
            replaces=created.version,
        )
        assert [key] == list(store.scan_due(BEFORE))

    def test_a_stale_tag_does_not_make_a_fresh_value_due(
        self, store: SecretsManagerStore, sm_client: Any
    ) -> None:
        """A lagging tag saying due does not count when the current value is not due."""
        key = unique_key()
        created = store.put(record(key, expires_at=BEFORE - timedelta(hours=1)))
        write_by_hand(sm_client, store.prefix + key, record(key), replaces=created.version)
        assert [] == list(store.scan_due(BEFORE))

    def test_a_due_key_with_a_hashed_name_is_found(self, store: SecretsManagerStore) -> None:
        """The key of a hashed name comes from its record."""
        key = "🔑" * 200
        store.put(record(key, expires_at=BEFORE))
        assert [key] == list(store.scan_due(BEFORE))

    def test_a_neighbouring_prefix_is_not_scanned(
        self, store: SecretsManagerStore, aws_endpoint: str, sm_client: Any
    ) -> None:
        """Secrets of a prefix that only starts like this one are not this store's."""
        neighbour = store.prefix[:-1] + "-neighbour/"
        key = unique_key()
        with SecretsManagerStore.from_url(store_url(aws_endpoint, neighbour)) as other:
            other.put(record(key, expires_at=BEFORE))
            scanned = list(store.scan_due(BEFORE))
            other.delete(key)
        assert [] == scanned

    def test_short_token_lifetimes_are_warned_about_once(
        self, store: SecretsManagerStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A scan finding 5-minute tokens logs one warning citing AWS's 10-minute guidance."""
        soon = datetime.now(UTC) + timedelta(minutes=5)
        for _ in range(3):
            store.put(record(unique_key(), expires_at=soon))
        with caplog.at_level(logging.WARNING, logger="credkeeper.aws"):
            list(store.scan_due(BEFORE))
            list(store.scan_due(BEFORE))
        warnings = [r.getMessage() for r in caplog.records if r.name == "credkeeper.aws"]
        assert (1, True) == (len(warnings), "one every 10 minutes" in warnings[0])


# -- errors ------------------------------------------------------------------------------------


class TestErrors:
    def test_throttling_is_retried_then_store_unavailable(self) -> None:
        """Throttled calls back off (jittered, doubling) until retry_timeout, then give up.

        A botocore Stubber supplies the throttling answers: moto's server cannot be made to
        throttle on demand, and this is the one test here that does not talk to it.
        """
        clock = FakeClock()
        store, stubber = stubbed_store(clock)
        for _ in range(30):
            stubber.add_client_error(
                "get_secret_value", "ThrottlingException", http_status_code=400
            )
        with stubber, pytest.raises(StoreUnavailable, match="kept throttling GetSecretValue"):
            store.get("user-1")
        waits = clock.sleeps
        assert (True, True, True) == (
            len(waits) >= 4,
            all(later > earlier for earlier, later in itertools.pairwise(waits[:4])),
            sum(waits) <= 2.0,
        )

    def test_a_throttled_call_that_then_succeeds_returns_its_answer(self) -> None:
        """Two LimitExceededException answers, then the record: get() returns the record.

        A botocore Stubber supplies the answers: moto cannot throttle on demand.
        """
        clock = FakeClock()
        store, stubber = stubbed_store(clock)
        stored = record("user-1")
        for _ in range(2):
            stubber.add_client_error("get_secret_value", "LimitExceededException", 400)
        stubber.add_response(
            "get_secret_value",
            {
                "Name": PREFIX + "user-1",
                "VersionId": "0" * 32,
                "SecretString": encode(stored, replaces=None),
            },
        )
        with stubber:
            got = store.get("user-1")
        assert stored.replace(version="0" * 32) == got

    def test_an_unreachable_endpoint_fails_at_once(self, aws_credentials: None) -> None:
        """A refused connection raises StoreUnavailable without any backoff wait."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        clock = FakeClock()
        store = SecretsManagerStore(
            PREFIX, region=REGION, endpoint_url=f"http://127.0.0.1:{port}", clock=clock
        )
        with store, pytest.raises(StoreUnavailable, match="could not be reached"):
            store.get("user-1")
        assert [] == clock.sleeps

    def test_missing_credentials_are_a_store_error_naming_the_chain(
        self, aws_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """A profile without keys fails the call with StoreError, not a botocore exception."""
        config = tmp_path / "config"
        config.write_text(f"[profile keyless-{uuid.uuid4().hex}]\nregion = {REGION}\n")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name)
        profile = config.read_text().split("profile ", 1)[1].split("]", 1)[0]
        store = SecretsManagerStore(PREFIX, endpoint_url=aws_endpoint, profile=profile)
        with store, pytest.raises(StoreError, match="no usable AWS credentials"):
            store.get("user-1")

    @pytest.mark.parametrize(
        "case", ["stale update", "deleted key", "existing key", "foreign secret", "too large"]
    )
    def test_no_token_appears_in_an_error(
        self, store: SecretsManagerStore, sm_client: Any, case: str
    ) -> None:
        """Neither token is in the message, repr or any chained exception of a failed put."""
        key = unique_key()
        if case == "foreign secret":
            sm_client.create_secret(Name=store.prefix + key, SecretString="[1, 2, 3]")
            attempt = record(key)
        elif case == "too large":
            attempt = record(key, last_error="e" * 70_000)
        else:
            created = store.put(record(key))
            if case == "stale update":
                store.put(created.replace(failures=1))
            if case == "deleted key":
                store.delete(key)
            attempt = record(key) if case == "existing key" else created.replace(failures=9)
        with pytest.raises(StoreError) as raised:
            store.put(attempt)
        texts = [text for exc in chain(raised.value) for text in (str(exc), repr(exc))]
        assert [] == [t for t in texts if ACCESS_TOKEN in t or REFRESH_TOKEN in t]

    def test_no_token_appears_in_a_throttling_error(self) -> None:
        """A create throttled to the end names no token anywhere in its chain.

        A botocore Stubber supplies the throttling answers: moto cannot throttle on demand.
        """
        store, stubber = stubbed_store(FakeClock())
        for _ in range(30):
            stubber.add_client_error("create_secret", "ThrottlingException", 400)
        with stubber, pytest.raises(StoreUnavailable) as raised:
            store.put(record("user-1"))
        texts = [text for exc in chain(raised.value) for text in (str(exc), repr(exc))]
        assert [] == [t for t in texts if ACCESS_TOKEN in t or REFRESH_TOKEN in t]


# -- the write-rate estimate -----------------------------------------------------------------


class TestWriteRate:
    def test_eight_hour_tokens_are_within_guidance(self) -> None:
        """1,000 keys with 8 h tokens: 6 puts per secret a day, well under both limits."""
        rate = estimate_write_rate(1000, timedelta(hours=8))
        assert (6.0, round(1000 * 2 * 2 / 28800, 6), True) == (
            rate.puts_per_secret_per_day,
            round(rate.write_calls_per_second, 6),
            rate.within_guidance,
        )

    def test_short_tokens_exceed_the_per_secret_guidance(self) -> None:
        """15-minute tokens mean 192 puts per secret a day, over the 144 of one per 10 minutes."""
        rate = estimate_write_rate(10, 900)
        assert (192.0, True, False) == (
            rate.puts_per_secret_per_day,
            rate.exceeds_secret_guidance,
            rate.exceeds_region_quota,
        )

    def test_many_keys_exceed_the_region_quota(self) -> None:
        """400,000 keys with 8 h tokens need 55.6 write calls a second, over the Region's 50."""
        rate = estimate_write_rate(400_000, timedelta(hours=8))
        assert (False, True) == (rate.exceeds_secret_guidance, rate.exceeds_region_quota)

    def test_the_description_names_the_broken_limit(self) -> None:
        """describe() says which limit is broken and why it matters."""
        text = estimate_write_rate(400_000, timedelta(hours=8)).describe()
        assert "the Region's quota is 50 per second" in text

    @pytest.mark.parametrize(
        ("keys", "lifetime"), [(-1, 3600), (10, 0), (10, float("inf")), (True, 3600)]
    )
    def test_nonsense_is_refused(self, keys: int, lifetime: float) -> None:
        """Negative key counts and non-positive or infinite lifetimes raise ValueError."""
        with pytest.raises(ValueError, match="must be"):
            estimate_write_rate(keys, lifetime)
