"""`credkeeper migrate` and `credkeeper.migrate`: every credential copied with its state, by
compare-and-swap, never over a newer one, resumable after an interruption."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from credkeeper import (
    ConfigurationError,
    DecryptionError,
    KeyRing,
    MemoryStore,
    MigrateReport,
    Record,
    Status,
    StoreUnavailable,
    migrate,
    open_store,
)
from credkeeper._store import CredentialStore
from credkeeper.cli._errors import ExitCode
from credkeeper.cli._output import FAR_FUTURE
from credkeeper.testing import FakeProvider

from .conftest import Cli, damage, import_credentials, leaked, stored, write_keys

LEASE = ("lease_owner", "lease_until")
NOW = datetime.now(UTC).replace(microsecond=0)


def opened(url: str) -> CredentialStore:
    """The synchronous store at ``url``."""
    store = open_store(url)
    assert isinstance(store, CredentialStore)
    return store


def contents(store: CredentialStore) -> dict[str, dict[str, Any]]:
    """Every record's document but its lease, by key: what a migration must carry over."""
    documents = {}
    for key in sorted(store.scan_due(FAR_FUTURE)):
        record = store.get(key)
        assert record is not None
        documents[key] = {k: v for k, v in record.to_document().items() if k not in LEASE}
    return documents


def contents_at(url: str) -> dict[str, dict[str, Any]]:
    """:func:`contents` of the store at ``url``."""
    store = opened(url)
    try:
        return contents(store)
    finally:
        store.close()


def on_store(run: Cli, url: str) -> Cli:
    """``run`` with ``--store url`` in place of the test's store."""
    options = list(run.options)
    options[options.index("--store") + 1] = url
    return Cli(options)


def summary(copied: int = 0, updated: int = 0, unchanged: int = 0, kept: int = 0) -> str:
    """The counts of the closing line."""
    return f"{copied} copied, {updated} updated, {unchanged} unchanged, {kept} kept newer"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite store with credkeeper's table, made by `credkeeper init-store`."""
    url = f"sqlite:///{tmp_path / 'credentials.db'}"
    assert 0 == Cli([])("init-store", url).exit_code
    return url


@pytest.fixture
def other_file_url(tmp_path: Path) -> str:
    """A second, empty file store."""
    return (tmp_path / "other" / "credentials.json").as_uri()


@pytest.fixture
def three(run: Cli, fake: FakeProvider, store_url: str) -> dict[str, dict[str, Any]]:
    """Three credentials in the test's store, one needing re-auth and one leased; their
    contents."""
    import_credentials(run, "alice", fake.issue())
    revoked = fake.issue()
    import_credentials(run, "bob", revoked)
    fake.revoke(revoked)
    run("refresh", "bob")  # refused: needs_reauth, one failure, its last error
    import_credentials(run, "carol", fake.issue(scopes=("user:inference",)))
    store = opened(store_url)
    try:
        carol = store.get("carol")
        assert carol is not None
        store.put(carol.replace(lease_owner="host-a", lease_until=NOW + timedelta(minutes=1)))
        return contents(store)
    finally:
        store.close()


