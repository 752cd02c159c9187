"""Where the test suite finds its real backend servers, and what happens when it cannot.

credkeeper's tests talk to real servers over real connections (docs/design.md, "How it is
proven"). Each backend fixture resolves its server once per session, in this order:

1. ``CREDKEEPER_TEST_<NAME>_URL``, used as is when set. An explicit URL that does not answer is a
   failure, never a reason to fall back: whoever set it expects that server to be tested.
2. The machine's own server on its usual port, when a real login and ``SELECT 1`` succeed.
3. The service in ``docker/compose.yaml``, started through pytest-docker, when
   ``CREDKEEPER_TEST_DOCKER=1`` and a Docker engine answers.
4. Otherwise :func:`require_service`: a failure on CI (``CI=true``), a skip anywhere else, either
   way naming what was tried and how to start the server.

The resolved URL names a database the tests may create tables in; tests use unique table names or
key prefixes and nothing here drops anything.

Adding a backend (MongoDB, moto) is one :class:`Backend` with its probe, plus one fixture that
calls :func:`resolve_url`. Registered from ``tests/conftest.py`` through ``pytest_plugins``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
# Equal to the `name:` in compose.yaml, so containers started by hand with `docker compose up`
# are the ones pytest-docker finds, instead of a second set clashing on the same host ports.
COMPOSE_PROJECT = "credkeeper-tests"

# A local probe must stay quick when nothing listens (refused at once) and bounded when a
# firewall drops packets; a container that is still starting gets longer.
CONNECT_TIMEOUT = 3
DOCKER_START_TIMEOUT = 120.0

Probe = Callable[[str], str | None]


@dataclass(frozen=True)
class Backend:
    """One kind of server the suite needs, and every place it may be found.

    ``probe(url)`` logs in for real and returns ``None`` on success, else a one-line reason.
    The Docker URL is ``local_url`` with the compose service's published host and port, so the
    compose service must accept the same user, password and database as the local server.
    """

    name: str
    env_var: str
    local_url: str
    service: str
    container_port: int
    how_to_start: str
    probe: Probe


def on_ci(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the suite runs on CI, where a missing backend must fail the run."""
    return (os.environ if environ is None else environ).get("CI") == "true"


def require_service(
    name: str,
    tried: list[str],
    how_to_start: str,
    *,
    environ: Mapping[str, str] | None = None,
) -> NoReturn:
    """Give up on an unreachable backend: fail on CI, skip elsewhere.

    A skip on CI would let a green run hide untested stores, so there it is a failure. Locally a
    developer without the server still gets the rest of the suite, with a reason saying how to
    start it. Every backend fixture, present and future, ends here.
    """
    summary = f"{name} is not reachable; tried: {'; '.join(tried)}. To start it: {how_to_start}"
    if on_ci(environ):
        pytest.fail(
            f"{summary}\nOn CI (CI=true) an unreachable backend fails the run instead of skipping.",
            pytrace=False,
        )
    pytest.skip(summary)


def hide_password(url: str) -> str:
    """*url* with its password, if any, replaced by ``***``, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def with_address(url: str, host: str, port: int) -> str:
    """*url* pointing at *host*:*port*, keeping its scheme, credentials, path and query."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}:{port}"))


def _scrubbed(text: str, url: str) -> str:
    """*text* on one line, without *url*'s password: driver errors may echo connection details."""
    text = " ".join(text.split())
    password = urlsplit(url).password
    if password:
        for form in {password, quote(password, safe="")}:
            text = text.replace(form, "***")
    return text


def probe_sql(url: str) -> str | None:
    """Log in to the SQL server at *url* and run ``SELECT 1``: ``None`` if that works, else why not.

    A real login, not a port check: a port can answer while the user or database is missing.
    """
    # SQLAlchemy loads only when a test asks for a SQL backend.
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    try:
        # psycopg and PyMySQL both take `connect_timeout`, in seconds.
        engine = sa.create_engine(
            url, poolclass=NullPool, connect_args={"connect_timeout": CONNECT_TIMEOUT}
        )
        try:
            with engine.connect() as connection:
                connection.execute(sa.text("SELECT 1")).scalar_one()
        finally:
            engine.dispose()
    except (sa.exc.SQLAlchemyError, ImportError) as exc:
        cause = getattr(exc, "orig", None) or exc
        return _scrubbed(f"{type(cause).__name__}: {cause}", url)
    return None


def docker_unavailable() -> str | None:
    """Why the Docker route cannot be taken here, or ``None`` when the engine and compose answer."""
    docker = shutil.which("docker")
    if docker is None:
        return "no `docker` client on PATH"
    for command in (["info"], ["compose", "version"]):
        shown = " ".join(["docker", *command])
        try:
            subprocess.run([docker, *command], capture_output=True, timeout=15, check=True)
        except subprocess.CalledProcessError as exc:
            lines = exc.stderr.decode(errors="replace").strip().splitlines() or ["no output"]
            return f"`{shown}` failed: {lines[-1]}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{shown}` failed: {exc}"
    return None


