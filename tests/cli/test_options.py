"""Global options and their environment variables: store, key ring, provider."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from credkeeper import KeyRing
from credkeeper.cli._options import default_store_path, display_url, load_keyring
from credkeeper.testing import FakeProvider

from .conftest import Cli, import_credentials


class TestKeys:
    def test_key_text(self, keyring: KeyRing) -> None:
        """A value that is not a path is key text."""
        assert keyring.key_ids == load_keyring(keyring.export()).key_ids

    def test_at_path(self, keys_file: Path, keyring: KeyRing) -> None:
        """@PATH reads a key file."""
        assert keyring.key_ids == load_keyring(f"@{keys_file}").key_ids

    def test_a_path_is_a_key_file(self, keys_file: Path, keyring: KeyRing) -> None:
        """A value containing '/' is a key file too: key text never contains one."""
        assert keyring.key_ids == load_keyring(str(keys_file)).key_ids

    def test_home_relative_path(self, keyring: KeyRing) -> None:
        """A value starting with '~' is a key file under the home directory."""
        path = Path.home() / "keys"
        path.write_text(keyring.export())
        os.chmod(path, 0o600)

        assert keyring.key_ids == load_keyring("~/keys").key_ids

    def test_environment_variable(
        self, monkeypatch: pytest.MonkeyPatch, keys_file: Path, store_url: str
    ) -> None:
        """CREDKEEPER_KEYS and CREDKEEPER_STORE stand for --keys and --store."""
        monkeypatch.setenv("CREDKEEPER_KEYS", f"@{keys_file}")
        monkeypatch.setenv("CREDKEEPER_STORE", store_url)

        result = Cli([])("rekey")

        assert "re-sealed 0 record(s) under key k1; 0 already under it\n" == result.stdout


class TestDefaultStore:
    def test_in_xdg_data_home(self, fake: FakeProvider, keys_file: Path, tmp_path: Path) -> None:
        """Without --store, the store is $XDG_DATA_HOME/credkeeper/credentials.json, dir 0700."""
        run = Cli(["--keys", f"@{keys_file}", "--provider", fake.token_url])

        import_credentials(run, "alice", fake.issue())

        path = tmp_path / "xdg-data" / "credkeeper" / "credentials.json"
        assert (True, 0o700) == (path.is_file(), stat.S_IMODE(path.parent.stat().st_mode))

    def test_falls_back_to_local_share(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without XDG_DATA_HOME, the store is under ~/.local/share."""
        monkeypatch.delenv("XDG_DATA_HOME")

        expected = Path.home() / ".local" / "share" / "credkeeper" / "credentials.json"
        assert expected == default_store_path()

    def test_status_of_a_new_default_store(self) -> None:
        """status on a default store that does not exist yet says it is empty."""
        result = Cli([])("status")

        assert (0, "no credentials in ") == (result.exit_code, result.stdout[:18])


class TestDisplayUrl:
    def test_password_is_hidden(self) -> None:
        """A password in a store URL is replaced before the URL is printed."""
        url = "postgresql+psycopg://app:s3cret@db.example:5432/creds"

        assert "postgresql+psycopg://app:***@db.example:5432/creds" == display_url(url)

    def test_url_without_password_is_unchanged(self) -> None:
        """A URL without a password is printed as it is."""
        assert "file:///var/lib/creds.json" == display_url("file:///var/lib/creds.json")
