"""``plaintext=true``: a mapped table whose tokens the application keeps in plain text.

The declaration is for the engine and the command line, which read ``store.plaintext`` and then
neither seal tokens nor expect sealed ones: the column keeps holding the raw token every other
reader of the row expects, even when a manager has a key ring (for its journal), and the
command line needs no key ring at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from credkeeper import (
    ConfigurationError,
    CredentialStore,
    KeyRing,
    Secret,
    TokenManager,
    open_store,
)
from credkeeper.cli import cli
from credkeeper.testing import FakeProvider
from credkeeper_sql import AsyncSQLStore, SQLStore

from .apptables import BACKENDS, MAPPING, AppTable, create_table, database_url

COLUMNS = (
    "id VARCHAR(64) NOT NULL PRIMARY KEY, name VARCHAR(100), access_token TEXT, "
    "refresh_token TEXT, expires_at BIGINT"
)


@contextlib.contextmanager
def opened(url: str, **options: Any) -> Iterator[CredentialStore]:
    """A sync store on ``url``, closed afterwards."""
    store = open_store(url, **options)
    assert isinstance(store, CredentialStore)
    with contextlib.closing(store):
        yield store


def stored_tokens(table: AppTable, row_id: str) -> tuple[str, str]:
    """The token columns of one row, read with plain SQL."""
    engine = sa.create_engine(table.server)
    try:
        with engine.connect() as connection:
            query = f"SELECT access_token, refresh_token FROM {table.name} WHERE id = :id"  # noqa: S608
            access, refresh = connection.execute(sa.text(query), {"id": row_id}).one()
    finally:
        engine.dispose()
    return access, refresh


@pytest.fixture(params=BACKENDS)
def users(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AppTable]:
    """A users table whose tokens the application keeps plainly, declared plaintext=true."""
    server = database_url(request, request.param, tmp_path)
    table = create_table(
        server, request.param, COLUMNS, options=f"{MAPPING}&plaintext=true", prefix="users"
    )
    table.insert(id="ada", name="Ada")
    try:
        yield table
    finally:
        table.drop()


def test_plaintext_defaults_to_false() -> None:
    """A store not declared plaintext says so."""
    with opened("sqlite:///creds.db") as store:
        assert False is getattr(store, "plaintext", None)


@pytest.mark.parametrize("layout", ["", f"&table=users&{MAPPING}"])
def test_plaintext_from_the_url(layout: str) -> None:
    """?plaintext=true declares either layout's store plaintext."""
    with opened(f"sqlite:///creds.db?plaintext=true{layout}") as store:
        assert True is getattr(store, "plaintext", None)


def test_plaintext_as_a_keyword() -> None:
    """plaintext=True as a keyword of open_store or of the class declares the store plaintext."""
    with (
        opened("sqlite:///creds.db", plaintext=True) as by_url,
        SQLStore("sqlite:///creds.db", plaintext=True) as by_class,
    ):
        assert (True, True) == (getattr(by_url, "plaintext", None), by_class.plaintext)


def test_an_async_store_declares_plaintext() -> None:
    """AsyncSQLStore shows the declaration too."""
    store = AsyncSQLStore("sqlite+aiosqlite:///creds.db", plaintext=True)
    declared = store.plaintext
    asyncio.run(store.close())

    assert True is declared


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_plaintext_must_be_a_boolean(value: str) -> None:
    """plaintext=maybe is a ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match=f"plaintext must be true or false, got '{value}'"):
        open_store(f"sqlite:///creds.db?plaintext={value}")


def test_plaintext_is_read_only() -> None:
    """The declaration cannot be changed on an open store."""
    with SQLStore("sqlite:///creds.db") as store, pytest.raises(AttributeError):
        store.plaintext = True  # type: ignore[misc]


def test_a_manager_with_a_key_ring_writes_plain_tokens(
    users: AppTable, fake: FakeProvider, tmp_path: Path
) -> None:
    """With plaintext=true the columns hold the raw tokens, although the manager has a key ring."""
    with (
        opened(users.url) as store,
        TokenManager(
            store, fake.provider(), keyring=KeyRing.generate(), journal=tmp_path / "journal"
        ) as manager,
    ):
        manager.put("ada", fake.issue(expires_in=60))
        refreshed = manager.refresh("ada")

    assert (
        refreshed.access_token.get_secret_value(),
        refreshed.refresh_token.get_secret_value(),
    ) == stored_tokens(users, "ada")


@pytest.fixture
def live() -> Iterator[FakeProvider]:
    """A provider on real time, like the command line it serves."""
    with FakeProvider() as provider:
        yield provider


def credkeeper(*args: str, input: str | None = None) -> Result:
    """``credkeeper ARGS`` in-process; stdout and stderr kept apart."""
    return CliRunner().invoke(cli, list(args), input=input)


def test_the_cli_imports_and_refreshes_without_a_key_ring(
    users: AppTable, live: FakeProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`credkeeper import` and `refresh` on a plaintext table work with CREDKEEPER_KEYS unset."""
    for name in ("CREDKEEPER_KEYS", "CREDKEEPER_STORE", "CREDKEEPER_JOURNAL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    common = ("--store", users.url, "--journal", str(tmp_path / "journal"))
    login = json.dumps(live.issue(expires_in=3600).to_wrapper())

    imported = credkeeper(
        *common, "--provider", live.token_url, "import", "--key", "ada", "--stdin", input=login
    )
    refreshed = credkeeper(*common, "--provider", live.token_url, "refresh", "ada")
    access, refresh = stored_tokens(users, "ada")

    assert (0, 0, "valid", "current", 1) == (
        imported.exit_code,
        refreshed.exit_code,
        live.access_token_state(Secret(access)),
        live.refresh_token_state(Secret(refresh)),
        live.refresh_count,
    ), imported.stderr + refreshed.stderr
