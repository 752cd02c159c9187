"""The Secrets Manager store's ``now()``: AWS's clock, learnt from the Date of its answers.

The estimator's arithmetic is checked on its own, with a ``FakeClock``; the store's use of it
against moto's server through :class:`~tests.adapters.aws.conftest.Proxy`, which moves the
``Date`` header of every answer to play an AWS whose clock disagrees with the host's.
"""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import botocore.config
import botocore.stub
import pytest

from credkeeper import StoreError, StoreUnavailable
from credkeeper.testing import FakeClock
from credkeeper_aws import SecretsManagerStore
from credkeeper_aws._server_clock import ServerClock
from tests.adapters.conftest import record

from .conftest import REGION, Proxy, through

START = datetime(2026, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)
# Header dates: whole seconds, as HTTP writes them.
AT_START = "Thu, 01 Jan 2026 00:00:00 GMT"
AT_START_PLUS_1 = "Thu, 01 Jan 2026 00:00:01 GMT"
AT_START_PLUS_5 = "Thu, 01 Jan 2026 00:00:05 GMT"


# -- the estimate -------------------------------------------------------------------------------


class TestServerClock:
    def test_nothing_is_known_before_an_answer(self) -> None:
        """Before any answer there is no estimate and no uncertainty."""
        clock = ServerClock(FakeClock(START))
        assert (None, None, None) == (clock.now(), clock.uncertainty(), clock.age())

    def test_one_answer_bounds_the_offset_by_its_second_and_round_trip(self) -> None:
        """A Date of T, sent at S and received at R: the offset lies in [T - R, T + 1 s - S]."""
        fake = FakeClock(START)
        clock = ServerClock(fake)
        clock.observe(AT_START_PLUS_5, sent=START, received=START + 200 * MS)
        # The middle of [4.8 s, 6 s].
        assert (START + 5400 * MS, 600 * MS) == (clock.now(), clock.uncertainty())

    def test_answers_at_other_phases_of_the_second_narrow_the_estimate(self) -> None:
        """Two answers, one written just before AWS's second ticked and one just after."""
        fake = FakeClock(START)
        clock = ServerClock(fake)
        # AWS is 0.3 s ahead. Two concurrent calls: the one sent at 0.6 s was answered in
        # second 0, the one sent at 0.7 s in second 1. Bounds [-0.8, 0.4] and [0.2, 1.3].
        clock.observe(AT_START, sent=START + 600 * MS, received=START + 800 * MS)
        clock.observe(AT_START_PLUS_1, sent=START + 700 * MS, received=START + 800 * MS)
        assert (START + 300 * MS, 100 * MS) == (clock.now(), clock.uncertainty())

    def test_answers_that_no_longer_overlap_start_the_estimate_over(self) -> None:
        """A clock stepped between answers: the newer answer alone decides."""
        fake = FakeClock(START)
        clock = ServerClock(fake)
        clock.observe(AT_START, sent=START, received=START)
        fake.advance(60)
        # Sixty seconds later on the local clock, AWS shows only five: its clock was set back.
        clock.observe(AT_START_PLUS_5, sent=fake.now(), received=fake.now())
        assert (fake.now() - timedelta(seconds=54.5), 500 * MS) == (
            clock.now(),
            clock.uncertainty(),
        )

    def test_old_bounds_widen_with_the_drift_clocks_may_have(self) -> None:
        """An hour between answers widens the older bounds by 0.36 s (100 ppm) each way."""
        fake = FakeClock(START)
        clock = ServerClock(fake)
        clock.observe(AT_START, sent=START, received=START)
        fake.advance(3600)
        hour_later = "Thu, 01 Jan 2026 01:00:00 GMT"
        clock.observe(hour_later, sent=fake.now() - 900 * MS, received=fake.now())
        # [0, 1] widened to [-0.36, 1.36], meeting the new [0, 1.9]: [0, 1.36].
        assert 680 * MS == clock.uncertainty()

    def test_now_never_goes_backwards(self) -> None:
        """A newer estimate a little behind the last reading holds the time still instead."""
        fake = FakeClock(START)
        clock = ServerClock(fake)
        clock.observe(AT_START_PLUS_1, sent=START, received=START)
        first = clock.now()
        # An answer that narrows the offset from [1, 2] to exactly 1 s.
        clock.observe(AT_START, sent=START, received=START)
        assert (START + 1500 * MS, START + 1500 * MS, timedelta(0)) == (
            first,
            clock.now(),
            clock.uncertainty(),
        )

    @pytest.mark.parametrize("date", [None, "", "yesterday", "Thu, 01 Jan 2026 00:00:00"])
    def test_a_missing_or_unreadable_date_is_ignored(self, date: str | None) -> None:
        """No header, garbage, or a date without a zone leaves the estimate unknown."""
        clock = ServerClock(FakeClock(START))
        clock.observe(date, sent=START, received=START)
        assert None is clock.now()


