"""The Secrets Manager store's backend: moto's server over real HTTP, with fake AWS credentials.

The endpoint is resolved once per session, in this order:

1. ``CREDKEEPER_TEST_AWS_ENDPOINT`` (e.g. ``http://127.0.0.1:55000``), used as is; if it does
   not answer, the tests that need it fail.
2. The ``moto`` service of ``docker/compose.yaml``, when ``CREDKEEPER_TEST_DOCKER=1`` and a
   Docker engine answers.
3. moto's ``ThreadedMotoServer`` in this process, on a free port, for the session.
4. If none of them works: a failure on CI, a skip elsewhere (``tests.backends.require_service``).

The session's environment holds fake credentials (``AWS_ACCESS_KEY_ID=testing``, ...) and
points boto3 away from any real AWS configuration, so spawned processes of the concurrency
cases and the storm inherit the same credentials and nothing can reach a real account.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import boto3
import botocore.config
import botocore.exceptions
import pytest

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


@pytest.fixture(scope="session")
def aws_credentials(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fake AWS credentials in this process's environment, inherited by spawned processes."""
    nowhere = tmp_path_factory.mktemp("aws") / "absent"
    with pytest.MonkeyPatch.context() as patch:
        for name in CLEARED:
            patch.delenv(name, raising=False)
        for name, value in FAKE_CREDENTIALS.items():
            patch.setenv(name, value)
        patch.setenv("AWS_CONFIG_FILE", str(nowhere))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
        yield


@contextlib.contextmanager
def _cached_module_listing() -> Iterator[None]:
    """Make moto's server list its own package directory once instead of on every request.

    Routing a request calls ``moto.backends.list_of_moto_modules``, which lists moto's
    directory and stats each entry: most of the server's time per request on a small machine.
    The listing never changes while it runs; Secrets Manager's behaviour is untouched.
    """
    import moto.backends

    original = moto.backends.list_of_moto_modules
    listing = tuple(original())
    moto.backends.list_of_moto_modules = lambda: listing
    try:
        yield
    finally:
        moto.backends.list_of_moto_modules = original


def _in_process() -> Iterator[str]:
    """moto's threaded server on a free loopback port, stopped at the end."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        require_service(
            MOTO.name,
            [f"{ENV_VAR} is not set", f"moto's server cannot be imported ({exc})"],
            MOTO.how_to_start,
        )
    # One line per request otherwise.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with _cached_module_listing():
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="session")
def aws_endpoint(request: pytest.FixtureRequest, aws_credentials: None) -> Iterator[str]:
    """The URL of a Secrets Manager endpoint (moto's server) the tests may create secrets in.

    moto keeps its state per process, not per server: tests use unique name prefixes.
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
    yield from _in_process()


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
