"""How the suite finds each backend server: env URL, local server, Docker, then fail or skip.

Unreachable servers are real closed ports on 127.0.0.1; reachable ones are the servers the
session's own ``postgres_url`` and ``mysql_url`` fixtures found.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.backends import (
    COMPOSE_FILE,
    MYSQL,
    POSTGRES,
    Backend,
    hide_password,
    require_service,
    resolve_url,
    with_address,
)

PASSWORD = "s3cr:t@pw"
QUOTED_PASSWORD = "s3cr%3At%40pw"
# The session fixture that resolves each backend.
FIXTURE = {POSTGRES.name: "postgres_url", MYSQL.name: "mysql_url"}


@dataclass(frozen=True)
class Reachable:
    """A backend whose local server is one that answers, and that server's URL."""

    backend: Backend
    url: str


def with_query(url: str, query: str) -> str:
    """*url* with *query* appended: the same server, under a different URL string."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query=f"{parts.query}&{query}" if parts.query else query))


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: bound, then closed again."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(params=[POSTGRES, MYSQL], ids=["postgres", "mysql"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each SQL backend the suite resolves."""
    chosen: Backend = request.param
    return chosen


@pytest.fixture
def unreachable(backend: Backend, closed_port: int) -> Backend:
    """The backend with its local server moved to a closed port."""
    return replace(backend, local_url=with_address(backend.local_url, "127.0.0.1", closed_port))


@pytest.fixture
def reachable(backend: Backend, request: pytest.FixtureRequest) -> Reachable:
    """The backend with its local server set to the real server this session resolved."""
    url: str = request.getfixturevalue(FIXTURE[backend.name])
    return Reachable(replace(backend, local_url=url), url)


@pytest.fixture
def secret_url(backend: Backend, closed_port: int) -> str:
    """A URL with a password, at a closed port."""
    parts = urlsplit(with_address(backend.local_url, "127.0.0.1", closed_port))
    user, _, hostport = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}:{QUOTED_PASSWORD}@{hostport}"))


class TestResolveUrl:
    """resolve_url: the order in which a backend is looked for."""

    def test_env_url_wins_over_local_server(self, reachable: Reachable) -> None:
        """A URL in the backend's variable is used even when the local server answers too."""
        explicit = with_query(reachable.url, "connect_timeout=5")
        environ = {reachable.backend.env_var: explicit}
        assert explicit == resolve_url(reachable.backend, environ=environ)

    def test_local_server_is_used_when_no_url_is_set(self, reachable: Reachable) -> None:
        """Without the variable, the local server that accepts a login is used."""
        assert reachable.url == resolve_url(reachable.backend, environ={})

    def test_unreachable_env_url_does_not_fall_back(
        self, reachable: Reachable, secret_url: str
    ) -> None:
        """An explicit URL that does not answer fails, even off CI with a local server up."""
        environ = {reachable.backend.env_var: secret_url}
        with pytest.raises(pytest.fail.Exception):
            resolve_url(reachable.backend, environ=environ)

    def test_unreachable_env_url_message_shows_url_without_password(
        self, unreachable: Backend, secret_url: str
    ) -> None:
        """The failure names the variable and the URL, with the password masked."""
        with pytest.raises(pytest.fail.Exception) as failure:
            resolve_url(unreachable, environ={unreachable.env_var: secret_url})
        expected = f"{unreachable.env_var}={hide_password(secret_url)} cannot be reached: "
        assert expected == str(failure.value)[: len(expected)]

    def test_unreachable_env_url_message_never_contains_password(
        self, unreachable: Backend, secret_url: str
    ) -> None:
        """Neither the raw nor the percent-encoded password appears in the failure."""
        with pytest.raises(pytest.fail.Exception) as failure:
            resolve_url(unreachable, environ={unreachable.env_var: secret_url})
        leaked = [form for form in (PASSWORD, QUOTED_PASSWORD) if form in str(failure.value)]
        assert [] == leaked

    def test_nothing_reachable_fails_on_ci(self, unreachable: Backend) -> None:
        """On CI a backend found nowhere is a failure."""
        with pytest.raises(pytest.fail.Exception):
            resolve_url(unreachable, environ={"CI": "true"})

    def test_nothing_reachable_skips_off_ci(self, unreachable: Backend) -> None:
        """Off CI a backend found nowhere skips the tests that need it."""
        with pytest.raises(pytest.skip.Exception):
            resolve_url(unreachable, environ={})

    def test_skip_reason_names_the_start_command(self, unreachable: Backend) -> None:
        """The skip reason says how to start the local server."""
        with pytest.raises(pytest.skip.Exception) as skip:
            resolve_url(unreachable, environ={})
        assert f"To start it: {unreachable.how_to_start};" in str(skip.value)

    def test_ci_failure_names_backend_and_local_server(self, unreachable: Backend) -> None:
        """The CI failure names the backend and the local address it tried."""
        with pytest.raises(pytest.fail.Exception) as failure:
            resolve_url(unreachable, environ={"CI": "true"})
        expected = f"{unreachable.name} is not reachable; tried: {unreachable.env_var} is not set; "
        expected += f"local server {unreachable.local_url}: "
        assert expected == str(failure.value)[: len(expected)]

    def test_docker_is_not_started_unless_requested(self, unreachable: Backend) -> None:
        """Without CREDKEEPER_TEST_DOCKER=1 no container is started."""
        started: list[Backend] = []

        def start_in_docker(backend: Backend) -> str:
            started.append(backend)
            return backend.local_url

        with pytest.raises(pytest.skip.Exception):
            resolve_url(unreachable, environ={}, start_in_docker=start_in_docker)
        assert [] == started


