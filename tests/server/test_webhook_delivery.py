"""Webhooks from ``credkeeper serve`` replicas: one signed delivery per transition of a credential.

Two service processes share one store; a receiver on loopback records what arrives and checks
each signature. A transition is reported by the replica whose write made it, so however many
replicas saw the credential change, the receiver gets it once.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from credkeeper import TokenManager
from credkeeper.server import new_webhook_secret, verify_webhook
from credkeeper.testing import FakeProvider

from .conftest import Service

SECRET = new_webhook_secret()


class Receiver(ThreadingHTTPServer):
    """Records each POST: its headers and its exact body."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks"

    def payloads(self) -> list[dict[str, Any]]:
        """Each delivery's payload, its signature verified."""
        with self.lock:
            return [verify_webhook(SECRET, headers, body) for headers, body in self.received]


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.server.lock:
            self.server.received.append((dict(self.headers.items()), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def stop(*services: Service) -> None:
    """SIGTERM each replica and wait: deliveries pending are sent before it exits."""
    for service in services:
        service.process.terminate()
    for service in services:
        # uvicorn ends a graceful shutdown by re-raising the signal it caught.
        assert service.process.wait(timeout=30) in (0, -15), service.output()


def store_dead_login(fake: FakeProvider, manager: TokenManager) -> None:
    """Store under "alice" a login due for refresh whose refresh token the provider refuses."""
    dead = fake.issue(expires_in=60)
    fake.revoke(dead)
    manager.put("alice", dead)


@pytest.fixture
def replicas(
    start_service: Callable[..., Service],
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> tuple[Service, Service]:
    """Two replicas on one store, each with the receiver as its webhook: one reads the secret
    from a file, the other from the environment."""
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    options = ("--no-sweep", "--webhook", receiver.url)
    first = start_service(*options, "--webhook-secret", f"@{secret_file}")
    monkeypatch.setenv("CREDKEEPER_WEBHOOK_SECRET", SECRET)
    return first, start_service(*options)


def test_needs_reauth_seen_by_two_replicas_is_delivered_once(
    replicas: tuple[Service, Service],
    receiver: Receiver,
    fake: FakeProvider,
    manager: TokenManager,
) -> None:
    """Both replicas refresh a dead login at once: one signed credential.needs_reauth."""
    store_dead_login(fake, manager)

    def read(service: Service) -> int:
        with service.client() as client:
            return client.get("/v1/users/alice/credentials").status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(read, [*replicas, *replicas]))
    stop(*replicas)

    assert ([409] * 4, [("credential.needs_reauth", "alice")]) == (
        statuses,
        [(p["type"], p["data"]["key"]) for p in receiver.payloads()],
    )


def test_a_new_login_after_needs_reauth_is_delivered_as_recovered(
    replicas: tuple[Service, Service],
    receiver: Receiver,
    fake: FakeProvider,
    manager: TokenManager,
) -> None:
    """needs_reauth through one replica, a PUT through the other: the two events, once each."""
    first, second = replicas
    store_dead_login(fake, manager)
    with first.client() as client:
        assert 409 == client.get("/v1/users/alice/credentials").status_code
    with second.client() as client:
        login = fake.issue().to_wrapper()
        assert 200 == client.put("/v1/users/alice/credentials", json=login).status_code
        # Storing over an active credential is no recovery.
        assert 200 == client.put("/v1/users/alice/credentials", json=login).status_code
    stop(*replicas)

    assert [("credential.needs_reauth", "alice"), ("credential.recovered", "alice")] == [
        (p["type"], p["data"]["key"]) for p in receiver.payloads()
    ]


def test_a_delete_through_both_replicas_is_delivered_once(
    replicas: tuple[Service, Service], receiver: Receiver, fake: FakeProvider, manager: TokenManager
) -> None:
    """Two DELETEs of one credential, one per replica: one credential.deleted."""
    manager.put("alice", fake.issue())
    statuses = []
    for service in replicas:
        with service.client() as client:
            statuses.append(client.delete("/v1/users/alice/credentials").status_code)
    stop(*replicas)

    assert ([204, 404], ["credential.deleted"]) == (
        statuses,
        [p["type"] for p in receiver.payloads()],
    )


def test_no_delivery_carries_a_token(
    replicas: tuple[Service, Service],
    receiver: Receiver,
    fake: FakeProvider,
    manager: TokenManager,
) -> None:
    """Neither the dead login's tokens nor the new one's appear in any delivered body."""
    first, _ = replicas
    store_dead_login(fake, manager)
    with first.client() as client:
        client.get("/v1/users/alice/credentials")
        client.put("/v1/users/alice/credentials", json=fake.issue().to_wrapper())
        client.delete("/v1/users/alice/credentials")
    stop(*replicas)

    bodies = b" ".join(body for _, body in receiver.received).decode()
    assert (3, []) == (
        len(receiver.received),
        [token for token in fake.all_tokens() if token in bodies],
    )
