"""credkeeper.storekit: the pieces every store is built from, public for store authors."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from credkeeper import ConfigurationError, StoreCorrupted, StoreUnavailable
from credkeeper.storekit import (
    COUNT,
    FLAG,
    NAME,
    SECONDS,
    AsyncClosingStore,
    ClosingStore,
    check_key,
    check_moment,
    check_record,
    error_boundary,
    from_epoch_ms,
    merge_options,
    new_version,
    query_options,
    read_epoch_ms,
    read_options,
    stored_record,
    to_epoch_ms,
    token_digest,
)

INSTANT = datetime(2031, 5, 17, 8, 30, 12, 345000, tzinfo=UTC)


class TestChecks:
    def test_check_key_returns_a_good_key(self) -> None:
        """A key every store can hold comes back unchanged."""
        assert "tenant/user 42" == check_key("tenant/user 42")

    def test_check_moment_refuses_a_naive_datetime_naming_it(self) -> None:
        """A naive datetime is refused, and the message names the argument."""
        with pytest.raises(ConfigurationError, match=r"^before is a naive datetime"):
            check_moment("before", datetime(2030, 1, 1))

    def test_check_moment_keeps_the_zone_given(self) -> None:
        """An aware datetime comes back as given, whatever its zone."""
        tokyo = INSTANT.astimezone(timezone(timedelta(hours=9)))
        assert tokyo is check_moment("before", tokyo)

    def test_check_record_refuses_what_is_not_a_record(self) -> None:
        """Anything but a Record is refused, naming its type."""
        with pytest.raises(ConfigurationError, match="not dict"):
            check_record({"key": "x"})


class TestConversions:
    def test_epoch_ms_round_trips_to_the_millisecond(self) -> None:
        """to_epoch_ms and from_epoch_ms are exact inverses at millisecond precision."""
        assert INSTANT == from_epoch_ms(to_epoch_ms(INSTANT))

    def test_read_epoch_ms_keeps_none(self) -> None:
        """A missing stored time stays None."""
        assert None is read_epoch_ms(None, key="k", field="lease_until")

    @pytest.mark.parametrize("value", ["1700000000000", 1.5, True, 10**20])
    def test_read_epoch_ms_refuses_damage_naming_key_and_field(self, value: object) -> None:
        """A stored time that is not an int in range is StoreCorrupted naming key and field."""
        with pytest.raises(StoreCorrupted, match=r"'k'.*'expires_at'") as caught:
            read_epoch_ms(value, key="k", field="expires_at")
        assert "k" == caught.value.key


class TestVersions:
    def test_new_versions_differ(self) -> None:
        """Every new version is new."""
        assert 1000 == len({new_version() for _ in range(1000)})

    def test_token_digest_is_short_stable_and_not_the_token(self) -> None:
        """A token's digest is 16 hex digits, the same each time, and does not contain it."""
        digest = token_digest("sk-ant-ort01-secret")
        assert (True, digest, False) == (
            bool(re.fullmatch("[0-9a-f]{16}", digest)),
            token_digest("sk-ant-ort01-secret"),
            "secret" in digest,
        )


class TestOptions:
    def test_query_options_reads_each_option(self) -> None:
        """The query's options come back by name, as text."""
        assert {"create": "true", "page_size": "50"} == query_options(
            "create=true&page_size=50", store="test store"
        )

    def test_query_options_refuses_an_option_given_twice(self) -> None:
        """An option given twice is refused, naming it."""
        with pytest.raises(ConfigurationError, match="'create' twice"):
            query_options("create=true&create=false", store="test store")

    def test_query_options_refuses_a_malformed_query(self) -> None:
        """A query that is not name=value pairs is refused."""
        with pytest.raises(ConfigurationError, match="malformed"):
            query_options("create", store="test store")

    def test_an_empty_query_has_no_options(self) -> None:
        """No query, no options."""
        assert {} == query_options("", store="test store")

    @pytest.mark.parametrize(
        ("option", "given", "expected"),
        [
            (FLAG, "yes", True),
            (FLAG, "OFF", False),
            (FLAG, True, True),
            (SECONDS, "2.5", 2.5),
            (SECONDS, 3, 3.0),
            (COUNT, "50", 50),
            (COUNT, 7, 7),
            (NAME, "credentials", "credentials"),
        ],
    )
    def test_each_option_reads_text_and_keywords_alike(
        self, option: Any, given: object, expected: object
    ) -> None:
        """URL text and keyword values read to the same value."""
        values, _ = read_options({"x": given}, {"x": option}, store="test store")
        assert {"x": expected} == values

    @pytest.mark.parametrize(
        ("option", "given"),
        [
            (FLAG, "maybe"),
            (SECONDS, "-1"),
            (SECONDS, "nan"),
            (SECONDS, True),
            (COUNT, "0"),
            (COUNT, "1.5"),
            (NAME, " padded"),
            (NAME, ""),
        ],
    )
    def test_a_bad_value_names_store_option_and_expectation(
        self, option: Any, given: object
    ) -> None:
        """A value an option cannot read is refused, naming the store, option and expectation."""
        with pytest.raises(ConfigurationError) as caught:
            read_options({"x": given}, {"x": option}, store="test store")
        assert f"test store option x must be {option.expects}, got {given!r}" == str(caught.value)

    def test_unknown_options_are_refused_listing_the_known_ones(self) -> None:
        """An option the store does not know is refused, listing those it knows."""
        with pytest.raises(ConfigurationError, match=r"unknown test store option.*creat.*create"):
            read_options({"creat": "1"}, {"create": FLAG}, store="test store")

    def test_unknown_options_can_be_handed_back(self) -> None:
        """With others="return", options the store does not know come back for the driver."""
        values, rest = read_options(
            {"create": "1", "sslmode": "require"}, {"create": FLAG}, store="s", others="return"
        )
        assert ({"create": True}, {"sslmode": "require"}) == (values, rest)


