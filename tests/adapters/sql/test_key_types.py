"""Existing-table mode with key columns of every common type, compared in the column's own type.

The application's key column may be text, varchar, uuid, integer or bigint. credkeeper keys are
strings; each is bound as a value of the column's type (a ``uuid.UUID``, an ``int``), and only
the canonical spelling of that value is accepted, so a row and its side-table lease are always
reached under one key.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from credkeeper import AsyncCredentialStore, ConfigurationError, Record, TokenManager, open_store
from credkeeper.testing import FakeProvider, run_storm
from credkeeper_sql import init_store

from .conftest import async_url
from .test_existing_table import MAPPING, UsersTable, drop

UUID_KEY = "5f0c3b7e-8a4d-4c1e-9b2a-0d6e7f8a9b1c"
# Above 2**53: a key that went through a float on its way would come back changed.
BIG_KEY = "9007199254740993"
KEYS = {
    "text": "alice",
    "varchar": "alice",
    "char36": UUID_KEY,
    "uuid": UUID_KEY,
    "integer": "123",
    "bigint": BIG_KEY,
}
FAR_FUTURE = datetime(2100, 1, 1, tzinfo=UTC)


def record(key: str) -> Record:
    """A new credential under ``key``, due for refresh."""
    return Record(
        key=key,
        access_token="access",
        refresh_token=f"refresh-{uuid.uuid4().hex}",
        expires_at=datetime(2030, 1, 1, tzinfo=UTC),
    )


def column_type(backend: str, kind: str, server: str) -> str:
    """The SQL type of a ``kind`` key column on ``backend``, as an application would declare it."""
    if kind == "uuid" and backend == "mariadb" and not has_native_uuid(server):
        return "CHAR(36)"
    return {
        "text": "TEXT",
        "varchar": "VARCHAR(64)",
        "char36": "CHAR(36)",
        "uuid": "UUID",
        "integer": "INTEGER",
        "bigint": "BIGINT",
    }[kind]


def has_native_uuid(server: str) -> bool:
    """Whether the MariaDB server has the UUID column type (10.7 and later)."""
    engine = sa.create_engine(server)
    try:
        with engine.connect() as connection:
            version = str(connection.execute(sa.text("SELECT VERSION()")).scalar_one())
    finally:
        engine.dispose()
    major, minor = (int(part) for part in version.split("-", maxsplit=1)[0].split(".")[:2])
    return (major, minor) >= (10, 7)


def make_keyed(server: str, backend: str, kind: str, ids: list[str]) -> UsersTable:
    """An application table whose ``id`` column has the ``kind`` type, one row per id."""
    name = f"keyed_{uuid.uuid4().hex[:8]}"
    declared = column_type(backend, kind, server)
    # MariaDB indexes a TEXT column by a prefix only.
    key = (
        "PRIMARY KEY (id(64))" if (backend, declared) == ("mariadb", "TEXT") else "PRIMARY KEY (id)"
    )
    table = UsersTable(server, name, "")
    table.execute(
        f"CREATE TABLE {name} (id {declared} NOT NULL, name VARCHAR(100), "
        "claude_access_token TEXT, claude_refresh_token TEXT, claude_expires_at BIGINT, "
        f"{key})"
    )
    for row_id in ids:
        table.execute(f"INSERT INTO {name} (id, name) VALUES (:id, 'someone')", id=row_id)  # noqa: S608
    leases = f"ck_leases_{uuid.uuid4().hex[:8]}"
    separator = "&" if "?" in server else "?"
    table.url = f"{server}{separator}table={name}&lease_table={leases}&{MAPPING}"
    init_store(table.url)
    return table


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def backend(request: pytest.FixtureRequest) -> str:
    """The backend a test runs on."""
    name: str = request.param
    return name


@pytest.fixture
def server(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    """The backend's database URL, without credkeeper's options."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    url: str = request.getfixturevalue("postgres_url" if backend == "postgresql" else "mysql_url")
    return url


@contextlib.contextmanager
def keyed(server: str, backend: str, kind: str, ids: list[str]) -> Iterator[UsersTable]:
    """:func:`make_keyed`, dropped afterwards."""
    table = make_keyed(server, backend, kind, ids)
    try:
        yield table
    finally:
        drop(table)


@contextlib.asynccontextmanager
async def opened_async(url: str) -> AsyncIterator[AsyncCredentialStore]:
    """An async store on ``url``, closed afterwards."""
    store = open_store(url)
    assert isinstance(store, AsyncCredentialStore)
    try:
        yield store
    finally:
        await store.close()


