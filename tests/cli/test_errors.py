"""Failures: one line on stderr, the documented exit code, a traceback only with --debug."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from credkeeper import KeyRing
from credkeeper.cli._errors import PREFIX, ExitCode
from credkeeper.testing import FakeProvider

from .conftest import Cli, error_line, import_credentials


class TestStoreErrors:
    def test_unknown_scheme(self, run: Cli) -> None:
        """A store URL whose scheme no store serves names the registered ones."""
        result = Cli(["--store", "bogus://somewhere"])("status")

        assert ExitCode.USAGE == result.exit_code
        assert error_line(result).startswith(
            "no credential store is registered for scheme 'bogus'; registered: "
        )

    def test_scheme_of_an_extra_that_is_not_installed(self) -> None:
        """A first-party scheme whose driver is missing exits 2 naming the pip command.

        pymongo is blocked from import in a fresh interpreter (``sys.modules[name] = None``),
        which is how a package that is not installed looks to the import system.
        """
        script = (
            "import sys\nsys.modules['pymongo'] = None\n"
            "from credkeeper.__main__ import main\n"
            "sys.exit(main(['--store', 'mongodb://db.example/app', 'status']))\n"
        )
        completed = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )

        assert (ExitCode.USAGE, True) == (
            completed.returncode,
            "pip install 'credkeeper[mongo]'" in completed.stderr,
        )

    def test_store_unavailable(self, tmp_path: Path) -> None:
        """A store that cannot be reached exits 4."""
        url = (tmp_path / "missing.json").as_uri() + "?create=false"

        result = Cli(["--store", url])("status")

        assert ExitCode.STORE == result.exit_code
        assert "does not exist" in error_line(result)

    def test_store_corrupted(self, tmp_path: Path) -> None:
        """A store file that is not credkeeper's exits 4 and is not overwritten."""
        path = tmp_path / "credentials.json"
        path.write_text("<html>not a store</html>")

        result = Cli(["--store", path.as_uri()])("status")

        assert (ExitCode.STORE, "<html>not a store</html>") == (
            result.exit_code,
            path.read_text(),
        )
        assert str(path) in error_line(result)


class TestKeyRingErrors:
    def test_missing_key_ring_says_how_to_make_one(self, store_url: str) -> None:
        """A command that touches tokens without a key ring says to run keygen and set the env."""
        result = Cli(["--store", store_url])("import", "--key", "alice", "--stdin", input="{}")

        keys = Path(os.environ["XDG_CONFIG_HOME"]) / "credkeeper" / "keys"
        assert ExitCode.USAGE == result.exit_code
        assert (
            f"no key ring: run `credkeeper keygen --output {keys}`, "
            f"then set CREDKEEPER_KEYS=@{keys} (or pass --keys)"
        ) == error_line(result)

    def test_bad_key_text_is_not_echoed(self, store_url: str) -> None:
        """Malformed key text is refused without repeating it."""
        result = Cli(["--store", store_url, "--keys", "k1:c2VjcmV0LWJ1dC1zaG9ydA"])("rekey")

        assert ExitCode.USAGE == result.exit_code
        assert "c2VjcmV0LWJ1dC1zaG9ydA" not in result.stderr
        assert "is 16 bytes long" in error_line(result)

    def test_key_file_others_can_read(self, store_url: str, tmp_path: Path) -> None:
        """A key file with group or other access is refused with the chmod to run."""
        path = tmp_path / "keys"
        path.write_text(KeyRing.generate().export())
        os.chmod(path, 0o640)

        result = Cli(["--store", store_url, "--keys", f"@{path}"])("rekey")

        assert ExitCode.USAGE == result.exit_code
        assert error_line(result).endswith(f"run `chmod 600 {path}`")


class TestDebug:
    def test_no_traceback_without_debug(self, run: Cli) -> None:
        """A failure shows one line and no traceback."""
        result = run("refresh", "nobody")

        assert "Traceback" not in result.stderr
        assert 1 == len(result.stderr.splitlines())

    def test_debug_shows_the_traceback_then_the_line(self, run: Cli) -> None:
        """With --debug the traceback comes first and the error line is still last."""
        result = Cli([*run.options, "--debug"])("refresh", "nobody")

        lines = result.stderr.splitlines()
        assert ExitCode.NOT_FOUND == result.exit_code
        assert "Traceback (most recent call last):" in lines
        assert lines[-1].startswith(PREFIX + "no credential is stored under key 'nobody'")

    def test_engine_warnings_stay_off_stderr_without_debug(
        self, run: Cli, fake: FakeProvider
    ) -> None:
        """The engine's log warning about a refused token does not add a second line."""
        credentials = fake.issue()
        import_credentials(run, "alice", credentials)
        fake.revoke(credentials)

        result = run("refresh", "alice")

        assert ExitCode.REAUTH_REQUIRED == result.exit_code
        assert 1 == len(result.stderr.splitlines())

    def test_debug_shows_the_engine_logs(self, run: Cli, fake: FakeProvider) -> None:
        """With --debug the engine's logs reach stderr."""
        import_credentials(run, "alice", fake.issue())

        result = Cli([*run.options, "--debug"])("refresh", "alice")

        assert 0 == result.exit_code
        assert " credkeeper DEBUG opening file store " in result.stderr
