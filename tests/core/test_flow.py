"""The refresh flow stepped by hand: every effect it yields, every answer and failure it takes.

No store, no provider, no threads: each test starts a flow from ``credkeeper._flow``, reads the
effect it yields (``next(flow)``), answers with ``flow.send(result)`` or fails it with
``flow.throw(error)``, the way httpx's ``tests/test_auth.py`` steps an auth flow. Time is a
``FakeClock`` the test moves itself; a ``Sleep`` effect is only a request to wait.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from credkeeper import (
    ConfigurationError,
    ConflictError,
    CredentialNotFound,
    Credentials,
    DecryptionError,
    KeyRing,
    ProviderError,
    ProviderUnavailable,
    ReauthRequired,
    Record,
    RefreshEvent,
    RefreshTimeout,
    Status,
    StoreContention,
    StoreCorrupted,
    StoreUnavailable,
)
from credkeeper._flow import (
    Deadline,
    Effect,
    Flow,
    JournalDiscard,
    JournalForget,
    JournalPending,
    JournalWrite,
    Load,
    Policy,
    Remove,
    Save,
    Send,
    Sleep,
    StoreNow,
    delete_flow,
    get_flow,
    put_flow,
    refresh_flow,
)
from credkeeper._journal import RescueEntry, fingerprint
from credkeeper._provider import Provider
from credkeeper._secret import Secret
from credkeeper.testing import FakeClock

KEY = "alice"
SEED = 7
OWNER = "host:1:cafe"
# The lease id the first flow of a fresh policy draws: the owner and 32 bits of its rng.
LEASE = f"{OWNER}/{random.Random(SEED).getrandbits(32):08x}"
PROVIDER = Provider.claude_code(token_url="https://auth.example.com/v1/oauth/token")
START = datetime(2026, 1, 1, tzinfo=UTC)
TIMEOUT = timedelta(seconds=30)
TTL = timedelta(seconds=60)
DEADLINE = START + TIMEOUT
# After the provider answered, the store write may go on until the lease end less its timeout.
WRITE_UNTIL = START + TTL - timedelta(seconds=PROVIDER.timeout)
LATER = START + timedelta(hours=8)  # valid beyond the 15-minute leeway
SOON = START + timedelta(minutes=5)  # due, but the access token still works
PAST = START - timedelta(minutes=1)  # expired
ROTATED = {"access_token": "at-2", "refresh_token": "rt-2", "expires_in": 28800}


@pytest.fixture
def clock() -> FakeClock:
    """The flow's clock, at START until a test moves it."""
    return FakeClock(START)


@pytest.fixture
def policy(clock: FakeClock) -> Policy:
    """A plain-text policy with the managers' defaults and a seeded rng."""
    return make_policy(clock)


def make_policy(clock: FakeClock, **changes: Any) -> Policy:
    settings: dict[str, Any] = {"keyring": None, "codec": None, **changes}
    return Policy(
        provider=PROVIDER,
        clock=clock,
        rng=random.Random(SEED),
        owner=OWNER,
        leeway=timedelta(minutes=15),
        lease_ttl=TTL,
        refresh_timeout=TIMEOUT,
        cooldown=timedelta(seconds=30),
        max_cooldown=timedelta(minutes=10),
        **settings,
    )


def record(
    access: str = "at-1",
    refresh: str = "rt-1",
    *,
    expires_at: datetime = SOON,
    version: str | None = "1",
    **fields: Any,
) -> Record:
    return Record(
        key=KEY,
        access_token=access,
        refresh_token=refresh,
        expires_at=expires_at,
        scopes=("user:inference",),
        subscription_type="max",
        version=version,
        **fields,
    )


def obtained(access: str, refresh: str, **fields: Any) -> Record:
    """A record of tokens the flow has just obtained: ``refreshed_at`` is the clock's START."""
    return record(access, refresh, refreshed_at=START, **fields)


def credentials_of(stored: Record) -> Credentials:
    return Credentials(
        access_token=stored.access_token,
        refresh_token=stored.refresh_token,
        expires_at=stored.expires_at,
        scopes=stored.scopes,
        subscription_type=stored.subscription_type,
    )


def rotated(now: datetime = START) -> Credentials:
    """What the provider's ROTATED answer holds, read at ``now``."""
    return Credentials(
        access_token="at-2",
        refresh_token="rt-2",
        expires_at=now + timedelta(seconds=28800),
        scopes=("user:inference",),
        subscription_type="max",
    )


def rescue(replaces: str = "rt-1", entry_id: str = "0001") -> RescueEntry:
    """A journal entry holding ROTATED's tokens, the answer to a refresh with ``replaces``."""
    return RescueEntry(
        id=entry_id,
        key=KEY,
        credentials=rotated(),
        replaces=fingerprint(Secret(replaces)),
        created_at=START,
    )


def stored_as(effect: Effect, version: str = "2") -> Record:
    """What a store answers to ``effect``, a Save: its record under a new version."""
    assert isinstance(effect, Save)
    return effect.record.replace(version=version)


def opened(flow: Flow[Any], found: Record | None) -> Effect:
    """Step a get or refresh flow past its deadline, an empty journal and the read of ``found``."""
    assert Deadline(DEADLINE) == next(flow)
    assert JournalPending(KEY) == flow.send(None)
    assert Load(KEY) == flow.send([])
    return flow.send(found)


def to_send(flow: Flow[Any], due: Record) -> tuple[Record, Send]:
    """Step a flow that reads ``due`` until it sends the refresh: the leased record, the Send."""
    assert StoreNow() == opened(flow, due)
    leased = stored_as(flow.send(None))
    send = flow.send(leased)
    assert isinstance(send, Send)
    return leased, send


def to_store_write(flow: Flow[Any], due: Record) -> tuple[Record, RescueEntry]:
    """Step a flow that reads ``due`` until it writes ROTATED to the store, past the journal."""
    leased, _ = to_send(flow, due)
    write = flow.send(httpx.Response(200, json=ROTATED))
    assert isinstance(write, JournalWrite)
    assert Deadline(WRITE_UNTIL) == flow.send(None)
    save = flow.send(None)
    assert Save(obtained("at-2", "rt-2", expires_at=rotated().expires_at, version="2")) == save
    return leased, write.entry


def finish(flow: Flow[Any], answer: object) -> Any:
    """Send ``answer``; the value the flow returns with it (it must yield nothing more)."""
    try:
        effect = flow.send(answer)
    except StopIteration as stop:
        return stop.value
    raise AssertionError(f"the flow went on with {effect!r}")


def finish_after(flow: Flow[Any], error: Exception) -> Any:
    """Throw ``error`` into the flow; the value it returns all the same."""
    try:
        effect = flow.throw(error)
    except StopIteration as stop:
        return stop.value
    raise AssertionError(f"the flow went on with {effect!r}")


def refused(error: str = "invalid_grant") -> httpx.Response:
    return httpx.Response(400, json={"error": error})


class TestValidRecord:
    def test_a_record_valid_beyond_the_leeway_is_returned_after_one_read(
        self, policy: Policy
    ) -> None:
        """A valid record ends the flow at its read: no lease, no request."""
        valid = record(expires_at=LATER)
        flow = get_flow(policy, KEY)
        assert Deadline(DEADLINE) == next(flow)
        assert JournalPending(KEY) == flow.send(None)
        assert Load(KEY) == flow.send([])
        assert credentials_of(valid) == finish(flow, valid)

    def test_an_unknown_key_raises_credential_not_found(self, policy: Policy) -> None:
        """No record under the key: CredentialNotFound naming it."""
        with pytest.raises(CredentialNotFound, match=KEY):
            opened(get_flow(policy, KEY), None)

    def test_a_condemned_record_raises_reauth_required(self, policy: Policy) -> None:
        """A record marked needs_reauth raises ReauthRequired before any request."""
        condemned = record(status=Status.NEEDS_REAUTH)

        with pytest.raises(ReauthRequired, match=KEY):
            opened(get_flow(policy, KEY), condemned)


