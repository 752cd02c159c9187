"""The Secrets Manager store's backend: moto's server over real HTTP, with fake AWS credentials.

The endpoint is resolved once per session, in this order:

1. ``CREDKEEPER_TEST_AWS_ENDPOINT`` (e.g. ``http://127.0.0.1:55000``), used as is; if it does
   not answer, the tests that need it fail.
2. The ``moto`` service of ``docker/compose.yaml``, when ``CREDKEEPER_TEST_DOCKER=1`` and a
   Docker engine answers.
3. moto's ``ThreadedMotoServer`` in a process of its own, on a free port, for the session,
   made to answer one Secrets Manager request at a time, as atomically as AWS answers each,
   and to find a secret by name without scanning them all (``tests/adapters/aws/moto_server.py``).
4. If none of them works: a failure on CI, a skip elsewhere (``tests.backends.require_service``).

The store does what AWS needs and nothing for moto's sake, so an endpoint of 1 or 2 running
moto's own server unchanged can fail the concurrency cases with races AWS does not have.

The session's environment holds fake credentials (``AWS_ACCESS_KEY_ID=testing``, ...) and
points boto3 away from any real AWS configuration, so spawned processes of the concurrency
cases and the storm inherit the same credentials and nothing can reach a real account.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import boto3
import botocore.config
import botocore.exceptions
import pytest

from credkeeper_aws import SecretsManagerStore
from tests.backends import (
    Backend,
    _start_in_docker,
    docker_unavailable,
    require_service,
)

ENV_VAR = "CREDKEEPER_TEST_AWS_ENDPOINT"
REGION = "us-east-1"
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Anything that could send boto3 to a real account or another endpoint.
CLEARED = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_SECRETS_MANAGER",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
PROBE_CONFIG = botocore.config.Config(
    retries={"mode": "standard", "max_attempts": 1}, connect_timeout=3, read_timeout=5
)


def probe_moto(endpoint: str) -> str | None:
    """List one secret at ``endpoint``: ``None`` if Secrets Manager answers, else why not."""
    client = boto3.client(
        "secretsmanager", region_name=REGION, endpoint_url=endpoint, config=PROBE_CONFIG
    )
    try:
        client.list_secrets(MaxResults=1)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


MOTO = Backend(
    name="Secrets Manager (moto)",
    env_var=ENV_VAR,
    local_url="http://127.0.0.1:5000",
    service="moto",
    container_port=5000,
    how_to_start="pip install 'moto[server]' (the dev extra has it)",
    probe=probe_moto,
)


# Where boto3 finds no configuration file: nothing on the machine can point it elsewhere.
NOWHERE = "/nonexistent/credkeeper-tests/aws-config"
FAKE_ENVIRONMENT = {
    **FAKE_CREDENTIALS,
    "AWS_CONFIG_FILE": NOWHERE,
    "AWS_SHARED_CREDENTIALS_FILE": NOWHERE,
}


def pytest_configure(config: pytest.Config) -> None:
    """The fake credentials in the environment from the start of the session, before any test
    starts a process. The storms and chaos cases start theirs from one forkserver, started by
    whichever test needs it first and keeping the environment it started with: set later (by
    a fixture), the credentials would miss the processes of every Secrets Manager case that
    runs after a case on another backend, as they do under ``pytest -n``."""
    for name in CLEARED:
        os.environ.pop(name, None)
    os.environ.update(FAKE_ENVIRONMENT)


@pytest.fixture(scope="session")
def aws_credentials() -> Iterator[None]:
    """Fake AWS credentials in this process's environment, inherited by spawned processes
    (already there when this conftest is loaded, see above; the fixture serves the tests that
    import it from elsewhere)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in CLEARED:
            patch.delenv(name, raising=False)
        for name, value in FAKE_ENVIRONMENT.items():
            patch.setenv(name, value)
        yield


def _own_process() -> Iterator[str]:
    """moto's threaded server in a process of its own (``tests.adapters.aws.moto_server``) on
    a free loopback port, stopped at the end. In the tests' process it would share their
    interpreter lock: the store's calls and moto's answers would take turns on one core."""
    command = [sys.executable, "-m", "tests.adapters.aws.moto_server"]
    root = Path(__file__).resolve().parents[3]
    with (
        tempfile.TemporaryFile() as errors,
        subprocess.Popen(
            command, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors
        ) as server,
    ):
        assert server.stdin is not None
        assert server.stdout is not None
        try:
            url = server.stdout.readline().decode().strip()
            if not url.startswith("http://"):
                server.wait(timeout=30)
                errors.seek(0)
                said = errors.read().decode(errors="replace").strip().splitlines()
                require_service(
                    MOTO.name,
                    [f"{ENV_VAR} is not set", f"moto's server did not start ({said[-1:]})"],
                    MOTO.how_to_start,
                )
            yield url
        finally:
            # The server stops when its standard input closes.
            server.stdin.close()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


