"""`credkeeper status`: every stored credential's state, never a token."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from credkeeper import open_store
from credkeeper._cli_format import humanise
from credkeeper._store import CredentialStore
from credkeeper.testing import FakeProvider

from .conftest import Cli, import_credentials, leaked, stored


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
        } == {name: value for name, value in entry.items() if not name.startswith("expires")}
        assert 28700 < entry["expires_in_seconds"] <= 28800


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
