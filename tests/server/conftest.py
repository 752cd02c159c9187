"""Fixtures for the service's tests: a real ``credkeeper serve`` process on a loopback port.

The service runs as the command line starts it, in its own process, over a real store, with
the test's :class:`FakeProvider` and :class:`FakeWrapper` on loopback and real time. Tests talk
to it over HTTP with httpx, exactly as an application in any language would.

Whatever a test does, no token may leave a service where it was not asked for: once its
services have stopped, every response body they gave (but the credential routes' answers), every
line they logged and their metrics are searched for each token the provider issued and each API
key the test made.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from credkeeper import Credentials, KeyRing, TokenManager, open_store
from credkeeper._settings import ENVIRONMENT
from credkeeper._store import CredentialStore
from credkeeper.server import create_api_key
from credkeeper.testing import FakeProvider, FakeWrapper

# How long a service process may take to start answering /healthz before the test fails.
START_TIMEOUT = 30.0


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    """A rotating-token provider on loopback, on real time like the service it serves."""
    with FakeProvider() as provider:
        yield provider


@pytest.fixture
def wrapper(fake: FakeProvider) -> Iterator[FakeWrapper]:
    """The fake wrapper on loopback, judging tokens with the test's provider."""
    with FakeWrapper(fake) as server:
        yield server


@pytest.fixture
def keyring() -> KeyRing:
    """The key ring the service seals tokens with."""
    return KeyRing.generate("k1")


@pytest.fixture
def keys_file(tmp_path: Path, keyring: KeyRing) -> Path:
    """The key ring in a 0600 key file."""
    path = tmp_path / "keys"
    path.write_text(keyring.export() + "\n", encoding="utf-8")
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """An encrypted file store in the test's directory."""
    return (tmp_path / "store" / "credentials.json").as_uri()


@pytest.fixture
def api_keys_file(tmp_path: Path) -> Path:
    """Where the test's API keys are written."""
    return tmp_path / "api-keys.jsonl"


@dataclass
class Service:
    """A running ``credkeeper serve``: its base URL and a client for it."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path
    keyed: bool = False
    responses: list[httpx.Response] = field(default_factory=list)

    def client(self, api_key: str | None = None) -> httpx.Client:
        """An HTTP client for the service, sending ``api_key`` as a bearer token; every
        response it gets is kept for the leak check."""
        headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
        return httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=30.0,
            event_hooks={"response": [self._keep]},
        )

    def _keep(self, response: httpx.Response) -> None:
        self.responses.append(response)

    def output(self) -> str:
        """Everything the process wrote so far (its logs)."""
        return self.log.read_text(encoding="utf-8", errors="replace")


@pytest.fixture
def start_service(
    tmp_path: Path,
    store_url: str,
    keys_file: Path,
    fake: FakeProvider,
    wrapper: FakeWrapper,
    api_keys_made: list[str],
) -> Iterator[Callable[..., Service]]:
    """Start ``credkeeper serve`` with the given options; every process is stopped after, and
    what each one answered and logged is searched for tokens and API keys."""
    started: list[Service] = []

    def start(*serve_options: str, store: str | None = None) -> Service:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in _VARIABLES}
        env.update(HOME=str(tmp_path / "home"), XDG_STATE_HOME=str(tmp_path / "state"))
        log = tmp_path / f"service-{port}.log"
        command = [
            sys.executable,
            *_measured(),
            "-m",
            "credkeeper",
            "--store",
            store or store_url,
            "--keys",
            f"@{keys_file}",
            "--journal",
            str(tmp_path / "journal"),
            "--provider",
            fake.token_url,
            "--wrapper-url",
            wrapper.url,
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            *serve_options,
        ]
        with log.open("wb") as sink:
            process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        service = Service(
            f"http://127.0.0.1:{port}", process, log, keyed="--api-keys" in serve_options
        )
        started.append(service)
        _wait_until_up(service)
        return service

    yield start
    for service in started:
        if service.process.poll() is None and not service.keyed:
            with contextlib.suppress(httpx.TransportError), service.client() as client:
                client.get("/metrics")
        service.process.terminate()
        try:
            service.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()
    secrets = fake.all_tokens() | set(api_keys_made)
    leaks = [place for service in started for place in _leaks(service, secrets)]
    if leaks:
        pytest.fail("a token or API key left the service: " + "; ".join(leaks))


# The answers that carry tokens by design: a credential route's 200.
_TOKEN_ROUTES = re.compile(r"/v1/users/[^/]+/credentials(/refresh)?")


def _leaks(service: Service, secrets: set[str]) -> list[str]:
    """Where a secret appears: a response not meant to carry one, or the process's output."""
    places = []
    for response in service.responses:
        request = response.request
        path = request.url.raw_path.split(b"?")[0].decode("ascii")
        if response.status_code == 200 and _TOKEN_ROUTES.fullmatch(path):
            continue
        try:
            body = response.text
        except httpx.ResponseNotRead:
            continue  # a stream the test read itself, and checks itself
        if any(secret in body for secret in secrets):
            places.append(f"the answer to {request.method} {path}")
    output = service.output()
    if any(secret in output for secret in secrets):
        places.append(f"the log of {service.url}")
    return places


_VARIABLES = {variable for variable, _ in ENVIRONMENT.values()} | {"CREDKEEPER_API_KEYS_FILE"}


def _measured() -> list[str]:
    """``-m coverage run`` options when this test run measures coverage (``make test``), so the
    service's own lines count: its data file, saved as it stops, joins the run's."""
    try:
        import coverage
    except ImportError:  # pragma: no cover - coverage comes with the dev extra
        return []
    current = coverage.Coverage.current()
    if current is None:
        return []
    data_file = os.path.abspath(current.config.data_file)
    return ["-m", "coverage", "run", "--parallel-mode", f"--data-file={data_file}"]


def _wait_until_up(service: Service) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            pytest.fail(
                f"credkeeper serve exited with {service.process.returncode}:\n{service.output()}"
            )
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(service.url + "/healthz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)
    pytest.fail(f"credkeeper serve did not answer /healthz:\n{service.output()}")


@pytest.fixture
def service(start_service: Callable[..., Service]) -> Service:
    """The service on loopback without API keys, and without the background sweeper."""
    return start_service("--no-sweep")


@pytest.fixture
def manager(
    store_url: str, keyring: KeyRing, fake: FakeProvider, tmp_path: Path
) -> Iterator[TokenManager]:
    """A manager of the test's own on the service's store, to seed and inspect credentials."""
    store = open_store(store_url)
    assert isinstance(store, CredentialStore)
    with TokenManager(
        store, fake.provider(), keyring=keyring, journal=tmp_path / "own-journal"
    ) as own:
        yield own


@pytest.fixture
def login(fake: FakeProvider, manager: TokenManager) -> Callable[..., Credentials]:
    """Store a fresh login from the fake provider under a key; returns its credentials."""

    def store(key: str, *, expires_in: float | None = None) -> Credentials:
        credentials = fake.issue(expires_in=expires_in)
        manager.put(key, credentials)
        return credentials

    return store


@pytest.fixture
def api_keys_made() -> list[str]:
    """The API keys the test made, for the leak check."""
    return []


@pytest.fixture
def new_api_key(api_keys_file: Path, api_keys_made: list[str]) -> Callable[..., str]:
    """Make an API key in the test's file: ``new_api_key(name, scope, ..., keys_matching=)``."""

    def make(name: str, *scopes: str, keys_matching: str | None = None) -> str:
        key = create_api_key(api_keys_file, name, scopes, keys_matching=keys_matching)
        api_keys_made.append(key)
        return key

    return make