class TestMigrateCommand:
    def test_file_to_sqlite_to_file_keeps_every_credential_identical(
        self,
        run: Cli,
        three: dict[str, dict[str, Any]],
        sqlite_url: str,
        other_file_url: str,
    ) -> None:
        """Two hops through two backends give back every record, state and all, but leases."""
        first = run("migrate", "--to", sqlite_url)
        second = on_store(run, sqlite_url)("migrate", "--to", other_file_url)

        assert (0, 0) == (first.exit_code, second.exit_code), first.stderr + second.stderr
        assert summary(copied=3) in first.stdout
        assert (three, three) == (contents_at(sqlite_url), contents_at(other_file_url))
        assert "needs_reauth" == three["bob"]["status"]
        assert (None, None) == (
            stored(sqlite_url, "carol").lease_owner,
            stored(other_file_url, "carol").lease_owner,
        )

    def test_a_second_run_finds_everything_unchanged(
        self, run: Cli, three: dict[str, dict[str, Any]], sqlite_url: str
    ) -> None:
        """Running it again writes nothing."""
        run("migrate", "--to", sqlite_url)
        versions = {key: stored(sqlite_url, key).version for key in three}

        result = run("migrate", "--to", sqlite_url)

        assert (0, True) == (result.exit_code, summary(unchanged=3) in result.stdout)
        assert versions == {key: stored(sqlite_url, key).version for key in three}

    def test_the_summary_names_both_stores(
        self, run: Cli, fake: FakeProvider, store_url: str, sqlite_url: str
    ) -> None:
        """The closing line says how many credentials went from where to where."""
        import_credentials(run, "alice", fake.issue())

        result = run("migrate", "--to", sqlite_url)

        assert (
            f"migrated 1 credential(s) from {store_url} to {sqlite_url}: {summary(copied=1)}\n"
            == result.stdout
        )

    def test_json_prints_the_report(self, run: Cli, fake: FakeProvider, sqlite_url: str) -> None:
        """--json prints the counts and the failures as one object."""
        import_credentials(run, "alice", fake.issue())

        result = run("migrate", "--to", sqlite_url, "--json")

        assert {
            "copied": 1,
            "updated": 0,
            "unchanged": 0,
            "kept_newer": 0,
            "failed": [],
        } == json.loads(result.stdout)

    def test_a_newer_login_at_the_destination_is_kept(
        self, run: Cli, fake: FakeProvider, sqlite_url: str
    ) -> None:
        """A credential the destination got by itself, expiring later, is not overwritten."""
        import_credentials(run, "alice", fake.issue(expires_in=3600))
        run("migrate", "--to", sqlite_url)
        import_credentials(on_store(run, sqlite_url), "alice", fake.issue(expires_in=7200))
        newer = stored(sqlite_url, "alice")

        result = run("migrate", "--to", sqlite_url)

        assert (0, True) == (result.exit_code, summary(kept=1) in result.stdout)
        assert newer == stored(sqlite_url, "alice")

    def test_a_refresh_at_the_source_updates_the_destination(
        self, run: Cli, fake: FakeProvider, store_url: str, sqlite_url: str
    ) -> None:
        """A credential refreshed at the source after a run is copied by the next run."""
        import_credentials(run, "alice", fake.issue(expires_in=3600))
        run("migrate", "--to", sqlite_url)
        run("refresh", "alice")

        result = run("migrate", "--to", sqlite_url)

        assert (0, True) == (result.exit_code, summary(updated=1) in result.stdout)
        assert contents_at(store_url) == contents_at(sqlite_url)

    def test_to_keys_reseals_under_the_new_ring(
        self,
        run: Cli,
        fake: FakeProvider,
        keyring: KeyRing,
        store_url: str,
        other_file_url: str,
        tmp_path: Path,
    ) -> None:
        """--to-keys: the destination's tokens open with the new ring only, to the same tokens."""
        import_credentials(run, "alice", fake.issue())
        new_ring = KeyRing.generate("k9")
        new_keys = write_keys(tmp_path / "new-keys", new_ring)

        result = run("migrate", "--to", other_file_url, "--to-keys", f"@{new_keys}")

        copy, original = stored(other_file_url, "alice"), stored(store_url, "alice")
        assert (0, True) == (result.exit_code, summary(copied=1) in result.stdout)
        assert [
            keyring.unseal(getattr(original, field), key="alice", field=field)
            for field in ("access_token", "refresh_token")
        ] == [
            new_ring.unseal(getattr(copy, field), key="alice", field=field)
            for field in ("access_token", "refresh_token")
        ]
        with pytest.raises(DecryptionError):
            keyring.unseal(copy.refresh_token, key="alice", field="refresh_token")

    def test_to_keys_again_finds_everything_unchanged(
        self, run: Cli, fake: FakeProvider, other_file_url: str, tmp_path: Path
    ) -> None:
        """Re-sealed copies count as unchanged on the next run, though the ciphertexts differ."""
        import_credentials(run, "alice", fake.issue())
        new_keys = write_keys(tmp_path / "new-keys", KeyRing.generate("k9"))
        run("migrate", "--to", other_file_url, "--to-keys", f"@{new_keys}")

        result = run("migrate", "--to", other_file_url, "--to-keys", f"@{new_keys}")

        assert summary(unchanged=1) in result.stdout

    def test_to_keys_without_the_source_key_exits_7(
        self, run: Cli, fake: FakeProvider, store_url: str, other_file_url: str, tmp_path: Path
    ) -> None:
        """Without --keys the source's sealed tokens cannot be opened: exit 7, nothing copied."""
        import_credentials(run, "alice", fake.issue())
        new_keys = write_keys(tmp_path / "new-keys", KeyRing.generate("k9"))

        result = Cli(["--store", store_url])(
            "migrate", "--to", other_file_url, "--to-keys", f"@{new_keys}"
        )

        assert (ExitCode.DECRYPTION, {}) == (result.exit_code, contents_at(other_file_url))

    def test_a_damaged_record_is_named_and_the_others_copied(
        self, run: Cli, fake: FakeProvider, store_url: str, sqlite_url: str
    ) -> None:
        """One damaged source record exits 1, named in the summary; the others are copied."""
        import_credentials(run, "alice", fake.issue())
        import_credentials(run, "bob", fake.issue())
        damage(store_url, "bob")

        result = run("migrate", "--to", sqlite_url)

        assert (ExitCode.FAILURE, ["alice"]) == (result.exit_code, list(contents_at(sqlite_url)))
        assert "; 1 failed: 'bob' (stored record for key 'bob' has a bad" in result.stdout

    def test_prints_no_token(
        self, run: Cli, fake: FakeProvider, sqlite_url: str, tmp_path: Path
    ) -> None:
        """Neither the summary, the JSON nor a re-sealing run shows a token."""
        import_credentials(run, "alice", fake.issue())
        new_keys = write_keys(tmp_path / "new-keys", KeyRing.generate("k9"))

        results = (
            run("migrate", "--to", sqlite_url),
            run("migrate", "--to", sqlite_url, "--json"),
            run("migrate", "--to", sqlite_url, "--to-keys", f"@{new_keys}"),
        )

        assert set() == leaked(fake, *results)

    def test_the_source_itself_is_refused(self, run: Cli, store_url: str) -> None:
        """--to naming the --store store is a usage error."""
        result = run("migrate", "--to", store_url)

        assert ExitCode.USAGE == result.exit_code

    @pytest.mark.parametrize("value", ["0", "257", "two"])
    def test_a_bad_concurrency_is_a_usage_error_naming_the_option(
        self, run: Cli, three: dict[str, dict[str, Any]], sqlite_url: str, value: str
    ) -> None:
        """Refused before anything is copied, naming --concurrency and what it takes."""
        result = run("migrate", "--to", sqlite_url, "--concurrency", value)

        assert (ExitCode.USAGE, {}) == (result.exit_code, contents_at(sqlite_url))
        assert "--concurrency" in result.stderr

    def test_concurrency_one_copies_as_the_default_does(
        self, run: Cli, three: dict[str, dict[str, Any]], sqlite_url: str
    ) -> None:
        """One at a time gives the same destination and summary."""
        result = run("migrate", "--to", sqlite_url, "--concurrency", "1")

        assert (0, three) == (result.exit_code, contents_at(sqlite_url)), result.stderr
        assert summary(copied=3) in result.stdout


