"""The service's storm: 4 ``credkeeper serve`` processes on one PostgreSQL table, 64 clients,
20 expiries: one provider refresh per expiry, every call answered.

The fake provider rotates single-use refresh tokens and revokes the whole family when one is
used twice, so two replicas refreshing the same expiry would show at the provider as
``invalid_grant``, then as every later call refused. Expiries come in real time: the provider
issues access tokens for the service's leeway plus :data:`DUE_AFTER`, so each becomes due that
long after the refresh that got it. The leeway is the manager's default: ``credkeeper serve``
has no option or ``CREDKEEPER_*`` variable for it, so the token lifetime is what is set here.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise

import httpx
import pytest

from credkeeper._manager import DEFAULT_LEEWAY
from credkeeper.testing import FakeProvider, RefreshCall
from tests.adapters.sql.conftest import _with_table
from tests.server import conftest as server
from tests.server.conftest import Service

# tests/server's fixtures that start_service needs, here on this module's provider and store.
api_keys_made = server.api_keys_made
keyring = server.keyring
keys_file = server.keys_file
start_service = server.start_service

REPLICAS = 4
CLIENTS = 64
EXPIRIES = 20
#: The credential's routes: its key holds "/", sent percent-encoded as one path segment.
USER = "/v1/users/storm%2Fuser"
HELLO = {"messages": [{"role": "user", "content": "Hello"}]}
#: How long after its refresh an access token becomes due: its lifetime less the leeway.
DUE_AFTER = 1.0
#: The provider's latency, so that refreshes two replicas raced would overlap there.
LATENCY = 0.2
# A refresh comes at least DUE_AFTER after the one before it ended, a second refresh of the
# same expiry within a provider round trip of it. The slack covers the milliseconds the store
# keeps times in and the clocks of the processes on one host.
SLACK = 0.1
# Time enough for the expiries on two busy cores; a storm that stalls fails instead of hanging.
DEADLINE = 120.0


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    """The provider: single-use refresh tokens, family revocation on reuse, short lifetimes."""
    lifetime = DEFAULT_LEEWAY.total_seconds() + DUE_AFTER
    with FakeProvider(
        latency=LATENCY, access_token_lifetime=lifetime, revoke_family_on_reuse=True
    ) as provider:
        yield provider


@pytest.fixture
def store_url(postgres_url: str) -> Iterator[str]:
    """A credkeeper table of the test's own on the PostgreSQL server, dropped afterwards."""
    yield from _with_table(postgres_url, f"ck_service_storm_{uuid.uuid4().hex[:8]}")


@dataclass
class Tally:
    """What the clients got: answers by status and problem code, and calls left unanswered."""

    answers: Counter[tuple[int, str]] = field(default_factory=Counter)
    unanswered: Counter[str] = field(default_factory=Counter)

    @property
    def refused(self) -> dict[tuple[int, str], int]:
        """The answers other than 200, by status and code."""
        return {answer: count for answer, count in self.answers.items() if answer[0] != 200}


async def client(
    number: int, service: Service, fake: FakeProvider, stop: asyncio.Event, tally: Tally
) -> None:
    """Call one replica until the storm ends: messages, and every fourth call the credentials.

    The storm ends after :data:`EXPIRIES` refreshes, or at the first call not answered 200:
    what would follow that one could only repeat it.
    """
    async with httpx.AsyncClient(base_url=service.url, timeout=30.0) as http:
        calls = number
        while not stop.is_set():
            calls += 1
            try:
                if calls % 4:
                    response = await http.post(f"{USER}/messages", json=HELLO)
                else:
                    response = await http.get(f"{USER}/credentials")
            except httpx.HTTPError as exc:
                tally.unanswered[type(exc).__name__] += 1
            else:
                tally.answers[response.status_code, problem_code(response)] += 1
            if fake.refresh_count >= EXPIRIES or tally.refused or tally.unanswered:
                stop.set()


def problem_code(response: httpx.Response) -> str:
    """The ``code`` of a problem+json answer; empty for any other."""
    if "json" not in response.headers.get("content-type", "") or response.status_code == 200:
        return ""
    return str(response.json().get("code", ""))


async def storm(services: list[Service], fake: FakeProvider) -> Tally:
    """:data:`CLIENTS` clients spread over the replicas, until the storm ends."""
    tally, stop = Tally(), asyncio.Event()
    clients = [
        asyncio.ensure_future(client(number, services[number % len(services)], fake, stop, tally))
        for number in range(CLIENTS)
    ]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), DEADLINE)
    stop.set()
    await asyncio.gather(*clients)
    return tally


def presented(call: RefreshCall) -> str:
    """The refresh token a call to the provider presented."""
    assert call.refresh_token is not None
    return call.refresh_token.get_secret_value()


@dataclass(frozen=True)
class Verdict:
    """What a storm came to, each field with one right value."""

    #: How many times the provider was called with each expired generation's refresh token.
    refreshes_per_expiry: frozenset[int]
    expiries_reached: bool
    provider_outcomes: frozenset[str]
    #: Refreshes that came before their token was due: a second refresh of an expiry.
    early_refreshes: int
    #: The state of the one family's current refresh token: "revoked" after a reuse.
    family: str
    refused: dict[tuple[int, str], int]
    unanswered: dict[str, int]
    tokens_in_logs: int


def judge(fake: FakeProvider, tally: Tally, services: list[Service]) -> Verdict:
    """The verdict on a storm, from the provider's log, the clients' tally and the logs."""
    calls = fake.refresh_calls
    # An expiry is a generation of tokens come due: its refresh token reaches the provider.
    per_expiry = Counter(presented(call) for call in calls)
    gaps = [(later.at - earlier.at).total_seconds() for earlier, later in pairwise(calls)]
    families = {call.family for call in calls if call.family is not None}
    state = f"{len(families)} families"
    if len(families) == 1:
        state = fake.refresh_token_state(fake.current_credentials(families.pop()).refresh_token)
    logs = "".join(service.output() for service in services)
    return Verdict(
        refreshes_per_expiry=frozenset(per_expiry.values()),
        expiries_reached=len(per_expiry) >= EXPIRIES,
        provider_outcomes=frozenset(call.outcome for call in calls),
        early_refreshes=sum(gap < DUE_AFTER - SLACK for gap in gaps),
        family=state,
        refused=tally.refused,
        unanswered=dict(tally.unanswered),
        tokens_in_logs=sum(token in logs for token in fake.all_tokens()),
    )


@pytest.mark.slow
def test_four_replicas_refresh_once_per_expiry(
    start_service: Callable[..., Service], fake: FakeProvider
) -> None:
    """4 replicas x 16 clients over 20 expiries: one refresh per expiry, every call answered."""
    services = [start_service("--no-sweep") for _ in range(REPLICAS)]
    with services[0].client() as http:
        assert 201 == http.put(f"{USER}/credentials", json=fake.issue().to_wrapper()).status_code

    tally = asyncio.run(storm(services, fake))

    assert Verdict(
        refreshes_per_expiry=frozenset({1}),
        expiries_reached=True,
        provider_outcomes=frozenset({"ok"}),
        early_refreshes=0,
        family="current",
        refused={},
        unanswered={},
        tokens_in_logs=0,
    ) == judge(fake, tally, services)
