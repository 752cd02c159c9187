"""`credkeeper rekey`: every record re-sealed under the primary key, counted."""

from __future__ import annotations

from pathlib import Path

from credkeeper import KeyRing
from credkeeper.cli._errors import ExitCode
from credkeeper.testing import FakeProvider

from .conftest import Cli, damage, error_line, import_credentials, stored, write_keys


def sealed_with(store_url: str, key: str) -> set[str]:
    """The key ids the token fields under ``key`` are sealed with."""
    record = stored(store_url, key)
    return {record.access_token.split(":")[1], record.refresh_token.split(":")[1]}


class TestRekey:
    def test_reseals_every_record_under_the_new_primary(
        self, run: Cli, fake: FakeProvider, keys_file: Path, keyring: KeyRing, store_url: str
    ) -> None:
        """After a rotation, rekey re-seals each record and counts them."""
        import_credentials(run, "alice", fake.issue())
        import_credentials(run, "bob", fake.issue())
        write_keys(keys_file, keyring.rotated("k2"))

        result = run("rekey")

        assert "re-sealed 2 record(s) under key k2; 0 already under it\n" == result.stdout
        assert ({"k2"}, {"k2"}) == (sealed_with(store_url, "alice"), sealed_with(store_url, "bob"))

    def test_second_run_changes_nothing(self, run: Cli, fake: FakeProvider) -> None:
        """Records already under the primary key are counted as unchanged."""
        import_credentials(run, "alice", fake.issue())

        result = run("rekey")

        assert "re-sealed 0 record(s) under key k1; 1 already under it\n" == result.stdout

    def test_a_ring_without_the_old_key_fails(
        self, run: Cli, fake: FakeProvider, keys_file: Path
    ) -> None:
        """A ring that cannot open a record exits 7, naming the record."""
        import_credentials(run, "alice", fake.issue())
        write_keys(keys_file, KeyRing.generate("k2"))

        result = run("rekey")

        assert ExitCode.DECRYPTION == result.exit_code
        assert "under key 'alice' could not be decrypted" in error_line(result)

    def test_a_damaged_record_is_named_and_the_others_are_resealed(
        self,
        run: Cli,
        fake: FakeProvider,
        keys_file: Path,
        keyring: KeyRing,
        store_url: str,
    ) -> None:
        """One damaged record exits 4, named on stderr, after every other record is re-sealed."""
        import_credentials(run, "alice", fake.issue())
        import_credentials(run, "bob", fake.issue())
        damage(store_url, "bob")
        write_keys(keys_file, keyring.rotated("k2"))

        result = run("rekey")

        assert (ExitCode.STORE, {"k2"}) == (result.exit_code, sealed_with(store_url, "alice"))
        assert "'bob'" in error_line(result)