def resolve_url(
    backend: Backend,
    *,
    environ: Mapping[str, str] | None = None,
    start_in_docker: Callable[[Backend], str] | None = None,
) -> str:
    """The URL the tests should use for *backend*, by the rule in this module's docstring.

    *environ* defaults to ``os.environ``; *start_in_docker* brings up the compose service and
    returns its URL (the fixtures pass pytest-docker's; without it the Docker route is closed).
    Returns, or ends the test through ``pytest.fail``/``pytest.skip``.
    """
    environ = os.environ if environ is None else environ
    explicit = environ.get(backend.env_var, "")
    if explicit:
        problem = backend.probe(explicit)
        if problem is not None:
            pytest.fail(
                f"{backend.env_var}={hide_password(explicit)} cannot be reached: {problem}",
                pytrace=False,
            )
        return explicit
    tried = [f"{backend.env_var} is not set"]

    problem = backend.probe(backend.local_url)
    if problem is None:
        return backend.local_url
    tried.append(f"local server {hide_password(backend.local_url)}: {problem}")

    if environ.get("CREDKEEPER_TEST_DOCKER") != "1":
        tried.append("Docker not requested (CREDKEEPER_TEST_DOCKER is not 1)")
    elif start_in_docker is None:
        tried.append("Docker requested, but this caller cannot start containers")
    elif (why := docker_unavailable()) is not None:
        tried.append(f"Docker requested, but {why}")
    else:
        return start_in_docker(backend)

    how_to_start = (
        f"{backend.how_to_start}; or set {backend.env_var}; "
        "or set CREDKEEPER_TEST_DOCKER=1 where a Docker engine runs (see docs/testing.md)"
    )
    require_service(backend.name, tried, how_to_start, environ=environ)


def _start_in_docker(request: pytest.FixtureRequest, backend: Backend) -> str:
    """Bring up the compose services through pytest-docker; return *backend*'s URL once it logs in.

    pytest-docker's ``up --wait`` already waits for the healthchecks; the login loop also covers
    a healthcheck that turns green a moment before the server accepts this user.
    """
    services = request.getfixturevalue("docker_services")
    host = request.getfixturevalue("docker_ip")
    url = with_address(
        backend.local_url, host, services.port_for(backend.service, backend.container_port)
    )
    deadline = time.monotonic() + DOCKER_START_TIMEOUT
    while (problem := backend.probe(url)) is not None:
        if time.monotonic() > deadline:
            pytest.fail(
                f"{backend.name} in Docker at {hide_password(url)} refused logins for "
                f"{DOCKER_START_TIMEOUT:.0f} s: {problem}",
                pytrace=False,
            )
        time.sleep(0.5)
    return url


def _fixture_url(request: pytest.FixtureRequest, backend: Backend) -> str:
    """What every backend fixture does: resolve with the real environment and pytest-docker."""
    return resolve_url(backend, start_in_docker=partial(_start_in_docker, request))


POSTGRES = Backend(
    name="PostgreSQL",
    env_var="CREDKEEPER_TEST_POSTGRES_URL",
    local_url="postgresql+psycopg://postgres@127.0.0.1:5432/test",
    service="postgres",
    container_port=5432,
    how_to_start="pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    probe=probe_sql,
)

MYSQL = Backend(
    name="MySQL/MariaDB",
    env_var="CREDKEEPER_TEST_MYSQL_URL",
    local_url="mysql+pymysql://root@127.0.0.1:3306/test",
    service="mariadb",
    container_port=3306,
    how_to_start="start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd",
    probe=probe_sql,
)


@pytest.fixture(scope="session")
def postgres_url(request: pytest.FixtureRequest) -> str:
    """SQLAlchemy URL (psycopg 3) of a PostgreSQL database the tests may create tables in."""
    return _fixture_url(request, POSTGRES)


@pytest.fixture(scope="session")
def mysql_url(request: pytest.FixtureRequest) -> str:
    """SQLAlchemy URL (PyMySQL) of a MySQL or MariaDB database the tests may create tables in."""
    return _fixture_url(request, MYSQL)


# pytest-docker's settings. Its `docker_services` starts every service in the file
# (`up --build --wait`) and removes them at the end of the session (`down -v`).


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    """The repository's docker/compose.yaml, not pytest-docker's tests/docker-compose.yml."""
    return str(COMPOSE_FILE)


@pytest.fixture(scope="session")
def docker_compose_project_name() -> str:
    """A stable project name, instead of one per process, matching the compose file's ``name:``."""
    return COMPOSE_PROJECT