class TestStale:
    def test_a_valid_record_still_holding_the_stale_token_is_refreshed(
        self, policy: Policy
    ) -> None:
        """get_flow(stale=token) on a valid record holding that token goes on to the lease."""
        valid = record(expires_at=LATER)
        flow = get_flow(policy, KEY, stale=Secret("at-1"))

        assert StoreNow() == opened(flow, valid)

    def test_a_record_a_peer_replaced_is_taken_as_it_is(self, policy: Policy) -> None:
        """The store holds another valid token than the stale one: it is the answer."""
        replaced = record("at-9", "rt-9", expires_at=LATER)
        flow = get_flow(policy, KEY, stale=Secret("at-1"))
        assert Deadline(DEADLINE) == next(flow)
        flow.send(None)
        flow.send([])

        assert credentials_of(replaced) == finish(flow, replaced)

    def test_a_stale_token_is_still_served_during_a_cooldown(self, policy: Policy) -> None:
        """Unlike a refused token, a stale one is handed out while the refresh must wait."""
        cooling = record(expires_at=LATER, cooldown_until=START + timedelta(seconds=60))
        flow = get_flow(policy, KEY, stale=Secret("at-1"))
        assert StoreNow() == opened(flow, cooling)

        assert credentials_of(cooling) == finish(flow, None)


class TestRefresh:
    def test_a_due_record_is_leased_refreshed_journalled_and_stored(self, policy: Policy) -> None:
        """The whole path of a due record: lease, request, journal, store write, journal drop."""
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, record())
        lease = flow.send(None)
        assert Save(record(lease_owner=LEASE, lease_until=START + TTL)) == lease
        send = flow.send(stored_as(lease))
        assert isinstance(send, Send)
        assert "rt-1" == json.loads(send.request.content)["refresh_token"]
        write = flow.send(httpx.Response(200, json=ROTATED))
        assert isinstance(write, JournalWrite)
        assert (KEY, rotated(), fingerprint(Secret("rt-1")), START) == (
            write.entry.key,
            write.entry.credentials,
            write.entry.replaces,
            write.entry.created_at,
        )
        assert Deadline(WRITE_UNTIL) == flow.send(None)
        save = flow.send(None)
        assert Save(obtained("at-2", "rt-2", expires_at=rotated().expires_at, version="2")) == save
        assert JournalDiscard(write.entry) == flow.send(stored_as(save, "3"))

        assert rotated() == finish(flow, None)

    def test_an_own_refresh_teaches_its_duration(self, policy: Policy, clock: FakeClock) -> None:
        """A refresh that took 0.25 s from the lease to the stored tokens sets the estimate."""
        flow = get_flow(policy, KEY)
        to_send(flow, record())
        clock.sleep(0.25)
        assert isinstance(flow.send(httpx.Response(200, json=ROTATED)), JournalWrite)
        flow.send(None)
        save = flow.send(None)
        flow.send(stored_as(save, "3"))

        finish(flow, None)

        assert pytest.approx(0.25) == policy.times.expected

    def test_a_lease_is_written_on_the_store_clock(self, policy: Policy) -> None:
        """With the store's clock 5 minutes ahead, the lease ends 5 minutes later too."""
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, record())

        lease = flow.send(START + timedelta(minutes=5))

        assert Save(record(lease_owner=LEASE, lease_until=START + timedelta(minutes=6))) == lease

    def test_a_lease_ended_on_the_store_clock_is_taken_over(self, policy: Policy) -> None:
        """A peer's lease that is live on our clock but over on the store's is taken over."""
        held = record(lease_owner="peer", lease_until=START + timedelta(minutes=2))
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, held)
        assert JournalPending(KEY, rescan=True) == flow.send(START + timedelta(minutes=5))

        lease = flow.send([])

        assert Save(held.replace(lease_owner=LEASE, lease_until=START + timedelta(minutes=6))) == (
            lease
        )

    def test_an_abandoned_lease_first_stores_its_journalled_answer(self, policy: Policy) -> None:
        """A peer died after journalling its answer, its lease ran out: its tokens are stored
        and used, and the refresh token it spent is never sent again."""
        abandoned = record(lease_owner="peer", lease_until=START - timedelta(seconds=1))
        entry = rescue()
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, abandoned)
        assert JournalPending(KEY, rescan=True) == flow.send(None)
        assert Load(KEY) == flow.send([entry])
        restore = flow.send(abandoned)
        assert Save(obtained("at-2", "rt-2", expires_at=rotated().expires_at, version="1")) == (
            restore
        )
        assert JournalDiscard(entry) == flow.send(stored_as(restore))
        assert Load(KEY) == flow.send(None)

        assert rotated() == finish(flow, stored_as(restore))

    @pytest.mark.parametrize("answer", [datetime(2026, 1, 1), "2026-01-01T00:00:00Z"])
    def test_a_store_clock_that_is_not_an_aware_datetime_is_refused(
        self, policy: Policy, answer: object
    ) -> None:
        """A store whose now() gives a naive datetime or a string is a ConfigurationError."""
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, record())

        with pytest.raises(ConfigurationError, match="aware datetime"):
            flow.send(answer)

    def test_a_failing_store_clock_serves_the_usable_token(self, policy: Policy) -> None:
        """The store's clock unreachable, a due but unexpired token is returned."""
        due = record()
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, due)

        assert credentials_of(due) == finish_after(flow, StoreUnavailable("down", key=KEY))

    def test_a_failing_store_clock_with_an_expired_token_raises(self, policy: Policy) -> None:
        """The store's clock unreachable and nothing usable: StoreUnavailable reaches the caller."""
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, record(expires_at=PAST))

        with pytest.raises(StoreUnavailable, match="down"):
            flow.throw(StoreUnavailable("down", key=KEY))


class TestForcedRefresh:
    def test_refresh_without_failed_refreshes_a_valid_token(self, policy: Policy) -> None:
        """refresh_flow() with no failed token goes for a lease even far from expiry."""
        valid = record(expires_at=LATER)
        flow = refresh_flow(policy, KEY)
        assert StoreNow() == opened(flow, valid)

        assert Save(valid.replace(lease_owner=LEASE, lease_until=START + TTL)) == flow.send(None)

    def test_refresh_of_the_failed_token_still_stored_refreshes(self, policy: Policy) -> None:
        """refresh_flow(failed=t) refreshes when the store still holds the refused token t."""
        flow = refresh_flow(policy, KEY, failed=Secret("at-1"))

        assert StoreNow() == opened(flow, record(expires_at=LATER))

    def test_refresh_of_a_failed_token_already_replaced_returns_the_new_one(
        self, policy: Policy
    ) -> None:
        """refresh_flow(failed=t) with another token stored returns it after one read."""
        newer = record("at-9", "rt-9", expires_at=LATER)
        flow = refresh_flow(policy, KEY, failed=Secret("at-1"))
        assert Deadline(DEADLINE) == next(flow)
        assert JournalPending(KEY) == flow.send(None)
        assert Load(KEY) == flow.send([])

        assert credentials_of(newer) == finish(flow, newer)

    def test_forced_refresh_of_an_unknown_key_raises_credential_not_found(
        self, policy: Policy
    ) -> None:
        """refresh_flow() with nothing stored raises CredentialNotFound naming the key."""
        with pytest.raises(CredentialNotFound, match=KEY):
            opened(refresh_flow(policy, KEY), None)

    def test_two_flows_of_one_policy_exclude_each_other(self, policy: Policy) -> None:
        """A forced refresh meeting the lease of a get() of the same policy waits on it."""
        leased, _ = to_send(get_flow(policy, KEY), record())
        forced = refresh_flow(policy, KEY)
        assert StoreNow() == opened(forced, leased)

        assert isinstance(forced.send(None), Sleep)


