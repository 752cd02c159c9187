"""Existing-table mode in the application's own formats: each mapped column written as it was.

Each table here is declared and written with plain SQL the way one program would (JavaScript's
``Date.now()`` milliseconds and ``toISOString()``, Python's ``isoformat()`` and ``json.dumps``,
PHP's ``date('c')``, a PostgreSQL ``timestamptz``, ``jsonb`` or ``text[]``, MariaDB's ``JSON``,
SQLAlchemy's DATETIME text on SQLite; scopes as the token response's space-separated string or
as a JSON array). After credkeeper refreshes a row, every column of it must read back, as the
database's own text, exactly as that program would have written the new credential.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from credkeeper import (
    ConfigurationError,
    Credentials,
    CredentialStore,
    Record,
    TokenManager,
    open_store,
)
from credkeeper.testing import FakeProvider

from .apptables import MAPPING, AppTable, create_table, database_url

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
OPTIONS = f"{MAPPING}&scopes_column=scopes&subscription_type_column=plan"


def epoch_ms(moment: datetime) -> int:
    """``Date.now() + expires_in * 1000``: whole epoch milliseconds."""
    return (moment - EPOCH) // timedelta(milliseconds=1)


def epoch_s(moment: datetime) -> int:
    """``Math.floor(Date.now() / 1000) + expires_in``, PHP's ``time() + $expiresIn``."""
    return (moment - EPOCH) // timedelta(seconds=1)


def javascript_iso(moment: datetime) -> str:
    """``new Date(...).toISOString()``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def php_date_c(moment: datetime) -> str:
    """PHP's ``date('c', $expires)`` on a server whose time zone is UTC+1."""
    return moment.astimezone(timezone(timedelta(hours=1))).isoformat(timespec="seconds")


def sqlalchemy_datetime(moment: datetime) -> str:
    """What SQLAlchemy's DateTime stores in SQLite: UTC, a space, six fractional digits."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def sqlite_datetime(moment: datetime) -> str:
    """SQLite's own ``datetime('now', '+8 hours')``: UTC, a space, whole seconds."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def naive_utc(moment: datetime) -> datetime:
    """A program binding a UTC wall-clock time to a timestamp without time zone."""
    return moment.astimezone(UTC).replace(tzinfo=None)


def space(scopes: tuple[str, ...]) -> str:
    """The token response's ``scope`` string, stored as it came."""
    return " ".join(scopes)


def stringify(scopes: tuple[str, ...]) -> str:
    """``JSON.stringify(scopes)`` (and PHP's ``json_encode``): no spaces."""
    return json.dumps(list(scopes), separators=(",", ":"))


def python_json(scopes: tuple[str, ...]) -> str:
    """Python's ``json.dumps(scopes)``: a space after each comma."""
    return json.dumps(list(scopes))


@dataclass(frozen=True)
class AppFormat:
    """How one program declares the expiry and scopes columns and writes values into them, and
    the store options it needs."""

    expires_type: str
    scopes_type: str
    expires_at: Callable[[datetime], Any]
    scopes: Callable[[tuple[str, ...]], Any]
    options: str = ""


FORMATS: dict[str, dict[str, AppFormat]] = {
    "postgresql": {
        "bigint-ms-space": AppFormat("BIGINT", "TEXT", epoch_ms, space),
        "bigint-s-stringify": AppFormat("BIGINT", "TEXT", epoch_s, stringify, "&expires_at_unit=s"),
        "timestamptz-jsonb": AppFormat("TIMESTAMPTZ", "JSONB", lambda at: at, stringify),
        "timestamp-text-array": AppFormat("TIMESTAMP", "TEXT[]", naive_utc, list),
        "iso-javascript-json": AppFormat("TEXT", "JSON", javascript_iso, stringify),
        "iso-python-python-json": AppFormat(
            "VARCHAR(40)", "TEXT", datetime.isoformat, python_json, "&expires_at_unit=iso"
        ),
        "iso-php-space": AppFormat("VARCHAR(32)", "VARCHAR(255)", php_date_c, space),
    },
    "mariadb": {
        "bigint-ms-space": AppFormat("BIGINT", "VARCHAR(255)", epoch_ms, space),
        "int-s-json": AppFormat("INT", "JSON", epoch_s, stringify, "&expires_at_unit=s"),
        "datetime3-python-json": AppFormat("DATETIME(3)", "TEXT", naive_utc, python_json),
        "timestamp-space": AppFormat("TIMESTAMP(6) NULL", "TEXT", naive_utc, space),
        "iso-javascript-json": AppFormat("VARCHAR(32)", "JSON", javascript_iso, stringify),
    },
    "sqlite": {
        "integer-ms-space": AppFormat("INTEGER", "TEXT", epoch_ms, space),
        "integer-s-stringify": AppFormat(
            "INTEGER", "TEXT", epoch_s, stringify, "&expires_at_unit=s"
        ),
        "iso-javascript-json": AppFormat("TEXT", "JSON", javascript_iso, stringify),
        "sqlalchemy-datetime-python-json": AppFormat(
            "DATETIME", "TEXT", sqlalchemy_datetime, python_json
        ),
        "sqlite-datetime-space": AppFormat("TIMESTAMP", "TEXT", sqlite_datetime, space),
    },
}
CASES = [(backend, name) for backend, shapes in FORMATS.items() for name in shapes]


