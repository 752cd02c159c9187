"""`credkeeper refresh KEY`: one provider refresh, stored before it is reported."""

from __future__ import annotations

import json
from pathlib import Path

from credkeeper import KeyRing
from credkeeper.cli._errors import ExitCode
from credkeeper.testing import FakeProvider, Fault

from .conftest import Cli, error_line, import_credentials, leaked, stored_tokens, write_keys


class TestRefresh:
    def test_rotates_the_stored_tokens_with_one_provider_call(
        self, run: Cli, fake: FakeProvider, store_url: str, keyring: KeyRing
    ) -> None:
        """The store gets the new tokens, from exactly one provider refresh."""
        credentials = fake.issue()
        import_credentials(run, "alice", credentials)

        result = run("refresh", "alice")

        assert 0 == result.exit_code, result.stderr
        access, refresh = stored_tokens(store_url, keyring, "alice")
        assert (1, "used", "current", "valid") == (
            fake.refresh_count,
            fake.refresh_token_state(credentials.refresh_token),
            fake.refresh_token_state(refresh),
            fake.access_token_state(access),
        )

    def test_prints_the_new_expiry_and_no_token(self, run: Cli, fake: FakeProvider) -> None:
        """The report gives the new expiry and shows no token."""
        import_credentials(run, "alice", fake.issue(expires_in=60))

        result = run("refresh", "alice")

        assert result.stdout.startswith("refreshed 'alice': the new access token expires in 7h")
        assert set() == leaked(fake, result)

    def test_unknown_key(self, run: Cli) -> None:
        """A key with no credential exits 6 and says how to store one."""
        result = run("refresh", "nobody")

        assert ExitCode.NOT_FOUND == result.exit_code
        assert (
            "no credential is stored under key 'nobody'; "
            "store one with `credkeeper import --key nobody`"
        ) == error_line(result)

    def test_refused_refresh_token_requires_reauth(self, run: Cli, fake: FakeProvider) -> None:
        """A revoked login exits 3, one line naming the key, no token."""
        credentials = fake.issue()
        import_credentials(run, "alice", credentials)
        fake.revoke(credentials)

        result = run("refresh", "alice")

        assert ExitCode.REAUTH_REQUIRED == result.exit_code
        assert error_line(result).startswith(
            "the provider refused the credential under key 'alice'"
        )
        assert set() == leaked(fake, result)

    def test_provider_error(self, run: Cli, fake: FakeProvider) -> None:
        """A token endpoint that rejects the request exits 5."""
        import_credentials(run, "alice", fake.issue(expires_in=-60))
        fake.fail_next(Fault.status(400, body=json.dumps({"error": "invalid_request"})))

        result = run("refresh", "alice")

        assert ExitCode.PROVIDER == result.exit_code
        assert "(HTTP 400 invalid_request)" in error_line(result)

    def test_wrong_key_ring(self, run: Cli, fake: FakeProvider, tmp_path: Path) -> None:
        """A key ring that cannot open the stored tokens exits 7."""
        import_credentials(run, "alice", fake.issue())
        other = write_keys(tmp_path / "other-keys", KeyRing.generate("k1"))

        result = Cli([*run.options, "--keys", f"@{other}"])("refresh", "alice")

        assert ExitCode.DECRYPTION == result.exit_code
        assert "could not be decrypted" in error_line(result)
