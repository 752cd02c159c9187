"""RescueJournal: its key file, the directories it trusts, the files it reads, its health report."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from credkeeper import ConfigurationError, Credentials, KeyRing
from credkeeper._journal import RescueEntry, RescueJournal

ACCESS = "sk-ant-oat01-journal-access-token"
REFRESH = "sk-ant-ort01-journal-refresh-token"

# A child process that creates the journal's key file with a slow disk: its first os.write
# says "writing", then waits for a line on stdin before it goes to disk. A disk that stalls
# mid-write on demand is the fault no real system produces, hence the patched os.write.
SLOW_KEY_WRITER = """
import os, sys
from datetime import UTC, datetime
from credkeeper import Credentials
from credkeeper._journal import RescueEntry, RescueJournal

real_write = os.write
stalled = False

def slow_write(fd, data):
    global stalled
    if not stalled:
        stalled = True
        print("writing", flush=True)
        sys.stdin.readline()
    return real_write(fd, data)

os.write = slow_write
credentials = Credentials(
    access_token="a-slow", refresh_token="r-slow", expires_at=datetime(2030, 1, 1, tzinfo=UTC)
)
RescueJournal(sys.argv[1]).write(
    RescueEntry(
        id=RescueJournal.new_id(), key="slow", credentials=credentials, replaces="0" * 40,
        created_at=datetime.now(UTC),
    )
)
print("done", flush=True)
"""

# Scans a journal in a child process, so that a read which blocks fails the test by timing out
# instead of hanging the test run.
SCANNER = """
import sys
from credkeeper._journal import RescueJournal
print(len(RescueJournal(sys.argv[1]).pending("alice")))
"""

# Writes an entry in a child process, likewise bounded by a timeout.
WRITER = """
import sys
from datetime import UTC, datetime
from credkeeper import ConfigurationError, Credentials
from credkeeper._journal import RescueEntry, RescueJournal
credentials = Credentials(
    access_token="a", refresh_token="r", expires_at=datetime(2030, 1, 1, tzinfo=UTC)
)
try:
    RescueJournal(sys.argv[1]).write(
        RescueEntry(
            id=RescueJournal.new_id(), key="alice", credentials=credentials,
            replaces="0" * 40, created_at=datetime.now(UTC),
        )
    )
except ConfigurationError as exc:
    print("refused:", exc)
else:
    print("written")
"""


def make_entry(key: str = "alice") -> RescueEntry:
    """An entry with recognisable tokens, as the engine would journal them."""
    credentials = Credentials(
        access_token=ACCESS,
        refresh_token=REFRESH,
        expires_at=datetime.now(UTC) + timedelta(hours=8),
    )
    return RescueEntry(
        id=RescueJournal.new_id(),
        key=key,
        credentials=credentials,
        replaces="0" * 40,
        created_at=datetime.now(UTC),
    )


def private_directory(path: Path) -> Path:
    """``path`` made as a mode 0700 directory, as credkeeper makes its own."""
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


def run_child(script: str, *args: object, timeout: float = 20) -> str:
    """Run ``script`` in a new interpreter: its stdout, or a failure past ``timeout``."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", script, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child process was still blocked after {timeout}s")
    return result.stdout


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages the journal logged at WARNING or above."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "credkeeper.journal" and record.levelno >= logging.WARNING
    ]


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    """A journal directory that does not exist yet, under a private parent."""
    return tmp_path / "journal"


