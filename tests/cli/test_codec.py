"""`--codec MODULE:FACTORY`: the application's own cipher seals what the command line writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from credkeeper import DecryptionError, KeyRing
from credkeeper.cli._errors import ExitCode
from credkeeper.testing import FakeProvider
from tests.examples import app_cipher

from .app_codecs import FACTORY_SECRET
from .conftest import Cli, error_line, import_credentials, stored

APP_CIPHER = "tests.examples:app_cipher"


@pytest.fixture
def with_codec(run: Cli) -> Cli:
    """The command line on the test's store and key file, sealing with the example cipher."""
    return Cli([*run.options, "--codec", APP_CIPHER])


def opened_with_app_cipher(store_url: str, key: str) -> tuple[str, str]:
    """The tokens stored under ``key``, opened with the application's cipher."""
    record = stored(store_url, key)
    codec = app_cipher()
    return (
        codec.unseal(record.access_token, key=key, field="access_token"),
        codec.unseal(record.refresh_token, key=key, field="refresh_token"),
    )


def refresh_with(codec: str, run: Cli) -> str:
    """The error line of ``credkeeper --codec CODEC refresh alice``, after checking exit 2."""
    result = Cli([*run.options, "--codec", codec])("refresh", "alice")
    assert ExitCode.USAGE == result.exit_code, result.stderr
    return error_line(result)


