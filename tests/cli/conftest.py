"""Fixtures for the command-line tests: a real file store, key file and provider per test.

Every test runs in its own HOME and XDG directories, so nothing reads or writes the real
user's files, and with no ``CREDKEEPER_*`` variable from the environment that runs the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from credkeeper import Credentials, KeyRing, Record, open_store
from credkeeper._settings import ENVIRONMENT as SETTINGS
from credkeeper._store import CredentialStore
from credkeeper.cli import cli
from credkeeper.cli._errors import PREFIX
from credkeeper.testing import FakeProvider

ENVIRONMENT = (
    *(variable for variable, _ in SETTINGS.values()),
    # rich would draw colours and live displays if any of these said so.
    "FORCE_COLOR",
    "TTY_COMPATIBLE",
    "TTY_INTERACTIVE",
)


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A private HOME and XDG tree, no credkeeper variables, and a wide virtual terminal."""
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    # Tables are as wide as rich thinks the terminal is; keep rows on one line.
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    """A rotating-token provider on loopback, on real time like the command line it serves."""
    with FakeProvider() as provider:
        yield provider


@pytest.fixture
def keyring() -> KeyRing:
    """The key ring the command line is given."""
    return KeyRing.generate("k1")


@pytest.fixture
def keys_file(tmp_path: Path, keyring: KeyRing) -> Path:
    """The key ring in a key file, mode 0600 as ``KeyRing.from_file`` demands."""
    return write_keys(tmp_path / "keys", keyring)


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """An encrypted file store in the test's directory."""
    return (tmp_path / "store" / "credentials.json").as_uri()


@dataclass
class Cli:
    """``credkeeper`` with the test's global options, run in-process by click's runner."""

    options: list[str]

    def __call__(self, *args: str, input: str | bytes | None = None) -> Result:
        """Run ``credkeeper <options> <args>``; stdout and stderr are kept apart."""
        return CliRunner().invoke(cli, [*self.options, *args], input=input)


@pytest.fixture
def run(store_url: str, keys_file: Path, tmp_path: Path, fake: FakeProvider) -> Cli:
    """The command line on the test's store, key file, journal and fake provider."""
    return Cli(
        [
            "--store",
            store_url,
            "--keys",
            f"@{keys_file}",
            "--journal",
            str(tmp_path / "journal"),
            "--provider",
            fake.token_url,
        ]
    )


def write_keys(path: Path, ring: KeyRing) -> Path:
    """Write ``ring`` to a 0600 key file at ``path``."""
    path.write_text(ring.export() + "\n", encoding="utf-8")
    os.chmod(path, 0o600)
    return path


def claude_code_file(path: Path, credentials: Credentials) -> Path:
    """Write ``credentials`` as Claude Code's credentials file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(credentials.to_claude_code()), encoding="utf-8")
    return path


def import_credentials(run: Cli, key: str, credentials: Credentials) -> None:
    """Store ``credentials`` under ``key`` through ``credkeeper import --stdin``."""
    result = run("import", "--key", key, "--stdin", input=json.dumps(credentials.to_wrapper()))
    assert 0 == result.exit_code, result.stderr


def stored(store_url: str, key: str) -> Record:
    """The record under ``key`` as the store holds it (token fields sealed)."""
    store = open_store(store_url)
    assert isinstance(store, CredentialStore)
    try:
        record = store.get(key)
    finally:
        store.close()
    assert record is not None
    return record


def set_refreshed_at(store_url: str, key: str, refreshed_at: datetime | None) -> Record:
    """Set when the tokens under ``key`` were last obtained, as an older store may hold it."""
    store = open_store(store_url)
    assert isinstance(store, CredentialStore)
    try:
        record = store.get(key)
        assert record is not None
        return store.put(record.replace(refreshed_at=refreshed_at))
    finally:
        store.close()


def stored_tokens(store_url: str, keyring: KeyRing, key: str) -> tuple[str, str]:
    """The access and refresh tokens stored under ``key``, opened with ``keyring``."""
    record = stored(store_url, key)
    return (
        keyring.unseal(record.access_token, key=key, field="access_token"),
        keyring.unseal(record.refresh_token, key=key, field="refresh_token"),
    )


def leaked(fake: FakeProvider, *results: Result) -> set[str]:
    """Every token ``fake`` ever issued that shows in the output of ``results``."""
    text = "".join(result.stdout + result.stderr for result in results)
    return {token for token in fake.all_tokens() if token in text}


def error_line(result: Result) -> str:
    """The single error line of a failed run, after checking that it is alone."""
    lines = result.stderr.splitlines()
    assert 1 == len(lines), result.stderr
    assert lines[0].startswith(PREFIX), lines[0]
    return lines[0][len(PREFIX) :]


def damage(store_url: str, key: str) -> None:
    """Give the record under ``key`` in the file store a field of the wrong type."""
    path = Path(store_url.removeprefix("file://"))
    with contextlib.closing(sqlite3.connect(path)) as database:
        # The expiry column too: scan_due reads back only the records it cannot index.
        database.execute(
            "UPDATE records SET document = json_set(document, '$.expires_at', 'tomorrow'),"
            " expires_at = NULL WHERE key = ?",
            (key,),
        )
        database.commit()
