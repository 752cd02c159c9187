"""Global options and their environment variables: store, key ring, provider."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from credkeeper import KeyRing
from credkeeper._settings import Settings, default_store_path, display_url
from credkeeper.cli._errors import ExitCode
from credkeeper.testing import FakeProvider

from .conftest import Cli, error_line, import_credentials


class TestKeys:
    def test_key_text(self, keyring: KeyRing) -> None:
        """A value that is not a path is key text."""
        assert keyring.key_ids == Settings(keys=keyring.export()).load_keyring().key_ids

    def test_at_path(self, keys_file: Path, keyring: KeyRing) -> None:
        """@PATH reads a key file."""
        assert keyring.key_ids == Settings(keys=f"@{keys_file}").load_keyring().key_ids

    def test_a_path_is_a_key_file(self, keys_file: Path, keyring: KeyRing) -> None:
        """A value containing '/' is a key file too: key text never contains one."""
        assert keyring.key_ids == Settings(keys=str(keys_file)).load_keyring().key_ids

    def test_home_relative_path(self, keyring: KeyRing) -> None:
        """A value starting with '~' is a key file under the home directory."""
        path = Path.home() / "keys"
        path.write_text(keyring.export())
        os.chmod(path, 0o600)

        assert keyring.key_ids == Settings(keys="~/keys").load_keyring().key_ids

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

    @pytest.mark.parametrize("name", ["password", "sslpassword", "client_secret", "token"])
    def test_a_secret_in_the_query_is_hidden(self, name: str) -> None:
        """libpq's ?password= and its kind are hidden too; other options stay readable."""
        url = f"postgresql://db.example/creds?{name}=s3cret&refresh_token_column=rt&table=t"

        assert (
            f"postgresql://db.example/creds?{name}=***&refresh_token_column=rt&table=t"
            == display_url(url)
        )

    @pytest.mark.parametrize(
        "url", ["file:///var/lib/creds.json", "sqlite:////var/lib/creds.db?table=t"]
    )
    def test_url_without_password_is_unchanged(self, url: str) -> None:
        """A URL without a password is printed as it is, four slashes of SQLite included."""
        assert url == display_url(url)


class TestProvider:
    def test_refresh_at_an_rfc6749_endpoint(self, store_url: str, keys_file: Path) -> None:
        """--provider oauth2+URL refreshes with a form body and the client id it names."""
        with FakeProvider(client_id="my-app") as fake:
            provider = f"oauth2+{fake.token_url}?client_id=my-app&scope=read+write"
            run = Cli(["--store", store_url, "--keys", f"@{keys_file}", "--provider", provider])
            import_credentials(run, "alice", fake.issue())

            result = run("refresh", "alice")

            call = fake.refresh_calls[-1]
        assert 0 == result.exit_code, result.stderr
        assert ("ok", "form", "my-app", "read write") == (
            call.outcome,
            call.body_format,
            call.client_id,
            call.scope,
        )

    def test_provider_and_client_secret_variables(
        self, monkeypatch: pytest.MonkeyPatch, store_url: str, keys_file: Path
    ) -> None:
        """CREDKEEPER_PROVIDER and CREDKEEPER_PROVIDER_CLIENT_SECRET reach the endpoint."""
        secret = "client-SECRET-value-42"
        monkeypatch.setenv("CREDKEEPER_STORE", store_url)
        monkeypatch.setenv("CREDKEEPER_KEYS", f"@{keys_file}")
        monkeypatch.setenv("CREDKEEPER_PROVIDER_CLIENT_SECRET", secret)
        with FakeProvider(client_id="my-app", client_secret=secret) as fake:
            monkeypatch.setenv("CREDKEEPER_PROVIDER", f"oauth2+{fake.token_url}?client_id=my-app")
            import_credentials(Cli([]), "alice", fake.issue())

            result = Cli([])("refresh", "alice")

            call = fake.refresh_calls[-1]
        assert (0, "ok", "client_secret_basic") == (
            result.exit_code,
            call.outcome,
            call.client_auth,
        )
        assert secret not in result.stdout + result.stderr

    def test_a_client_secret_for_claude_code_is_refused(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A client secret beside a profile that sends none is a usage error naming both."""
        monkeypatch.setenv("CREDKEEPER_PROVIDER_CLIENT_SECRET", "client-SECRET-value-42")

        result = Cli([])("status")

        assert ExitCode.USAGE == result.exit_code
        assert error_line(result).startswith(
            "CREDKEEPER_PROVIDER_CLIENT_SECRET is set, but the claude-code profile sends no "
            "client secret; unset it, or name an RFC 6749 endpoint in --provider "
            "(CREDKEEPER_PROVIDER) as oauth2+"
        )

    def test_a_secret_in_the_provider_variable_is_refused_unquoted(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A client secret written into CREDKEEPER_PROVIDER is refused, and not repeated."""
        monkeypatch.setenv(
            "CREDKEEPER_PROVIDER",
            "oauth2+https://auth.example.com/token?client_id=app&client_secret=hunter2",
        )

        result = Cli([])("status")

        assert ExitCode.USAGE == result.exit_code
        assert (
            "--provider (CREDKEEPER_PROVIDER) must not hold the client secret, as it gets "
            "printed; give it in CREDKEEPER_PROVIDER_CLIENT_SECRET"
        ) == error_line(result)