class TestMergeOptions:
    def test_url_and_keyword_options_are_merged(self) -> None:
        """Options from the URL and from keywords come back together."""
        assert {"table": "t", "create": True} == merge_options(
            {"table": "t"}, {"create": True}, store="SQL store"
        )

    def test_an_option_given_both_ways_is_refused_by_name(self) -> None:
        """The same option in the URL and as a keyword: neither silently wins."""
        with pytest.raises(ConfigurationError, match=r"SQL store option.*table.*both in the URL"):
            merge_options({"table": "a"}, {"table": "b"}, store="SQL store")


class Closed(ClosingStore):
    """A store whose close() is recorded."""

    closed = False

    def close(self) -> None:
        self.closed = True


class AsyncClosed(AsyncClosingStore):
    """An async store whose close() is recorded."""

    closed = False

    async def close(self) -> None:
        self.closed = True


class TestClosingStores:
    def test_a_with_block_closes_the_store_even_on_error(self) -> None:
        """``with store:`` hands the store in and closes it when the block raises."""
        store = Closed()
        entered: list[Closed] = []

        def use() -> None:
            with store as opened:
                entered.append(opened)
                raise RuntimeError("in the block")

        with pytest.raises(RuntimeError):
            use()
        assert ([store], True) == (entered, store.closed)

    @pytest.mark.anyio
    async def test_an_async_with_block_awaits_close(self) -> None:
        """``async with store:`` awaits the store's own async close()."""
        store = AsyncClosed()
        async with store as entered:
            assert entered is store
        assert store.closed


class DriverError(Exception):
    """What a driver raises."""


class TestErrorBoundary:
    def translate(self, exc: Exception) -> StoreUnavailable:
        """The store's mapping: every driver error is 'unavailable' here."""
        return StoreUnavailable(f"the test store failed ({type(exc).__name__})")

    def test_a_driver_error_is_translated_keeping_its_cause(self) -> None:
        """A driver error inside the boundary comes out translated, the original as cause."""
        original = DriverError("boom")
        with (
            pytest.raises(StoreUnavailable, match="DriverError") as caught,
            error_boundary(self.translate, DriverError),
        ):
            raise original
        assert original is caught.value.__cause__

    def test_credkeepers_own_errors_pass_untouched(self) -> None:
        """A credkeeper error raised inside the boundary is not translated again."""
        own = StoreCorrupted("damaged")
        with pytest.raises(StoreCorrupted) as caught, error_boundary(self.translate, Exception):
            raise own
        assert own is caught.value

    def test_other_errors_pass_untouched(self) -> None:
        """An exception that is not a driver error (a bug) is not disguised."""
        with pytest.raises(KeyError), error_boundary(self.translate, DriverError):
            raise KeyError("bug")


class TestStoredRecord:
    def test_a_record_read_back_is_made_as_given(self) -> None:
        """Fields that make a valid Record give that Record."""
        record = stored_record(key="k", access_token="a", refresh_token="r", expires_at=INSTANT)
        assert ("k", INSTANT) == (record.key, record.expires_at)

    def test_what_a_record_refuses_is_store_damage_naming_the_key(self) -> None:
        """A field Record refuses, read back from a store, is StoreCorrupted naming the key."""
        with pytest.raises(StoreCorrupted, match=r"'k' is not a valid record") as caught:
            stored_record(
                key="k", access_token="a", refresh_token="r", expires_at=INSTANT, failures=-1
            )
        assert "k" == caught.value.key
