"""No token ever reaches a log line, a repr, an exception message or a file in clear."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from credkeeper import (
    CredkeeperError,
    KeyRing,
    Provider,
    TokenManager,
)
from credkeeper.testing import FakeClock, FakeProvider, Fault
from credkeeper_file import FileStore


@pytest.fixture
def ring() -> KeyRing:
    """A fresh key ring."""
    return KeyRing.generate()


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    """Where the rescue journal lives."""
    return tmp_path / "journal"


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """The encrypted file store's path."""
    return tmp_path / "credentials.json"


@pytest.fixture
def manager(
    store_path: Path, fake: FakeProvider, clock: FakeClock, ring: KeyRing, journal: Path
) -> Iterator[TokenManager]:
    """A manager sealing tokens into a file store."""
    with TokenManager(
        FileStore(store_path), fake.provider(), keyring=ring, journal=journal, clock=clock
    ) as m:
        yield m


def exercise_every_path(
    manager: TokenManager, fake: FakeProvider, clock: FakeClock, texts: list[str]
) -> None:
    """Drive a refresh cycle and each error path, keeping every message and repr produced."""

    def attempt(call: object) -> None:
        try:
            texts.append(repr(call() if callable(call) else call))
        except CredkeeperError as exc:
            texts.extend([str(exc), repr(exc), repr(exc.args), repr(exc.__dict__)])
            if exc.__cause__ is not None:
                texts.append(repr(exc.__cause__))

    first = fake.issue(expires_in=0)
    manager.put("cycle", first)
    texts.append(repr(first))
    attempt(lambda: manager.get("cycle"))
    attempt(lambda: manager.refresh("cycle", failed=manager.get("cycle").access_token))

    for number, fault in enumerate(
        [
            Fault.status(429, retry_after=1),
            Fault.status(500),
            Fault.malformed(),
            Fault.timeout(0.5),
        ]
    ):
        key = f"fault-{number}"
        manager.put(key, fake.issue(expires_in=-5))
        fake.fail_next(*[fault] * 40)
        attempt(lambda key=key: manager.get(key))  # type: ignore[misc]
        fake.clear_faults()

    echoing = fake.issue(expires_in=-5)
    manager.put("echo", echoing)
    echo_body = json.dumps(
        {
            "detail": "Server error: Command '[claude, --settings, "
            + json.dumps({"credentials": echoing.to_wrapper()})
            + "]' timed out after 180 seconds"
        }
    )
    fake.fail_next(*[Fault.status(500, body=echo_body)] * 40)
    attempt(lambda: manager.get("echo"))

    revoked = fake.issue(expires_in=0)
    manager.put("revoked", revoked)
    fake.revoke(revoked)
    attempt(lambda: manager.get("revoked"))
    attempt(lambda: manager.get("revoked"))
    attempt(lambda: manager.get("missing"))
    clock.advance(timedelta(hours=1))
    texts.extend([repr(manager), repr(manager.store), repr(manager.policy.provider)])
    texts.append(repr(manager.store.get("cycle")))


def all_tokens(fake: FakeProvider) -> set[str]:
    return fake.all_tokens()


class TestNoTokenLeaks:
    def test_logs_reprs_and_errors_contain_no_token(
        self,
        manager: TokenManager,
        fake: FakeProvider,
        clock: FakeClock,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """DEBUG logs, reprs and exception texts of every path mention no token."""
        caplog.set_level(logging.DEBUG)
        texts: list[str] = []

        exercise_every_path(manager, fake, clock, texts)

        haystack = "\n".join(texts + [record.getMessage() for record in caplog.records])
        assert len(all_tokens(fake)) > 10
        assert [] == [token for token in all_tokens(fake) if token in haystack]
        assert "[REDACTED]" in haystack

    def test_files_on_disk_contain_no_token(
        self,
        manager: TokenManager,
        fake: FakeProvider,
        clock: FakeClock,
        tmp_path: Path,
    ) -> None:
        """Neither the store file nor the journal ever holds a token in clear."""
        exercise_every_path(manager, fake, clock, [])

        contents = b"".join(path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())
        assert [] == [token for token in all_tokens(fake) if token.encode() in contents]

    def test_provider_repr_hides_the_client_secret(self) -> None:
        """A confidential client's secret stays out of the provider's repr."""
        provider = Provider(
            token_url="https://idp.example/token",
            client_id="app",
            client_secret="s3cret-value-123",
        )

        assert "s3cret-value-123" not in repr(provider)
