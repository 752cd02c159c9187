"""``credkeeper serve`` as deployed: on PostgreSQL, with the sweeper, its refusals and its logs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from click.testing import CliRunner

from credkeeper import AsyncTokenManager, Credentials, KeyRing, open_store
from credkeeper.cli import cli
from credkeeper.server import create_app
from credkeeper.testing import FakeProvider
from credkeeper_sql import init_store

from .conftest import Service, free_port

HELLO = {"messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture
def postgres_store(postgres_url: str) -> Iterator[str]:
    """A store URL on the PostgreSQL server, in a table of this test's; dropped after."""
    table = f"ck_serve_{uuid.uuid4().hex[:10]}"
    init_store(postgres_url, table=table)
    yield f"{postgres_url}{'&' if '?' in postgres_url else '?'}table={table}"
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as connection:
            sa.Table(table, sa.MetaData()).drop(connection, checkfirst=True)
    finally:
        engine.dispose()


def test_a_login_stored_on_postgresql_is_answered_back(
    start_service: Callable[..., Service], postgres_store: str, fake: FakeProvider
) -> None:
    """On PostgreSQL, a login PUT through the service is what GET answers."""
    service = start_service("--no-sweep", store=postgres_store)
    credentials = fake.issue()
    with service.client() as client:
        client.put("/v1/users/alice/credentials", json=credentials.to_wrapper())
        answer = client.get("/v1/users/alice/credentials").json()
    assert credentials.to_wrapper() == answer["oauth_credentials"]


def test_an_unreachable_store_answers_503_with_retry_after(
    start_service: Callable[..., Service],
) -> None:
    """A store that cannot be reached answers 503 store_unavailable with Retry-After."""
    service = start_service("--no-sweep", store="postgresql+psycopg://postgres@127.0.0.1:1/test")
    with service.client() as client:
        response = client.get("/v1/users/alice/credentials")
    assert (503, "store_unavailable", True) == (
        response.status_code,
        response.json()["code"],
        "retry-after" in response.headers,
    )


def test_the_sweeper_refreshes_a_credential_before_anyone_asks(
    start_service: Callable[..., Service],
    login: Callable[..., Credentials],
    fake: FakeProvider,
) -> None:
    """With --sweep, a credential due soon is refreshed without any request for it."""
    login("alice", expires_in=60)
    start_service("--sweep")
    deadline = time.monotonic() + 30
    while fake.refresh_count == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 1 == fake.refresh_count


def test_no_token_reaches_the_service_log(
    service: Service, login: Callable[..., Credentials], fake: FakeProvider
) -> None:
    """Requests carrying and answering tokens leave none of them in the service's log."""
    login("alice", expires_in=60)
    with service.client() as client:
        fresh = client.get("/v1/users/alice/credentials").json()["oauth_credentials"]
        client.post(
            "/v1/users/alice/credentials/refresh",
            json={"failed_access_token": fresh["access_token"]},
        )
        client.post("/v1/users/alice/messages", json=HELLO)
        client.put("/v1/users/bob/credentials", json=fake.issue().to_wrapper())
    log = service.output()
    # Every token the provider ever minted, the first login's among them.
    assert [] == [token for token in fake.all_tokens() if token in log]


def test_serve_refuses_a_public_address_without_api_keys() -> None:
    """serve --listen 0.0.0.0:PORT without --api-keys exits 2 naming the fix."""
    result = CliRunner().invoke(cli, ["serve", "--listen", "0.0.0.0:8080"])
    assert (2, True) == (result.exit_code, "--api-keys" in result.stderr)


def test_serve_refuses_a_webhook_without_a_secret() -> None:
    """serve --webhook URL without --webhook-secret exits 2 naming the option."""
    result = CliRunner().invoke(
        cli,
        ["serve", "--webhook", "https://hooks.example/h"],
        env={"CREDKEEPER_WEBHOOK_SECRET": ""},
    )
    assert (2, True) == (result.exit_code, "--webhook-secret" in result.stderr)


def test_serve_refuses_an_unreadable_webhook_secret_file(tmp_path: Path) -> None:
    """--webhook-secret @FILE naming no file exits 2 naming the file."""
    missing = tmp_path / "no-such-secret"
    result = CliRunner().invoke(
        cli,
        ["serve", "--webhook", "https://hooks.example/h", "--webhook-secret", f"@{missing}"],
    )
    assert (2, True) == (result.exit_code, str(missing) in result.stderr)


def test_serve_refuses_a_plain_http_webhook_to_another_host(tmp_path: Path) -> None:
    """A webhook over plain http beyond loopback exits 2 naming --webhook, before any start."""
    secret = "whsec_" + "A" * 44
    result = CliRunner().invoke(
        cli,
        ["serve", "--webhook", "http://hooks.example/h", "--webhook-secret", secret],
    )
    assert (2, True, False) == (
        result.exit_code,
        "--webhook" in result.stderr,
        secret in result.stderr,
    )


def test_messages_answer_503_without_a_wrapper(
    tmp_path: Path, fake: FakeProvider, keyring: KeyRing, store_url: str
) -> None:
    """An application made without a wrapper client answers messages with 503 no_wrapper."""
    port = free_port()
    store = open_store(store_url)
    manager = AsyncTokenManager(
        store, fake.provider(), keyring=keyring, journal=tmp_path / "journal"
    )
    app = create_app(manager=manager)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))

    async def serve() -> None:
        async with manager:
            await server.serve()

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        while not server.started and thread.is_alive():
            time.sleep(0.02)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/users/alice/messages", json=HELLO)
    finally:
        server.should_exit = True
        thread.join()
    assert (503, "no_wrapper") == (response.status_code, response.json()["code"])


def test_the_command_line_and_api_keys_load_without_fastapi() -> None:
    """Importing credkeeper.server and the command line imports neither FastAPI nor uvicorn."""
    code = (
        "import sys, credkeeper.server, credkeeper.cli; "
        "print(sorted({'fastapi', 'uvicorn'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert b"[]\n" == result.stdout
