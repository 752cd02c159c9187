"""The MongoDB server the store's tests talk to, found or started once per session.

In this order (``tests/backends.py`` has the rule's reasons):

1. ``CREDKEEPER_TEST_MONGODB_URL``, used as is; a URL that does not answer fails the tests.
2. The ``mongo`` service (``mongo:7``) of ``docker/compose.yaml`` through pytest-docker, when
   ``CREDKEEPER_TEST_DOCKER=1`` and a Docker engine answers.
3. A SecantusDB server (a MongoDB wire-protocol server from PyPI, in the dev extra) started
   for the session on a free port, in a temporary directory, with test commands enabled
   (``configureFailPoint``), and stopped at the end.
4. Otherwise :func:`~tests.backends.require_service`: a failure on CI, a skip elsewhere.

Each session works in a database of its own (``ck_test_<hex>``), dropped at the end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError
from pymongo.monitoring import (
    CommandFailedEvent,
    CommandListener,
    CommandStartedEvent,
    CommandSucceededEvent,
)

from tests.backends import (
    CONNECT_TIMEOUT,
    Backend,
    _scrubbed,
    _start_in_docker,
    docker_unavailable,
    hide_password,
    require_service,
)

ENV_VAR = "CREDKEEPER_TEST_MONGODB_URL"
SECANTUS_START_TIMEOUT = 60.0
HOW_TO_START = (
    f"pip install 'secantusdb>=0.7.0b3' (the dev extra has it); or set {ENV_VAR}; "
    "or set CREDKEEPER_TEST_DOCKER=1 where a Docker engine runs (see docs/testing.md)"
)


def probe_mongo(url: str) -> str | None:
    """Connect to the server at *url* and run ``ping``: ``None`` if that works, else why not."""
    try:
        client: MongoClient[dict[str, object]] = MongoClient(
            url, serverSelectionTimeoutMS=CONNECT_TIMEOUT * 1000
        )
        try:
            client.admin.command("ping")
        finally:
            client.close()
    except (PyMongoError, ValueError) as exc:
        return _scrubbed(f"{type(exc).__name__}: {exc}", url)[:300]
    return None


MONGO = Backend(
    name="MongoDB",
    env_var=ENV_VAR,
    local_url="mongodb://127.0.0.1:27017/",
    service="mongo",
    container_port=27017,
    how_to_start=HOW_TO_START,
    probe=probe_mongo,
)


def with_database(url: str, database: str) -> str:
    """*url* naming *database* in its path, keeping hosts, credentials and query."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_secantus(directory: Path) -> tuple[subprocess.Popen[bytes] | None, str]:
    """Start ``python -m secantus`` in *directory*; the process and URL, or ``None`` and why."""
    if importlib.util.find_spec("secantus") is None:
        return None, "SecantusDB is not installed (no module named 'secantus')"
    port = free_port()
    url = f"mongodb://127.0.0.1:{port}/"
    log = directory / "secantus.log"
    command = [sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--storage-path", str(directory / "data"), "--log-level", "WARNING"]
    # configureFailPoint, for the faults the tests inject through fail_command below.
    command.append("--enable-test-commands")
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + SECANTUS_START_TIMEOUT
    while (problem := probe_mongo(url)) is not None:
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            tail = " ".join(log.read_text(errors="replace").split()[-40:])
            return None, f"SecantusDB on port {port} did not answer ({problem}); its log: {tail}"
        time.sleep(0.2)
    return process, url


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate *process*, and kill it if it has not exited within two seconds.

    The data is throwaway, so a slow orderly shutdown is not worth waiting for.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(2)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="session")
def mongodb_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """URL of a MongoDB wire-protocol server, without a database: found, or started here."""
    explicit = os.environ.get(ENV_VAR, "")
    if explicit:
        problem = probe_mongo(explicit)
        if problem is not None:
            pytest.fail(
                f"{ENV_VAR}={hide_password(explicit)} cannot be reached: {problem}",
                pytrace=False,
            )
        yield explicit
        return
    tried = [f"{ENV_VAR} is not set"]
    if os.environ.get("CREDKEEPER_TEST_DOCKER") == "1":
        why = docker_unavailable()
        if why is None:
            yield _start_in_docker(request, MONGO)
            return
        tried.append(f"Docker requested, but {why}")
    else:
        tried.append("Docker not requested (CREDKEEPER_TEST_DOCKER is not 1)")
    process, found = start_secantus(tmp_path_factory.mktemp("secantus"))
    if process is None:
        tried.append(found)
        require_service("MongoDB", tried, HOW_TO_START)
    try:
        yield found
    finally:
        stop(process)


@pytest.fixture(scope="session")
def mongodb_database(mongodb_url: str) -> Iterator[str]:
    """This session's database on the server; dropped at the end."""
    name = f"ck_test_{uuid.uuid4().hex[:8]}"
    yield name
    client: MongoClient[dict[str, object]] = MongoClient(mongodb_url)
    with contextlib.closing(client):
        client.drop_database(name)


@pytest.fixture(scope="session")
def mongodb_store_url(mongodb_url: str, mongodb_database: str) -> str:
    """The store URL of this session's database, credkeeper's own collection in it."""
    return with_database(mongodb_url, mongodb_database)


@pytest.fixture
def mongo_client(mongodb_url: str) -> Iterator[MongoClient[dict[str, object]]]:
    """A plain pymongo client on the server, for looking at what the store wrote."""
    client: MongoClient[dict[str, object]] = MongoClient(mongodb_url)
    with contextlib.closing(client):
        yield client


# fail_command's arming function: (app, *commands, **data) fails app's next matching command.
FailCommand = Callable[..., None]


@pytest.fixture
def fail_command(mongo_client: MongoClient[dict[str, object]]) -> Iterator[FailCommand]:
    """Arms the server's ``failCommand`` fail point; skips when the server refuses it.

    ``fail_command(app, *commands, **data)`` fails the next of ``commands`` that a client with
    the appname ``app`` sends, once, as ``data`` says (``errorCode``, ``closeConnection``...).
    """
    try:
        mongo_client.admin.command("configureFailPoint", "failCommand", mode="off")
    except OperationFailure as exc:
        pytest.skip(f"the server refuses configureFailPoint (test commands off): {exc}")

    def arm(app: str, *commands: str, **data: Any) -> None:
        mongo_client.admin.command(
            "configureFailPoint",
            "failCommand",
            mode={"times": 1},
            data={"failCommands": list(commands), "appName": app, **data},
        )

    yield arm
    mongo_client.admin.command("configureFailPoint", "failCommand", mode="off")


class Commands(CommandListener):
    """The names of the commands a client sent, in order: pymongo's own monitoring API."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: CommandStartedEvent) -> None:
        self.names.append(event.command_name)

    def succeeded(self, event: CommandSucceededEvent) -> None:
        """Not needed."""

    def failed(self, event: CommandFailedEvent) -> None:
        """Not needed."""
