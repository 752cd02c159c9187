"""Existing-table mode: credentials in mapped columns of the application's own ``users`` table.

The application's table here has no lease or version columns, extra columns of its own, and
rows credkeeper must not touch. credkeeper reads and refreshes through the mapped columns, keeps
its coordination state in a side table made by ``init_store``, and leaves everything else as it
was, value for value. That state belongs to the refresh token credkeeper wrote: when the
application logs the user in again by writing new tokens into its columns, the old token's
``needs_reauth``, lease and failures no longer apply.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from credkeeper import (
    ConflictError,
    Credentials,
    CredentialStore,
    ReauthRequired,
    Record,
    Status,
    StoreError,
    TokenManager,
    open_store,
)
from credkeeper.storekit import to_epoch_ms
from credkeeper.testing import FakeProvider, run_storm
from credkeeper_sql import init_store

MAPPING = (
    "key_column=id&access_token_column=claude_access_token"
    "&refresh_token_column=claude_refresh_token&expires_at_column=claude_expires_at"
)


@dataclass
class UsersTable:
    """The application's table on one backend, and the store URL that maps onto it."""

    server: str
    name: str
    url: str

    def rows(self) -> list[tuple[Any, ...]]:
        """Every row, every column, in id order: what must not change."""
        engine = sa.create_engine(self.server)
        try:
            with engine.connect() as connection:
                query = f"SELECT * FROM {self.name} ORDER BY id"  # noqa: S608 - our own name
                result = connection.execute(sa.text(query))
                return [tuple(row) for row in result]
        finally:
            engine.dispose()

    def execute(self, sql: str, **values: Any) -> None:
        """Run one statement as the application would."""
        engine = sa.create_engine(self.server)
        try:
            with engine.begin() as connection:
                connection.execute(sa.text(sql), values)
        finally:
            engine.dispose()

    def store(self) -> contextlib.closing[CredentialStore]:
        """A store on the mapping, to use in a ``with`` block that closes it."""
        store = open_store(self.url)
        assert isinstance(store, CredentialStore)
        return contextlib.closing(store)


def make_users(server: str, *, timestamp: bool = False, integer_ids: bool = False) -> UsersTable:
    name = f"users_{uuid.uuid4().hex[:8]}"
    meta = sa.MetaData()
    sa.Table(
        name,
        meta,
        sa.Column("id", sa.Integer if integer_ids else sa.String(64), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("email", sa.String(200)),
        sa.Column("plan", sa.String(20), nullable=False, server_default="free"),
        sa.Column("claude_access_token", sa.Text),
        sa.Column("claude_refresh_token", sa.Text),
        sa.Column("claude_expires_at", sa.DateTime(timezone=True) if timestamp else sa.BigInteger),
        sa.Column("last_seen", sa.DateTime),
    )
    engine = sa.create_engine(server)
    try:
        with engine.begin() as connection:
            meta.create_all(connection)
            ids = ["1", "2", "3"] if integer_ids else ["alice", "bob", "carol"]
            for row in (
                {
                    "id": int(ids[0]) if integer_ids else ids[0],
                    "name": "Alice",
                    "email": "alice@example.com",
                    "last_seen": datetime(2026, 1, 2, 3, 4, 5),
                },
                {
                    "id": int(ids[1]) if integer_ids else ids[1],
                    "name": "Bob",
                    "plan": "pro",
                    "claude_access_token": "the app's own token",
                    "claude_refresh_token": "the app's own refresh token",
                    "claude_expires_at": datetime(2030, 1, 1, tzinfo=UTC)
                    if timestamp
                    else 1_893_456_000_000,
                },
                {"id": int(ids[2]) if integer_ids else ids[2], "name": "Carol ✓"},
            ):
                connection.execute(meta.tables[name].insert().values(row))
    finally:
        engine.dispose()
    leases = f"ck_leases_{uuid.uuid4().hex[:8]}"
    separator = "&" if "?" in server else "?"
    url = f"{server}{separator}table={name}&lease_table={leases}&{MAPPING}"
    return UsersTable(server, name, url)


def drop(users: UsersTable) -> None:
    engine = sa.create_engine(users.server)
    try:
        with engine.begin() as connection:
            for table in (users.name, lease_table(users)):
                sa.Table(table, sa.MetaData()).drop(connection, checkfirst=True)
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend's database URL (without credkeeper's options)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'app.db'}"
    url: str = request.getfixturevalue(
        "postgres_url" if request.param == "postgresql" else "mysql_url"
    )
    return url