class TestFixtures:
    """postgres_url and mysql_url."""

    def test_resolved_url_accepts_a_login(self, reachable: Reachable) -> None:
        """The URL a fixture hands out logs in and answers SELECT 1."""
        assert None is reachable.backend.probe(reachable.url)

    def test_pytest_docker_uses_the_repository_compose_file(self, docker_compose_file: str) -> None:
        """pytest-docker is pointed at docker/compose.yaml, which exists."""
        assert (str(COMPOSE_FILE), True) == (docker_compose_file, COMPOSE_FILE.is_file())


class TestRequireService:
    """require_service: the skip-or-fail rule every backend shares."""

    def test_fails_on_ci(self) -> None:
        """CI=true turns a missing service into a failure."""
        with pytest.raises(pytest.fail.Exception):
            require_service("MongoDB", ["nothing"], "start mongod", environ={"CI": "true"})

    def test_skips_off_ci(self) -> None:
        """Without CI a missing service is a skip."""
        with pytest.raises(pytest.skip.Exception):
            require_service("MongoDB", ["nothing"], "start mongod", environ={})

    def test_only_ci_true_counts_as_ci(self) -> None:
        """CI=false is not CI."""
        with pytest.raises(pytest.skip.Exception):
            require_service("MongoDB", ["nothing"], "start mongod", environ={"CI": "false"})

    def test_reason_lists_what_was_tried_and_how_to_start(self) -> None:
        """The reason names the service, each attempt and the start command, on one line."""
        with pytest.raises(pytest.skip.Exception) as skip:
            require_service("MongoDB", ["env unset", "port refused"], "start mongod", environ={})
        expected = (
            "MongoDB is not reachable; tried: env unset; port refused. To start it: start mongod"
        )
        assert expected == str(skip.value)


class TestHidePassword:
    """hide_password: URLs fit for messages."""

    def test_masks_the_password(self) -> None:
        """The password becomes ***, the rest of the URL stays."""
        url = f"postgresql+psycopg://app:{QUOTED_PASSWORD}@db:5432/test?sslmode=require"
        expected = "postgresql+psycopg://app:***@db:5432/test?sslmode=require"
        assert expected == hide_password(url)

    def test_leaves_a_url_without_password_alone(self) -> None:
        """A URL without a password is returned unchanged."""
        assert MYSQL.local_url == hide_password(MYSQL.local_url)