class TestCodecOption:
    def test_import_seals_with_the_application_cipher(
        self, with_codec: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """The stored tokens open with the application's cipher."""
        credentials = fake.issue()

        import_credentials(with_codec, "alice", credentials)

        assert (
            credentials.access_token.get_secret_value(),
            credentials.refresh_token.get_secret_value(),
        ) == opened_with_app_cipher(store_url, "alice")

    def test_the_key_ring_cannot_open_what_the_codec_sealed(
        self, with_codec: Cli, fake: FakeProvider, store_url: str, keyring: KeyRing
    ) -> None:
        """With --codec the key ring seals no token: its ciphertext is not in the store."""
        import_credentials(with_codec, "alice", fake.issue())

        with pytest.raises(DecryptionError):
            keyring.unseal(
                stored(store_url, "alice").refresh_token, key="alice", field="refresh_token"
            )

    def test_refresh_stores_the_new_tokens_through_the_codec(
        self, with_codec: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """One provider refresh; the store holds the new tokens as the application seals them."""
        credentials = fake.issue()
        import_credentials(with_codec, "alice", credentials)

        result = with_codec("refresh", "alice")

        assert 0 == result.exit_code, result.stderr
        access, refresh = opened_with_app_cipher(store_url, "alice")
        assert (1, "used", "current", "valid") == (
            fake.refresh_count,
            fake.refresh_token_state(credentials.refresh_token),
            fake.refresh_token_state(refresh),
            fake.access_token_state(access),
        )

    def test_the_environment_variable_stands_for_the_option(
        self, run: Cli, fake: FakeProvider, store_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """CREDKEEPER_CODEC stands for --codec."""
        monkeypatch.setenv("CREDKEEPER_CODEC", APP_CIPHER)
        credentials = fake.issue()

        import_credentials(run, "alice", credentials)

        _, refresh = opened_with_app_cipher(store_url, "alice")
        assert credentials.refresh_token.get_secret_value() == refresh

    def test_no_key_ring_is_needed(
        self, fake: FakeProvider, store_url: str, tmp_path: Path
    ) -> None:
        """The codec seals the tokens; without --keys the journal keeps its own key."""
        run = Cli(["--store", store_url, "--codec", APP_CIPHER, "--provider", fake.token_url])
        credentials = fake.issue()

        import_credentials(run, "alice", credentials)

        _, refresh = opened_with_app_cipher(store_url, "alice")
        assert credentials.refresh_token.get_secret_value() == refresh

    def test_rekey_takes_a_key_ring_given_as_the_codec(
        self,
        run: Cli,
        fake: FakeProvider,
        keyring: KeyRing,
        store_url: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A codec that is a KeyRing is the ring rekey re-seals under."""
        import_credentials(run, "alice", fake.issue())
        monkeypatch.setenv("APP_KEYS", keyring.rotated("k2").export())

        result = Cli([*run.options, "--codec", "tests.cli.app_codecs:key_ring"])("rekey")

        assert "re-sealed 1 record(s) under key k2; 0 already under it\n" == result.stdout
        assert stored(store_url, "alice").refresh_token.startswith("ck1:k2:")


class TestCodecErrors:
    def test_a_value_without_a_factory(self, run: Cli) -> None:
        """A value that is not MODULE:FACTORY says what the form is."""
        assert (
            "--codec (CREDKEEPER_CODEC) 'tests.examples' must be MODULE:FACTORY, such as "
            "myapp.tokens:make_codec: FACTORY() must return the application's "
            "credkeeper.TokenCodec"
        ) == refresh_with("tests.examples", run)

    def test_a_module_that_is_not_importable(self, run: Cli) -> None:
        """A module that cannot be imported names the module and how to make it importable."""
        assert (
            "--codec (CREDKEEPER_CODEC) 'no_such_codec_module:make': cannot import "
            "'no_such_codec_module' (no module named 'no_such_codec_module'); install what is "
            "missing in credkeeper's environment, or add the directory holding it to PYTHONPATH"
        ) == refresh_with("no_such_codec_module:make", run)

    def test_a_module_that_fails_while_imported(self, run: Cli) -> None:
        """A module raising on import is named, with the error's type and not its text."""
        line = refresh_with("tests.cli.app_codec_broken:make", run)

        assert (
            "--codec (CREDKEEPER_CODEC) 'tests.cli.app_codec_broken:make': importing "
            "'tests.cli.app_codec_broken' raised RuntimeError; fix the module (rerun with "
            "--debug for the traceback)"
        ) == line
        assert FACTORY_SECRET not in line

    def test_a_missing_factory(self, run: Cli) -> None:
        """A factory the module does not have is named."""
        assert (
            "--codec (CREDKEEPER_CODEC) 'tests.examples:make_codec': 'tests.examples' has no "
            "attribute 'make_codec'; name a function or class of that module that builds the "
            "codec with no arguments"
        ) == refresh_with("tests.examples:make_codec", run)

    def test_a_factory_that_is_not_callable(self, run: Cli) -> None:
        """An attribute that cannot be called is refused, with its type and not its value."""
        line = refresh_with("tests.examples:SECRET_KEY", run)

        assert (
            "--codec (CREDKEEPER_CODEC) 'tests.examples:SECRET_KEY': SECRET_KEY is a str, not "
            "something to call; name a function or class that builds the codec with no arguments"
        ) == line

    def test_a_factory_that_raises_is_named_by_the_error_type_only(self, run: Cli) -> None:
        """The factory's own message may hold its secret: only its type is shown."""
        line = refresh_with("tests.cli.app_codecs:failing", run)

        assert (
            "--codec (CREDKEEPER_CODEC) 'tests.cli.app_codecs:failing': failing() raised "
            "RuntimeError; it must build the codec with no arguments, reading its secret from "
            "the environment, say (rerun with --debug for the traceback)"
        ) == line
        assert FACTORY_SECRET not in line

    def test_a_factory_raising_credkeepers_error_shows_its_message(self, run: Cli) -> None:
        """credkeeper's own errors hold no secret, so their fix is shown."""
        line = refresh_with("tests.cli.app_codecs:key_ring", run)

        assert (
            "raised ConfigurationError: environment variable APP_KEYS is not set or empty"
        ) in line

    def test_a_result_that_is_not_a_codec(self, run: Cli) -> None:
        """A factory returning something without seal and unseal is refused."""
        assert (
            "--codec (CREDKEEPER_CODEC) 'tests.cli.app_codecs:seal_only': seal_only() returned "
            "a SealOnly, not a codec; it must return an object with seal(value, *, key, field) "
            "and unseal(value, *, key, field) methods (credkeeper.TokenCodec)"
        ) == refresh_with("tests.cli.app_codecs:seal_only", run)

    def test_a_codec_that_fails_the_check(
        self, run: Cli, with_codec: Cli, fake: FakeProvider
    ) -> None:
        """A codec that cannot open what it seals is refused before any provider call."""
        import_credentials(with_codec, "alice", fake.issue(expires_in=0))

        line = refresh_with("tests.cli.app_codecs:wrong_secret", run)

        assert (
            0,
            "the codec WrongSecret failed its check: unseal() of what seal() gave for the "
            "access_token raised ValueError; fix the codec (its secret, its key service) before "
            "giving it to a manager",
        ) == (fake.refresh_count, line)

    def test_a_plaintext_store(self, run: Cli, tmp_path: Path) -> None:
        """--codec on a store declared plaintext is a contradiction, named with both fixes."""
        url = f"sqlite:///{tmp_path / 'app.db'}?plaintext=true"

        result = Cli([*run.options, "--store", url, "--codec", APP_CIPHER])("refresh", "alice")

        assert ExitCode.USAGE == result.exit_code
        assert (
            f"--codec (CREDKEEPER_CODEC) {APP_CIPHER!r} is given, but the store "
            f"{url} is declared plaintext (its plaintext option) and "
            "keeps tokens as they are; drop --codec, or drop the store's plaintext option to "
            "seal with the codec"
        ) == error_line(result)

    def test_rekey_with_the_application_cipher_is_refused(
        self, with_codec: Cli, fake: FakeProvider, store_url: str
    ) -> None:
        """rekey re-seals under a key ring; the application's cipher is its own to rotate."""
        import_credentials(with_codec, "alice", fake.issue())
        before = stored(store_url, "alice")

        result = with_codec("rekey")

        assert (ExitCode.USAGE, before) == (result.exit_code, stored(store_url, "alice"))
        assert error_line(result).startswith(
            "rekey re-seals tokens under the primary key of a credkeeper key ring, but --codec "
            f"(CREDKEEPER_CODEC) {APP_CIPHER!r} gives the application's own cipher (AppCipher)"
        )
