"""Tables shaped like the wrapper guide's examples pass the process storm and keep the rest intact.

On PostgreSQL and MariaDB, three tables as applications following the guide keep them:

- ``users`` with uuid keys and plain-text tokens (``plaintext=true``);
- ``claude_tokens`` with integer user ids, whose row is created at login (``insert=true``),
  epoch-ms expiry and space-separated scopes, tokens in plain text too;
- ``accounts`` whose tokens the application encrypts with its own ``encrypt(token,
  SECRET_KEY)`` (``codec=app_cipher``), a timestamp expiry and JSON scopes.

Each passes ``run_storm`` (4 processes x 16 threads: exactly one refresh, every caller holding
the new token), and afterwards every other row, and every other column of the stormed row, reads
back as the database's own text exactly as before. So does a ``claude_tokens`` row the
application itself inserted at login, which credkeeper never wrote before the storm.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from credkeeper import Credentials, TokenCodec
from credkeeper.storekit import to_epoch_ms
from credkeeper.testing import run_storm
from tests.examples import app_cipher

from .apptables import create_table

TOKENS = ("access_token", "refresh_token", "expires_at", "scopes", "subscription_type")
GUIDE_MAPPING = "&".join(f"{name}_column={name}" for name in TOKENS)


@dataclass(frozen=True)
class GuideTable:
    """One of the guide's table shapes: its columns per backend, rows the application wrote,
    the key stormed, and the store options."""

    key: str
    columns: Callable[[str], str]
    rows: list[dict[str, Any]]
    stormed: str
    options: str
    scopes: Callable[[tuple[str, ...]], str]
    codec: Callable[[], TokenCodec] | None = None


def space(scopes: tuple[str, ...]) -> str:
    """The token response's ``scope`` string, as the application stores it."""
    return " ".join(scopes)


def stringify(scopes: tuple[str, ...]) -> str:
    """``JSON.stringify(scopes)``."""
    return json.dumps(list(scopes), separators=(",", ":"))


def parsed(scopes: str) -> tuple[str, ...]:
    """The scopes a stored value holds, whichever of the two formats it is in."""
    return tuple(json.loads(scopes)) if scopes.startswith("[") else tuple(scopes.split())


USER_IDS = [str(uuid.UUID(int=n, version=4)) for n in (1, 2, 3)]


def users_columns(backend: str) -> str:
    """The guide's ``users`` table, keyed by uuid, tokens kept in plain text."""
    created = "DATETIME(6)" if backend == "mariadb" else "TIMESTAMP"
    return (
        "id UUID NOT NULL PRIMARY KEY, email VARCHAR(200) NOT NULL, name VARCHAR(100), "
        "access_token TEXT, refresh_token TEXT, expires_at BIGINT, scopes TEXT, "
        f"subscription_type VARCHAR(20), created_at {created} NOT NULL"
    )


def claude_tokens_columns(backend: str) -> str:
    """A ``claude_tokens`` table whose row the application creates at login."""
    now = "now()" if backend == "postgresql" else "CURRENT_TIMESTAMP"
    return (
        "user_id INTEGER NOT NULL PRIMARY KEY, access_token TEXT NOT NULL, "
        "refresh_token TEXT NOT NULL, expires_at BIGINT NOT NULL, scopes TEXT NOT NULL, "
        "subscription_type VARCHAR(20), source VARCHAR(20) NOT NULL DEFAULT 'web-login', "
        f"created_at TIMESTAMP NOT NULL DEFAULT {now}"
    )


def accounts_columns(backend: str) -> str:
    """Accounts whose tokens the application encrypts itself; expiry a timestamp, JSON scopes."""
    expiry = "TIMESTAMPTZ" if backend == "postgresql" else "DATETIME(3) NULL"
    return (
        "id VARCHAR(64) NOT NULL PRIMARY KEY, plan VARCHAR(20) NOT NULL, "
        f"access_token TEXT, refresh_token TEXT, expires_at {expiry}, scopes JSON, "
        "subscription_type VARCHAR(20), notes TEXT"
    )


SHAPES = {
    "users-uuid-plaintext": GuideTable(
        key="id",
        columns=users_columns,
        rows=[
            {
                "id": USER_IDS[0],
                "email": "ada@example.com",
                "name": "Ada",
                "access_token": "sk-ant-oat01-ada",
                "refresh_token": "sk-ant-ort01-ada",
                "expires_at": 1_893_456_000_000,
                "scopes": "user:inference user:profile",
                "subscription_type": "max",
                "created_at": "2024-02-29 23:59:59.999999",
            },
            {
                "id": USER_IDS[1],
                "email": "grace@example.com",
                "name": "Grace ✓",
                "created_at": "2025-01-01 00:00:00",
            },
            {
                "id": USER_IDS[2],
                "email": "alan@example.com",
                "name": None,
                "access_token": "sk-ant-oat01-alan",
                "refresh_token": "sk-ant-ort01-alan",
                "expires_at": 1_893_456_000_000,
                "scopes": "user:inference",
                "created_at": "2025-06-30 12:00:00",
            },
        ],
        stormed=USER_IDS[1],
        options=f"key_column=id&{GUIDE_MAPPING}&plaintext=true",
        scopes=space,
    ),
    "claude-tokens-insert": GuideTable(
        key="user_id",
        columns=claude_tokens_columns,
        rows=[
            {
                "user_id": 7,
                "access_token": "sk-ant-oat01-7",
                "refresh_token": "sk-ant-ort01-7",
                "expires_at": 1_893_456_000_000,
                "scopes": "user:inference user:profile",
                "subscription_type": "pro",
                "source": "mobile",
                "created_at": "2025-01-01 00:00:00",
            },
            {
                "user_id": 420,
                "access_token": "sk-ant-oat01-420",
                "refresh_token": "sk-ant-ort01-420",
                "expires_at": 1_767_225_600_000,
                "scopes": "user:inference",
                "created_at": "2025-06-30 12:00:00",
            },
        ],
        stormed="42",
        options=f"key_column=user_id&{GUIDE_MAPPING}&insert=true&plaintext=true",
        scopes=space,
    ),
    "accounts-app-cipher": GuideTable(
        key="id",
        columns=accounts_columns,
        rows=[
            {"id": "acct-1", "plan": "team", "notes": "first customer"},
            {
                "id": "acct-2",
                "plan": "pro",
                "access_token": "AAAAAAAAAAAAAAAA:BBBBBBBBBBBBBBBBBBBBBB==:Q0NDQw==",
                "refresh_token": "AAAAAAAAAAAAAAAA:BBBBBBBBBBBBBBBBBBBBBB==:RERERA==",
                "expires_at": "2030-01-01 00:00:00",
                "scopes": '["user:inference","user:profile"]',
                "subscription_type": "pro",
            },
        ],
        stormed="acct-1",
        options=f"key_column=id&{GUIDE_MAPPING}",
        scopes=stringify,
        codec=app_cipher,
    ),
}