@pytest.fixture
def users(server: str) -> Iterator[UsersTable]:
    """The application's users table with three rows, and credkeeper's side table."""
    table = make_users(server)
    try:
        init_store(table.url)
        yield table
    finally:
        drop(table)


@pytest.fixture
def manager(users: UsersTable, fake: FakeProvider, tmp_path: Path) -> Iterator[TokenManager]:
    """A token manager on the mapping, without a key ring: the app reads its columns plainly."""
    with users.store() as store, TokenManager(store, fake.provider(), journal=tmp_path / "j") as m:
        yield m


def lease_table(users: UsersTable) -> str:
    """The name of the side table of ``users``' mapping."""
    return str(dict(sa.engine.make_url(users.url).query)["lease_table"])


def relogin(users: UsersTable, user_id: str, credentials: Credentials) -> None:
    """The application's own login handler: new tokens straight into its columns."""
    users.execute(
        f"UPDATE {users.name} SET claude_access_token = :access, "  # noqa: S608 - our own name
        "claude_refresh_token = :refresh, claude_expires_at = :expires WHERE id = :id",
        access=credentials.access_token.get_secret_value(),
        refresh=credentials.refresh_token.get_secret_value(),
        expires=to_epoch_ms(credentials.expires_at),
        id=user_id,
    )


def refused(manager: TokenManager, fake: FakeProvider, key: str) -> None:
    """Store a credential under ``key`` whose refresh the provider refuses: needs_reauth."""
    issued = fake.issue(expires_in=60)
    manager.put(key, issued)
    fake.revoke(issued)
    with pytest.raises(ReauthRequired):
        manager.get(key)


FUTURE = datetime(2031, 1, 1, tzinfo=UTC)


def stuck(key: str) -> Record:
    """A never-stored record of ``key`` held back by every kind of coordination state."""
    return Record(
        key=key,
        access_token="old access token",
        refresh_token="old refresh token",
        expires_at=datetime(2030, 1, 1, tzinfo=UTC),
        status=Status.NEEDS_REAUTH,
        lease_owner="crashed-host:1:2",
        lease_until=FUTURE,
        failures=3,
        cooldown_until=FUTURE,
        last_error="invalid_grant",
    )


def state(record: Record | None) -> tuple[Any, ...]:
    """The coordination state of ``record``."""
    assert record is not None
    return (
        record.status,
        record.lease_owner,
        record.lease_until,
        record.failures,
        record.cooldown_until,
        record.last_error,
    )


FRESH = (Status.ACTIVE, None, None, 0, None, None)


def untouched(rows: list[tuple[Any, ...]], row_id: Any) -> list[tuple[Any, ...]]:
    """The rows with the mapped columns (4, 5, 6) of ``row_id``'s row blanked out."""
    return [(*row[:4], None, None, None, *row[7:]) if row[0] == row_id else row for row in rows]


