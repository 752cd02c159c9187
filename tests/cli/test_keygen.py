"""`credkeeper keygen`: new keys on stdout, in a 0600 file, or prepended for a rotation."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from click.testing import CliRunner

from credkeeper import KeyRing
from credkeeper.cli import cli
from credkeeper.cli._errors import ExitCode

from .conftest import error_line, write_keys


def keygen(*args: str) -> tuple[int, str, str]:
    """Run ``credkeeper keygen ARGS``: exit code, stdout, stderr."""
    result = CliRunner().invoke(cli, ["keygen", *args])
    return result.exit_code, result.stdout, result.stderr


def mode(path: Path) -> int:
    """The permission bits of ``path``."""
    return stat.S_IMODE(os.stat(path).st_mode)


class TestKeygen:
    def test_prints_a_ring_that_parses(self) -> None:
        """The output is one new 256-bit key, in the form KeyRing.parse reads."""
        code, stdout, stderr = keygen()

        ring = KeyRing.parse(stdout)
        assert (0, "", 1) == (code, stderr, len(ring.key_ids))
        assert stdout == ring.export() + "\n"

    def test_key_id(self) -> None:
        """--key-id names the new key."""
        _, stdout, _ = keygen("--key-id", "k2026")

        assert ("k2026",) == KeyRing.parse(stdout).key_ids

    def test_each_run_makes_a_new_key(self) -> None:
        """Two runs never print the same key."""
        assert keygen()[1] != keygen()[1]

    def test_output_writes_a_0600_file_and_prints_no_key(self, tmp_path: Path) -> None:
        """--output writes the ring with mode 0600 and keeps the key off stdout."""
        path = tmp_path / "config" / "keys"

        code, stdout, _ = keygen("--output", str(path))

        ring = KeyRing.from_file(path)
        assert (0, 0o600) == (code, mode(path))
        assert ring.export() not in stdout
        assert f"CREDKEEPER_KEYS=@{path}" in stdout

    def test_output_refuses_to_overwrite(self, tmp_path: Path) -> None:
        """An existing --output file is left alone without --force."""
        path = write_keys(tmp_path / "keys", KeyRing.generate("old"))
        before = path.read_text()

        result = CliRunner().invoke(cli, ["keygen", "--output", str(path)])

        assert (ExitCode.USAGE, before) == (result.exit_code, path.read_text())
        assert "already exists; pass --force to replace it" in error_line(result)

    def test_force_replaces(self, tmp_path: Path) -> None:
        """--force replaces an existing --output file, still with mode 0600."""
        path = write_keys(tmp_path / "keys", KeyRing.generate("old"))
        os.chmod(path, 0o644)

        code, _, _ = keygen("--output", str(path), "--force", "--key-id", "new")

        assert (0, ("new",), 0o600) == (code, KeyRing.from_file(path).key_ids, mode(path))

    def test_add_to_prepends_a_new_primary_key(self, tmp_path: Path) -> None:
        """--add-to puts a new primary first and keeps the file's keys and comments."""
        old = KeyRing.generate("old")
        path = tmp_path / "keys"
        path.write_text(f"# production\n{old.export()}\n")
        os.chmod(path, 0o600)

        code, stdout, _ = keygen("--add-to", str(path), "--key-id", "new")

        ring = KeyRing.from_file(path)
        assert (0, ("new", "old"), 0o600) == (code, ring.key_ids, mode(path))
        assert path.read_text().endswith(f"\n# production\n{old.export()}\n")
        assert "then run `credkeeper rekey`" in stdout

    def test_add_to_refuses_a_readable_key_file(self, tmp_path: Path) -> None:
        """--add-to refuses a key file others can read, as every reader of it would."""
        path = write_keys(tmp_path / "keys", KeyRing.generate("old"))
        os.chmod(path, 0o644)

        result = CliRunner().invoke(cli, ["keygen", "--add-to", str(path)])

        assert ExitCode.USAGE == result.exit_code
        assert "run `chmod 600" in error_line(result)

    def test_add_to_and_output_are_exclusive(self, tmp_path: Path) -> None:
        """--add-to rewrites its own file, so --output with it is a usage error."""
        result = CliRunner().invoke(
            cli, ["keygen", "--add-to", str(tmp_path / "a"), "--output", str(tmp_path / "b")]
        )

        assert ExitCode.USAGE == result.exit_code
        assert error_line(result).startswith("--add-to rewrites its file in place")
