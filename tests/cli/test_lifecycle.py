"""`credkeeper show`, `delete` and `export`: one credential's state, its removal, a backup."""

from __future__ import annotations

import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from credkeeper import KeyRing, Status, open_store
from credkeeper._journal import RescueEntry, RescueJournal, default_journal_dir, fingerprint
from credkeeper._store import CredentialStore, reported_damage
from credkeeper.cli._errors import ExitCode
from credkeeper.cli._output import FAR_FUTURE
from credkeeper.testing import FakeProvider

from .conftest import (
    Cli,
    damage,
    error_line,
    import_credentials,
    leaked,
    set_refreshed_at,
    stored,
)


class Terminal(io.BytesIO):
    """Standard input that says it is a terminal, so that a command asks its question."""

    def isatty(self) -> bool:
        return True


def is_stored(store_url: str, key: str) -> bool:
    """Whether the store holds a record under ``key``, readable or damaged."""
    store = open_store(store_url)
    assert isinstance(store, CredentialStore)
    try:
        return key in set(store.scan_due(FAR_FUTURE)) or key in reported_damage(store)
    finally:
        store.close()


def store_only(store_url: str) -> Cli:
    """The command line on ``store_url`` alone: no key ring, codec or provider."""
    return Cli(["--store", store_url])