class TestExistingTable:
    def test_init_store_creates_only_the_side_table(self, server: str) -> None:
        """init_store makes the lease table and leaves the application's table alone."""
        table = make_users(server)
        try:
            before = table.rows()

            created = init_store(table.url)

            assert ([dict(sa.engine.make_url(table.url).query)["lease_table"]], before) == (
                created,
                table.rows(),
            )
        finally:
            drop(table)

    def test_refresh_goes_through_the_mapped_columns_only(
        self, users: UsersTable, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """A refresh writes the new tokens into alice's mapped columns; nothing else changes."""
        manager.put("alice", fake.issue(expires_in=60))
        before = users.rows()

        refreshed = manager.get("alice")

        after = users.rows()
        alice = next(row for row in after if row[0] == "alice")
        assert (1, untouched(before, "alice")) == (fake.refresh_count, untouched(after, "alice"))
        assert (
            refreshed.access_token.get_secret_value(),
            refreshed.refresh_token.get_secret_value(),
        ) == (alice[4], alice[5])

    def test_other_rows_are_identical_after_import_refresh_and_delete(
        self, users: UsersTable, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """Bob's and Carol's rows, and Alice's own columns, survive the whole life cycle."""
        original = users.rows()

        manager.put("alice", fake.issue(expires_in=60))
        manager.get("alice")
        manager.refresh("alice")
        deleted = manager.delete("alice")

        assert (True, original) == (deleted, users.rows())

    def test_reads_a_credential_the_application_wrote(self, users: UsersTable) -> None:
        """Tokens the application put in its columns read back as a record."""
        with users.store() as store:
            record = store.get("bob")

        assert record is not None
        assert ("the app's own token", datetime(2030, 1, 1, tzinfo=UTC)) == (
            record.access_token,
            record.expires_at,
        )

    def test_row_without_tokens_reads_as_absent(self, users: UsersTable) -> None:
        """A user with no credential yet is no record; an unknown id neither."""
        with users.store() as store:
            assert (None, None) == (store.get("alice"), store.get("nobody"))

    def test_no_row_is_ever_inserted(self, users: UsersTable) -> None:
        """Creating a credential for an id the table does not have is refused, clearly."""
        record = Record(
            key="nobody",
            access_token="a",
            refresh_token="r",
            expires_at=datetime(2030, 1, 1, tzinfo=UTC),
        )

        with users.store() as store, pytest.raises(StoreError, match="never inserts"):
            store.put(record)

        assert 3 == len(users.rows())

    def test_a_token_changed_by_the_application_wins_over_a_stale_write(
        self, users: UsersTable
    ) -> None:
        """CAS on the stored refresh token: a write based on the old token conflicts."""
        with users.store() as store:
            read = store.get("bob")
        assert read is not None
        users.execute(
            f"UPDATE {users.name} SET claude_refresh_token = :t WHERE id = 'bob'",  # noqa: S608
            t="a re-login's refresh token",
        )

        with users.store() as store, pytest.raises(ConflictError):
            store.put(read.replace(access_token="stale", refresh_token="stale"))

        assert "a re-login's refresh token" == next(r for r in users.rows() if r[0] == "bob")[5]

    def test_timestamp_expiry_column(self, server: str, fake: FakeProvider, tmp_path: Path) -> None:
        """An expiry kept as a timestamp column is read and written as one."""
        table = make_users(server, timestamp=True)
        try:
            init_store(table.url)
            with (
                table.store() as store,
                TokenManager(store, fake.provider(), journal=tmp_path) as m,
            ):
                m.put("alice", fake.issue(expires_in=60))
                refreshed = m.get("alice")
                stored = store.get("alice")

            assert stored is not None
            assert abs(stored.expires_at - refreshed.expires_at) < timedelta(seconds=1)
        finally:
            drop(table)

    def test_integer_ids(self, server: str, fake: FakeProvider, tmp_path: Path) -> None:
        """An integer id column is matched by the key's digits, and scanned back as text."""
        table = make_users(server, integer_ids=True)
        try:
            init_store(table.url)
            with (
                table.store() as store,
                TokenManager(store, fake.provider(), journal=tmp_path) as m,
            ):
                m.put("1", fake.issue(expires_in=60))
                m.get("1")
                due = list(store.scan_due(datetime(2100, 1, 1, tzinfo=UTC)))

            assert (1, ["1", "2"]) == (fake.refresh_count, sorted(due))
        finally:
            drop(table)

    def test_delete_rows_deletes_the_row(self, server: str) -> None:
        """With delete_rows=true, deleting alice's credential deletes her row; the rest stays."""
        made = make_users(server)
        table = UsersTable(made.server, made.name, f"{made.url}&delete_rows=true")
        try:
            init_store(table.url)
            with table.store() as store:
                store.put(stuck("alice").replace(status=Status.ACTIVE))
                before = table.rows()
                deleted = store.delete("alice")

            assert (True, [row for row in before if row[0] != "alice"]) == (deleted, table.rows())
        finally:
            drop(table)


class TestRelogin:
    def test_a_relogin_by_the_application_ends_needs_reauth(
        self, users: UsersTable, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """After invalid_grant, the tokens the app's re-login wrote are served, not refused."""
        refused(manager, fake, "alice")
        login = fake.issue(expires_at=FUTURE)
        relogin(users, "alice", login)

        served = manager.get("alice")

        assert (login.access_token, login.refresh_token) == (
            served.access_token,
            served.refresh_token,
        )

    def test_the_next_refresh_after_a_relogin_works(
        self, users: UsersTable, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """The re-login's refresh token refreshes, and credkeeper stores the rotated tokens."""
        refused(manager, fake, "alice")
        relogin(users, "alice", fake.issue())

        refreshed = manager.refresh("alice")

        with users.store() as store:
            stored = store.get("alice")
        assert stored is not None
        assert ("ok", refreshed.refresh_token.get_secret_value(), FRESH) == (
            fake.refresh_calls[-1].outcome,
            stored.refresh_token,
            state(stored),
        )

    def test_a_relogin_voids_failures_and_cooldown_but_keeps_a_lease(
        self, users: UsersTable, fake: FakeProvider
    ) -> None:
        """Failures, cooldown and error of the old token are void; a lease ends by itself."""
        with users.store() as store:
            store.put(stuck("alice"))
            relogin(users, "alice", fake.issue())

            kept = (Status.ACTIVE, "crashed-host:1:2", FUTURE, 0, None, None)
            assert kept == state(store.get("alice"))

    def test_the_same_refresh_token_written_again_keeps_the_state(self, users: UsersTable) -> None:
        """The app rewriting the refresh token it already had is no re-login: state holds."""
        with users.store() as store:
            store.put(stuck("alice"))
            users.execute(
                f"UPDATE {users.name} SET claude_access_token = 'another access token', "  # noqa: S608
                "claude_refresh_token = 'old refresh token' WHERE id = 'alice'"
            )

            assert state(stuck("alice")) == state(store.get("alice"))

    def test_a_write_based_on_the_old_token_still_conflicts(
        self, users: UsersTable, fake: FakeProvider
    ) -> None:
        """A record read before the re-login cannot be written back over the app's tokens."""
        login = fake.issue()
        with users.store() as store:
            read = store.put(stuck("alice"))
            relogin(users, "alice", login)

            with pytest.raises(ConflictError):
                store.put(read.replace(lease_owner=None, lease_until=None))
            stored = store.get("alice")

        assert stored is not None
        assert login.refresh_token.get_secret_value() == stored.refresh_token

    def test_a_side_row_versioned_before_the_upgrade_always_applies(
        self, users: UsersTable, fake: FakeProvider
    ) -> None:
        """A side row whose version names no token (an older credkeeper's) is never voided."""
        with users.store() as store:
            store.put(stuck("alice"))
            users.execute(
                f"UPDATE {lease_table(users)} SET version = :version",  # noqa: S608
                version=uuid.uuid4().hex,
            )
            relogin(users, "alice", fake.issue())

            assert state(stuck("alice")) == state(store.get("alice"))


@pytest.mark.slow
@pytest.mark.parametrize("repetition", range(3))
@pytest.mark.parametrize("backend", ["postgres_url", "mysql_url"])
def test_storm_through_an_existing_table(
    request: pytest.FixtureRequest, backend: str, repetition: int, tmp_path: Path
) -> None:
    """64 callers on a table without lease or version columns: still exactly one refresh."""
    table = make_users(request.getfixturevalue(backend))
    try:
        init_store(table.url)
        report = run_storm(table.url, directory=tmp_path, key="carol")

        assert (1, ("ok",), (), 64, 64) == (
            report.refreshes,
            report.outcomes,
            report.errors,
            report.callers,
            report.holding_current,
        )
    finally:
        drop(table)
