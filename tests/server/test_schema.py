"""schemathesis against ``credkeeper serve``'s own ``/openapi.json``: no server error, and every
answer exactly as the document declares it (status, content type, headers and body).

Each operation the document lists is one test, run against a real service process: inputs
generated from the document, valid ones and invalid ones, sent with an API key holding every
scope, over a few stored credentials (one fresh, one under a key holding ``/``, one its user
must log in again for) and the fake wrapper behind the messages route. Every answer goes
through schemathesis's checks but two (``EXCLUDED_CHECKS``, with the reason).

The operations are listed here rather than read from the document when tests are collected:
the document comes from the service, which a fixture starts, and schemathesis's own way to load
a schema from a fixture (``schemathesis.pytest.from_fixture``) fails on this pytest. So each
operation's cases are drawn with ``as_strategy`` under ``hypothesis.given``, and
:func:`test_every_operation_is_tested` fails when the list and the document differ, so that no
route is ever left out silently.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode

from credkeeper import Credentials
from credkeeper.server._apikeys import SCOPES
from credkeeper.testing import FakeProvider

from .conftest import Service

#: Every operation of the service's document, as schemathesis labels them.
OPERATIONS = (
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /v1/users/{key}/credentials",
    "PUT /v1/users/{key}/credentials",
    "DELETE /v1/users/{key}/credentials",
    "POST /v1/users/{key}/credentials/refresh",
    "GET /v1/users/{key}",
    "GET /v1/users",
    "POST /v1/users/{key}/messages",
)

#: Operations that take no input at all: there is nothing for a negative case to get wrong.
NO_INPUT = frozenset({"GET /healthz", "GET /readyz"})

#: The keys the service holds credentials under, given to the key-taking operations beside the
#: keys schemathesis makes up (which mostly name nothing, and so test the 404s).
FRESH, NESTED, NEEDS_REAUTH = "alice", "team/bob", "carol"

#: Examples per operation and mode: ~700 requests in all, well under a minute on two cores.
EXAMPLES = 40


# Not run: two checks about which inputs are valid rather than about answers.
# positive_data_acceptance wants every input the document allows accepted, and
# negative_data_rejection every other input refused. Both need the document to state every rule
# of the input exactly, which JSON Schema cannot for a credential key (printable, as
# str.isprintable says) or a page cursor (one the service made), and which the service does not
# want for a query parameter no route knows (ignored, as HTTP services do). What the service
# answers to any input, valid or not, is still checked: a status, content type, headers and body
# the document declares, and never a server error.
EXCLUDED_CHECKS = [
    schemathesis.checks.positive_data_acceptance,
    schemathesis.checks.negative_data_rejection,
]


@pytest.fixture
def api_key(new_api_key: Callable[..., str]) -> str:
    """An API key holding every scope, so that every route is reached."""
    return new_api_key("schema", *sorted(SCOPES))


@pytest.fixture
def seeded(login: Callable[..., Credentials], fake: FakeProvider) -> None:
    """The credentials the service starts with: fresh, fresh under a nested key, and one whose
    refresh token the provider refuses, due now."""
    login(FRESH)
    login(NESTED)
    fake.revoke(login(NEEDS_REAUTH, expires_in=0))


@pytest.fixture
def keyed_service(
    start_service: Callable[..., Service], api_keys_file: Path, api_key: str, seeded: None
) -> Service:
    """The service requiring API keys, over the seeded credentials and the fake wrapper."""
    return start_service("--no-sweep", "--api-keys", str(api_keys_file))


@pytest.fixture
def api_schema(keyed_service: Service) -> schemathesis.BaseSchema:
    """The service's own API document, as it serves it."""
    return schemathesis.openapi.from_url(f"{keyed_service.url}/openapi.json")


def cases(
    schema: schemathesis.BaseSchema, label: str, mode: GenerationMode
) -> st.SearchStrategy[Case[Any]]:
    """Cases for one operation: on made-up keys, and on each seeded key when it takes one."""
    operation = schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the document"
    strategies = [operation.as_strategy(mode)]
    if "{key}" in operation.path:
        strategies += [
            operation.as_strategy(mode, path_parameters={"key": key})
            for key in (FRESH, NESTED, NEEDS_REAUTH)
        ]
    return st.one_of(strategies)


@pytest.mark.parametrize("label", OPERATIONS)
def test_answers_conform_to_the_document(
    label: str, api_schema: schemathesis.BaseSchema, keyed_service: Service, api_key: str
) -> None:
    """Generated requests, valid and invalid, get no server error and only declared answers."""
    modes = [GenerationMode.POSITIVE]
    if label not in NO_INPUT:
        modes.append(GenerationMode.NEGATIVE)
    for mode in modes:

        @given(case=cases(api_schema, label, mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            # Every operation's function is this same code: examples saved for one would be
            # replayed on another.
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        def conforms(case: Case[Any]) -> None:
            case.call_and_validate(
                base_url=keyed_service.url,
                headers={"Authorization": f"Bearer {api_key}"},
                excluded_checks=EXCLUDED_CHECKS,
                timeout=30,
            )

        conforms()


def test_every_operation_is_tested(keyed_service: Service) -> None:
    """The operations tested here are exactly those the service's document lists."""
    document = httpx.get(f"{keyed_service.url}/openapi.json", timeout=30).json()
    listed = {
        f"{method.upper()} {path}"
        for path, methods in document["paths"].items()
        for method in methods
    }
    tested = [item if isinstance(item, str) else item.values[0] for item in OPERATIONS]
    assert sorted(listed) == sorted(tested)
