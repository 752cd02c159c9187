"""`credkeeper apikey`: create, list and revoke the service's API keys in a key file."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from credkeeper.cli import cli
from credkeeper.cli._apikey import API_KEYS_VARIABLE
from credkeeper.cli._errors import ExitCode
from credkeeper.server import ApiKey, ApiKeys

from .conftest import error_line


@pytest.fixture(autouse=True)
def no_key_file_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """No API key file from the environment that runs the tests."""
    monkeypatch.delenv(API_KEYS_VARIABLE, raising=False)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """Where the test's API key file goes (not created yet)."""
    return tmp_path / "service" / "api-keys.jsonl"


def apikey(*args: str) -> Result:
    """Run ``credkeeper apikey ARGS``; stdout and stderr are kept apart."""
    return CliRunner().invoke(cli, ["apikey", *args])


def create(key_file: Path, name: str, *args: str) -> str:
    """Create the key ``name`` in ``key_file``; the key printed."""
    result = apikey("create", name, "--file", str(key_file), *args)
    assert 0 == result.exit_code, result.stderr
    return result.stdout.splitlines()[-1]


class TestCreate:
    def test_the_printed_key_verifies_against_the_file(self, key_file: Path) -> None:
        """The key on the last line of stdout is the one the file now accepts."""
        key = create(key_file, "web", "--scope", "messages", "--keys-matching", "acme:*")

        assert ApiKey("web", frozenset({"messages"}), "acme:*") == ApiKeys.load(key_file).verify(
            key
        )

    def test_the_key_is_alone_on_the_last_line(self, key_file: Path) -> None:
        """The last line of stdout is the key and nothing else; the summary comes before it."""
        result = apikey("create", "web", "--scope", "admin", "--file", str(key_file))

        *summary, last = result.stdout.splitlines()
        assert (0, "", True) == (result.exit_code, result.stderr, last.startswith("ck_"))
        assert [last] == last.split()
        assert summary[0].startswith(f"created API key 'web' in {key_file} (mode 0600)")

    def test_the_file_never_contains_the_key(self, key_file: Path) -> None:
        """The file keeps the key's digest only."""
        key = create(key_file, "web", "--scope", "admin")

        assert key not in key_file.read_text(encoding="utf-8")

    def test_the_file_is_private(self, key_file: Path) -> None:
        """The new file has mode 0600."""
        create(key_file, "web", "--scope", "admin")

        assert 0o600 == stat.S_IMODE(key_file.stat().st_mode)

    def test_several_scopes(self, key_file: Path) -> None:
        """--scope repeated gives the key each scope."""
        key = create(key_file, "ops", "--scope", "admin", "--scope", "metrics")

        verified = ApiKeys.load(key_file).verify(key)
        assert frozenset({"admin", "metrics"}) == getattr(verified, "scopes", None)

    def test_the_variable_names_the_file(
        self, key_file: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without --file, CREDKEEPER_API_KEYS_FILE names the file."""
        monkeypatch.setenv(API_KEYS_VARIABLE, str(key_file))

        result = apikey("create", "web", "--scope", "admin")

        verified = ApiKeys.load(key_file).verify(result.stdout.splitlines()[-1])
        assert (0, "web") == (result.exit_code, getattr(verified, "name", None))

    def test_file_option_replaces_the_variable(
        self, key_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """--file wins over the variable, which is then left alone."""
        monkeypatch.setenv(API_KEYS_VARIABLE, str(tmp_path / "other.jsonl"))

        create(key_file, "web", "--scope", "admin")

        assert (True, False) == (key_file.exists(), (tmp_path / "other.jsonl").exists())


class TestCreateRefusals:
    @pytest.mark.parametrize("variable", [None, "", "  "])
    def test_no_file_is_a_usage_error(
        self, monkeypatch: pytest.MonkeyPatch, variable: str | None
    ) -> None:
        """Neither --file nor a (non-empty) variable: one line naming both, exit 2."""
        if variable is not None:
            monkeypatch.setenv(API_KEYS_VARIABLE, variable)

        result = apikey("create", "web", "--scope", "admin")

        assert (ExitCode.USAGE, "") == (result.exit_code, result.stdout)
        assert (
            "no API key file: pass --file FILE or set CREDKEEPER_API_KEYS_FILE "
            "(see 'credkeeper apikey create --help')"
        ) == error_line(result)

    def test_no_scope(self, key_file: Path) -> None:
        """A key without --scope is refused, listing the scopes; no file is made."""
        result = apikey("create", "web", "--file", str(key_file))

        assert (ExitCode.USAGE, False) == (result.exit_code, key_file.exists())
        assert error_line(result).startswith(
            "Invalid value for '--scope': give at least one: admin, credentials:read, "
            "credentials:write, messages, metrics"
        )

    def test_unknown_scope(self, key_file: Path) -> None:
        """An unknown scope is refused, naming it and the valid ones."""
        result = apikey("create", "web", "--scope", "write", "--file", str(key_file))

        assert (ExitCode.USAGE, False) == (result.exit_code, key_file.exists())
        assert "Invalid value for '--scope': 'write' is not one of 'admin'" in error_line(result)

    def test_duplicate_name_keeps_the_file(self, key_file: Path) -> None:
        """A name already in the file is refused, and the first key still verifies."""
        key = create(key_file, "web", "--scope", "messages")
        before = key_file.read_bytes()

        result = apikey("create", "web", "--scope", "admin", "--file", str(key_file))

        assert (ExitCode.USAGE, "", before) == (
            result.exit_code,
            result.stdout,
            key_file.read_bytes(),
        )
        assert "already holds a key named 'web'" in error_line(result)
        assert ApiKeys.load(key_file).verify(key) is not None

    def test_bad_name(self, key_file: Path) -> None:
        """A name with a space is refused, saying what a name may hold."""
        result = apikey("create", "my key", "--scope", "admin", "--file", str(key_file))

        assert ExitCode.USAGE == result.exit_code
        assert error_line(result).startswith("API key name 'my key' is not usable; give 1 to 64")

    def test_damaged_file_is_kept(self, key_file: Path) -> None:
        """A file with a bad line is named with the line, and left exactly as it was."""
        create(key_file, "web", "--scope", "admin")
        with key_file.open("a", encoding="utf-8") as handle:
            handle.write("{oops\n")
        before = key_file.read_bytes()

        result = apikey("create", "ops", "--scope", "admin", "--file", str(key_file))

        assert (ExitCode.USAGE, before) == (result.exit_code, key_file.read_bytes())
        assert f"API key file {key_file}, line 2: not a JSON object" == error_line(result)


class TestList:
    def test_table_shows_names_scopes_globs_and_times(self, key_file: Path) -> None:
        """The table has a row per key: name, scopes, glob ('*' for every key), creation time."""
        create(key_file, "web", "--scope", "messages", "--keys-matching", "acme:*")
        create(key_file, "ops", "--scope", "admin")

        result = apikey("list", "--file", str(key_file))

        rows = [line.split() for line in result.stdout.splitlines()[3:]]
        assert (0, f"2 API key(s) in {key_file}") == (
            result.exit_code,
            result.stdout.splitlines()[0],
        )
        assert [["web", "messages", "acme:*"], ["ops", "admin", "*"]] == [row[:3] for row in rows]

    def test_never_prints_a_key_or_hash(self, key_file: Path) -> None:
        """Neither the key nor any part of its digest line is printed."""
        key = create(key_file, "web", "--scope", "admin")
        digest = json.loads(key_file.read_text(encoding="utf-8"))["hash"].removeprefix("sha256:")

        result = apikey("list", "--file", str(key_file))
        as_json = apikey("list", "--json", "--file", str(key_file))

        output = result.stdout + as_json.stdout
        assert (False, False, False) == (key in output, digest in output, "sha256" in output)

    def test_json(self, key_file: Path) -> None:
        """--json lists each key's name, scopes, glob and creation time, as in the file."""
        create(key_file, "web", "--scope", "messages", "--scope", "credentials:read")
        written = json.loads(key_file.read_text(encoding="utf-8"))

        result = apikey("list", "--json", "--file", str(key_file))

        assert [
            {
                "name": "web",
                "scopes": ["credentials:read", "messages"],
                "keys_matching": None,
                "created_at": written["created_at"],
            }
        ] == json.loads(result.stdout)

    def test_empty_file(self, key_file: Path) -> None:
        """A file with no keys says so."""
        key_file.parent.mkdir()
        key_file.touch(mode=0o600)

        result = apikey("list", "--file", str(key_file))

        assert (0, f"no API keys in {key_file}\n") == (result.exit_code, result.stdout)

    def test_missing_file(self, key_file: Path) -> None:
        """A missing file is a usage error naming it and how to make a key in it."""
        result = apikey("list", "--file", str(key_file))

        assert ExitCode.USAGE == result.exit_code
        assert f"API key file {key_file} does not exist" in error_line(result)

    def test_a_file_others_may_write_is_refused(self, key_file: Path) -> None:
        """A world-writable file is refused, naming the chmod that fixes it."""
        create(key_file, "web", "--scope", "admin")
        os.chmod(key_file, 0o666)  # noqa: S103 - the refused case itself

        result = apikey("list", "--file", str(key_file))

        assert ExitCode.USAGE == result.exit_code
        assert error_line(result).endswith(f"run chmod 600 {key_file}")


class TestRevoke:
    def test_revoked_key_no_longer_verifies(self, key_file: Path) -> None:
        """After revoke, the key is refused and the other keys still verify."""
        web = create(key_file, "web", "--scope", "messages")
        ops = create(key_file, "ops", "--scope", "admin")

        result = apikey("revoke", "web", "--file", str(key_file))

        keys = ApiKeys.load(key_file)
        assert (0, f"revoked API key 'web' in {key_file}\n") == (result.exit_code, result.stdout)
        assert (None, "ops") == (keys.verify(web), getattr(keys.verify(ops), "name", None))

    def test_unknown_name_exits_1_naming_it(self, key_file: Path) -> None:
        """An unknown name exits 1 naming it and the keys there are; the file is unchanged."""
        create(key_file, "web", "--scope", "messages")
        before = key_file.read_bytes()

        result = apikey("revoke", "nope", "--file", str(key_file))

        assert (ExitCode.FAILURE, before) == (result.exit_code, key_file.read_bytes())
        assert (
            f"no API key named 'nope' in {key_file} (its keys: 'web'); "
            f"see `credkeeper apikey list --file {key_file}`"
        ) == error_line(result)

    def test_missing_file(self, key_file: Path) -> None:
        """Revoking in a missing file is a usage error, and creates nothing."""
        result = apikey("revoke", "web", "--file", str(key_file))

        assert (ExitCode.USAGE, False) == (result.exit_code, key_file.parent.exists())


def test_apikey_runs_without_fastapi(key_file: Path) -> None:
    """The apikey commands need only the cli extra: they run with FastAPI blocked."""
    script = (
        "import sys; sys.modules['fastapi'] = None\n"
        "from credkeeper.cli import main\n"
        "sys.exit(main(['apikey', 'create', 'web', '--scope', 'admin', '--file', sys.argv[1]]))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, str(key_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert (0, "") == (completed.returncode, completed.stderr)
    assert ApiKeys.load(key_file).verify(completed.stdout.splitlines()[-1]) is not None
