"""Rows created at login: ``insert=true`` on a ``claude_tokens`` table the application keeps.

Some applications keep tokens in a table of their own whose row is created when the user logs
in (``claude_tokens(user_id, access_token, ...)``), not in ``users``. With ``insert=true``
credkeeper creates that row for a new key, holding the key and the mapped columns, and
everything else takes the table's defaults. Creating stays a compare-and-swap: the key column
is unique, so of several workers creating one key exactly one inserts. Deleting such a row is a
separate choice, ``delete_rows=true``: the row may hold columns only the application owns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from credkeeper import (
    ConfigurationError,
    ConflictError,
    CredentialStore,
    Record,
    StoreError,
    open_store,
)
from credkeeper_sql import init_store

from .apptables import (
    BACKENDS,
    TEXT_KEY,
    TOKENS_INSERT_AND_DELETE,
    TOKENS_MAPPING,
    AppTable,
    MappedTableConformance,
    claude_tokens,
    create_table,
    database_url,
    new_record,
    opened,
)

INSERT = f"{TOKENS_MAPPING}&insert=true"
# A surrogate primary key the database numbers, beside a user_id that is not the key.
SERIAL = {
    "sqlite": "id INTEGER PRIMARY KEY, ",
    "postgresql": "id SERIAL PRIMARY KEY, ",
    "mariadb": "id INTEGER NOT NULL AUTO_INCREMENT PRIMARY KEY, ",
}


@pytest.fixture(params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend's database URL (without credkeeper's options)."""
    return database_url(request, request.param, tmp_path)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The backend ``server`` is on."""
    name: str = request.node.callspec.params["server"]
    return name


@pytest.fixture
def tokens(server: str, backend: str) -> Iterator[AppTable]:
    """An empty ``claude_tokens`` table, mapped with insert=true; dropped afterwards."""
    with create_table(
        server, backend, claude_tokens(backend), options=INSERT, prefix="tokens"
    ) as table:
        yield table


def test_without_insert_a_missing_row_is_refused_naming_the_option(
    server: str, backend: str
) -> None:
    """Storing for a key the table has no row for raises StoreError telling of insert=true."""
    with (
        create_table(server, backend, claude_tokens(backend), options=TOKENS_MAPPING) as table,
        opened(table.url) as store,
        pytest.raises(StoreError) as raised,
    ):
        store.put(new_record("42"))

    assert (
        f"table {table.name!r} has no row with user_id = '42'; credkeeper stores credentials "
        "in existing rows and never inserts them, unless the store is opened with insert=true"
    ) == str(raised.value)


def test_insert_creates_the_row_with_the_key_and_the_mapped_columns(tokens: AppTable) -> None:
    """With insert=true a new key gets a row of its own; other columns take their defaults."""
    with opened(tokens.url) as store:
        created = store.put(new_record("42"))
        read = store.get("42")
    rows = tokens.select(
        f"SELECT user_id, access_token, refresh_token, expires_at, scopes, plan, source, "  # noqa: S608
        f"created_at IS NOT NULL FROM {tokens.name}",
    )

    assert (created, [(42, "access-token", "refresh-token", 1_936_773_012_345,
            "user:inference user:profile", "max", "web-login", 1)]) == (read, rows)  # fmt: skip


def test_insert_gives_the_side_table_its_row(tokens: AppTable) -> None:
    """The created credential's lease state lives in the side table, under the key."""
    with opened(tokens.url) as store:
        store.put(new_record("42", lease_owner="worker-1"))

    assert [("42", "worker-1")] == tokens.select(
        f"SELECT {'`key`' if tokens.backend == 'mariadb' else 'key'}, lease_owner "  # noqa: S608
        f"FROM {tokens.leases}",
    )


def test_a_create_over_a_stored_credential_conflicts(tokens: AppTable) -> None:
    """A create (version None) where the row holds a credential raises ConflictError."""
    tokens.insert(
        user_id=42,
        access_token="a",
        refresh_token="the app's",
        expires_at=1_893_456_000_000,
        scopes="user:inference",
    )

    with opened(tokens.url) as store, pytest.raises(ConflictError):
        store.put(new_record("42"))

    assert [("the app's",)] == tokens.select(f"SELECT refresh_token FROM {tokens.name}")  # noqa: S608


def test_an_update_never_recreates_a_row_the_application_deleted(tokens: AppTable) -> None:
    """An update (version set) whose row was deleted since it was read raises ConflictError."""
    with opened(tokens.url) as store:
        created = store.put(new_record("42"))
        tokens.execute(f"DELETE FROM {tokens.name}")  # noqa: S608 - a logout, by the app
        with pytest.raises(ConflictError):
            store.put(created.replace(failures=1))

    assert [] == tokens.select(f"SELECT user_id FROM {tokens.name}")  # noqa: S608