# -- the store's now() --------------------------------------------------------------------------


class TestNow:
    @pytest.mark.parametrize("shift", [-300.0, 0.0, 300.0], ids=["behind", "same", "ahead"])
    def test_now_is_aws_clock_within_its_uncertainty(
        self, proxy: Proxy, prefix: str, shift: float
    ) -> None:
        """AWS's clock 5 minutes off the host's, either way: now() reads AWS's, not the host's."""
        proxy.shift = shift
        with through(proxy, prefix) as store:
            offset = (store.now() - datetime.now(UTC)).total_seconds()
            bound = store._server_clock.uncertainty()
        assert bound is not None
        assert pytest.approx(shift, abs=bound.total_seconds() + 0.05) == offset

    def test_a_store_that_has_not_heard_from_aws_asks_once(self, proxy: Proxy, prefix: str) -> None:
        """The first now() costs one DescribeSecret; the next one, no call."""
        with through(proxy, prefix) as store:
            store.now()
            store.now()
        assert ["DescribeSecret"] == proxy.operations

    def test_any_answer_teaches_the_clock(self, proxy: Proxy, prefix: str) -> None:
        """After a put, now() answers without a call of its own."""
        with through(proxy, prefix) as store:
            store.put(record("alice"))
            store.now()
        assert ["CreateSecret"] == proxy.operations

    def test_an_estimate_a_minute_old_is_measured_again(self, proxy: Proxy, prefix: str) -> None:
        """61 s after the last answer, now() asks AWS again."""
        clock = FakeClock()
        with through(proxy, prefix, clock=clock) as store:
            store.now()
            clock.advance(61)
            store.now()
        assert ["DescribeSecret", "DescribeSecret"] == proxy.operations

    def test_the_offset_is_measured_on_the_stores_clock(self, proxy: Proxy, prefix: str) -> None:
        """A store whose clock says 2020 still reads AWS's time: clock plus measured offset."""
        with through(proxy, prefix, clock=FakeClock(datetime(2020, 1, 1, tzinfo=UTC))) as store:
            offset = (store.now() - datetime.now(UTC)).total_seconds()
        assert pytest.approx(0.0, abs=1.5) == offset

    def test_between_answers_now_follows_the_stores_clock(self, proxy: Proxy, prefix: str) -> None:
        """Thirty seconds on the store's clock are thirty seconds of AWS's time."""
        clock = FakeClock()
        with through(proxy, prefix, clock=clock) as store:
            first = store.now()
            clock.advance(30)
            second = store.now()
        assert timedelta(seconds=30) == second - first

    def test_an_answer_without_a_date_is_a_store_error(self) -> None:
        """No Date header, so no clock to read: StoreError saying so, not a made-up time."""
        client = boto3.client(
            "secretsmanager",
            region_name=REGION,
            endpoint_url="http://127.0.0.1:9",
            config=botocore.config.Config(retries={"total_max_attempts": 1}),
        )
        store = SecretsManagerStore("credkeeper/", client=client, clock=FakeClock())
        with botocore.stub.Stubber(client) as stubber:
            stubber.add_client_error("describe_secret", "ResourceNotFoundException", 400)
            with pytest.raises(StoreError, match="without a Date header"):
                store.now()

    def test_an_unreachable_endpoint_is_store_unavailable(self, aws_credentials: None) -> None:
        """Nothing listening: now() raises StoreUnavailable, not a botocore exception."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        store = SecretsManagerStore(
            "credkeeper/", region=REGION, endpoint_url=f"http://127.0.0.1:{port}"
        )
        with store, pytest.raises(StoreUnavailable, match="could not be reached"):
            store.now()

    def test_the_probe_names_no_key(self, proxy: Proxy, prefix: str, sm_client: Any) -> None:
        """now() creates nothing: the prefix holds no secret afterwards."""
        with through(proxy, prefix) as store:
            store.now()
        listed = sm_client.list_secrets(Filters=[{"Key": "name", "Values": [prefix]}])
        assert [] == listed["SecretList"]
