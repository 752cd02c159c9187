"""One budget per call: the Secrets Manager store's own retries stop at the engine call's deadline.

Against moto's server through :class:`~tests.adapters.aws.conftest.Proxy`, which answers the
throttling and server errors moto cannot produce on demand. The budget is set the way the
engine sets it, with :func:`credkeeper._budget.budget`.
"""

from __future__ import annotations

import time

import pytest

from credkeeper import StoreUnavailable

# not yet public: sets a call's time budget the way the engine does; no public name sets one.
from credkeeper._budget import budget
from credkeeper.testing import FakeClock
from tests.adapters.conftest import record

from .conftest import Proxy, through

THROTTLED = (400, "ThrottlingException")
NOT_FOUND = (400, "ResourceNotFoundException")
SERVER_FAULT = (500, "InternalServiceError")


class TestThrottling:
    def test_a_throttled_call_gives_up_at_the_calls_deadline(
        self, proxy: Proxy, prefix: str
    ) -> None:
        """retry_timeout=30 inside a 0.3 s budget: StoreUnavailable after 0.3 s of backoff."""
        clock = FakeClock()
        proxy.faults["GetSecretValue"] = THROTTLED
        deadline = pytest.raises(StoreUnavailable, match="until the call's deadline")
        with (
            through(proxy, prefix, clock=clock, retry_timeout=30) as store,
            budget(0.3),
            deadline as raised,
        ):
            store.get("alice")
        assert (True, True, "alice") == (
            0 < sum(clock.sleeps) <= 0.3,
            "kept throttling GetSecretValue" in str(raised.value),
            raised.value.key,
        )

    def test_on_the_real_clock_it_gives_up_at_the_deadline_too(
        self, proxy: Proxy, prefix: str
    ) -> None:
        """Real waits, retry_timeout=30, a 0.3 s budget: the call fails in about 0.3 s, not 30."""
        proxy.faults["GetSecretValue"] = THROTTLED
        with through(proxy, prefix, retry_timeout=30) as store, budget(0.3):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="until the call's deadline"):
                store.get("alice")
            elapsed = time.monotonic() - started
        # Generous: only a loop that ignored the budget (30 s) could miss it.
        assert True is (elapsed < 5)

    def test_a_tighter_retry_timeout_still_wins(self, proxy: Proxy, prefix: str) -> None:
        """retry_timeout=0.5 inside a 30 s budget: the store stops at its own 0.5 s."""
        clock = FakeClock()
        proxy.faults["GetSecretValue"] = THROTTLED
        own_limit = pytest.raises(StoreUnavailable, match=r"for 0\.5 s")
        with through(proxy, prefix, clock=clock, retry_timeout=0.5) as store, budget(30), own_limit:
            store.get("alice")
        assert True is (0 < sum(clock.sleeps) <= 0.5)

    def test_a_spent_budget_leaves_one_attempt_and_no_wait(self, proxy: Proxy, prefix: str) -> None:
        """With nothing left of the budget, a throttled call is tried once and not retried."""
        clock = FakeClock()
        proxy.faults["GetSecretValue"] = THROTTLED
        with (
            through(proxy, prefix, clock=clock) as store,
            budget(0),
            pytest.raises(StoreUnavailable),
        ):
            store.get("alice")
        assert (["GetSecretValue"], []) == (proxy.operations, clock.sleeps)


class TestOtherWaits:
    def test_a_read_finding_no_current_version_does_not_wait(
        self, proxy: Proxy, prefix: str
    ) -> None:
        """AWSCURRENT is on some version of every secret AWS holds: not found is absent, at once."""
        clock = FakeClock()
        with through(proxy, prefix, clock=clock) as store:
            store.put(record("alice"))
            proxy.operations.clear()
            proxy.faults["GetSecretValue"] = NOT_FOUND
            found = store.get("alice")
        assert (None, ["GetSecretValue"], []) == (found, proxy.operations, clock.sleeps)

    def test_stage_move_attempts_stop_at_the_deadline(self, proxy: Proxy, prefix: str) -> None:
        """A move failing with a server error is not tried again once the budget is spent."""
        clock = FakeClock()
        with through(proxy, prefix, clock=clock) as store:
            created = store.put(record("alice"))
            proxy.faults["UpdateSecretVersionStage"] = SERVER_FAULT
            # Less than the first backoff (25 to 50 ms): no room for a second attempt.
            with budget(0.02), pytest.raises(StoreUnavailable, match="UpdateSecretVersionStage"):
                store.put(created.replace(failures=1))
        assert (1, []) == (proxy.operations.count("UpdateSecretVersionStage"), clock.sleeps)

    def test_without_a_budget_the_stage_move_is_tried_three_times(
        self, proxy: Proxy, prefix: str
    ) -> None:
        """Outside any credkeeper call, the move keeps its three attempts."""
        clock = FakeClock()
        with through(proxy, prefix, clock=clock) as store:
            created = store.put(record("alice"))
            proxy.faults["UpdateSecretVersionStage"] = SERVER_FAULT
            with pytest.raises(StoreUnavailable, match="UpdateSecretVersionStage"):
                store.put(created.replace(failures=1))
        assert 3 == proxy.operations.count("UpdateSecretVersionStage")