class TestKeyTypes:
    @pytest.mark.parametrize("kind", ["text", "varchar", "uuid", "integer", "bigint"])
    def test_refresh_through_a_key_of_each_type(
        self, server: str, backend: str, kind: str, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """A credential stored and refreshed under a key column of each type: one refresh."""
        key = KEYS[kind]
        with (
            keyed(server, backend, kind, [key]) as table,
            table.store() as store,
            TokenManager(store, fake.provider(), journal=tmp_path / "j") as manager,
        ):
            manager.put(key, fake.issue(expires_in=60))
            refreshed = manager.get(key)
            stored = store.get(key)

        assert stored is not None
        assert (1, refreshed.refresh_token.get_secret_value()) == (
            fake.refresh_count,
            stored.refresh_token,
        )

    @pytest.mark.parametrize("backend", ["mariadb"])
    def test_uuid_text_column_on_mariadb(
        self, server: str, backend: str, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """A uuid kept as CHAR(36) text on MariaDB works as a text key."""
        with (
            keyed(server, backend, "char36", [UUID_KEY]) as table,
            table.store() as store,
            TokenManager(store, fake.provider(), journal=tmp_path / "j") as manager,
        ):
            manager.put(UUID_KEY, fake.issue(expires_in=60))
            manager.get(UUID_KEY)

        assert 1 == fake.refresh_count

    @pytest.mark.parametrize("kind", ["uuid", "integer", "bigint"])
    def test_scan_due_returns_the_canonical_keys(
        self, server: str, backend: str, kind: str
    ) -> None:
        """scan_due yields each row's key as the string credkeeper accepts for that row."""
        ids = {
            "uuid": [UUID_KEY, "00000000-0000-4000-8000-00000000000a"],
            "integer": ["7", "123"],
            "bigint": ["7", BIG_KEY],
        }[kind]
        with keyed(server, backend, kind, ids) as table, table.store() as store:
            for key in ids:
                store.put(record(key))
            due = sorted(store.scan_due(FAR_FUTURE))

        assert sorted(ids) == due

    @pytest.mark.anyio
    @pytest.mark.parametrize("kind", ["uuid", "integer"])
    async def test_async_driver_binds_the_column_type(
        self, server: str, backend: str, kind: str
    ) -> None:
        """psycopg async, aiomysql and aiosqlite compare the key in the column's type too."""
        key = KEYS[kind]
        with keyed(server, backend, kind, [key]) as table:
            async with opened_async(async_url(table.url)) as store:
                await store.put(record(key))
                stored = await store.get(key)
                due = [k async for k in store.scan_due(FAR_FUTURE)]

        assert stored is not None
        assert ([key], key) == (due, stored.key)

    @pytest.mark.parametrize(
        ("backend", "declared", "reflected"),
        [("postgresql", "NUMERIC(20)", "NUMERIC"), ("mariadb", "DECIMAL(20)", "DECIMAL")],
    )
    def test_key_column_of_another_type_is_refused(
        self, server: str, backend: str, declared: str, reflected: str
    ) -> None:
        """A key column credkeeper cannot compare keys with: refused at first use, naming it."""
        table = UsersTable(server, f"keyed_{uuid.uuid4().hex[:8]}", "")
        table.execute(
            f"CREATE TABLE {table.name} (id {declared} PRIMARY KEY, claude_access_token TEXT, "
            "claude_refresh_token TEXT, claude_expires_at BIGINT)"
        )
        table.url = f"{server}?table={table.name}&lease_table=ck_unused&{MAPPING}"
        try:
            with table.store() as store, pytest.raises(ConfigurationError) as caught:
                store.get("1")
        finally:
            drop(table)

        assert str(caught.value).endswith(
            f"key column {table.name}.id is {reflected}; credkeeper compares keys with text (CHAR, "
            "VARCHAR, TEXT), integer (SMALLINT, INTEGER, BIGINT) or UUID columns: map key_column "
            "to one of those"
        )


class TestCanonicalKeys:
    @pytest.mark.parametrize(
        ("given", "canonical"), [("0123", "123"), ("+123", "123"), ("1_23", "123"), ("-0", "0")]
    )
    def test_integer_key_in_another_spelling_is_refused(
        self, server: str, backend: str, given: str, canonical: str
    ) -> None:
        """A key that only spells an integer the long way round names the canonical spelling."""
        with (
            keyed(server, backend, "integer", ["123"]) as table,
            table.store() as store,
            pytest.raises(ConfigurationError) as caught,
        ):
            store.get(given)

        assert (
            f"key {given!r} is not how column {table.name}.id (INTEGER) spells it: "
            f"use {canonical!r}, its canonical form, so that a row and its lease are "
            "reached under one key"
        ) == str(caught.value)

    @pytest.mark.parametrize(
        "given",
        [
            UUID_KEY.upper(),
            "{" + UUID_KEY + "}",
            UUID_KEY.replace("-", ""),
            "urn:uuid:" + UUID_KEY,
        ],
    )
    @pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
    def test_uuid_key_in_another_spelling_is_refused(
        self, server: str, backend: str, given: str
    ) -> None:
        """An uppercase, braced, unhyphenated or URN uuid is refused, naming the canonical one."""
        with (
            keyed(server, backend, "uuid", [UUID_KEY]) as table,
            table.store() as store,
            pytest.raises(ConfigurationError) as caught,
        ):
            store.get(given)

        assert (
            f"key {given!r} is not how column {table.name}.id (UUID) spells it: "
            f"use {UUID_KEY!r}, its canonical form, so that a row and its lease are "
            "reached under one key"
        ) == str(caught.value)

    @pytest.mark.parametrize(
        ("backend", "kind", "given"),
        [
            ("sqlite", "integer", "alice"),
            ("sqlite", "integer", str(2**64)),
            ("postgresql", "integer", "alice"),
            ("postgresql", "uuid", "alice"),
            ("mariadb", "integer", "alice"),
            ("mariadb", "uuid", "alice"),
        ],
    )
    def test_key_that_is_no_value_of_the_column_is_refused(
        self, server: str, backend: str, kind: str, given: str
    ) -> None:
        """A key the column's type cannot hold at all is a ConfigurationError naming both."""
        with (
            keyed(server, backend, kind, [KEYS[kind]]) as table,
            table.store() as store,
            pytest.raises(ConfigurationError) as caught,
        ):
            store.get(given)

        assert str(caught.value).startswith(
            f"key {given!r} cannot name a row of column {table.name}.id ("
        )

    @pytest.mark.parametrize("backend", ["mariadb"])
    def test_key_matched_by_a_case_folding_collation_is_refused(
        self, server: str, backend: str
    ) -> None:
        """A text column whose collation ignores case reaches 'alice' by 'Alice': refused."""
        with keyed(server, backend, "varchar", ["alice"]) as table, table.store() as store:
            store.put(record("alice"))
            with pytest.raises(ConfigurationError) as caught:
                store.get("Alice")

        assert str(caught.value).startswith(
            f"key 'Alice' reaches the row whose id is 'alice' in column {table.name}.id"
        )

    def test_non_canonical_key_is_refused_before_any_provider_call(
        self, server: str, backend: str, tmp_path: Path
    ) -> None:
        """Workers using '0123' and '123' for row 123: the first is refused, one refresh in all.

        Before keys were canonical, '0123' reached row 123 while its lease row was keyed
        '0123', invisible to the worker using '123': both refreshed, and a provider that revokes
        the family on reuse logged the user out.
        """
        with (
            FakeProvider(revoke_family_on_reuse=True) as fake,
            keyed(server, backend, "integer", ["123"]) as table,
            table.store() as store,
            TokenManager(store, fake.provider(), journal=tmp_path / "a") as padded,
            TokenManager(store, fake.provider(), journal=tmp_path / "b") as plain,
        ):
            plain.put("123", fake.issue(expires_in=60))
            with pytest.raises(ConfigurationError):
                padded.get("0123")
            refused_before_calling = fake.refresh_count
            plain.get("123")

            assert (0, 1) == (refused_before_calling, fake.refresh_count)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "kind"),
    [("postgresql", "uuid"), ("postgresql", "integer"), ("mariadb", "uuid"), ("mariadb", "bigint")],
)
def test_storm_through_a_typed_key(server: str, backend: str, kind: str, tmp_path: Path) -> None:
    """64 callers on a uuid- or integer-keyed table: the lease is found, one refresh in all."""
    with keyed(server, backend, kind, [KEYS[kind]]) as table:
        report = run_storm(table.url, directory=tmp_path, key=KEYS[kind])

    assert (1, ("ok",), (), 64, 64) == (
        report.refreshes,
        report.outcomes,
        report.errors,
        report.callers,
        report.holding_current,
    )