class TestKeyFile:
    def test_is_created_private_on_first_write(self, directory: Path) -> None:
        """Without a key ring, the first write makes journal.key, mode 0600."""
        RescueJournal(directory).write(make_entry())
        expected = 0o600
        assert expected == stat.S_IMODE((directory / "journal.key").stat().st_mode)

    def test_an_empty_key_file_is_replaced_with_a_fresh_key(self, directory: Path) -> None:
        """An empty journal.key, left by a crash before its key was written, gets a new key."""
        private_directory(directory)
        key_file = directory / "journal.key"
        key_file.write_bytes(b"")
        key_file.chmod(0o600)

        written = make_entry()
        RescueJournal(directory).write(written)

        expected = ([written.id], True)
        assert expected == (
            [entry.id for entry in RescueJournal(directory).pending("alice")],
            key_file.stat().st_size > 0,
        )

    def test_a_creator_never_exposes_a_partial_key_file(self, directory: Path) -> None:
        """A process creating the key file meets one stalled mid-write, and both agree on a key."""
        private_directory(directory)
        slow = subprocess.Popen(
            [sys.executable, "-c", SLOW_KEY_WRITER, str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert slow.stdin is not None
            assert slow.stdout is not None
            assert "writing\n" == slow.stdout.readline()
            RescueJournal(directory).write(make_entry())
            slow.stdin.write("go\n")
            slow.stdin.flush()
            assert "done\n" == slow.stdout.readline()
        finally:
            slow.kill()
            slow.communicate()

        journal = RescueJournal(directory)
        expected = (1, 1)
        assert expected == (len(journal.pending("alice")), len(journal.pending("slow")))

    def test_leaves_no_temporary_file(self, directory: Path) -> None:
        """Creating the key file leaves only the key file and the entry in the directory."""
        written = make_entry()
        RescueJournal(directory).write(written)
        expected = sorted(["journal.key", f"{written.id}.json"])
        assert expected == sorted(os.listdir(directory))

    def test_a_key_file_others_can_read_is_refused_with_the_fix(self, directory: Path) -> None:
        """A journal.key of mode 0640 raises ConfigurationError saying chmod 600."""
        RescueJournal(directory).write(make_entry())
        (directory / "journal.key").chmod(0o640)
        with pytest.raises(ConfigurationError, match="chmod 600"):
            RescueJournal(directory).write(make_entry())

    def test_a_garbage_key_file_is_refused(self, directory: Path) -> None:
        """A journal.key that holds no key ring raises ConfigurationError naming it."""
        private_directory(directory)
        key_file = directory / "journal.key"
        key_file.write_text("this is not a key\n")
        key_file.chmod(0o600)
        with pytest.raises(ConfigurationError, match=r"journal\.key"):
            RescueJournal(directory).write(make_entry())

    def test_a_symlinked_key_file_is_refused(self, tmp_path: Path, directory: Path) -> None:
        """A journal.key that is a symbolic link is not followed: ConfigurationError naming it."""
        elsewhere = tmp_path / "planted.key"
        elsewhere.write_text(KeyRing.generate("planted").export())
        elsewhere.chmod(0o600)
        private_directory(directory)
        (directory / "journal.key").symlink_to(elsewhere)
        with pytest.raises(ConfigurationError, match="symbolic link") as caught:
            RescueJournal(directory).write(make_entry())
        assert str(directory / "journal.key") in str(caught.value)

    def test_a_fifo_key_file_is_refused_without_hanging(self, directory: Path) -> None:
        """A FIFO named journal.key is refused at once rather than read forever."""
        private_directory(directory)
        os.mkfifo(directory / "journal.key", 0o600)
        output = run_child(WRITER, directory)
        assert output.startswith("refused:")
        assert "not a regular file" in output


class TestDirectories:
    def test_made_private_under_a_permissive_umask(self, tmp_path: Path) -> None:
        """Under umask 000 every directory the journal makes, parents included, is 0700."""
        old = os.umask(0)
        try:
            RescueJournal(tmp_path / "a" / "b" / "journal").write(make_entry())
        finally:
            os.umask(old)
        modes = [
            stat.S_IMODE((tmp_path / sub).stat().st_mode) for sub in ("a", "a/b", "a/b/journal")
        ]
        expected = [0o700, 0o700, 0o700]
        assert expected == modes

    @pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o1777])
    def test_a_directory_others_can_write_is_refused(self, directory: Path, mode: int) -> None:
        """A journal directory group or others can write raises ConfigurationError with the fix."""
        private_directory(directory)
        directory.chmod(mode)
        with pytest.raises(ConfigurationError, match="chmod go-w") as caught:
            RescueJournal(directory).write(make_entry())
        assert str(directory) in str(caught.value)

    def test_a_sticky_world_writable_parent_is_fine(self, tmp_path: Path) -> None:
        """A /tmp-like parent is allowed: only the journal's own directory must be private."""
        public = tmp_path / "public"
        public.mkdir()
        public.chmod(0o1777)
        written = make_entry()
        RescueJournal(public / "journal").write(written)
        expected = [written.id]
        assert expected == [
            entry.id for entry in RescueJournal(public / "journal").pending("alice")
        ]

    def test_entries_in_a_directory_others_can_write_are_not_offered(
        self, directory: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Entries in a directory that became writable by others are left alone, with a warning."""
        RescueJournal(directory).write(make_entry())
        directory.chmod(0o777)

        pending = RescueJournal(directory).pending("alice")

        assert [] == pending
        assert any(str(directory) in message for message in warnings_of(caplog))


class TestEntryFiles:
    def test_a_fifo_entry_does_not_hang_the_scan(self, directory: Path) -> None:
        """A FIFO named like an entry is skipped, and the real entries are still found."""
        RescueJournal(directory).write(make_entry())
        os.mkfifo(directory / "00000000000000000000-fifo.json", 0o600)
        expected = "1\n"
        assert expected == run_child(SCANNER, directory)

    def test_a_symlinked_entry_is_skipped_with_a_warning(
        self, tmp_path: Path, directory: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An entry that is a symbolic link is not followed; a warning names it."""
        written = make_entry()
        RescueJournal(directory).write(written)
        name = f"{written.id}.json"
        (directory / name).rename(tmp_path / name)
        (directory / name).symlink_to(tmp_path / name)

        pending = RescueJournal(directory).pending("alice")

        assert [] == pending
        assert any(name in message for message in warnings_of(caplog))

    def test_an_unreadable_entry_is_skipped_with_a_warning(
        self, directory: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An entry that is not JSON is skipped and named in a warning."""
        RescueJournal(directory).write(make_entry())
        (directory / "00000000000000000000-bad.json").write_bytes(b"{not json")

        pending = RescueJournal(directory).pending("alice")

        assert 1 == len(pending)
        assert any("00000000000000000000-bad.json" in m for m in warnings_of(caplog))

    def test_an_entry_under_a_dropped_key_is_warned_about(
        self, directory: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """An entry sealed under a key gone from the ring is named, with the key id, at WARNING."""
        written = make_entry()
        RescueJournal(directory, keyring=KeyRing.generate("old")).write(written)

        RescueJournal(directory, keyring=KeyRing.generate("new")).pending("alice")

        [message] = warnings_of(caplog)
        expected = (True, True, True, True)
        assert expected == (
            f"{written.id}.json" in message,
            "'old'" in message,
            "another deployment" in message,
            "CREDKEEPER_KEYS" in message,
        )

    def test_warnings_never_show_a_token(
        self, directory: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Nothing the journal logs while skipping entries contains a token."""
        RescueJournal(directory, keyring=KeyRing.generate("old")).write(make_entry())
        caplog.set_level(logging.DEBUG, logger="credkeeper.journal")

        RescueJournal(directory, keyring=KeyRing.generate("new")).pending("alice")

        assert [] == [m for m in caplog.messages if ACCESS in m or REFRESH in m]


class TestProblems:
    def test_a_healthy_journal_has_none(self, directory: Path) -> None:
        """A journal with a good key file and readable entries reports nothing."""
        journal = RescueJournal(directory)
        journal.write(make_entry())
        expected: list[str] = []
        assert expected == journal.problems()

    def test_a_missing_directory_is_no_problem_and_is_not_made(self, directory: Path) -> None:
        """A journal never written to reports nothing, and asking creates nothing."""
        expected: tuple[list[str], bool] = ([], False)
        assert expected == (RescueJournal(directory).problems(), directory.exists())

    def test_reports_an_unusable_key_file_with_the_fix(self, directory: Path) -> None:
        """A key file others can read is reported with its path and chmod 600."""
        RescueJournal(directory).write(make_entry())
        (directory / "journal.key").chmod(0o640)

        [problem] = RescueJournal(directory).problems()

        expected = (True, True)
        assert expected == (str(directory / "journal.key") in problem, "chmod 600" in problem)

    def test_reports_a_directory_others_can_write(self, directory: Path) -> None:
        """A journal directory writable by others is reported with the chmod fix."""
        private_directory(directory)
        directory.chmod(0o777)

        [problem] = RescueJournal(directory).problems()

        expected = (True, True)
        assert expected == (str(directory) in problem, "chmod go-w" in problem)

    @pytest.mark.skipif(os.geteuid() == 0, reason="root may write any directory")
    def test_reports_a_directory_it_cannot_write(self, directory: Path) -> None:
        """A journal directory this user cannot write is reported."""
        private_directory(directory)
        directory.chmod(0o500)
        try:
            [problem] = RescueJournal(directory).problems()
        finally:
            directory.chmod(0o700)
        expected = (True, True)
        assert expected == (str(directory) in problem, "writable by this user" in problem)

    def test_reports_a_directory_that_cannot_be_created(self, tmp_path: Path) -> None:
        """A journal directory under a regular file is reported as impossible to create."""
        (tmp_path / "plain").write_text("")
        directory = tmp_path / "plain" / "journal"

        [problem] = RescueJournal(directory).problems()

        expected = (True, True)
        assert expected == (str(directory) in problem, "cannot be created" in problem)

    def test_reports_an_unreadable_entry(self, directory: Path) -> None:
        """An entry that cannot be read is reported by name."""
        journal = RescueJournal(directory)
        journal.write(make_entry())
        (directory / "00000000000000000000-bad.json").write_bytes(b"{not json")

        [problem] = journal.problems()

        assert "00000000000000000000-bad.json" in problem

    def test_reports_an_entry_under_a_dropped_key(self, directory: Path) -> None:
        """An entry sealed under a key the ring lacks is reported with the key id and the fix."""
        written = make_entry()
        RescueJournal(directory, keyring=KeyRing.generate("old")).write(written)

        [problem] = RescueJournal(directory, keyring=KeyRing.generate("new")).problems()

        expected = (True, True, True)
        assert expected == (
            f"{written.id}.json" in problem,
            "'old'" in problem,
            "CREDKEEPER_KEYS" in problem,
        )

    def test_reports_without_raising_when_everything_is_wrong(self, directory: Path) -> None:
        """A FIFO entry, a symlinked entry and a bad key file are all reported, none raised."""
        RescueJournal(directory).write(make_entry())
        (directory / "journal.key").chmod(0o644)
        os.mkfifo(directory / "00000000000000000000-fifo.json", 0o600)
        (directory / "00000000000000000001-link.json").symlink_to("/etc/hostname")

        problems = RescueJournal(directory).problems()

        expected = 3
        assert expected == len(problems)
