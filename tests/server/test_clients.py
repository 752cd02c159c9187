"""The guide's Node.js and PHP clients, run as programs against a real ``credkeeper serve``.

``docs/examples/node/`` and ``docs/examples/php/`` call the service in two ways: ``messages``
(the service attaches credentials and calls the wrapper) and ``direct`` (credentials from the
service, the wrapper called by the client, one refresh through the service and one retry
after an auth failure). Each test runs the real ``node`` or ``php`` on a client, with the
service checking API keys and the FakeWrapper judging tokens by the FakeProvider's verdict.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from credkeeper import Credentials
from credkeeper.testing import FakeProvider, FakeWrapper, WrapperFault
from tests.backends import require_service
from tests.examples import EXAMPLES

from .conftest import Service

# Each language: its executable, the client program, and what to call and install it by.
CLIENTS = {
    "node": (
        "node",
        EXAMPLES / "node" / "credkeeper-client.mjs",
        "Node.js",
        "install Node.js 20 (apt-get install nodejs)",
    ),
    "php": (
        "php",
        EXAMPLES / "php" / "credkeeper_client.php",
        "PHP",
        "apt-get install php-cli (.ci/run installs it on CI)",
    ),
}
REPLY = "You said: Hello\n"
WRONG_API_KEY = "ck_not-a-key-of-this-service"


@dataclass(frozen=True)
class Outcome:
    """What one run of a client program left: its exit status and its two streams."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def code(self) -> str:
        """The problem code an error run reports first on stderr (``code: detail``)."""
        return self.stderr.partition(":")[0]


Run = Callable[..., Outcome]


@pytest.fixture(scope="module", params=sorted(CLIENTS))
def client(request: pytest.FixtureRequest) -> list[str]:
    """The command running one language's client: a failure on CI when the executable is
    missing, a skip elsewhere."""
    executable, program, name, how_to_install = CLIENTS[request.param]
    found = shutil.which(executable)
    if found is None:
        require_service(name, [f"{executable} on PATH"], how_to_install)
    return [found, str(program)]


@pytest.fixture
def api_key(new_api_key: Callable[..., str]) -> str:
    """An API key for the routes the clients use, in the file the service loads."""
    return new_api_key("app", "messages", "credentials:read")