def columns_sql(shape: AppFormat, backend: str) -> str:
    """The application's table: its own columns around the credential's."""
    return (
        "id VARCHAR(64) NOT NULL PRIMARY KEY, name VARCHAR(100) NOT NULL, "
        f"access_token TEXT, refresh_token TEXT, expires_at {shape.expires_type}, "
        f"scopes {shape.scopes_type}, plan VARCHAR(20), "
        f"created_at {'DATETIME' if backend == 'mariadb' else 'TIMESTAMP'} NULL"
    )


def app_row(shape: AppFormat, row_id: str, credentials: Credentials) -> dict[str, Any]:
    """A row as the application writes it, ``credentials`` in its formats."""
    return {
        "id": row_id,
        "name": "Ada Lovelace",
        "access_token": credentials.access_token.get_secret_value(),
        "refresh_token": credentials.refresh_token.get_secret_value(),
        "expires_at": shape.expires_at(credentials.expires_at),
        "scopes": shape.scopes(credentials.scopes),
        "plan": credentials.subscription_type,
        "created_at": datetime(2024, 2, 29, 23, 59, 59),
    }


@contextlib.contextmanager
def app_table(server: str, backend: str, shape: AppFormat) -> Iterator[AppTable]:
    """The application's table in ``shape``'s formats, dropped afterwards."""
    table = create_table(
        server, backend, columns_sql(shape, backend), options=OPTIONS + shape.options
    )
    try:
        yield table
    finally:
        table.drop()


@contextlib.contextmanager
def opened(url: str) -> Iterator[CredentialStore]:
    """A sync store on ``url``, closed afterwards."""
    store = open_store(url)
    assert isinstance(store, CredentialStore)
    with contextlib.closing(store):
        yield store


def soon() -> datetime:
    """A minute from now, to the microsecond, as a program's clock gives it."""
    return datetime.now(UTC) + timedelta(minutes=1)


def new_record(key: str, **changes: Any) -> Record:
    """A never-stored credential under ``key``."""
    fields: dict[str, Any] = {
        "key": key,
        "access_token": "access",
        "refresh_token": "refresh",
        "expires_at": datetime(2031, 5, 17, 8, 30, 12, 345000, tzinfo=UTC),
        "scopes": ("user:inference", "user:profile"),
    }
    return Record(**{**fields, **changes})


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The database URL of the case's backend (the first element of its parameters)."""
    backend: str = request.node.callspec.params["case"][0]
    return database_url(request, backend, tmp_path)


@pytest.mark.parametrize("case", CASES, ids=[f"{b}-{n}" for b, n in CASES])
def test_a_refresh_writes_every_column_as_the_application_would(
    case: tuple[str, str], server: str, fake: FakeProvider, tmp_path: Path
) -> None:
    """After a refresh the row reads back as the app writing that format would have left it."""
    backend, name = case
    shape = FORMATS[backend][name]
    with app_table(server, backend, shape) as table:
        table.insert(**app_row(shape, "ada", fake.issue(expires_at=soon())))
        table.insert(**app_row(shape, "bob", fake.issue(expires_at=soon())))
        before = table.dump()
        with (
            opened(table.url) as store,
            TokenManager(store, fake.provider(), journal=tmp_path / "journal") as manager,
        ):
            refreshed = manager.refresh("ada")
        table.insert(**app_row(shape, "twin", refreshed))
        after = table.dump()

    twin = after.pop("twin")
    assert {**before, "ada": (after["ada"][0], *twin[1:])} == after