def untouched(
    rows: dict[Any, tuple[str | None, ...]], names: list[str], stormed: Any
) -> dict[Any, tuple[str | None, ...]]:
    """``rows`` with the mapped credential columns of the stormed key's row blanked out."""
    blanked = {names.index(name) for name in TOKENS}
    return {
        key: tuple(None if key == stormed and i in blanked else v for i, v in enumerate(row))
        for key, row in rows.items()
    }


def stored_key(rows: dict[Any, Any], key: str) -> Any:
    """``key`` as the driver hands the key column back (an int, a uuid.UUID, a string)."""
    return next((stored for stored in rows if str(stored) == key), key)


@pytest.mark.slow
@pytest.mark.parametrize("repetition", range(20))
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_guide_table_passes_the_storm_and_keeps_everything_else(
    backend: str,
    shape_name: str,
    repetition: int,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """64 callers on the guide's table: 1 refresh, all hold it (the app's spelling of the scopes
    in the row), and nothing else in the table moves."""
    shape = SHAPES[shape_name]
    server: str = request.getfixturevalue(
        "postgres_url" if backend == "postgresql" else "mysql_url"
    )
    table = create_table(
        server,
        backend,
        shape.columns(backend),
        options=shape.options,
        prefix=shape_name.partition("-")[0],
        key=shape.key,
    )
    try:
        for row in shape.rows:
            table.insert(**row)
        before = table.dump()

        report = run_storm(table.url, directory=tmp_path, key=shape.stormed, codec=shape.codec)

        after = table.dump()
        names = table.column_names()
    finally:
        table.drop()
    stormed = stored_key(after, shape.stormed)
    row = dict(zip(names, after[stormed], strict=True))
    access, scopes = row["access_token"] or "", row["scopes"] or ""
    if shape.codec is not None:
        access = shape.codec().unseal(access, key=shape.stormed, field="access_token")
    if stormed not in before:  # created by the storm: its other columns are the defaults
        after = {key: value for key, value in after.items() if key != stormed}

    assert (1, ("ok",), (), 64, 64, {hashlib.sha256(access.encode()).hexdigest()}, scopes) == (
        report.refreshes,
        report.outcomes,
        report.errors,
        report.callers,
        report.holding_current,
        set(report.tokens_seen),
        shape.scopes(parsed(scopes)),
    )
    assert untouched(before, names, stormed) == untouched(after, names, stormed)


@pytest.mark.slow
@pytest.mark.parametrize("repetition", range(5))
@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_row_the_application_inserted_passes_the_storm_and_keeps_everything_else(
    backend: str, repetition: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """64 callers on a claude_tokens row the app INSERTed at login: 1 refresh, all hold it, and
    the row's source and created_at, and every other row, read back byte for byte."""
    shape = SHAPES["claude-tokens-insert"]
    server: str = request.getfixturevalue(
        "postgres_url" if backend == "postgresql" else "mysql_url"
    )
    table = create_table(
        server,
        backend,
        shape.columns(backend),
        options=shape.options,
        prefix="claude",
        key=shape.key,
    )
    dumps: list[dict[Any, tuple[str | None, ...]]] = []

    def login(credentials: Credentials) -> None:
        """The application's login handler: one row, epoch-ms expiry, space-separated scopes."""
        table.insert(
            user_id=int(shape.stormed),
            access_token=credentials.access_token.get_secret_value(),
            refresh_token=credentials.refresh_token.get_secret_value(),
            expires_at=to_epoch_ms(credentials.expires_at),
            scopes=space(credentials.scopes),
            subscription_type=credentials.subscription_type,
            source="ios",
            created_at="2025-03-04 05:06:07",
        )
        dumps.append(table.dump())

    try:
        for row in shape.rows:
            table.insert(**row)

        report = run_storm(table.url, directory=tmp_path, key=shape.stormed, seed=login)

        after = table.dump()
        names = table.column_names()
    finally:
        table.drop()
    before = dumps[0]
    stormed = stored_key(after, shape.stormed)
    row = dict(zip(names, after[stormed], strict=True))
    access, scopes = row["access_token"] or "", row["scopes"] or ""

    assert (
        1,
        ("ok",),
        (),
        64,
        64,
        {hashlib.sha256(access.encode()).hexdigest()},
        scopes,
    ) == (
        report.refreshes,
        report.outcomes,
        report.errors,
        report.callers,
        report.holding_current,
        set(report.tokens_seen),
        space(parsed(scopes)),
    )
    assert untouched(before, names, stormed) == untouched(after, names, stormed)
