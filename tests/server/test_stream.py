"""``"stream": true`` through ``credkeeper serve``: the wrapper's lines relayed as they arrive.

The fake wrapper here sends its lines apart (``stream_gap``), as a long reply would, so that a
service buffering the reply would be seen doing it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from credkeeper import Credentials
from credkeeper.testing import FakeProvider, FakeWrapper, WrapperFault

from .conftest import Service

GAP = 0.1
HELLO = {"messages": [{"role": "user", "content": "Hello"}]}
STREAM = {"messages": [{"role": "user", "content": "one two three four"}], "stream": True}


@pytest.fixture
def wrapper(fake: FakeProvider) -> Iterator[FakeWrapper]:
    """The fake wrapper, its streamed lines GAP seconds apart."""
    with FakeWrapper(fake, stream_gap=GAP) as server:
        yield server


def stream(client: httpx.Client, key: str = "alice") -> tuple[httpx.Response, list[Any]]:
    """POST a streamed messages request: the response and each line with its arrival time."""
    arrivals: list[Any] = []
    with client.stream("POST", f"/v1/users/{key}/messages", json=STREAM) as response:
        for line in response.iter_lines():
            if line:
                arrivals.append((time.monotonic(), json.loads(line)))
    return response, arrivals


def test_a_stream_answers_ndjson_ending_with_the_result(
    service: Service, login: Callable[..., Credentials]
) -> None:
    """The answer is application/x-ndjson, unbuffered by proxies, one wrapper object a line,
    the result last."""
    login("alice")
    with service.client() as client:
        response, arrivals = stream(client)
    objects = [document for _, document in arrivals]
    assert ("application/x-ndjson", "no", "system", "result", "You said: one two three four") == (
        response.headers["content-type"],
        response.headers["x-accel-buffering"],
        objects[0]["type"],
        objects[-1]["type"],
        objects[-1]["result"],
    )


def test_lines_reach_the_client_as_the_wrapper_sends_them(
    service: Service, login: Callable[..., Credentials]
) -> None:
    """Lines arrive spread over the wrapper's pace, not all at once at its end."""
    login("alice")
    with service.client() as client:
        _, arrivals = stream(client)
    spread = arrivals[-1][0] - arrivals[0][0]
    # Sent GAP apart by the wrapper; a service that buffered would deliver them together.
    assert spread >= GAP * (len(arrivals) - 1) / 2, (spread, len(arrivals))


def test_a_revoked_token_costs_one_refresh_and_no_error(
    service: Service, login: Callable[..., Credentials], fake: FakeProvider
) -> None:
    """The wrapper refusing the token in the stream's head: refreshed, retried, relayed whole."""
    credentials = login("alice")
    fake.revoke_access_token(credentials)
    with service.client() as client:
        response, arrivals = stream(client)
    objects = [document for _, document in arrivals]
    assert (200, 1, "result", []) == (
        response.status_code,
        fake.refresh_count,
        objects[-1]["type"],
        [o for o in objects if o["type"] == "error"],
    )


def test_a_failure_mid_stream_ends_it_with_an_error_line(
    service: Service, login: Callable[..., Credentials], wrapper: FakeWrapper
) -> None:
    """An in-band error after lines went out: a last line in the wrapper's error shape."""
    login("alice")
    wrapper.fail_next(WrapperFault.stream_error("the CLI crashed", after_deltas=1))
    with service.client() as client:
        response, arrivals = stream(client)
    last = arrivals[-1][1]
    assert (200, "error", "wrapper_error", True) == (
        response.status_code,
        last["type"],
        last["error"]["code"],
        "the CLI crashed" in last["error"]["message"],
    )


def test_a_stream_for_an_unknown_key_answers_404_before_any_line(service: Service) -> None:
    """Refusals that come before the first line keep their status: 404 credential_not_found."""
    with service.client() as client:
        response = client.post("/v1/users/nobody/messages", json=STREAM)
    assert (404, "credential_not_found") == (response.status_code, response.json()["code"])


def test_stream_must_be_a_boolean(service: Service, login: Callable[..., Credentials]) -> None:
    """ "stream": "yes" answers 422 naming the field."""
    login("alice")
    with service.client() as client:
        response = client.post("/v1/users/alice/messages", json={**STREAM, "stream": "yes"})
    assert (422, ["stream"]) == (
        response.status_code,
        [error["field"] for error in response.json()["errors"]],
    )


def test_no_token_is_in_any_line(
    service: Service, login: Callable[..., Credentials], fake: FakeProvider
) -> None:
    """Neither the stored nor the refreshed tokens appear in the relayed lines."""
    credentials = login("alice")
    fake.revoke_access_token(credentials)
    with service.client() as client:
        _, arrivals = stream(client)
    text = json.dumps([document for _, document in arrivals])
    assert [] == [token for token in fake.all_tokens() if token in text]


def test_sigterm_cuts_a_call_still_running_after_the_shutdown_timeout(
    start_service: Callable[..., Service],
    login: Callable[..., Credentials],
    wrapper: FakeWrapper,
) -> None:
    """A wrapper call still running at SIGTERM gets --shutdown-timeout, then is cut and the
    process exits; without the cut it would wait out the wrapper's whole minute."""
    login("alice")
    wrapper.fail_next(WrapperFault.delay(60))
    service = start_service("--no-sweep", "--shutdown-timeout", "1")
    answers: list[int | str] = []

    def call() -> None:
        with service.client() as client:
            try:
                answers.append(client.post("/v1/users/alice/messages", json=HELLO).status_code)
            except httpx.HTTPError as exc:
                answers.append(type(exc).__name__)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 30
    while wrapper.pending_faults and time.monotonic() < deadline:  # the call holds the delay
        time.sleep(0.01)
    started = time.monotonic()
    service.process.terminate()
    service.process.wait(timeout=30)  # uvicorn exits by the signal it caught, once shut down
    stopped = time.monotonic() - started
    caller.join(30)
    # The wrapper's answer was a minute away and the default timeout is 10 s: the process
    # waited about the 1 s asked, and the caller got an answer (the connection closed).
    assert (True, 1) == (stopped < 8, len(answers)), (stopped, answers)