class TestCooldown:
    def test_a_cooldown_serves_the_usable_token(self, policy: Policy) -> None:
        """During a cooldown another worker recorded, the still-valid token comes back."""
        cooling = record(cooldown_until=START + timedelta(seconds=60))
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, cooling)

        assert credentials_of(cooling) == finish(flow, None)

    def test_a_cooldown_with_an_expired_token_raises_provider_unavailable(
        self, policy: Policy
    ) -> None:
        """During a cooldown with nothing usable: ProviderUnavailable with the time left."""
        cooling = record(
            expires_at=PAST, cooldown_until=START + timedelta(seconds=60), last_error="HTTP 503"
        )
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, cooling)

        with pytest.raises(ProviderUnavailable, match="HTTP 503") as caught:
            flow.send(None)
        assert 60.0 == caught.value.retry_after

    def test_an_ended_cooldown_lets_the_refresh_go_on(self, policy: Policy) -> None:
        """A cooldown in the past is no obstacle: the flow takes the lease."""
        cooled = record(cooldown_until=START - timedelta(seconds=1))
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, cooled)

        assert Save(cooled.replace(lease_owner=LEASE, lease_until=START + TTL)) == flow.send(None)


class TestPeerLease:
    def test_a_peer_lease_is_waited_on_and_its_tokens_used(
        self, policy: Policy, clock: FakeClock
    ) -> None:
        """A live lease of another worker: sleep, re-read, and use the tokens it stored."""
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, record(lease_owner="peer", lease_until=START + TTL))
        sleep = flow.send(None)
        assert isinstance(sleep, Sleep)
        clock.sleep(sleep.seconds)
        assert Load(KEY) == flow.send(None)
        refreshed = record("at-9", "rt-9", expires_at=LATER, version="3")

        assert credentials_of(refreshed) == finish(flow, refreshed)

    def test_with_no_estimate_a_new_lease_is_reread_after_twenty_ms(self, policy: Policy) -> None:
        """Nothing learnt yet, a lease taken just now: the first re-read comes 18-20 ms later."""
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, record(lease_owner="peer", lease_until=START + TTL))

        sleep = flow.send(None)

        assert isinstance(sleep, Sleep)
        assert 0.018 <= sleep.seconds <= 0.02

    def test_an_overdue_lease_is_reread_after_a_tenth_of_its_age(self, policy: Policy) -> None:
        """A lease taken 1 s ago, past any estimate: the next read comes 0.09-0.1 s later."""
        began = START - timedelta(seconds=1)
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, record(lease_owner="peer", lease_until=began + TTL))

        sleep = flow.send(None)

        assert isinstance(sleep, Sleep)
        assert 0.09 <= sleep.seconds <= 0.1

    def test_a_lease_is_reread_at_the_expected_end_of_its_refresh(self, policy: Policy) -> None:
        """Refreshes take 0.3 s, this lease began 0.1 s ago: the next read is 0.2 s away."""
        policy.times.observe(0.3)
        began = START - timedelta(seconds=0.1)
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, record(lease_owner="peer", lease_until=began + TTL))

        assert Sleep(pytest.approx(0.2), KEY, "1") == flow.send(None)

    def test_a_refresh_far_slower_than_the_estimate_at_most_doubles_it(
        self, policy: Policy
    ) -> None:
        """Estimate 0.2 s, one refresh of 10 s (the provider's retries): the estimate is 0.26 s."""
        policy.times.observe(0.2)

        policy.times.observe(10.0)

        assert pytest.approx(0.26) == policy.times.expected

    def test_taking_over_an_abandoned_lease_teaches_nothing(
        self, policy: Policy, clock: FakeClock
    ) -> None:
        """A lease waited on until it ran out, then its journalled tokens stored: that wait was
        no refresh's duration, and the estimate stays as it was."""
        policy.times.observe(0.2)
        held = record(lease_owner="peer", lease_until=START + timedelta(seconds=1))
        entry = rescue()
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, held)
        assert isinstance(flow.send(None), Sleep)
        clock.sleep(2.0)
        assert Load(KEY) == flow.send(None)
        assert JournalPending(KEY, rescan=True) == flow.send(held)
        assert Load(KEY) == flow.send([entry])
        restore = flow.send(held)
        assert isinstance(restore, Save)
        assert JournalDiscard(entry) == flow.send(stored_as(restore))
        assert Load(KEY) == flow.send(None)

        assert rotated() == finish(flow, stored_as(restore))
        assert 0.2 == policy.times.expected

    def test_no_wait_is_longer_than_a_second(self, policy: Policy) -> None:
        """However long refreshes took before, a waiter re-reads at least once a second."""
        policy.times.observe(30.0)
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, record(lease_owner="peer", lease_until=START + TTL))

        assert Sleep(1.0, KEY, "1") == flow.send(None)

    def test_a_peer_refresh_seen_ending_teaches_its_duration(
        self, policy: Policy, clock: FakeClock
    ) -> None:
        """Held at 0.1 s, done at the read 0.2 s later: the estimate is the midpoint, 0.2 s."""
        began = START - timedelta(seconds=0.1)
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, record(lease_owner="peer", lease_until=began + TTL))
        assert isinstance(flow.send(None), Sleep)
        clock.sleep(0.2)
        assert Load(KEY) == flow.send(None)

        finish(flow, record("at-9", "rt-9", expires_at=LATER, version="3"))

        assert pytest.approx(0.2) == policy.times.expected

    def test_a_peer_lease_held_until_the_deadline_raises_refresh_timeout(
        self, policy: Policy, clock: FakeClock
    ) -> None:
        """A peer's lease still live at the call's deadline, nothing usable: RefreshTimeout."""
        held = record(expires_at=PAST, lease_owner="peer", lease_until=START + timedelta(hours=1))
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, held)
        assert isinstance(flow.send(None), Sleep)
        clock.advance(TIMEOUT)
        assert Load(KEY) == flow.send(None)

        with pytest.raises(RefreshTimeout, match=KEY):
            flow.send(held)

    def test_a_peer_lease_held_until_the_deadline_serves_the_usable_token(
        self, policy: Policy, clock: FakeClock
    ) -> None:
        """A peer's lease still live at the deadline: the due but unexpired token comes back."""
        held = record(lease_owner="peer", lease_until=START + timedelta(hours=1))
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, held)
        assert isinstance(flow.send(None), Sleep)
        clock.advance(TIMEOUT)
        assert Load(KEY) == flow.send(None)

        assert credentials_of(held) == finish(flow, held)


