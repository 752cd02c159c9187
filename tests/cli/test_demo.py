"""`credkeeper demo`: many workers through several expiries, one refresh per expiry."""

from __future__ import annotations

from collections import Counter

import pytest
from click.testing import CliRunner, Result

from credkeeper.cli import cli
from credkeeper.cli._demo import DemoResult


@pytest.fixture(scope="module")
def demo_run() -> Result:
    """One short demo run, shared by the tests that read its output (it takes seconds)."""
    unset: dict[str, str | None] = {"FORCE_COLOR": None, "TTY_COMPATIBLE": None}
    return CliRunner().invoke(cli, ["demo", "--workers", "8", "--seconds", "2.5"], env=unset)


class TestDemo:
    def test_demo_succeeds(self, demo_run: Result) -> None:
        """A short run exits 0 and says OK."""
        assert 0 == demo_run.exit_code, demo_run.stdout + demo_run.stderr
        assert "result    OK" == demo_run.stdout.splitlines()[-1].strip()

    def test_summary_counts_calls_refreshes_and_errors(self, demo_run: Result) -> None:
        """The summary reports no error and no refused refresh."""
        assert "0 errors" in demo_run.stdout
        assert "0 invalid_grant" in demo_run.stdout
        assert "1 provider refresh for 1 expiry, " in demo_run.stdout

    def test_without_a_terminal_progress_is_plain_lines(self, demo_run: Result) -> None:
        """Off a terminal there are no escape codes, and progress is a line a second."""
        progress = [line for line in demo_run.stdout.splitlines() if "/2.5 s" in line]

        assert "\x1b[" not in demo_run.stdout
        # A loaded machine may print a line a tenth of a second late; a second apart still.
        seconds = [int(float(line.split("/")[0])) for line in progress]
        assert ([1, 2, 2], True) == (seconds, progress[-1].strip().startswith("2.5/"))

    def test_no_token_is_shown(self, demo_run: Result) -> None:
        """Nothing token-shaped appears in the output."""
        assert "sk-ant-" not in demo_run.stdout + demo_run.stderr


class TestDemoResult:
    def test_one_refresh_per_expiry_without_errors_is_ok(self) -> None:
        """No error and as many refreshes as expiries is a success."""
        assert DemoResult(calls=100, refreshes=3, expiries=3).ok

    def test_an_error_fails_the_run(self) -> None:
        """A single failed call fails the run."""
        assert not DemoResult(
            calls=100, errors=Counter({"AuthFailed": 1}), refreshes=3, expiries=3
        ).ok

    def test_extra_refreshes_fail_the_run(self) -> None:
        """Two refreshes more than expiries means refreshes were not shared."""
        assert not DemoResult(calls=100, refreshes=5, expiries=3).ok
