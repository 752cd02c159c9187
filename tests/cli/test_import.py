"""`credkeeper import`: a login's credentials into the store, sealed, never echoed."""

from __future__ import annotations

import json
from pathlib import Path

from credkeeper import Credentials, KeyRing
from credkeeper.cli._errors import ExitCode
from credkeeper.testing import FakeProvider

from .conftest import Cli, claude_code_file, error_line, leaked, stored, stored_tokens


def tokens(credentials: Credentials) -> tuple[str, str]:
    """The access and refresh tokens of ``credentials``, in clear."""
    return (
        credentials.access_token.get_secret_value(),
        credentials.refresh_token.get_secret_value(),
    )


class TestImport:
    def test_from_claude_code_file(
        self, run: Cli, fake: FakeProvider, tmp_path: Path, store_url: str, keyring: KeyRing
    ) -> None:
        """--from-file reads Claude Code's credentials file and stores its tokens."""
        credentials = fake.issue()
        path = claude_code_file(tmp_path / "credentials.json", credentials)

        result = run("import", "--key", "alice", "--from-file", str(path))

        assert 0 == result.exit_code, result.stderr
        assert tokens(credentials) == stored_tokens(store_url, keyring, "alice")

    def test_default_file_is_claude_codes(
        self, run: Cli, fake: FakeProvider, store_url: str, keyring: KeyRing
    ) -> None:
        """Without a source, ~/.claude/.credentials.json is read."""
        credentials = fake.issue()
        claude_code_file(Path.home() / ".claude" / ".credentials.json", credentials)

        result = run("import", "--key", "alice")

        assert 0 == result.exit_code, result.stderr
        assert tokens(credentials) == stored_tokens(store_url, keyring, "alice")

    def test_from_stdin_wrapper_document(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """--stdin reads a document holding the wrapper's oauth_credentials object."""
        credentials = fake.issue(subscription_type="pro")
        document = json.dumps({"oauth_credentials": credentials.to_wrapper()})

        result = run("import", "--key", "bob", "--stdin", input=document)

        assert 0 == result.exit_code, result.stderr
        assert "pro" == stored(store_url, "bob").subscription_type

    def test_from_dash_reads_the_bare_object(
        self, run: Cli, fake: FakeProvider, store_url: str, keyring: KeyRing
    ) -> None:
        """'-' reads stdin too, and the oauth_credentials object may come bare."""
        credentials = fake.issue()

        result = run("import", "--key", "bob", "-", input=json.dumps(credentials.to_wrapper()))

        assert 0 == result.exit_code, result.stderr
        assert tokens(credentials) == stored_tokens(store_url, keyring, "bob")

    def test_tokens_are_sealed_in_the_store(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """The store holds ciphertexts under the key ring's primary key, never the tokens."""
        run("import", "--key", "alice", "-", input=json.dumps(fake.issue().to_wrapper()))

        record = stored(store_url, "alice")

        assert (True, True) == (
            record.access_token.startswith("ck1:k1:"),
            record.refresh_token.startswith("ck1:k1:"),
        )

    def test_reports_the_expiry_and_never_a_token(self, run: Cli, fake: FakeProvider) -> None:
        """The confirmation names key, store and expiry, and shows no token."""
        credentials = fake.issue(expires_in=3600 * 8 - 30)

        result = run("import", "--key", "alice", "-", input=json.dumps(credentials.to_wrapper()))

        assert "access token expires in 7h 59m" in result.stdout
        assert set() == leaked(fake, result)

    def test_invalid_json_is_refused_without_quoting_it(self, run: Cli) -> None:
        """Input that is not JSON is a usage error whose message does not quote it."""
        result = run("import", "--key", "alice", "--stdin", input="sk-ant-oat01-not-json")

        assert ExitCode.USAGE == result.exit_code
        assert "standard input is not valid JSON" == error_line(result)

    def test_incomplete_document_names_the_field(self, run: Cli) -> None:
        """A document without a refresh token is refused, naming the missing field."""
        document = json.dumps({"access_token": "a", "expires_at": 1_900_000_000_000})

        result = run("import", "--key", "alice", "--stdin", input=document)

        assert ExitCode.USAGE == result.exit_code
        assert "has no 'refresh_token' field" in error_line(result)

    def test_missing_file_is_a_usage_error(self, run: Cli, tmp_path: Path) -> None:
        """A credentials file that does not exist is named in one line."""
        missing = tmp_path / "nowhere.json"

        result = run("import", "--key", "alice", "--from-file", str(missing))

        assert ExitCode.USAGE == result.exit_code
        assert f"cannot read credentials from {missing}: No such file or directory" == (
            error_line(result)
        )

    def test_key_is_required(self, run: Cli) -> None:
        """--key is required."""
        result = run("import", "--stdin", input="{}")

        assert ExitCode.USAGE == result.exit_code
        assert error_line(result).startswith("Missing option '--key'.")

    def test_one_source_at_a_time(self, run: Cli, tmp_path: Path) -> None:
        """--stdin and --from-file together are refused."""
        result = run("import", "--key", "a", "--stdin", "--from-file", str(tmp_path / "x"))

        assert ExitCode.USAGE == result.exit_code
        assert error_line(result).startswith("give one of PATH, --from-file and --stdin")