class TestLeaseConflict:
    def test_a_lost_lease_race_rereads_at_once_and_uses_the_winner_tokens(
        self, policy: Policy
    ) -> None:
        """The lease's compare-and-swap lost: re-read with no wait, use the winner's tokens."""
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, record())
        assert isinstance(flow.send(None), Save)
        assert Load(KEY) == flow.throw(ConflictError("moved", key=KEY))
        winner = record("at-9", "rt-9", expires_at=LATER, version="3")

        assert credentials_of(winner) == finish(flow, winner)

    def test_a_second_lost_lease_race_backs_off(self, policy: Policy) -> None:
        """The second conflict in a row sleeps before the re-read; the store clock is not reread."""
        due = record()
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, due)
        flow.send(None)
        assert Load(KEY) == flow.throw(ConflictError("moved", key=KEY))
        assert Save(due.replace(lease_owner=LEASE, lease_until=START + TTL)) == flow.send(due)

        sleep = flow.throw(ConflictError("moved", key=KEY))

        assert isinstance(sleep, Sleep)
        assert 0.025 <= sleep.seconds <= 0.05

    def test_an_own_lease_found_after_a_conflict_is_taken_again(self, policy: Policy) -> None:
        """A conflict on a write that did commit (the flow's own lease stored) is not waited on."""
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, record())
        ours = stored_as(flow.send(None))
        assert Load(KEY) == flow.throw(ConflictError("ambiguous commit", key=KEY))

        assert Save(ours) == flow.send(ours)

    def test_lease_conflicts_until_the_deadline_raise_store_contention(
        self, policy: Policy, clock: FakeClock
    ) -> None:
        """Losing the lease past the deadline, nothing usable: StoreContention naming the step."""
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, record(expires_at=PAST))
        flow.send(None)
        clock.advance(TIMEOUT + timedelta(seconds=1))

        with pytest.raises(StoreContention, match="taking the refresh lease"):
            flow.throw(ConflictError("moved", key=KEY))

    def test_lease_conflicts_until_the_deadline_serve_the_usable_token(
        self, policy: Policy, clock: FakeClock
    ) -> None:
        """Losing the lease past the deadline, the due but unexpired token comes back."""
        due = record()
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, due)
        flow.send(None)
        clock.advance(TIMEOUT + timedelta(seconds=1))

        assert credentials_of(due) == finish_after(flow, ConflictError("moved", key=KEY))


class TestProviderFailures:
    def test_a_5xx_is_retried_after_a_jittered_wait(self, policy: Policy) -> None:
        """A 503 with time left: sleep 0.25 to 0.5 s, then send again."""
        flow = get_flow(policy, KEY)
        to_send(flow, record())

        sleep = flow.send(httpx.Response(503))

        assert isinstance(sleep, Sleep)
        assert 0.25 <= sleep.seconds <= 0.5
        assert isinstance(flow.send(None), Send)

    def test_retry_after_is_honoured(self, policy: Policy) -> None:
        """A 429 with Retry-After: 7 waits 7 s before the next request."""
        flow = get_flow(policy, KEY)
        to_send(flow, record())

        assert Sleep(7.0) == flow.send(httpx.Response(429, headers={"Retry-After": "7"}))

    def test_a_transport_error_is_retried(self, policy: Policy) -> None:
        """A request that got no answer is retried like a 5xx."""
        flow = get_flow(policy, KEY)
        to_send(flow, record())

        assert isinstance(flow.throw(httpx.ConnectError("refused")), Sleep)

    def test_giving_up_records_a_cooldown_and_serves_the_usable_token(
        self, policy: Policy, clock: FakeClock
    ) -> None:
        """No time left for a retry: release the lease with a cooldown, return the valid token."""
        due = record()
        flow = get_flow(policy, KEY)
        leased, _ = to_send(flow, due)
        clock.advance(15)

        release = flow.send(httpx.Response(503))

        assert Save(
            leased.replace(
                lease_owner=None,
                lease_until=None,
                failures=1,
                cooldown_until=START + timedelta(seconds=45),
                last_error="HTTP 503",
            )
        ) == (release)
        assert credentials_of(due) == finish(flow, stored_as(release, "3"))

    def test_giving_up_with_an_expired_token_raises_provider_unavailable(
        self, policy: Policy, clock: FakeClock
    ) -> None:
        """No time left and nothing usable: the provider's failure reaches the caller."""
        flow = get_flow(policy, KEY)
        to_send(flow, record(expires_at=PAST))
        clock.advance(15)
        release = flow.send(httpx.Response(502))

        with pytest.raises(ProviderUnavailable, match="HTTP 502"):
            flow.send(stored_as(release, "3"))

    def test_giving_up_after_no_answer_names_the_error_type(
        self, policy: Policy, clock: FakeClock
    ) -> None:
        """A cooldown after requests that got no answer records the error's type, not a status."""
        flow = get_flow(policy, KEY)
        to_send(flow, record())
        clock.advance(15)

        release = flow.throw(httpx.ReadTimeout("slow"))

        assert isinstance(release, Save)
        assert "ProviderUnavailable" == release.record.last_error

    def test_a_release_the_store_refuses_is_left_to_expire(
        self, policy: Policy, clock: FakeClock
    ) -> None:
        """Releasing the lease conflicts: the flow goes on, the lease will expire by itself."""
        due = record()
        flow = get_flow(policy, KEY)
        to_send(flow, due)
        clock.advance(15)
        flow.send(httpx.Response(503))

        assert credentials_of(due) == finish_after(flow, ConflictError("moved", key=KEY))

    def test_a_refused_request_releases_the_lease_and_raises_provider_error(
        self, policy: Policy
    ) -> None:
        """A 400 that is not invalid_grant is not retried: release with a cooldown, then raise."""
        flow = get_flow(policy, KEY)
        leased, _ = to_send(flow, record())

        release = flow.send(refused("invalid_request"))

        assert Save(
            leased.replace(
                lease_owner=None,
                lease_until=None,
                failures=1,
                cooldown_until=START + timedelta(seconds=30),
                last_error="HTTP 400",
            )
        ) == (release)
        with pytest.raises(ProviderError, match="invalid_request"):
            flow.send(stored_as(release, "3"))

    def test_a_rotated_answer_without_access_token_is_stored_then_raised(
        self, policy: Policy
    ) -> None:
        """A 200 with a new refresh token but no access token: store it due at once, then fail."""
        flow = get_flow(policy, KEY)
        to_send(flow, record())
        write = flow.send(httpx.Response(200, json={"refresh_token": "rt-2", "expires_in": 60}))
        assert isinstance(write, JournalWrite)
        assert Deadline(WRITE_UNTIL) == flow.send(None)
        save = flow.send(None)
        assert Save(obtained("at-1", "rt-2", expires_at=START, version="2")) == save
        assert JournalDiscard(write.entry) == flow.send(stored_as(save, "3"))

        with pytest.raises(ProviderError, match="access_token") as caught:
            flow.send(None)
        assert ProviderError is type(caught.value)


class TestInvalidGrant:
    def test_a_peer_token_in_the_store_is_adopted(self, policy: Policy) -> None:
        """invalid_grant with a newer refresh token stored: a lost race, its tokens are used."""
        flow = get_flow(policy, KEY)
        to_send(flow, record())
        assert Load(KEY) == flow.send(refused())
        peer = record("at-9", "rt-9", expires_at=LATER, version="3")

        assert credentials_of(peer) == finish(flow, peer)

    def test_adopting_under_the_flow_lease_releases_it_first(self, policy: Policy) -> None:
        """New tokens written beside the flow's lease (by the application): release, then adopt."""
        flow = get_flow(policy, KEY)
        leased, _ = to_send(flow, record())
        assert Load(KEY) == flow.send(refused())
        rewritten = leased.replace(access_token="at-9", refresh_token="rt-9", expires_at=LATER)

        release = flow.send(rewritten)

        assert Save(rewritten.replace(lease_owner=None, lease_until=None)) == release
        assert credentials_of(rewritten) == finish(flow, stored_as(release, "3"))

    def test_a_conflict_on_that_release_rereads(self, policy: Policy) -> None:
        """The lease release loses its compare-and-swap: re-read and judge again."""
        flow = get_flow(policy, KEY)
        leased, _ = to_send(flow, record())
        flow.send(refused())
        flow.send(leased.replace(access_token="at-9", refresh_token="rt-9", expires_at=LATER))
        assert Load(KEY) == flow.throw(ConflictError("moved", key=KEY))
        peer = record("at-9", "rt-9", expires_at=LATER, version="4")

        assert credentials_of(peer) == finish(flow, peer)

    def test_nothing_newer_marks_needs_reauth_and_raises(self, policy: Policy) -> None:
        """invalid_grant, the same token stored, an empty journal: needs_reauth, ReauthRequired."""
        flow = get_flow(policy, KEY)
        leased, _ = to_send(flow, record())
        flow.send(refused())
        assert JournalPending(KEY, rescan=True) == flow.send(leased)
        mark = flow.send([])
        assert Save(
            leased.replace(
                status=Status.NEEDS_REAUTH,
                lease_owner=None,
                lease_until=None,
                failures=1,
                last_error="invalid_grant",
            )
        ) == (mark)

        with pytest.raises(ReauthRequired, match=KEY):
            flow.send(stored_as(mark, "3"))

    def test_a_conflict_on_marking_needs_reauth_rereads(self, policy: Policy) -> None:
        """Marking needs_reauth loses its compare-and-swap: re-read before condemning again."""
        flow = get_flow(policy, KEY)
        leased, _ = to_send(flow, record())
        flow.send(refused())
        flow.send(leased)
        flow.send([])

        assert Load(KEY) == flow.throw(ConflictError("moved", key=KEY))

    def test_a_journalled_answer_is_restored_and_adopted(self, policy: Policy) -> None:
        """invalid_grant and a rescue entry for the stored token: restore it, then use it."""
        entry = rescue()
        flow = get_flow(policy, KEY)
        leased, _ = to_send(flow, record())
        flow.send(refused())
        assert JournalPending(KEY, rescan=True) == flow.send(leased)
        assert Load(KEY) == flow.send([entry])
        restore = flow.send(leased)
        assert Save(obtained("at-2", "rt-2", expires_at=rotated().expires_at, version="2")) == (
            restore
        )
        restored = stored_as(restore, "3")
        assert JournalDiscard(entry) == flow.send(restored)
        assert Load(KEY) == flow.send(None)

        assert rotated() == finish(flow, restored)

    def test_a_record_deleted_meanwhile_raises_credential_not_found(self, policy: Policy) -> None:
        """invalid_grant and the record gone: CredentialNotFound naming the key."""
        flow = get_flow(policy, KEY)
        to_send(flow, record())
        flow.send(refused())

        with pytest.raises(CredentialNotFound, match=KEY):
            flow.send(None)