class TestShow:
    def test_prints_the_status_row_of_the_key(self, run: Cli, fake: FakeProvider) -> None:
        """The table has the header and one row: key, expiry, status, lease, failures."""
        import_credentials(run, "alice", fake.issue(expires_in=2 * 3600 + 30))
        import_credentials(run, "bob", fake.issue())

        result = run("show", "alice")

        assert 0 == result.exit_code, result.stderr
        rows = result.stdout.splitlines()
        assert (4, ["alice", "in 2h", "active", "-", "-"]) == (
            len(rows),
            [cell.strip() for cell in rows[2].split("  ") if cell.strip()],
        )

    def test_prints_when_the_tokens_were_last_refreshed(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """The line after the table gives the last refresh in UTC and how long ago it was."""
        import_credentials(run, "alice", fake.issue())
        moment = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
        set_refreshed_at(store_url, "alice", moment)

        result = run("show", "alice")

        last = result.stdout.splitlines()[-1]
        prefix = "last refresh: 2026-01-02T03:04:05.678Z ("
        assert (0, True, True) == (
            result.exit_code,
            last.startswith(prefix),
            last.endswith(" ago)"),
        )

    def test_an_unknown_last_refresh_says_so(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """A record stored before credkeeper kept the last refresh shows it as unknown."""
        import_credentials(run, "alice", fake.issue())
        set_refreshed_at(store_url, "alice", None)

        result = run("show", "alice")

        assert (
            "last refresh: unknown (stored before credkeeper kept it)"
            == (result.stdout.splitlines()[-1])
        )

    def test_json_holds_the_last_refresh(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """--json gives refreshed_at in ISO 8601 UTC, to the millisecond."""
        import_credentials(run, "alice", fake.issue())
        set_refreshed_at(store_url, "alice", datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC))

        shown = json.loads(run("show", "alice", "--json").stdout)

        assert "2026-01-02T03:04:05.678Z" == shown["refreshed_at"]

    def test_json_is_the_object_status_lists(self, run: Cli, fake: FakeProvider) -> None:
        """--json prints the fields of `status --json` for the key."""
        import_credentials(run, "alice", fake.issue())
        listed = json.loads(run("status", "--json").stdout)[0]

        shown = json.loads(run("show", "alice", "--json").stdout)

        # The seconds left are counted at each run's own moment.
        for document in (listed, shown):
            document.pop("expires_in_seconds")
        assert listed == shown

    def test_needs_no_key_ring_and_prints_no_token(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """Without --keys the state is shown, and no token shows in either form."""
        import_credentials(run, "alice", fake.issue())
        show = store_only(store_url)

        results = (show("show", "alice"), show("show", "alice", "--json"))

        assert ([0, 0], set()) == ([r.exit_code for r in results], leaked(fake, *results))

    def test_an_absent_key_exits_6(self, run: Cli) -> None:
        """A key with no credential exits 6, naming it."""
        result = run("show", "nobody")

        assert ExitCode.NOT_FOUND == result.exit_code
        assert error_line(result).startswith("no credential is stored under key 'nobody'")

    def test_a_damaged_record_exits_4(self, run: Cli, fake: FakeProvider, store_url: str) -> None:
        """A record the store cannot read exits 4, naming the key."""
        import_credentials(run, "alice", fake.issue())
        damage(store_url, "alice")

        result = run("show", "alice")

        assert (ExitCode.STORE, True) == (result.exit_code, "'alice'" in error_line(result))


class TestDelete:
    def test_yes_deletes_without_asking(self, run: Cli, fake: FakeProvider, store_url: str) -> None:
        """--yes deletes at once and says what was deleted."""
        import_credentials(run, "alice", fake.issue())

        result = run("delete", "alice", "--yes")

        assert (
            0,
            f"deleted the credential under key 'alice' and its rescue-journal entries "
            f"from {store_url}\n",
        ) == (result.exit_code, result.stdout)
        assert not is_stored(store_url, "alice")

    def test_answering_no_keeps_the_credential(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """On a terminal the command asks; 'n' keeps the credential and exits 1."""
        import_credentials(run, "alice", fake.issue())

        result = run("delete", "alice", input=Terminal(b"n\n"))

        assert ExitCode.FAILURE == result.exit_code
        assert (True, True) == (
            f"Delete the credential under key 'alice' from {store_url}? [y/N]" in result.stdout,
            is_stored(store_url, "alice"),
        )

    def test_answering_yes_deletes(self, run: Cli, fake: FakeProvider, store_url: str) -> None:
        """'y' to the question deletes the credential."""
        import_credentials(run, "alice", fake.issue())

        result = run("delete", "alice", input=Terminal(b"y\n"))

        assert (0, False) == (result.exit_code, is_stored(store_url, "alice"))

    def test_without_a_terminal_it_asks_for_yes(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """Without a terminal to ask on and without --yes, a usage error names --yes."""
        import_credentials(run, "alice", fake.issue())

        result = run("delete", "alice", input="y\n")

        assert (ExitCode.USAGE, True) == (result.exit_code, is_stored(store_url, "alice"))
        assert "pass --yes" in error_line(result)

    def test_an_absent_key_exits_6(self, run: Cli) -> None:
        """A key with no credential exits 6 without asking."""
        result = run("delete", "nobody", input=Terminal(b"y\n"))

        assert (ExitCode.NOT_FOUND, "") == (result.exit_code, result.stdout)

    def test_drops_the_keys_rescue_entries(
        self, run: Cli, fake: FakeProvider, keyring: KeyRing, tmp_path: Path
    ) -> None:
        """Through the manager, the rescue entry made for the stored record is deleted too."""
        credentials = fake.issue()
        import_credentials(run, "alice", credentials)
        journal = tmp_path / "journal"
        entry = RescueEntry(
            id=RescueJournal.new_id(),
            key="alice",
            credentials=fake.issue(),
            replaces=fingerprint(credentials.refresh_token),
            created_at=datetime.now(UTC),
        )
        RescueJournal(journal, keyring=keyring).write(entry)

        result = run("delete", "alice", "--yes")

        assert (0, []) == (result.exit_code, list(journal.glob("*.json")))

    def test_without_a_key_ring_deletes_the_record(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """With no key ring, the store's record is deleted, and the message says only that."""
        import_credentials(run, "alice", fake.issue())

        result = store_only(store_url)("delete", "alice", "--yes")

        assert (0, f"deleted the credential under key 'alice' from {store_url}\n", "") == (
            result.exit_code,
            result.stdout,
            result.stderr,
        )
        assert not is_stored(store_url, "alice")

    def test_without_a_key_ring_the_journal_is_left_and_said_so(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """With no key ring and entries in the journal, stderr says they were left alone: they
        cannot be matched to the record without its tokens."""
        credentials = fake.issue()
        import_credentials(run, "alice", credentials)
        journal = default_journal_dir()
        RescueJournal(journal).write(
            RescueEntry(
                id=RescueJournal.new_id(),
                key="alice",
                credentials=fake.issue(),
                replaces=fingerprint(credentials.refresh_token),
                created_at=datetime.now(UTC),
            )
        )

        result = store_only(store_url)("delete", "alice", "--yes")

        assert (0, True, 1) == (
            result.exit_code,
            f"the rescue journal in {journal} was left as it is" in result.stderr,
            len(list(journal.glob("*.json"))),
        )

    def test_a_damaged_record_can_be_deleted(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """A record the store cannot read is deleted all the same."""
        import_credentials(run, "alice", fake.issue())
        damage(store_url, "alice")

        result = run("delete", "alice", "--yes")

        assert (0, f"deleted the damaged record under key 'alice' from {store_url}\n") == (
            result.exit_code,
            result.stdout,
        )
        assert not is_stored(store_url, "alice")


def exported(text: str) -> dict[str, dict[str, Any]]:
    """The JSON lines of an export, by key."""
    documents = [json.loads(line) for line in text.splitlines()]
    return {document.pop("key"): document for document in documents}


class TestExport:
    def test_writes_each_record_as_stored(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """One JSON line per record: the key and the stored document, tokens sealed."""
        import_credentials(run, "alice", fake.issue())
        import_credentials(run, "bob", fake.issue())

        result = run("export")

        assert 0 == result.exit_code, result.stderr
        assert {key: stored(store_url, key).to_document() for key in ("alice", "bob")} == (
            exported(result.stdout)
        )
        assert f"exported 2 record(s) from {store_url} to standard output\n" == result.stderr

    def test_prints_no_token(self, run: Cli, fake: FakeProvider) -> None:
        """The tokens in the export are sealed: none of the issued ones shows."""
        import_credentials(run, "alice", fake.issue())

        assert set() == leaked(fake, run("export"))

    def test_output_is_a_private_file(self, run: Cli, fake: FakeProvider, tmp_path: Path) -> None:
        """--output writes the same lines to a file of mode 0600, and nothing to stdout."""
        import_credentials(run, "alice", fake.issue())
        output = tmp_path / "backup" / "credentials.jsonl"

        result = run("export", "--output", str(output))

        assert (0, "", 0o600) == (result.exit_code, result.stdout, output.stat().st_mode & 0o777)
        assert run("export").stdout == output.read_text(encoding="utf-8")

    def test_an_existing_file_needs_force(
        self, run: Cli, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """An existing --output is kept unless --force replaces it."""
        import_credentials(run, "alice", fake.issue())
        output = tmp_path / "backup.jsonl"
        output.write_text("older backup\n", encoding="utf-8")
        os.chmod(output, 0o600)

        refused = run("export", "--output", str(output))
        kept = output.read_text(encoding="utf-8")
        forced = run("export", "--output", str(output), "--force")

        assert (ExitCode.USAGE, "older backup\n", 0) == (
            refused.exit_code,
            kept,
            forced.exit_code,
        )
        assert ["alice"] == list(exported(output.read_text(encoding="utf-8")))

    def test_a_damaged_record_is_named_and_the_others_exported(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """A damaged record exits 4 named on stderr, after the readable ones are written."""
        import_credentials(run, "alice", fake.issue())
        import_credentials(run, "bob", fake.issue())
        damage(store_url, "bob")

        result = run("export")

        assert (ExitCode.STORE, ["alice"]) == (result.exit_code, list(exported(result.stdout)))
        assert "'bob'" in result.stderr.splitlines()[-1]


def test_status_of_a_record_with_state_survives_show(
    run: Cli, fake: FakeProvider, store_url: str
) -> None:
    """A credential needing re-auth, with a failure and a lease, shows all of it in --json."""
    import_credentials(run, "alice", fake.issue())
    store = open_store(store_url)
    assert isinstance(store, CredentialStore)
    try:
        record = store.get("alice")
        assert record is not None
        store.put(
            record.replace(
                status=Status.NEEDS_REAUTH,
                failures=2,
                last_error="invalid_grant",
                lease_owner="host-a",
                lease_until=datetime.now(UTC) + timedelta(minutes=1),
            )
        )
    finally:
        store.close()

    shown = json.loads(run("show", "alice", "--json").stdout)

    assert ("needs_reauth", 2, "invalid_grant", "host-a", True) == (
        shown["status"],
        shown["failures"],
        shown["last_error"],
        shown["lease_owner"],
        shown["lease_active"],
    )


@pytest.mark.parametrize("command", ["show", "delete"])
def test_a_key_no_store_can_hold_is_a_usage_error(run: Cli, command: str) -> None:
    """A key with surrounding spaces is refused before the store is asked."""
    result = run(command, " alice ", "--yes" if command == "delete" else "--json")

    assert ExitCode.USAGE == result.exit_code