def test_concurrent_creates_make_one_row_and_one_winner(tokens: AppTable) -> None:
    """Eight threads creating one new key: one wins, seven conflict, one row exists."""
    start = threading.Barrier(8)
    outcomes: list[Record | BaseException] = []

    def create(store: CredentialStore, index: int) -> None:
        start.wait()
        try:
            outcomes.append(store.put(new_record("42", access_token=f"token-{index}")))
        except ConflictError as exc:
            outcomes.append(exc)

    with opened(tokens.url) as store:
        threads = [threading.Thread(target=create, args=(store, i)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        winners = [outcome for outcome in outcomes if isinstance(outcome, Record)]
        read = store.get("42")

    assert ([read], 7, [(1,)]) == (
        winners,
        sum(isinstance(outcome, ConflictError) for outcome in outcomes),
        tokens.select(f"SELECT COUNT(*) FROM {tokens.name}"),  # noqa: S608
    )


def test_delete_rows_deletes_a_row_that_cannot_be_without_a_credential(
    server: str, backend: str
) -> None:
    """With delete_rows=true and NOT NULL token columns, delete deletes the row and side row."""
    columns = claude_tokens(backend)
    with create_table(server, backend, columns, options=TOKENS_INSERT_AND_DELETE) as table:
        with opened(table.url) as store:
            store.put(new_record("42"))
            deleted = store.delete("42")
        counts = [
            table.select(f"SELECT COUNT(*) FROM {name}")  # noqa: S608
            for name in (table.name, table.leases)
        ]

    assert (True, [[(0,)], [(0,)]]) == (deleted, counts)


def test_without_delete_rows_delete_of_a_not_null_row_is_refused(tokens: AppTable) -> None:
    """insert=true alone never deletes the app's row: the error names the column and fixes."""
    tokens.insert(
        user_id=42, access_token="a", refresh_token="r", expires_at=1_893_456_000_000, scopes=""
    )
    with opened(tokens.url) as store, pytest.raises(ConfigurationError) as raised:
        store.delete("42")

    assert (
        "cannot delete the credential for key '42': column "
        f"{tokens.name}.access_token is NOT NULL, so its row cannot be kept without one; open "
        "the store with delete_rows=true to let credkeeper delete such rows, or allow NULL in "
        "the mapped columns",
        [("r",)],
    ) == (str(raised.value), tokens.select(f"SELECT refresh_token FROM {tokens.name}"))  # noqa: S608


def test_a_not_null_column_left_empty_is_a_store_error_not_a_conflict(
    server: str, backend: str
) -> None:
    """A NOT NULL mapped column the record has no value for is refused as such, not as a race."""
    columns = claude_tokens(backend).replace("plan VARCHAR(20)", "plan VARCHAR(20) NOT NULL")
    with (
        create_table(server, backend, columns, options=INSERT) as table,
        opened(table.url) as store,
        pytest.raises(StoreError) as raised,
    ):
        store.put(new_record("42", subscription_type=None))

    assert (False, True) == (
        isinstance(raised.value, ConflictError),
        "plan" in str(raised.value),
    )


def test_not_null_columns_without_defaults_are_named_at_first_use(
    server: str, backend: str
) -> None:
    """insert=true on a table with NOT NULL columns the mapping cannot fill is refused early."""
    columns = claude_tokens(backend, extra=", device VARCHAR(20) NOT NULL, ip VARCHAR(40) NOT NULL")
    with (
        create_table(server, backend, columns, options=INSERT, init=False) as table,
        pytest.raises(ConfigurationError) as raised,
    ):
        init_store(table.url)

    assert (
        "the NOT NULL column(s) device, ip of table "
        f"{table.name!r} have no default; give them one (ALTER TABLE {table.name} ALTER COLUMN "
        "device SET DEFAULT ...) or allow NULL there"
    ) in str(raised.value)


def test_insert_needs_a_unique_key_column(server: str, backend: str) -> None:
    """Without a unique key column two creates could insert two rows: refused, with the fix."""
    columns = SERIAL[backend] + claude_tokens(backend, key="INTEGER NOT NULL")
    with (
        create_table(server, backend, columns, options=INSERT, init=False) as table,
        opened(table.url) as store,
        pytest.raises(ConfigurationError) as raised,
    ):
        store.get("42")

    assert (
        f"insert=true needs {table.name}.user_id to be unique (its primary key, or a unique "
        "index on it alone): without that, two workers creating the same key at once would "
        f"insert two rows. Create it, e.g. CREATE UNIQUE INDEX {table.name}_user_id_key ON "
        f"{table.name} (user_id)"
    ) in str(raised.value)


def test_a_unique_index_makes_the_key_column_unique_enough(server: str, backend: str) -> None:
    """A unique index on the key column alone serves as well as a primary key."""
    columns = SERIAL[backend] + claude_tokens(
        backend, key="INTEGER NOT NULL", extra=", UNIQUE (user_id)"
    )
    with (
        create_table(server, backend, columns, options=INSERT) as table,
        opened(table.url) as store,
    ):
        created = store.put(new_record("42"))
        read = store.get("42")

    assert created == read


def test_insert_must_be_a_boolean() -> None:
    """insert=maybe is a ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match="insert must be true or false, got 'maybe'"):
        open_store(f"sqlite:///app.db?table=claude_tokens&{TOKENS_MAPPING}&insert=maybe")


def test_delete_rows_must_be_a_boolean() -> None:
    """delete_rows=maybe is a ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match="delete_rows must be true or false, got 'maybe'"):
        open_store(f"sqlite:///app.db?table=claude_tokens&{TOKENS_MAPPING}&delete_rows=maybe")


def test_delete_rows_needs_a_mapping() -> None:
    """delete_rows describes an existing-table mapping: alone it is a ConfigurationError."""
    with pytest.raises(ConfigurationError, match="delete_rows only apply to an existing-table"):
        open_store("sqlite:///app.db?delete_rows=true")


# -- the store contract on rows credkeeper creates ---------------------------------------------


class TestInsertConformance(MappedTableConformance):
    """The whole store contract on rows credkeeper inserts, on every backend."""

    # delete_rows=true too: the contract deletes.
    options = TOKENS_INSERT_AND_DELETE

    @classmethod
    def columns(cls, backend: str) -> str:
        """A claude_tokens table whose text key holds any credkeeper key."""
        return claude_tokens(backend, key=TEXT_KEY[backend])