class TestStoreWrite:
    def test_an_unwritable_journal_still_stores_the_tokens(self, policy: Policy) -> None:
        """The journal write fails: the store write follows, and there is no entry to drop."""
        flow = get_flow(policy, KEY)
        to_send(flow, record())
        assert isinstance(flow.send(httpx.Response(200, json=ROTATED)), JournalWrite)
        assert Deadline(WRITE_UNTIL) == flow.throw(OSError("read-only file system"))
        save = flow.send(None)

        assert rotated() == finish(flow, stored_as(save, "3"))

    def test_a_lease_taken_over_meanwhile_is_written_over(self, policy: Policy) -> None:
        """The write conflicts but the store holds the token we used: write again, at once."""
        flow = get_flow(policy, KEY)
        leased, entry = to_store_write(flow, record())
        assert Load(KEY) == flow.throw(ConflictError("moved", key=KEY))
        taken = leased.replace(lease_owner="peer", version="3")

        again = flow.send(taken)

        assert Save(obtained("at-2", "rt-2", expires_at=rotated().expires_at, version="3")) == again
        assert JournalDiscard(entry) == flow.send(stored_as(again, "4"))

    def test_a_login_stored_meanwhile_wins(self, policy: Policy) -> None:
        """The write conflicts with other tokens stored (a new login): drop ours, use theirs."""
        flow = get_flow(policy, KEY)
        _, entry = to_store_write(flow, record())
        flow.throw(ConflictError("moved", key=KEY))
        login = record("at-9", "rt-9", expires_at=LATER, version="5")

        assert JournalDiscard(entry) == flow.send(login)
        assert Deadline(DEADLINE) == flow.send(None)
        assert credentials_of(login) == finish(flow, None)

    def test_a_record_deleted_meanwhile_keeps_the_entry_on_disk_and_raises(
        self, policy: Policy
    ) -> None:
        """The write conflicts and the record reads as gone: CredentialNotFound, the entry is
        no longer offered but stays on disk, since a read that found nothing for a moment must
        not delete the only copy of the new refresh token."""
        flow = get_flow(policy, KEY)
        _, entry = to_store_write(flow, record())
        flow.throw(ConflictError("moved", key=KEY))

        assert JournalForget(entry) == flow.send(None)
        with pytest.raises(CredentialNotFound, match=KEY):
            flow.send(None)

    def test_write_conflicts_past_the_lease_raise_store_contention(
        self, policy: Policy, clock: FakeClock
    ) -> None:
        """Conflicting writes until the lease runs out: StoreContention, tokens left journalled."""
        flow = get_flow(policy, KEY)
        leased, _ = to_store_write(flow, record())
        clock.advance(TTL)
        flow.throw(ConflictError("moved", key=KEY))

        with pytest.raises(StoreContention, match="kept in the rescue journal"):
            flow.send(leased.replace(lease_owner="peer", version="3"))

    def test_a_brief_store_outage_is_ridden_out(self, policy: Policy) -> None:
        """The store write fails once: sleep, write again, drop the journal entry."""
        flow = get_flow(policy, KEY)
        _, entry = to_store_write(flow, record())

        sleep = flow.throw(StoreUnavailable("down", key=KEY))

        assert isinstance(sleep, Sleep)
        save = flow.send(None)
        assert isinstance(save, Save)
        assert JournalDiscard(entry) == flow.send(stored_as(save, "3"))

    def test_a_store_down_for_every_retry_raises_store_unavailable(self, policy: Policy) -> None:
        """The store write fails three times: StoreUnavailable, the tokens kept in the journal."""
        flow = get_flow(policy, KEY)
        to_store_write(flow, record())
        for _ in range(2):
            assert isinstance(flow.throw(StoreUnavailable("down", key=KEY)), Sleep)
            assert isinstance(flow.send(None), Save)

        with pytest.raises(StoreUnavailable, match=r"were not stored.*rescue journal"):
            flow.throw(StoreUnavailable("down", key=KEY))

    def test_a_store_down_past_the_lease_raises_at_once(
        self, policy: Policy, clock: FakeClock
    ) -> None:
        """A failed write with no time left before the lease ends is not retried."""
        flow = get_flow(policy, KEY)
        to_store_write(flow, record())
        clock.advance(WRITE_UNTIL - START - timedelta(seconds=0.1))

        with pytest.raises(StoreUnavailable, match="were not stored"):
            flow.throw(StoreUnavailable("down", key=KEY))

    def test_a_store_down_without_journal_says_the_tokens_are_lost(self, policy: Policy) -> None:
        """Neither journal nor store took the tokens: the message says a new login may be due."""
        flow = get_flow(policy, KEY)
        to_send(flow, record())
        flow.send(httpx.Response(200, json=ROTATED))
        flow.throw(OSError("read-only file system"))
        flow.send(None)
        for _ in range(2):
            flow.throw(StoreUnavailable("down", key=KEY))
            flow.send(None)

        with pytest.raises(StoreUnavailable, match="may have to log in again"):
            flow.throw(StoreUnavailable("down", key=KEY))