@pytest.mark.parametrize(
    ("backend", "expires_type", "expected"),
    [
        ("postgresql", "TEXT", "2031-05-17T08:30:12.345Z"),
        ("mariadb", "VARCHAR(32)", "2031-05-17T08:30:12.345Z"),
        ("sqlite", "TEXT", "'2031-05-17T08:30:12.345Z'"),
        ("sqlite", "DATETIME", "'2031-05-17 08:30:12.345000'"),
    ],
)
def test_a_text_expiry_without_a_stored_value_takes_the_column_types_usual_spelling(
    backend: str, expires_type: str, expected: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A new credential's ISO text is toISOString()'s, or SQLAlchemy's in a SQLite DATETIME."""
    shape = AppFormat(expires_type, "TEXT", javascript_iso, space)
    with app_table(database_url(request, backend, tmp_path), backend, shape) as table:
        table.insert(id="ada", name="Ada")
        with opened(table.url) as store:
            store.put(new_record("ada"))
        stored = table.dump()["ada"][4]

    assert expected == stored


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("", "user:inference user:profile"),
        ("&scopes_format=json", '["user:inference","user:profile"]'),
    ],
)
def test_text_scopes_without_a_stored_value_follow_scopes_format(
    backend: str, options: str, expected: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Where the row shows no format, text scopes are space-separated unless scopes_format=json."""
    shape = AppFormat("BIGINT", "TEXT", epoch_ms, space, options)
    with app_table(database_url(request, backend, tmp_path), backend, shape) as table:
        table.insert(id="ada", name="Ada")
        with opened(table.url) as store:
            store.put(new_record("ada"))
        stored = table.dump()["ada"][5]

    assert (f"'{expected}'" if backend == "sqlite" else expected) == stored


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_a_stored_format_wins_over_scopes_format(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """scopes_format only decides for rows that show no format: a JSON row stays JSON."""
    shape = AppFormat("BIGINT", "TEXT", epoch_ms, space, "&scopes_format=space")
    with app_table(database_url(request, backend, tmp_path), backend, shape) as table:
        table.insert(id="ada", name="Ada", scopes='["user:inference"]')
        with opened(table.url) as store:
            store.put(new_record("ada"))
        stored = table.dump()["ada"][5]

    expected = '["user:inference","user:profile"]'
    assert (f"'{expected}'" if backend == "sqlite" else expected) == stored


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
def test_scan_due_compares_iso_text_whatever_its_spelling(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """scan_due finds due ISO-8601 expiries written with T or a space, with or without Z."""
    shape = AppFormat("VARCHAR(40)", "TEXT", javascript_iso, space)
    due = datetime(2030, 1, 1, 12, tzinfo=UTC)
    expiries = {
        "javascript": javascript_iso(due - timedelta(seconds=1)),
        "python": (due - timedelta(hours=1)).isoformat(),
        "sqlite": sqlite_datetime(due),
        "later-javascript": javascript_iso(due + timedelta(seconds=1)),
        "later-sqlite": sqlite_datetime(due + timedelta(hours=1)),
    }
    with app_table(database_url(request, backend, tmp_path), backend, shape) as table:
        for row_id, expiry in expiries.items():
            table.insert(
                id=row_id, name=row_id, access_token="a", refresh_token="r", expires_at=expiry
            )
        with opened(table.url) as store:
            found = sorted(store.scan_due(due))

    assert ["javascript", "python", "sqlite"] == found


@pytest.mark.parametrize(
    ("backend", "expires_type", "scopes_type", "options", "message"),
    [
        (
            "postgresql",
            "BIGINT",
            "TEXT",
            "&scopes_format=array",
            "scopes_format=array does not fit scopes column .*TEXT.*use space or json",
        ),
        (
            "postgresql",
            "BIGINT",
            "JSONB",
            "&scopes_format=space",
            "scopes_format=space does not fit scopes column .*JSONB.*use json",
        ),
        (
            "mariadb",
            "BIGINT",
            "JSON",
            "&scopes_format=space",
            "scopes_format=space does not fit scopes column .*use json",
        ),
        (
            "postgresql",
            "BIGINT",
            "TEXT",
            "&expires_at_unit=iso",
            "expires_at_unit=iso declares ISO-8601 text, but expiry column .*BIGINT: use ms or s",
        ),
        (
            "postgresql",
            "NUMERIC(20)",
            "TEXT",
            "",
            "expiry column .*NUMERIC; credkeeper keeps expiries in timestamp",
        ),
        (
            "postgresql",
            "BIGINT",
            "INTEGER[]",
            "",
            "scopes column .*ARRAY; credkeeper keeps scopes in text",
        ),
    ],
)
def test_a_format_the_column_cannot_hold_is_a_configuration_error(
    backend: str,
    expires_type: str,
    scopes_type: str,
    options: str,
    message: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """An option contradicting the column type, or an unusable type, is named at first use."""
    shape = AppFormat(expires_type, scopes_type, epoch_ms, space, options)
    table = create_table(
        database_url(request, backend, tmp_path),
        backend,
        columns_sql(shape, backend),
        options=OPTIONS + options,
        init=False,
    )
    try:
        with opened(table.url) as store, pytest.raises(ConfigurationError, match=message):
            store.get("ada")
    finally:
        table.drop()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("&scopes_format=csv", "scopes_format must be 'space'.*'json'.*'array'.*got 'csv'"),
        ("&expires_at_unit=us", "expires_at_unit must be 'ms' or 's'.*or 'iso'.*got 'us'"),
    ],
)
def test_an_unknown_format_option_is_refused(options: str, message: str) -> None:
    """scopes_format and expires_at_unit outside their values are refused when the store opens."""
    with pytest.raises(ConfigurationError, match=message):
        open_store(f"sqlite:///app.db?table=users&{OPTIONS}{options}")


def test_scopes_format_without_a_scopes_column_is_refused() -> None:
    """scopes_format describes the scopes column, so it needs one mapped."""
    with pytest.raises(ConfigurationError, match="map one with scopes_column"):
        open_store(f"sqlite:///app.db?table=users&{MAPPING}&scopes_format=json")


def test_mapping_options_without_a_mapping_are_refused() -> None:
    """scopes_format and insert describe an existing-table mapping; alone they are a mistake."""
    with pytest.raises(ConfigurationError, match="only apply to an existing-table mapping"):
        open_store("sqlite:///creds.db?scopes_format=json&insert=true")