@pytest.fixture(scope="session")
def aws_endpoint(request: pytest.FixtureRequest, aws_credentials: None) -> Iterator[str]:
    """The URL of a Secrets Manager endpoint (moto's server) the tests may create secrets in.

    One server serves the whole session: tests use unique name prefixes.
    """
    explicit = os.environ.get(ENV_VAR, "")
    if explicit:
        problem = probe_moto(explicit)
        if problem is not None:
            pytest.fail(f"{ENV_VAR}={explicit} cannot be reached: {problem}", pytrace=False)
        yield explicit
        return
    if os.environ.get("CREDKEEPER_TEST_DOCKER") == "1" and docker_unavailable() is None:
        yield _start_in_docker(request, MOTO)
        return
    yield from _own_process()


def store_url(endpoint: str, prefix: str) -> str:
    """The store URL for ``prefix`` at ``endpoint``."""
    return f"aws-sm://{REGION}/{prefix}?endpoint_url={quote(endpoint, safe='')}"


def new_prefix() -> str:
    """A secret name prefix no other test or run uses."""
    return f"credkeeper-test-{uuid.uuid4().hex[:12]}/"


@pytest.fixture(scope="session")
def aws_store_url(aws_endpoint: str) -> str:
    """A store URL under this session's own prefix."""
    return store_url(aws_endpoint, new_prefix())


@pytest.fixture
def sm_client(aws_endpoint: str) -> Iterator[object]:
    """A bare boto3 Secrets Manager client on the endpoint, for looking behind the store."""
    client = boto3.client("secretsmanager", region_name=REGION, endpoint_url=aws_endpoint)
    yield client
    client.close()


# Headers the proxy sets itself rather than copying from moto's answer.
_OWN_HEADERS = frozenset({"date", "server", "connection", "transfer-encoding", "content-length"})


class Proxy:
    """An HTTP proxy in front of moto's server that can move AWS's clock and throttle calls.

    Every answer, moto's or the proxy's own, carries a ``Date`` header ``shift`` seconds off
    the host's clock, as from an AWS whose clock disagrees with the host's. ``faults`` maps an
    operation (``"GetSecretValue"``) to the HTTP status and AWS error code answered instead of
    forwarding it, for as long as it is there: the throttling and server errors moto's server
    cannot produce on demand. ``operations`` lists what was asked, in order.
    """

    def __init__(self, upstream: str) -> None:
        self.shift = 0.0
        self.faults: dict[str, tuple[int, str]] = {}
        self.operations: list[str] = []
        self._lock = threading.Lock()
        proxy = self
        target = urlsplit(upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: one line per request otherwise."""

            def date_time_string(self, timestamp: float | None = None) -> str:
                return formatdate(time.time() + proxy.shift, usegmt=True)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                operation = (self.headers.get("X-Amz-Target") or "").rpartition(".")[2]
                with proxy._lock:
                    proxy.operations.append(operation)
                    fault = proxy.faults.get(operation)
                if fault is not None:
                    status, code = fault
                    answer = json.dumps({"__type": code, "message": "injected"}).encode()
                    headers = [("Content-Type", "application/x-amz-json-1.1")]
                    headers.append(("x-amzn-ErrorType", code))
                else:
                    connection = http.client.HTTPConnection(target.netloc, timeout=30)
                    try:
                        connection.request("POST", self.path, body, dict(self.headers.items()))
                        response = connection.getresponse()
                        status, answer = response.status, response.read()
                        headers = [
                            (name, value)
                            for name, value in response.getheaders()
                            if name.lower() not in _OWN_HEADERS
                        ]
                    finally:
                        connection.close()
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def proxy(aws_endpoint: str) -> Iterator[Proxy]:
    """A :class:`Proxy` in front of the session's endpoint, for this test."""
    made = Proxy(aws_endpoint)
    yield made
    made.close()


@pytest.fixture
def prefix(sm_client: Any) -> Iterator[str]:
    """This test's own secret name prefix; every secret under it is deleted afterwards."""
    made = new_prefix()
    yield made
    for page in sm_client.get_paginator("list_secrets").paginate(
        Filters=[{"Key": "name", "Values": [made]}]
    ):
        for entry in page["SecretList"]:
            sm_client.delete_secret(SecretId=entry["Name"], ForceDeleteWithoutRecovery=True)


def through(proxy: Proxy, prefix: str, **options: Any) -> SecretsManagerStore:
    """A store on ``prefix`` whose calls go through ``proxy``."""
    return SecretsManagerStore(prefix, region=REGION, endpoint_url=proxy.url, **options)