class TestRescues:
    def test_a_journalled_answer_for_the_stored_token_is_restored(self, policy: Policy) -> None:
        """A rescue entry replacing the stored refresh token is written, then dropped."""
        entry = rescue()
        due = record()
        flow = get_flow(policy, KEY)
        assert Deadline(DEADLINE) == next(flow)
        assert JournalPending(KEY) == flow.send(None)
        assert Load(KEY) == flow.send([entry])
        restore = flow.send(due)
        assert Save(obtained("at-2", "rt-2", expires_at=rotated().expires_at, version="1")) == (
            restore
        )
        assert JournalDiscard(entry) == flow.send(stored_as(restore))
        assert Load(KEY) == flow.send(None)

        assert rotated() == finish(flow, stored_as(restore))

    def test_restored_tokens_keep_the_time_they_were_obtained(self, policy: Policy) -> None:
        """Tokens journalled an hour ago are stored with refreshed_at an hour ago, not now."""
        entry = dataclasses.replace(rescue(), created_at=START - timedelta(hours=1))
        flow = get_flow(policy, KEY)
        next(flow)
        flow.send(None)
        assert Load(KEY) == flow.send([entry])

        restore = flow.send(record())

        assert isinstance(restore, Save)
        assert START - timedelta(hours=1) == restore.record.refreshed_at

    def test_an_entry_whose_tokens_are_stored_is_dropped(self, policy: Policy) -> None:
        """A rescue entry the store already holds is deleted, with no write."""
        entry = rescue()
        flow = get_flow(policy, KEY)
        next(flow)
        flow.send(None)
        assert Load(KEY) == flow.send([entry])

        assert JournalDiscard(entry) == flow.send(record("at-2", "rt-2"))
        assert Load(KEY) == flow.send(None)

    def test_an_entry_for_a_key_this_store_lacks_is_left_alone(self, policy: Policy) -> None:
        """An entry for an absent key may be another store's only copy: forgotten, not deleted."""
        entry = rescue()
        flow = get_flow(policy, KEY)
        next(flow)
        flow.send(None)
        flow.send([entry])

        assert JournalForget(entry) == flow.send(None)
        assert Load(KEY) == flow.send(None)

    def test_an_entry_for_another_token_is_left_alone(self, policy: Policy) -> None:
        """An entry replacing a token the store does not hold (an older login) is forgotten."""
        entry = rescue(replaces="rt-0")
        flow = get_flow(policy, KEY)
        next(flow)
        flow.send(None)
        flow.send([entry])

        assert JournalForget(entry) == flow.send(record())
        assert Load(KEY) == flow.send(None)

    def test_a_conflict_on_restoring_rereads_at_once(self, policy: Policy) -> None:
        """Restoring a rescue entry loses its compare-and-swap: re-read with no wait."""
        flow = get_flow(policy, KEY)
        next(flow)
        flow.send(None)
        flow.send([rescue()])
        flow.send(record())

        assert Load(KEY) == flow.throw(ConflictError("moved", key=KEY))

    def test_a_failing_journal_is_logged_and_passed_by(
        self, policy: Policy, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A journal that cannot be read does not fail the call: logged, then the store is read."""
        flow = get_flow(policy, KEY)
        next(flow)
        assert JournalPending(KEY) == flow.send(None)

        with caplog.at_level(logging.WARNING, logger="credkeeper"):
            assert Load(KEY) == flow.throw(PermissionError("journal"))

        assert "the rescue journal failed (PermissionError: journal)" in caplog.text


class TestPut:
    def test_a_new_key_is_created(self, policy: Policy) -> None:
        """put_flow on an absent key writes an active record with no version."""
        login = rotated()
        flow = put_flow(policy, KEY, login)
        assert Deadline(DEADLINE) == next(flow)
        assert Load(KEY) == flow.send(None)
        save = flow.send(None)
        assert Save(obtained("at-2", "rt-2", expires_at=login.expires_at, version=None)) == save

        assert True is finish(flow, stored_as(save))

    def test_a_condemned_record_is_replaced_and_made_active(self, policy: Policy) -> None:
        """put_flow over a needs_reauth record writes an active one on its version."""
        login = rotated()
        flow = put_flow(policy, KEY, login)
        next(flow)
        flow.send(None)

        save = flow.send(record(status=Status.NEEDS_REAUTH, version="4", failures=2))

        assert Save(obtained("at-2", "rt-2", expires_at=login.expires_at, version="4")) == save

    def test_a_replaced_record_is_not_reported_created(self, policy: Policy) -> None:
        """put_flow over a stored record returns False: it replaced, it did not create."""
        flow = put_flow(policy, KEY, rotated())
        next(flow)
        flow.send(None)
        save = flow.send(record(version="4"))

        assert False is finish(flow, stored_as(save))

    def test_a_lost_create_is_a_replace(self, policy: Policy) -> None:
        """A create that lost to another writer's rereads, and its write is no create."""
        flow = put_flow(policy, KEY, rotated())
        next(flow)
        flow.send(None)
        flow.send(None)
        flow.throw(ConflictError("created meanwhile", key=KEY))
        save = flow.send(record(version="1"))

        assert False is finish(flow, stored_as(save))

    def test_a_conflict_rereads_at_once_then_backs_off(self, policy: Policy) -> None:
        """The first conflict re-reads with no wait; the second sleeps first."""
        flow = put_flow(policy, KEY, rotated())
        next(flow)
        flow.send(None)
        flow.send(None)
        assert Load(KEY) == flow.throw(ConflictError("moved", key=KEY))
        flow.send(record())

        assert isinstance(flow.throw(ConflictError("moved", key=KEY)), Sleep)

    def test_conflicts_until_the_deadline_raise_store_contention(
        self, policy: Policy, clock: FakeClock
    ) -> None:
        """Conflicts past the deadline: StoreContention saying which step kept failing."""
        flow = put_flow(policy, KEY, rotated())
        next(flow)
        flow.send(None)
        flow.send(None)
        clock.advance(TIMEOUT + timedelta(seconds=1))

        with pytest.raises(StoreContention, match="storing the credentials for key 'alice'"):
            flow.throw(ConflictError("moved", key=KEY))


class TestDelete:
    def test_delete_drops_this_store_entries_and_forgets_the_others(self, policy: Policy) -> None:
        """Entries replacing the deleted token are deleted; others are only forgotten."""
        mine, other = rescue(), rescue(replaces="rt-0", entry_id="0002")
        flow = delete_flow(policy, KEY)
        assert Deadline(DEADLINE) == next(flow)
        assert Load(KEY) == flow.send(None)
        assert Remove(KEY) == flow.send(record())
        assert JournalPending(KEY) == flow.send(True)
        assert JournalDiscard(mine) == flow.send([mine, other])
        assert JournalForget(other) == flow.send(None)

        assert finish(flow, None) is True

    def test_delete_of_an_absent_key_reports_nothing_removed(self, policy: Policy) -> None:
        """Deleting a key never stored removes nothing and says so."""
        flow = delete_flow(policy, KEY)
        next(flow)
        flow.send(None)
        assert Remove(KEY) == flow.send(None)
        assert JournalPending(KEY) == flow.send(False)

        assert finish(flow, []) is False

    def test_an_unreadable_record_is_removed_all_the_same(self, policy: Policy) -> None:
        """A record sealed under a key this policy lacks is still removed; entries forgotten."""
        entry = rescue()
        sealed = KeyRing.generate().seal("rt-1", key=KEY, field="refresh_token")
        flow = delete_flow(policy, KEY)
        next(flow)
        flow.send(None)
        assert Remove(KEY) == flow.send(record(refresh=sealed))
        flow.send(True)

        assert JournalForget(entry) == flow.send([entry])

    def test_a_damaged_record_is_removed_all_the_same(self, policy: Policy) -> None:
        """The store cannot read the record back: it is removed; its entries forgotten."""
        entry = rescue()
        flow = delete_flow(policy, KEY)
        assert Deadline(DEADLINE) == next(flow)
        assert Load(KEY) == flow.send(None)
        assert Remove(KEY) == flow.throw(StoreCorrupted("damaged", key=KEY))
        flow.send(True)

        assert JournalForget(entry) == flow.send([entry])
        assert finish(flow, None) is True

    def test_a_failing_journal_does_not_fail_the_delete(self, policy: Policy) -> None:
        """The journal cannot be read: the record is removed all the same."""
        flow = delete_flow(policy, KEY)
        next(flow)
        flow.send(None)
        flow.send(record())
        assert JournalPending(KEY) == flow.send(True)

        assert finish_after(flow, OSError("journal")) is True


class Reversing:
    """An application's codec: the token reversed behind a prefix."""

    def seal(self, plaintext: str, *, key: str, field: str) -> str:
        return "rev:" + plaintext[::-1]

    def unseal(self, sealed: str, *, key: str, field: str) -> str:
        if not sealed.startswith("rev:"):
            raise ValueError(f"not sealed: {sealed}")
        return sealed[4:][::-1]


class Answering:
    """A codec that answers ``answer`` (or raises it) from both methods."""

    def __init__(self, answer: object) -> None:
        self.answer = answer

    def seal(self, plaintext: str, *, key: str, field: str) -> str:
        return self._give()

    def unseal(self, sealed: str, *, key: str, field: str) -> str:
        return self._give()

    def _give(self) -> Any:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class TestPolicy:
    def test_sealed_tokens_are_opened_with_the_key_ring(self, clock: FakeClock) -> None:
        """Token fields sealed by the key ring come back in clear."""
        ring = KeyRing.generate()
        policy = make_policy(clock, keyring=ring, codec=ring)
        sealed = record(
            ring.seal("at-1", key=KEY, field="access_token"),
            ring.seal("rt-1", key=KEY, field="refresh_token"),
        )

        assert credentials_of(record()) == policy.credentials(sealed)

    def test_sealed_tokens_without_a_key_ring_name_the_option(self, policy: Policy) -> None:
        """A sealed token and no key ring: ConfigurationError saying to pass keyring=."""
        sealed = record(KeyRing.generate().seal("at-1", key=KEY, field="access_token"))

        with pytest.raises(ConfigurationError, match="pass keyring="):
            policy.credentials(sealed)

    def test_plain_tokens_under_a_key_ring_are_refused(self, clock: FakeClock) -> None:
        """With a key ring sealing, a plain-text token is StoreCorrupted naming the fix."""
        ring = KeyRing.generate()
        policy = make_policy(clock, keyring=ring, codec=ring)

        with pytest.raises(StoreCorrupted, match="accept_plaintext=True"):
            policy.credentials(record())

    def test_accepted_plain_tokens_are_reported_once_per_key(
        self, clock: FakeClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """accept_plaintext opens plain tokens, with one WARNING per key, not per field or call."""
        ring = KeyRing.generate()
        policy = make_policy(clock, keyring=ring, codec=ring, accept_plaintext=True)

        with caplog.at_level(logging.WARNING, logger="credkeeper"):
            opened_twice = [policy.credentials(record()) for _ in range(2)]

        assert [credentials_of(record())] * 2 == opened_twice
        assert 1 == len(caplog.records)

    def test_an_application_codec_opens_and_seals(self, clock: FakeClock) -> None:
        """The application's codec unseals what it stores and seals what the flow writes."""
        policy = make_policy(clock, codec=Reversing())
        stored = record("rev:1-ta", "rev:1-tr")

        plain = policy.credentials(stored)
        written = policy.record(KEY, plain, base=stored)

        assert credentials_of(record()) == plain
        assert (stored.access_token, stored.refresh_token) == (
            written.access_token,
            written.refresh_token,
        )

    @pytest.mark.parametrize("answer", [ValueError("cannot open at-1"), "", None])
    def test_a_codec_that_cannot_open_is_one_opaque_error(
        self, clock: FakeClock, answer: object
    ) -> None:
        """A codec raising, or giving no non-empty str, is a DecryptionError naming the field."""
        policy = make_policy(clock, codec=Answering(answer))

        with pytest.raises(DecryptionError, match="access_token under key 'alice'") as caught:
            policy.credentials(record())
        assert "at-1" not in str(caught.value)

    def test_a_codec_raising_a_credkeeper_error_is_not_masked(self, clock: FakeClock) -> None:
        """A codec's own StoreUnavailable (its key service down) reaches the caller as it is."""
        policy = make_policy(clock, codec=Answering(StoreUnavailable("kms down")))

        with pytest.raises(StoreUnavailable, match="kms down"):
            policy.credentials(record())

    @pytest.mark.parametrize(
        ("answer", "reason"),
        [(RuntimeError("kms down for at-1"), "RuntimeError"), ("", "not a non-empty str")],
    )
    def test_a_codec_that_cannot_seal_is_a_store_write_that_failed(
        self, clock: FakeClock, answer: object, reason: str
    ) -> None:
        """A codec failing to seal is StoreUnavailable naming the codec and field, not the token."""
        policy = make_policy(clock, codec=Answering(answer))

        with pytest.raises(StoreUnavailable, match=rf"seal the access_token .*{reason}") as caught:
            policy.record(KEY, credentials_of(record()), base=None)
        assert "at-1" not in str(caught.value)

    def test_fresh_means_valid_beyond_the_leeway(self, policy: Policy) -> None:
        """A token expiring in 16 minutes is fresh; one expiring in 14 minutes is not."""
        assert (True, False) == (
            policy.fresh(credentials_of(record(expires_at=START + timedelta(minutes=16)))),
            policy.fresh(credentials_of(record(expires_at=START + timedelta(minutes=14)))),
        )

    def test_cooldowns_double_up_to_the_cap_and_never_undercut_retry_after(
        self, policy: Policy
    ) -> None:
        """30 s, 60 s, 120 s ... capped at 10 minutes; a longer Retry-After wins."""
        seconds = [policy.cooldown_for(n, None).total_seconds() for n in (1, 2, 3, 20)]

        assert [30.0, 60.0, 120.0, 600.0] == seconds
        assert 900.0 == policy.cooldown_for(1, 900.0).total_seconds()


def watched(clock: FakeClock) -> tuple[Policy, list[tuple[str, str | None, float | None]]]:
    """A policy whose events hook records (kind, outcome, duration) of each event for KEY."""
    seen: list[tuple[str, str | None, float | None]] = []

    def hook(event: RefreshEvent) -> None:
        assert KEY == event.key
        seen.append((event.kind.value, event.outcome, event.duration))

    return make_policy(clock, events=hook), seen


class TestEvents:
    def test_a_refresh_reports_its_start_the_provider_call_and_its_success(
        self, clock: FakeClock
    ) -> None:
        """Lease taken, a 2 s provider answer, stored: started, provider_call, succeeded."""
        policy, seen = watched(clock)
        flow = get_flow(policy, KEY)
        to_send(flow, record())
        clock.advance(2)
        flow.send(httpx.Response(200, json=ROTATED))
        flow.send(None)
        save = flow.send(None)
        flow.send(stored_as(save, "3"))

        assert rotated(START + timedelta(seconds=2)) == finish(flow, None)
        assert [
            ("refresh_started", None, None),
            ("provider_call", "ok", 2.0),
            ("refresh_succeeded", "ok", 2.0),
        ] == seen

    def test_a_valid_record_reports_nothing(self, clock: FakeClock) -> None:
        """No refresh, no event."""
        policy, seen = watched(clock)
        flow = get_flow(policy, KEY)
        assert Deadline(DEADLINE) == next(flow)
        flow.send(None)
        flow.send([])
        finish(flow, record(expires_at=LATER))

        assert [] == seen

    def test_a_lost_race_reports_the_adoption(self, clock: FakeClock) -> None:
        """invalid_grant with a peer's tokens stored: adopted, and the refresh ends adopted."""
        policy, seen = watched(clock)
        flow = get_flow(policy, KEY)
        to_send(flow, record())
        flow.send(refused())
        finish(flow, record("at-9", "rt-9", expires_at=LATER, version="3"))

        assert [
            ("refresh_started", None, None),
            ("provider_call", "invalid_grant", 0.0),
            ("adopted", None, None),
            ("refresh_succeeded", "adopted", 0.0),
        ] == seen

    def test_a_login_over_a_condemned_record_reports_recovered(self, clock: FakeClock) -> None:
        """put_flow replacing a needs_reauth record reports recovered, once it is stored."""
        policy, seen = watched(clock)
        flow = put_flow(policy, KEY, rotated())
        next(flow)
        flow.send(None)
        save = flow.send(record(status=Status.NEEDS_REAUTH, version="4"))
        assert [] == seen

        finish(flow, stored_as(save, "5"))

        assert [("recovered", None, None)] == seen

    def test_a_login_over_an_active_record_reports_nothing(self, clock: FakeClock) -> None:
        """Replacing an active credential is no recovery: no event."""
        policy, seen = watched(clock)
        flow = put_flow(policy, KEY, rotated())
        next(flow)
        flow.send(None)
        save = flow.send(record(version="4"))

        finish(flow, stored_as(save, "5"))

        assert [] == seen

    def test_a_delete_that_removed_the_record_reports_deleted(self, clock: FakeClock) -> None:
        """delete_flow reports deleted when its removal took the record away."""
        policy, seen = watched(clock)
        flow = delete_flow(policy, KEY)
        next(flow)
        flow.send(None)
        flow.send(record())
        flow.send(True)
        finish(flow, [])

        assert [("deleted", None, None)] == seen

    def test_a_delete_that_found_nothing_reports_nothing(self, clock: FakeClock) -> None:
        """A peer removed it first (or it never existed): no event from this delete."""
        policy, seen = watched(clock)
        flow = delete_flow(policy, KEY)
        next(flow)
        flow.send(None)
        flow.send(None)
        flow.send(False)
        finish(flow, [])

        assert [] == seen

    def test_a_rescue_over_a_condemned_record_reports_recovered(self, clock: FakeClock) -> None:
        """Journalled tokens restored over a needs_reauth record: journal_rescue, recovered."""
        policy, seen = watched(clock)
        flow = get_flow(policy, KEY)
        next(flow)
        flow.send(None)
        assert Load(KEY) == flow.send([rescue()])
        restore = flow.send(record(status=Status.NEEDS_REAUTH))
        flow.send(stored_as(restore))

        assert [("journal_rescue", None, None), ("recovered", None, None)] == seen

    def test_a_dead_credential_reports_reauth_required(self, clock: FakeClock) -> None:
        """invalid_grant and nothing newer: reauth_required, then the refresh fails so."""
        policy, seen = watched(clock)
        flow = get_flow(policy, KEY)
        leased, _ = to_send(flow, record())
        flow.send(refused())
        flow.send(leased)
        mark = flow.send([])
        with pytest.raises(ReauthRequired):
            flow.send(stored_as(mark, "3"))

        assert [
            ("refresh_started", None, None),
            ("provider_call", "invalid_grant", 0.0),
            ("reauth_required", None, None),
            ("refresh_failed", "invalid_grant", 0.0),
        ] == seen

    def test_a_provider_down_to_the_deadline_reports_failure_and_cooldown(
        self, clock: FakeClock
    ) -> None:
        """A 429 with no time left: throttled call, failed unavailable, a 30 s cooldown."""
        policy, seen = watched(clock)
        flow = get_flow(policy, KEY)
        to_send(flow, record())
        clock.advance(15)
        release = flow.send(httpx.Response(429))
        finish(flow, stored_as(release, "3"))

        assert [
            ("refresh_started", None, None),
            ("provider_call", "throttled", 15.0),
            ("cooldown", "HTTP 429", 30.0),
            ("refresh_failed", "unavailable", 15.0),
        ] == seen

    def test_a_refused_request_reports_a_provider_error(self, clock: FakeClock) -> None:
        """A 400 other than invalid_grant: error call, cooldown, failed provider_error."""
        policy, seen = watched(clock)
        flow = get_flow(policy, KEY)
        to_send(flow, record())
        release = flow.send(refused("invalid_request"))
        with pytest.raises(ProviderError):
            flow.send(stored_as(release, "3"))

        assert [
            ("refresh_started", None, None),
            ("provider_call", "error", 0.0),
            ("cooldown", "HTTP 400", 30.0),
            ("refresh_failed", "provider_error", 0.0),
        ] == seen

    def test_a_lease_conflict_is_reported(self, clock: FakeClock) -> None:
        """The lease's compare-and-swap lost: lease_conflict, and no refresh started."""
        policy, seen = watched(clock)
        flow = get_flow(policy, KEY)
        opened(flow, record())
        flow.send(None)
        flow.throw(ConflictError("moved", key=KEY))
        finish(flow, record("at-9", "rt-9", expires_at=LATER, version="3"))

        assert [("lease_conflict", None, None)] == seen

    def test_a_store_down_after_the_answer_reports_store_unavailable(
        self, clock: FakeClock
    ) -> None:
        """The store refuses the new tokens every time: the refresh fails store_unavailable."""
        policy, seen = watched(clock)
        flow = get_flow(policy, KEY)
        to_store_write(flow, record())
        for _ in range(2):
            flow.throw(StoreUnavailable("down", key=KEY))
            flow.send(None)
        with pytest.raises(StoreUnavailable):
            flow.throw(StoreUnavailable("down", key=KEY))

        assert ("refresh_failed", "store_unavailable", 0.0) == seen[-1]
        assert 1 == sum(
            kind.startswith("refresh_") and kind != "refresh_started" for kind, *_ in seen
        )

    def test_a_restored_rescue_entry_is_reported(self, clock: FakeClock) -> None:
        """Tokens written from the rescue journal: journal_rescue."""
        policy, seen = watched(clock)
        entry = rescue()
        flow = get_flow(policy, KEY)
        next(flow)
        flow.send(None)
        flow.send([entry])
        restore = flow.send(record())
        flow.send(stored_as(restore))
        flow.send(None)
        finish(flow, stored_as(restore))

        assert [("journal_rescue", None, None)] == seen

    def test_a_salvaged_answer_ends_the_refresh_once_as_failed(self, clock: FakeClock) -> None:
        """A rotated answer without an access token is stored, and the refresh ends failed."""
        policy, seen = watched(clock)
        flow = get_flow(policy, KEY)
        to_send(flow, record())
        flow.send(httpx.Response(200, json={"refresh_token": "rt-2", "expires_in": 60}))
        flow.send(None)
        save = flow.send(None)
        flow.send(stored_as(save, "3"))
        with pytest.raises(ProviderError):
            flow.send(None)

        assert [
            ("refresh_started", None, None),
            ("provider_call", "error", 0.0),
            ("refresh_failed", "provider_error", 0.0),
        ] == seen

    def test_a_failing_hook_is_logged_and_the_refresh_goes_on(
        self, clock: FakeClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A hook that raises costs a warning naming its error type, not the refresh."""

        def broken(event: RefreshEvent) -> None:
            raise RuntimeError("exporter down")

        flow = get_flow(make_policy(clock, events=broken), KEY)
        with caplog.at_level(logging.WARNING, logger="credkeeper"):
            to_send(flow, record())

        assert "events hook raised RuntimeError on refresh_started" in caplog.text

    def test_a_flow_closed_mid_refresh_ends_it_as_interrupted(self, clock: FakeClock) -> None:
        """A call interrupted while the provider answers: the refresh still ends, once."""
        policy, seen = watched(clock)
        flow = get_flow(policy, KEY)
        to_send(flow, record())

        flow.close()

        assert [("refresh_started", None, None), ("refresh_failed", "interrupted", 0.0)] == seen

    def test_a_cooling_down_token_served_is_a_deferred_refresh(self, clock: FakeClock) -> None:
        """A due token served under a cooldown: refresh_deferred, and no refresh started."""
        policy, seen = watched(clock)
        cooling = record(cooldown_until=START + timedelta(seconds=30), failures=1)
        flow = get_flow(policy, KEY)
        assert StoreNow() == opened(flow, cooling)

        assert credentials_of(cooling) == finish(flow, None)
        assert [("refresh_deferred", "cooldown", None)] == seen
