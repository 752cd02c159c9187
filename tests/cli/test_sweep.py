"""`credkeeper sweep`: every due credential refreshed once, a summary, JSON, and exit codes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from credkeeper.cli._errors import ExitCode
from credkeeper.testing import FakeProvider, Fault

from .conftest import Cli, import_credentials, leaked, set_refreshed_at, stored

DAY = timedelta(days=1)


class TestSweep:
    def test_refreshes_the_due_credentials_and_sums_up(self, run: Cli, fake: FakeProvider) -> None:
        """Two due, one not: two provider refreshes, one summary line, no token shown."""
        import_credentials(run, "alice", fake.issue(expires_in=60))
        import_credentials(run, "bob", fake.issue(expires_in=-60))
        import_credentials(run, "carol", fake.issue(expires_in=8 * 3600))

        result = run("sweep")

        assert (0, 2) == (result.exit_code, fake.refresh_count), result.stderr
        assert result.stdout.startswith("swept 2 due credential(s) in ")
        assert "2 refreshed, 0 already fresh, 0 by a peer" in result.stdout
        assert set() == leaked(fake, result)

    def test_json_reports_counts_and_keys(self, run: Cli, fake: FakeProvider) -> None:
        """--json: one JSON object with the counts, the re-auth and failed keys."""
        import_credentials(run, "alice", fake.issue(expires_in=60))
        dead = fake.issue(expires_in=60)
        import_credentials(run, "bob", dead)
        fake.revoke(dead)

        result = run("sweep", "--json")

        report = json.loads(result.stdout)
        assert (0, 2, 1, ["bob"], []) == (
            result.exit_code,
            report["due"],
            report["refreshed"],
            report["needs_reauth"],
            report["failed"],
        )

    def test_a_failed_refresh_exits_1(self, run: Cli, fake: FakeProvider) -> None:
        """A provider refusing the request: the key is listed as failed, exit code 1."""
        import_credentials(run, "alice", fake.issue(expires_in=60))
        fake.fail_next(Fault.status(400))

        result = run("sweep")

        assert ExitCode.FAILURE == result.exit_code
        assert "1 failed: 'alice' (provider_error)" in result.stdout

    def test_window_widens_what_is_due(self, run: Cli, fake: FakeProvider) -> None:
        """A token expiring in 40 minutes is left by the default window, swept by --window 1h."""
        import_credentials(run, "alice", fake.issue(expires_in=40 * 60))

        first = run("sweep", "--json")
        second = run("sweep", "--json", "--window", "1h")

        assert (0, 1) == (json.loads(first.stdout)["due"], json.loads(second.stdout)["due"])
        assert 1 == fake.refresh_count

    def test_a_bad_duration_is_a_usage_error(self, run: Cli) -> None:
        """--window soon: exit 2 naming the forms a duration takes."""
        result = run("sweep", "--window", "soon")

        assert ExitCode.USAGE == result.exit_code
        assert "is not a duration such as 90s, 30m, 2h or 1d" in result.stderr

    def test_a_window_shorter_than_the_leeway_is_refused(self, run: Cli) -> None:
        """--window 5m: the leeway is 15 minutes, so the sweep would leave callers to refresh."""
        result = run("sweep", "--window", "5m")

        assert ExitCode.USAGE == result.exit_code
        assert "must be at least the manager's leeway" in result.stderr

    def test_a_watch_interval_under_a_second_is_refused(self, run: Cli) -> None:
        """--watch --interval 0s would poll the store in a busy loop: exit 2."""
        result = run("sweep", "--watch", "--interval", "0s")

        assert ExitCode.USAGE == result.exit_code
        assert "must be at least 1s" in result.stderr


class TestKeepAlive:
    def test_refreshes_an_idle_credential_and_leaves_a_recent_one(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """Both valid for 60 days; the one last refreshed 31 days ago is refreshed, alone."""
        import_credentials(run, "idle", fake.issue(expires_in=60 * 86400))
        import_credentials(run, "recent", fake.issue(expires_in=60 * 86400))
        set_refreshed_at(store_url, "idle", datetime.now(UTC) - 31 * DAY)
        recent = stored(store_url, "recent")

        result = run("sweep", "--keep-alive", "30d", "--json")

        report = json.loads(result.stdout)
        assert (0, 0, 1, 1, 1) == (
            result.exit_code,
            report["due"],
            report["idle"],
            report["kept_alive"],
            fake.refresh_count,
        )
        assert recent == stored(store_url, "recent")

    def test_without_the_flag_an_idle_credential_is_left_alone(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """No --keep-alive: a credential idle for a year but valid is not refreshed."""
        import_credentials(run, "idle", fake.issue(expires_in=60 * 86400))
        set_refreshed_at(store_url, "idle", datetime.now(UTC) - 365 * DAY)

        result = run("sweep", "--json")

        idle = json.loads(result.stdout)["idle"]
        assert (0, 0, 0) == (result.exit_code, idle, fake.refresh_count)

    def test_the_summary_counts_the_idle_credentials(
        self, run: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """The closing line says how many idle credentials were kept alive, no token shown."""
        import_credentials(run, "idle", fake.issue(expires_in=60 * 86400))
        set_refreshed_at(store_url, "idle", None)

        result = run("sweep", "--keep-alive", "30d")

        assert 0 == result.exit_code, result.stderr
        assert "1 of 1 idle kept alive" in result.stdout
        assert set() == leaked(fake, result)

    def test_a_keep_alive_under_a_second_is_refused(self, run: Cli) -> None:
        """--keep-alive 0s would refresh every credential at every pass: exit 2."""
        result = run("sweep", "--keep-alive", "0s")

        assert ExitCode.USAGE == result.exit_code
        assert "must be at least 1s" in result.stderr