def record(key: str, *, expires_in: float = 3600, origin: str = "s", **fields: Any) -> Record:
    """A record whose tokens name ``origin`` and the key, as a store keeps opaque values."""
    return Record(
        key=key,
        access_token=f"access-{origin}-{key}",
        refresh_token=f"refresh-{origin}-{key}",
        expires_at=NOW + timedelta(seconds=expires_in),
        **fields,
    )


@pytest.fixture
def file_store(store_url: str) -> Iterator[CredentialStore]:
    """The test's file store, opened."""
    store = opened(store_url)
    yield store
    store.close()


@pytest.fixture
def sqlite_store(sqlite_url: str) -> Iterator[CredentialStore]:
    """The SQLite store, opened."""
    store = opened(sqlite_url)
    yield store
    store.close()


class Interrupt:
    """A progress callback that interrupts the run once ``after`` keys are done."""

    def __init__(self, after: int) -> None:
        self.after = after

    def __call__(self, done: int, total: int) -> None:
        if done == self.after:
            raise KeyboardInterrupt


class TestMigrateFunction:
    @pytest.mark.parametrize("concurrency", [1, 4])
    def test_an_interrupted_run_is_finished_by_the_next(
        self, file_store: CredentialStore, sqlite_store: CredentialStore, concurrency: int
    ) -> None:
        """Interrupted after 4 of 10 keys and run again: every key there once, all identical.
        The interrupted run stops handing out keys: those under way finish, no other starts."""
        for number in range(10):
            file_store.put(record(f"user-{number:02}", failures=number % 3))
        with pytest.raises(KeyboardInterrupt):
            migrate(file_store, sqlite_store, progress=Interrupt(after=4), concurrency=concurrency)
        copied = len(contents(sqlite_store))
        assert 4 <= copied <= 4 + concurrency - 1

        report = migrate(file_store, sqlite_store, concurrency=concurrency)

        assert MigrateReport(copied=10 - copied, unchanged=copied) == report
        assert contents(file_store) == contents(sqlite_store)

    def test_keys_are_copied_concurrency_at_once(self) -> None:
        """Four copies are under way together with concurrency 4: each waits at a barrier the
        four must reach at once (a sequential run would break it after its timeout)."""
        source = MemoryStore()
        for number in range(8):
            source.put(record(f"user-{number}"))
        together = threading.Barrier(4, timeout=10)

        class Meeting(MemoryStore):
            def get(self, key: str) -> Record | None:
                if key < "user-4":
                    together.wait()
                return super().get(key)

        destination = Meeting()

        report = migrate(source, destination, concurrency=4)

        assert (MigrateReport(copied=8), False) == (report, together.broken)

    def test_a_store_error_stops_the_run_once_the_copies_under_way_end(self) -> None:
        """A failing key stops the run: no key is handed out after it but those already under
        way, and none is still being copied when migrate raises."""
        read: list[str] = []
        lock = threading.Lock()

        class Failing(MemoryStore):
            def get(self, key: str) -> Record | None:
                with lock:
                    read.append(key)
                if key == "user-05":
                    raise StoreUnavailable("the source is down")
                time.sleep(0.01)
                return super().get(key)

        source = Failing()
        for number in range(40):
            source.put(record(f"user-{number:02}"))

        with pytest.raises(StoreUnavailable):
            migrate(source, MemoryStore(), concurrency=3)

        running = [t for t in threading.enumerate() if t.name.startswith("credkeeper-migrate")]
        assert (True, []) == (len(read) <= 6 + 3, running)

    @pytest.mark.parametrize("concurrency", [0, -1, True, 2.0, "8"])
    def test_a_bad_concurrency_is_refused_before_anything_is_copied(self, concurrency: Any) -> None:
        """The error names the parameter and what it takes."""
        source, destination = MemoryStore(), MemoryStore()
        source.put(record("alice"))

        with pytest.raises(ConfigurationError, match="concurrency must be a whole number"):
            migrate(source, destination, concurrency=concurrency)
        assert destination.get("alice") is None

    def test_progress_counts_every_key(self) -> None:
        """progress is called with 0 first, then after each key, with the total."""
        source = MemoryStore()
        for key in ("a", "b"):
            source.put(record(key))
        calls: list[tuple[int, int]] = []

        migrate(source, MemoryStore(), progress=lambda done, total: calls.append((done, total)))

        assert [(0, 2), (1, 2), (2, 2)] == calls

    def test_the_same_expiry_with_other_tokens_is_kept(self) -> None:
        """At the same expiry, the destination's own tokens are kept: either may be the live one."""
        source, destination = MemoryStore(), MemoryStore()
        source.put(record("alice", origin="source"))
        theirs = destination.put(record("alice", origin="destination"))

        report = migrate(source, destination)

        assert (MigrateReport(kept_newer=1), theirs) == (report, destination.get("alice"))

    def test_tokens_obtained_later_win_though_they_expire_sooner(self) -> None:
        """When both copies say when their tokens were obtained, the later ones are copied over
        the destination's, whatever the expiries: a provider answer of unknown lifetime is
        stored expiring at once, and its refresh token is the only live one."""
        source, destination = MemoryStore(), MemoryStore()
        destination.put(record("alice", origin="old", expires_in=1800, refreshed_at=NOW))
        later = NOW + timedelta(minutes=5)
        source.put(record("alice", origin="new", expires_in=300, refreshed_at=later))

        report = migrate(source, destination)
        copied = destination.get("alice")

        assert (MigrateReport(updated=1), "refresh-new-alice") == (
            report,
            copied and copied.refresh_token,
        )

    def test_tokens_obtained_earlier_are_not_copied_over_later_ones(self) -> None:
        """And the other way round: the destination's later tokens stay."""
        source, destination = MemoryStore(), MemoryStore()
        source.put(record("alice", origin="old", expires_in=1800, refreshed_at=NOW))
        later = NOW + timedelta(minutes=5)
        theirs = destination.put(record("alice", origin="new", expires_in=300, refreshed_at=later))

        report = migrate(source, destination)

        assert (MigrateReport(kept_newer=1), theirs) == (report, destination.get("alice"))

    def test_an_older_destination_is_overwritten_keeping_its_lease(self) -> None:
        """A later credential at the source replaces an older one; the destination's lease
        stays, the source's is not copied."""
        source, destination = MemoryStore(), MemoryStore()
        source.put(record("alice", expires_in=7200, lease_owner="source-host", lease_until=NOW))
        lease_until = NOW + timedelta(minutes=1)
        destination.put(
            record("alice", origin="old", lease_owner="dest-host", lease_until=lease_until)
        )

        report = migrate(source, destination)

        copy = destination.get("alice")
        assert copy is not None
        assert (MigrateReport(updated=1), "access-s-alice", "dest-host", lease_until) == (
            report,
            copy.access_token,
            copy.lease_owner,
            copy.lease_until,
        )

    def test_a_state_change_of_the_same_credential_is_copied(self) -> None:
        """The same tokens in another state (a refused refresh) update the destination."""
        source, destination = MemoryStore(), MemoryStore()
        destination.put(record("alice"))
        source.put(record("alice", status=Status.NEEDS_REAUTH, failures=1, last_error="x"))

        report = migrate(source, destination)

        copy = destination.get("alice")
        assert copy is not None
        assert (MigrateReport(updated=1), Status.NEEDS_REAUTH, 1) == (
            report,
            copy.status,
            copy.failures,
        )

    def test_a_writer_racing_the_copy_is_judged_again(self) -> None:
        """When another writer stores a newer credential just before the copy's write, the
        compare-and-swap fails, the record is read again, and the newer one is kept."""
        source = MemoryStore()
        source.put(record("alice", origin="source"))
        newer = record("alice", expires_in=7200, origin="racer")

        class Racing(MemoryStore):
            def put(self, record: Record) -> Record:
                if self.get(record.key) is None and record.access_token != newer.access_token:
                    super().put(newer)  # lands between the copy's read and its write
                return super().put(record)

        destination = Racing()

        report = migrate(source, destination)

        stored_copy = destination.get("alice")
        assert stored_copy is not None
        assert (MigrateReport(kept_newer=1), newer.access_token) == (
            report,
            stored_copy.access_token,
        )

    def test_reseal_needs_a_ring_that_opens_the_source(self) -> None:
        """A ring without the source's key stops the run naming the record."""
        old, new = KeyRing.generate("k1"), KeyRing.generate("k2")
        source = MemoryStore()
        sealed = {
            field: old.seal("token", key="alice", field=field)
            for field in ("access_token", "refresh_token")
        }
        source.put(record("alice").replace(**sealed))

        with pytest.raises(DecryptionError, match="'alice'"):
            migrate(source, MemoryStore(), reseal=new)

    @pytest.mark.parametrize(
        ("plain_source", "plain_destination", "reseal"),
        [(True, False, False), (False, True, False), (False, True, True)],
    )
    def test_stores_that_disagree_on_sealing_are_refused(
        self, plain_source: bool, plain_destination: bool, reseal: bool
    ) -> None:
        """Copying would put tokens in a form the destination's readers do not expect."""

        class Plain(MemoryStore):
            plaintext = True

        source = Plain() if plain_source else MemoryStore()
        destination = Plain() if plain_destination else MemoryStore()
        source.put(record("alice"))

        with pytest.raises(ConfigurationError, match="declared plaintext"):
            migrate(source, destination, reseal=KeyRing.generate() if reseal else None)
        assert destination.get("alice") is None
