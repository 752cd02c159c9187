"""`credkeeper status`: every stored credential's state, never a token."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from credkeeper import Credentials, KeyRing, open_store
from credkeeper._journal import RescueEntry, RescueJournal
from credkeeper._store import CredentialStore
from credkeeper.cli._errors import PREFIX
from credkeeper.cli._output import humanise
from credkeeper.testing import FakeProvider

from .conftest import Cli, damage, import_credentials, leaked, stored

WARNING = "credkeeper: warning: "


def table_row(stdout: str, key: str) -> list[str]:
    """The cells of the table row for ``key``, split on runs of two or more spaces."""
    for line in stdout.splitlines():
        if line.startswith(key + " "):
            return [cell for cell in line.strip().split("  ") if cell.strip()]
    raise AssertionError(f"no row for {key!r} in:\n{stdout}")


class TestStatusTable:
    def test_lists_every_key_with_its_expiry_and_status(self, run: Cli, fake: FakeProvider) -> None:
        """Each key has a row: expiry in words, status, no lease, no failures."""
        import_credentials(run, "alice", fake.issue(expires_in=2 * 3600 + 30))
        import_credentials(run, "bob", fake.issue(expires_in=-185))

        result = run("status")

        assert 0 == result.exit_code, result.stderr
        assert ["alice", "in 2h", "active", "-", "-"] == [
            cell.strip() for cell in table_row(result.stdout, "alice")
        ]
        assert "expired 3m ago" == table_row(result.stdout, "bob")[1].strip()

    def test_shows_needs_reauth_and_the_failure(self, run: Cli, fake: FakeProvider) -> None:
        """A refused credential shows needs_reauth and its failure count and cause."""
        credentials = fake.issue()
        import_credentials(run, "alice", credentials)
        fake.revoke(credentials)
        run("refresh", "alice")

        result = run("status")

        row = [cell.strip() for cell in table_row(result.stdout, "alice")]
        assert ["needs_reauth", "-", "1 (invalid_grant)"] == row[2:]

    def test_shows_the_lease_holder(self, run: Cli, fake: FakeProvider, store_url: str) -> None:
        """A live lease shows its holder and the time it has left."""
        import_credentials(run, "alice", fake.issue())
        store = open_store(store_url)
        assert isinstance(store, CredentialStore)
        until = datetime.now(UTC) + timedelta(seconds=50)
        store.put(stored(store_url, "alice").replace(lease_owner="web-1:42:ab", lease_until=until))
        store.close()

        result = run("status")

        assert table_row(result.stdout, "alice")[3].strip().startswith("web-1:42:ab (4")

    def test_empty_store(self, run: Cli, store_url: str) -> None:
        """An empty store says so."""
        result = run("status")

        assert f"no credentials in {store_url}\n" == result.stdout

    def test_needs_no_key_ring(self, fake: FakeProvider, run: Cli, store_url: str) -> None:
        """status reads no token, so it runs without --keys."""
        import_credentials(run, "alice", fake.issue())

        result = Cli(["--store", store_url])("status")

        assert 0 == result.exit_code, result.stderr
        assert "alice" == table_row(result.stdout, "alice")[0].strip()

    def test_never_shows_a_token(self, run: Cli, fake: FakeProvider) -> None:
        """Neither the table nor the JSON shows any token, after imports and a refresh."""
        for key in ("alice", "bob", "carol"):
            import_credentials(run, key, fake.issue())
        run("refresh", "bob")

        results = [run("status"), run("status", "--json")]

        assert set() == leaked(fake, *results)


def journal_entry(directory: Path, keyring: KeyRing | None) -> RescueEntry:
    """Write a rescue entry for 'alice' into the journal at ``directory``; return it."""
    entry = RescueEntry(
        id=RescueJournal.new_id(),
        key="alice",
        credentials=Credentials(
            access_token="a", refresh_token="r", expires_at=datetime.now(UTC) + timedelta(hours=8)
        ),
        replaces="0" * 40,
        created_at=datetime.now(UTC),
    )
    RescueJournal(directory, keyring=keyring).write(entry)
    return entry


def lines_starting(text: str, prefix: str) -> list[str]:
    """The lines of ``text`` that start with ``prefix``, without it."""
    return [line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)]


class TestDamagedRecords:
    def test_other_records_are_listed_and_the_damaged_one_named(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """A damaged record is named on stderr while every other record still shows."""
        import_credentials(run, "alice", fake.issue())
        import_credentials(run, "bob", fake.issue())
        damage(store_url, "bob")

        result = run("status")

        [error] = lines_starting(result.stderr, PREFIX)
        expected = ("alice", True, True)
        assert expected == (
            table_row(result.stdout, "alice")[0].strip(),
            "'bob'" in error,
            "expires_at" in error,
        )

    def test_exits_4(self, run: Cli, fake: FakeProvider, store_url: str) -> None:
        """status exits 4, the store's code, when a record is damaged."""
        import_credentials(run, "alice", fake.issue())
        damage(store_url, "alice")

        result = run("status")

        assert 4 == result.exit_code

    def test_json_lists_the_readable_records_and_exits_4(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """--json prints the readable records, names the damaged one on stderr, and exits 4."""
        import_credentials(run, "alice", fake.issue())
        import_credentials(run, "bob", fake.issue())
        damage(store_url, "bob")

        result = run("status", "--json")

        expected = (4, ["alice"], 1)
        assert expected == (
            result.exit_code,
            [entry["key"] for entry in json.loads(result.stdout)],
            len([line for line in lines_starting(result.stderr, PREFIX) if "'bob'" in line]),
        )


class TestJournalWarnings:
    def test_a_healthy_store_and_journal_print_nothing_on_stderr(
        self, run: Cli, fake: FakeProvider
    ) -> None:
        """After an import and a refresh, status writes nothing to stderr and exits 0."""
        import_credentials(run, "alice", fake.issue())
        run("refresh", "alice")

        result = run("status")

        expected = (0, "")
        assert expected == (result.exit_code, result.stderr)

    def test_an_unusable_key_file_is_a_warning_with_the_fix(
        self, store_url: str, tmp_path: Path
    ) -> None:
        """A journal key file others can read is a warning naming it and chmod 600; exit 0."""
        journal = tmp_path / "journal"
        journal_entry(journal, None)
        (journal / "journal.key").chmod(0o640)

        result = Cli(["--store", store_url, "--journal", str(journal)])("status")

        [warning] = lines_starting(result.stderr, WARNING)
        expected = (0, True, True)
        assert expected == (
            result.exit_code,
            str(journal / "journal.key") in warning,
            "chmod 600" in warning,
        )

    def test_a_journal_directory_others_can_write_is_a_warning(
        self, run: Cli, tmp_path: Path
    ) -> None:
        """A journal directory writable by others is a warning naming it."""
        journal = tmp_path / "journal"
        journal.mkdir()
        journal.chmod(0o777)

        result = run("status")

        [warning] = lines_starting(result.stderr, WARNING)
        expected = (True, True)
        assert expected == (str(journal) in warning, "chmod go-w" in warning)

    def test_the_default_journal_is_checked(self, store_url: str, tmp_path: Path) -> None:
        """Without --journal, the journal under $XDG_STATE_HOME is the one checked."""
        journal = tmp_path / "xdg-state" / "credkeeper" / "journal"
        journal_entry(journal, None)
        (journal / "journal.key").chmod(0o644)

        result = Cli(["--store", store_url])("status")

        [warning] = lines_starting(result.stderr, WARNING)
        assert str(journal / "journal.key") in warning

    def test_an_entry_under_a_dropped_key_is_a_warning(self, run: Cli, tmp_path: Path) -> None:
        """An entry sealed under a key the ring lacks is named with its key id."""
        entry = journal_entry(tmp_path / "journal", KeyRing.generate("k0"))

        result = run("status")

        [warning] = lines_starting(result.stderr, WARNING)
        expected = (0, True, True)
        assert expected == (result.exit_code, f"{entry.id}.json" in warning, "'k0'" in warning)


class TestStatusJson:
    def test_fields(self, run: Cli, fake: FakeProvider) -> None:
        """--json lists each record's non-secret fields."""
        import_credentials(run, "alice", fake.issue(scopes=("user:inference",)))

        result = run("status", "--json")

        [entry] = json.loads(result.stdout)
        assert {
            "key": "alice",
            "status": "active",
            "scopes": ["user:inference"],
            "subscription_type": "max",
            "lease_owner": None,
            "lease_until": None,
            "lease_active": False,
            "failures": 0,
            "last_error": None,
            "cooldown_until": None,
        } == {
            name: value
            for name, value in entry.items()
            if not name.startswith("expires") and name != "refreshed_at"
        }
        assert 28700 < entry["expires_in_seconds"] <= 28800

    def test_refreshed_at_is_when_the_login_was_stored(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """refreshed_at is the stored record's, in ISO 8601 UTC to the millisecond."""
        import_credentials(run, "alice", fake.issue())
        record = stored(store_url, "alice")
        assert record.refreshed_at is not None

        [entry] = json.loads(run("status", "--json").stdout)

        expected = record.refreshed_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert expected == entry["refreshed_at"]


class TestHumanise:
    @pytest.mark.parametrize(
        ("seconds", "expected"),
        [
            (0, "0s"),
            (45, "45s"),
            (-185, "3m"),
            (3600, "1h"),
            (8 * 3600 - 60, "7h 59m"),
            (86400 * 2 + 3 * 3600 + 59, "2d 3h"),
            (86400, "1d"),
        ],
    )
    def test_two_largest_units(self, seconds: float, expected: str) -> None:
        """A duration is written in its two largest units, whatever its sign."""
        assert expected == humanise(seconds)
