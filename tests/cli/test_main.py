"""The command as a whole: entry points, help, exit codes, one error line per failure."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from credkeeper import (
    ConfigurationError,
    CredentialNotFound,
    CredentialsError,
    DecryptionError,
    InvalidGrant,
    ProviderError,
    ProviderUnavailable,
    ReauthRequired,
    RefreshTimeout,
    StoreCorrupted,
    StoreUnavailable,
    UnknownSchemeError,
)
from credkeeper.cli import cli, main
from credkeeper.cli._errors import MEANINGS, ExitCode, describe, exit_code_for

from .conftest import error_line

DOCS = Path(__file__).parents[2] / "docs" / "cli.md"


class TestEntryPoints:
    def test_python_m_credkeeper_shows_help(self) -> None:
        """`python -m credkeeper --help` runs the command line and exits 0."""
        completed = subprocess.run(
            [sys.executable, "-m", "credkeeper", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert (0, "") == (completed.returncode, completed.stderr)
        assert completed.stdout.startswith("Usage: credkeeper ")

    def test_without_click_the_command_names_the_extra(self) -> None:
        """Without the cli extra (click blocked from import), one line says what to install."""
        script = (
            "import sys; sys.modules['click'] = None\n"
            "from credkeeper.__main__ import main\n"
            "sys.exit(main(['--help']))"
        )
        completed = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )

        assert (
            2,
            "",
            [
                "credkeeper: error: the command line needs click; "
                "install it with pip install 'credkeeper[cli]'"
            ],
        ) == (
            completed.returncode,
            completed.stdout,
            completed.stderr.splitlines(),
        )

    def test_main_returns_the_exit_code(self, capsys: pytest.CaptureFixture[str]) -> None:
        """main() returns the code rather than exiting, for the console script to exit with."""
        code = main(["no-such-command"])

        assert ExitCode.USAGE == code
        assert capsys.readouterr().err.startswith("credkeeper: error: No such command")

    def test_version(self) -> None:
        """--version prints the package version."""
        result = CliRunner().invoke(cli, ["--version"])

        assert 0 == result.exit_code
        assert result.stdout.startswith("credkeeper, version ")


class TestHelp:
    def test_help_lists_every_exit_code(self) -> None:
        """The --help epilog has one row per exit code, with its meaning."""
        result = CliRunner().invoke(cli, ["--help"])

        rows = re.findall(r"^ +(\d+) +(.+)$", result.stdout.split("Exit codes:")[1], re.M)
        assert [(str(code.value), MEANINGS[code]) for code in ExitCode] == rows

    def test_docs_list_every_exit_code(self) -> None:
        """docs/cli.md has a table row for every exit code, in order."""
        rows = re.findall(r"^\| `(\d+)` \|", DOCS.read_text(encoding="utf-8"), re.M)

        assert [str(code.value) for code in ExitCode] == rows

    def test_no_command_shows_help_with_usage_status(self) -> None:
        """A bare `credkeeper` shows the help and exits with the usage status."""
        result = CliRunner().invoke(cli, [])

        assert ExitCode.USAGE == result.exit_code
        assert "Usage: credkeeper" in result.stderr


class TestUsageErrors:
    def test_unknown_command_is_one_line(self) -> None:
        """An unknown command is one error line and the usage status."""
        result = CliRunner().invoke(cli, ["bogus"])

        assert ExitCode.USAGE == result.exit_code
        assert "No such command 'bogus'. (see 'credkeeper --help')" == error_line(result)

    def test_bad_option_value_is_one_line(self) -> None:
        """A bad option value names the option, in one line, with the usage status."""
        result = CliRunner().invoke(cli, ["demo", "--workers", "many"])

        assert ExitCode.USAGE == result.exit_code
        assert "'--workers'" in error_line(result)

    def test_unknown_provider_is_refused(self) -> None:
        """--provider accepts the profiles, PROFILE+URL and URLs only, naming them all."""
        result = CliRunner().invoke(cli, ["--provider", "github", "status"])

        assert ExitCode.USAGE == result.exit_code
        assert (
            "--provider (CREDKEEPER_PROVIDER) must be claude-code, wrapper-guide, or PROFILE+URL "
            "such as oauth2+https://auth.example.com/oauth/token?client_id=ID (PROFILE: "
            "claude-code, wrapper-guide, oauth2), or a token URL spoken to with Claude Code's "
            "protocol; got 'github'"
        ) == error_line(result)


class TestExitCodeTable:
    @pytest.mark.parametrize(
        ("exc", "expected"),
        [
            (ReauthRequired("alice"), ExitCode.REAUTH_REQUIRED),
            (InvalidGrant("refused"), ExitCode.REAUTH_REQUIRED),
            (CredentialNotFound("alice"), ExitCode.NOT_FOUND),
            (DecryptionError("no"), ExitCode.DECRYPTION),
            (StoreUnavailable("down"), ExitCode.STORE),
            (StoreCorrupted("bad"), ExitCode.STORE),
            (ProviderUnavailable("503"), ExitCode.PROVIDER),
            (ProviderError("400"), ExitCode.PROVIDER),
            (RefreshTimeout("alice"), ExitCode.PROVIDER),
            (UnknownSchemeError("no", scheme="x"), ExitCode.USAGE),
            (ConfigurationError("no"), ExitCode.USAGE),
            (CredentialsError("no"), ExitCode.USAGE),
            (OSError(13, "Permission denied", "/x"), ExitCode.FAILURE),
            (RuntimeError("bug"), ExitCode.FAILURE),
        ],
    )
    def test_each_error_has_its_documented_code(
        self, exc: BaseException, expected: ExitCode
    ) -> None:
        """Each kind of error maps to the exit code the table documents."""
        assert expected == exit_code_for(exc)

    def test_internal_errors_do_not_show_their_text(self) -> None:
        """An unexpected exception is named by type only: its text could hold anything."""
        message = describe(RuntimeError("sk-ant-secret"))

        assert "internal error (RuntimeError); rerun with --debug for the traceback" == message

    def test_messages_are_one_line(self) -> None:
        """A message with line breaks is folded into one line."""
        assert "a b c" == describe(ConfigurationError("a\nb\n  c"))