@pytest.fixture
def run(
    client: list[str],
    start_service: Callable[..., Service],
    api_keys_file: Path,
    api_key: str,
    wrapper: FakeWrapper,
) -> Run:
    """``run(mode, key, api_key=)``: the client asked to say "Hello" for ``key``, through the
    service checking API keys."""
    service = start_service("--no-sweep", "--api-keys", str(api_keys_file))

    def run_client(mode: str, key: str, *, api_key: str = api_key) -> Outcome:
        # Only what the client is documented to read, so no variable of this run leaks in.
        env = {
            "PATH": os.environ.get("PATH", ""),
            "CREDKEEPER_SERVICE_URL": service.url,
            "CREDKEEPER_API_KEY": api_key,
            "WRAPPER_URL": wrapper.url,
        }
        result = subprocess.run(
            [*client, mode, key, "Hello"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        return Outcome(result.returncode, result.stdout, result.stderr)

    return run_client


def test_messages_through_the_service_print_the_reply(
    run: Run, login: Callable[..., Credentials]
) -> None:
    """``messages`` prints the wrapper's reply the service relayed, and nothing on stderr."""
    login("alice")
    assert Outcome(0, REPLY, "") == run("messages", "alice")


def test_a_key_holding_a_slash_travels_as_one_path_segment(
    run: Run, login: Callable[..., Credentials]
) -> None:
    """A key such as ``billing/alice`` is percent-encoded, so the service finds its login."""
    login("billing/alice")
    assert Outcome(0, REPLY, "") == run("messages", "billing/alice")


def test_direct_with_a_fresh_token_prints_the_reply_without_a_refresh(
    run: Run, login: Callable[..., Credentials], fake: FakeProvider
) -> None:
    """``direct`` with a valid stored token calls the wrapper once and refreshes nothing."""
    login("alice")
    assert (Outcome(0, REPLY, ""), 0) == (run("direct", "alice"), fake.refresh_count)


def test_direct_after_a_revoked_access_token_refreshes_once_and_retries(
    run: Run, login: Callable[..., Credentials], fake: FakeProvider
) -> None:
    """A revoked access token costs one refresh through the service, then the reply arrives."""
    fake.revoke_access_token(login("alice"))
    assert (Outcome(0, REPLY, ""), 1) == (run("direct", "alice"), fake.refresh_count)


def test_direct_after_a_wrapper_401_refreshes_once_and_retries(
    run: Run, login: Callable[..., Credentials], fake: FakeProvider, wrapper: FakeWrapper
) -> None:
    """An HTTP 401 from the wrapper is an auth failure too: one refresh, then the reply."""
    login("alice")
    wrapper.fail_next(WrapperFault.status(401))
    assert (Outcome(0, REPLY, ""), 1) == (run("direct", "alice"), fake.refresh_count)


def test_direct_retries_only_once(
    run: Run, login: Callable[..., Credentials], wrapper: FakeWrapper
) -> None:
    """A wrapper refusing the refreshed token too ends in wrapper_auth_failed after two calls."""
    login("alice")
    refused = WrapperFault.cli_error(FakeWrapper.INVALID_API_KEY)
    wrapper.fail_next(refused, refused)
    outcome = run("direct", "alice")
    assert (1, "wrapper_auth_failed", 2) == (outcome.returncode, outcome.code, len(wrapper.calls))


def test_direct_reports_a_wrapper_error_without_the_tokens_it_echoed(
    run: Run, login: Callable[..., Credentials], fake: FakeProvider, wrapper: FakeWrapper
) -> None:
    """The wrapper's CLI timeout, whose text holds the tokens sent, is reported redacted."""
    login("alice")
    wrapper.fail_next(WrapperFault.cli_timeout())
    outcome = run("direct", "alice")
    leaked = [token for token in fake.all_tokens() if token in outcome.stderr]
    assert (1, "wrapper_error", []) == (outcome.returncode, outcome.code, leaked)


def test_direct_reports_a_usage_limit_without_a_refresh(
    run: Run, login: Callable[..., Credentials], fake: FakeProvider, wrapper: FakeWrapper
) -> None:
    """The wrapper's usage-limit text exits with usage_limit_reached, as the service reports
    it, and costs no refresh."""
    login("alice")
    wrapper.fail_next(WrapperFault.cli_error(FakeWrapper.OPUS_WEEKLY_LIMIT))
    outcome = run("direct", "alice")
    assert (1, "usage_limit_reached", 0) == (outcome.returncode, outcome.code, fake.refresh_count)


@pytest.mark.parametrize("mode", ["messages", "direct"])
def test_an_unknown_key_exits_with_credential_not_found(run: Run, mode: str) -> None:
    """A key with no stored login exits 1 reporting the service's credential_not_found."""
    outcome = run(mode, "nobody")
    assert (1, "credential_not_found", "") == (outcome.returncode, outcome.code, outcome.stdout)


@pytest.mark.parametrize("mode", ["messages", "direct"])
def test_a_wrong_api_key_exits_with_unauthenticated(
    run: Run, login: Callable[..., Credentials], mode: str
) -> None:
    """An API key the service does not know exits 1 reporting unauthenticated."""
    login("alice")
    outcome = run(mode, "alice", api_key=WRONG_API_KEY)
    assert (1, "unauthenticated", "") == (outcome.returncode, outcome.code, outcome.stdout)


def test_no_token_or_api_key_reaches_the_output(
    run: Run,
    login: Callable[..., Credentials],
    fake: FakeProvider,
    api_key: str,
) -> None:
    """Successes, a refresh and refusals print none of the tokens, nor the API key."""
    fake.revoke_access_token(login("alice"))
    outcomes = [
        run("direct", "alice"),
        run("messages", "alice"),
        run("direct", "nobody"),
        run("messages", "alice", api_key=WRONG_API_KEY),
    ]
    printed = "".join(outcome.stdout + outcome.stderr for outcome in outcomes)
    secrets = fake.all_tokens() | {api_key, WRONG_API_KEY}
    assert [] == [secret for secret in secrets if secret in printed]
