"""Issue 13's proof of ``migrate``: ten thousand credentials through every kind of store and
back, identical, and a ``credkeeper migrate`` killed halfway that the next run finishes with
nothing duplicated or lost."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import sqlalchemy as sa

from credkeeper import KeyRing, MigrateReport, Record, Status, migrate, open_store
from credkeeper._settings import ENVIRONMENT as SETTINGS
from credkeeper._store import CredentialStore
from tests.adapters.aws.conftest import store_url as aws_store_url
from tests.adapters.sql.conftest import _with_table

logger = logging.getLogger(__name__)

CHAIN_COUNT = 10_000
KILLED_COUNT = 3_000
# What a migration carries over: everything but the lease, which belongs to the source's
# processes (and the version, which to_document leaves out).
LEASE = ("lease_owner", "lease_until")
# Whole milliseconds, as every store keeps times.
NOW = datetime.now(UTC).replace(microsecond=0)
SCOPES = (
    (),
    ("user:inference",),
    ("user:inference", "user:profile"),
    ("org:create_api_key", "user:profile", "user:inference"),
)
SUBSCRIPTIONS = (None, "pro", "max", "team", "enterprise")
# Keys as applications name them, and ones some stores must escape (Secrets Manager's
# alphabet, MongoDB's dots): each store must give every one of them back as it was.
KEY_SHAPES = ("user-{:05}", "tenant/acme/user-{}", "alice+{}@example.com", "Jöns Smith {}")


class Table(NamedTuple):
    """A fresh credkeeper table: its store URL, and where to look at its rows directly."""

    store_url: str
    server_url: str
    name: str


def credentials(ring: KeyRing, count: int) -> list[Record]:
    """``count`` records in many states, their tokens sealed by ``ring`` as a manager seals them.

    Expiries spread over a month either side of now, to the millisecond; scopes and
    subscription types vary; every 9th needs re-authentication after failed refreshes, every
    13th other one waits out a cooldown, every 17th is leased.
    """
    records = []
    for number in range(count):
        key = KEY_SHAPES[number % len(KEY_SHAPES)].format(number)
        state: dict[str, Any] = {}
        if number % 9 == 0:
            state = {
                "status": Status.NEEDS_REAUTH,
                "failures": 1 + number % 3,
                "last_error": f"invalid_grant: refresh token revoked ({number})",
            }
        elif number % 13 == 0:
            state = {
                "failures": 1 + number % 2,
                "cooldown_until": NOW + timedelta(seconds=number % 3600, milliseconds=number % 997),
                "last_error": "HTTP 503 from the token endpoint",
            }
        if number % 17 == 0:
            state |= {"lease_owner": f"host-{number % 5}:4242", "lease_until": NOW}
        records.append(
            Record(
                key=key,
                access_token=ring.seal(f"access-{number}", key=key, field="access_token"),
                refresh_token=ring.seal(f"refresh-{number}", key=key, field="refresh_token"),
                expires_at=NOW
                + timedelta(seconds=(number * 7919) % (60 * 86400) - 30 * 86400)
                + timedelta(milliseconds=number % 1000),
                scopes=SCOPES[number % len(SCOPES)],
                subscription_type=SUBSCRIPTIONS[number % len(SUBSCRIPTIONS)],
                **state,
            )
        )
    return records


def carried(record: Record) -> dict[str, Any]:
    """What a migration must give back of ``record``: its document but the lease."""
    return {name: value for name, value in record.to_document().items() if name not in LEASE}


def contents(store: CredentialStore) -> dict[str, dict[str, Any]]:
    """:func:`carried` of every record in ``store``, by key."""
    documents = {}
    for key in store.scan_due(datetime.max.replace(tzinfo=UTC)):
        record = store.get(key)
        assert record is not None
        documents[key] = carried(record)
    return documents


@contextlib.contextmanager
def opened(url: str) -> Iterator[CredentialStore]:
    """The synchronous store at ``url``, closed afterwards."""
    store = open_store(url)
    assert isinstance(store, CredentialStore)
    with contextlib.closing(store):
        yield store


def filled_file_store(path: Path, records: list[Record]) -> str:
    """The URL of a new file store at ``path`` holding ``records``."""
    url = path.as_uri()
    with opened(url) as store:
        for record in records:
            store.put(record)
    return url


@pytest.fixture
def table(postgres_url: str) -> Iterator[Table]:
    """A fresh credkeeper table in PostgreSQL, made by ``init_store`` and dropped afterwards."""
    name = f"ck_chain_{uuid.uuid4().hex[:8]}"
    for url in _with_table(postgres_url, name):
        yield Table(url, postgres_url, name)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_chain_of_migrations_keeps_every_credential(
    tmp_path: Path, table: Table, mongodb_store_url: str, aws_endpoint: str, prefix: str
) -> None:
    """file → PostgreSQL → MongoDB → Secrets Manager → file: every one of 10,000 credentials
    arrives, each step creating all of them, and the last store holds each credential as the
    first did, its sealed tokens byte for byte, its state field for field, but its lease."""
    originals = credentials(KeyRing.generate("k1"), CHAIN_COUNT)
    chain = (
        filled_file_store(tmp_path / "first" / "credentials.json", originals),
        table.store_url,
        f"{mongodb_store_url}?collection=chain_{uuid.uuid4().hex[:8]}",
        aws_store_url(aws_endpoint, prefix),
        (tmp_path / "last" / "credentials.json").as_uri(),
    )

    reports = []
    for source_url, destination_url in pairwise(chain):
        with opened(source_url) as source, opened(destination_url) as destination:
            started = time.perf_counter()
            reports.append(migrate(source, destination))
            logger.info(
                "%s -> %s: %.1f s",
                source_url.partition(":")[0],
                destination_url.partition(":")[0],
                time.perf_counter() - started,
            )

    assert [MigrateReport(copied=CHAIN_COUNT)] * 4 == reports
    with opened(chain[-1]) as last:
        assert {record.key: carried(record) for record in originals} == contents(last)


def cli_environment(home: Path) -> dict[str, str]:
    """This process's environment without credkeeper's settings, in a private HOME."""
    environment = dict(os.environ)
    for variable, _ in SETTINGS.values():
        environment.pop(variable, None)
    home.mkdir()
    environment["HOME"] = str(home)
    return environment


def rows_by_key(table: Table) -> dict[str, int]:
    """How many rows the table holds under each key."""
    engine = sa.create_engine(table.server_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text(f'SELECT "key", COUNT(*) FROM {table.name} GROUP BY "key"')  # noqa: S608
            )
            return dict(rows.all())
    finally:
        engine.dispose()


def row_count(connection: sa.Connection, table: Table) -> int:
    """How many rows the table holds now, as another reader sees them."""
    count: int = connection.execute(
        sa.text(f"SELECT COUNT(*) FROM {table.name}")  # noqa: S608
    ).scalar_one()
    connection.rollback()
    return count


@pytest.mark.slow
@pytest.mark.parametrize("killed_at", [0.25, 0.5, 0.75])
def test_a_migration_killed_halfway_and_restarted_loses_and_duplicates_nothing(
    killed_at: float, tmp_path: Path, table: Table
) -> None:
    """``credkeeper migrate`` SIGKILLed once the destination holds part of the credentials, then
    run again: every key there exactly once, identical to the source, the second run counting
    each key as copied or already there, and none failed."""
    ring = KeyRing.generate("k1")
    source_url = filled_file_store(
        tmp_path / "source" / "credentials.json", credentials(ring, KILLED_COUNT)
    )
    keys = tmp_path / "keys"
    keys.write_text(ring.export() + "\n", encoding="utf-8")
    keys.chmod(0o600)
    command = [sys.executable, "-m", "credkeeper", "--store", source_url, "--keys", f"@{keys}"]
    command += ["migrate", "--to", table.store_url, "--json"]
    environment = cli_environment(tmp_path / "home")
    wanted = int(KILLED_COUNT * killed_at)

    engine = sa.create_engine(table.server_url, poolclass=sa.pool.NullPool)
    try:
        with (
            engine.connect() as connection,
            (tmp_path / "killed.log").open("wb") as log,
            subprocess.Popen(command, stdout=log, stderr=log, env=environment) as process,
        ):
            try:
                # Watched from outside, as an operator's kill would land: the moment comes
                # from the destination's rows, never from a guessed delay.
                while row_count(connection, table) < wanted:
                    assert process.poll() is None, (tmp_path / "killed.log").read_text()
                    time.sleep(0.01)
            finally:
                process.send_signal(signal.SIGKILL)
            assert -signal.SIGKILL == process.wait()
            left = row_count(connection, table)
    finally:
        engine.dispose()
    logger.info("killed with %d of %d credentials copied", left, KILLED_COUNT)
    assert wanted <= left < KILLED_COUNT

    finished = subprocess.run(command, capture_output=True, env=environment, check=False)

    assert 0 == finished.returncode, finished.stderr.decode()
    report = json.loads(finished.stdout)
    assert (KILLED_COUNT, 0, []) == (
        report["copied"] + report["unchanged"] + report["updated"],
        report["kept_newer"],
        report["failed"],
    )
    # The killed run's copies are found as they are; one whose commit was in flight at the
    # kill may land after the count.
    assert left <= report["unchanged"]
    with opened(source_url) as source, opened(table.store_url) as destination:
        expected = contents(source)
        assert dict.fromkeys(expected, 1) == rows_by_key(table)
        assert expected == contents(destination)
