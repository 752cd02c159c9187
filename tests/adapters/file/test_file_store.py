"""FileStore: one SQLite file, written atomically, shared by threads and processes on one host."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import credkeeper
from credkeeper import (
    ConfigurationError,
    ConflictError,
    Credentials,
    KeyRing,
    Provider,
    Record,
    Status,
    StoreCorrupted,
    StoreUnavailable,
    TokenManager,
)

# not yet public: sets a call's time budget the way the engine does; no public name sets one.
from credkeeper._budget import budget
from credkeeper_file import FileStore

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

# A child process that takes the store's write lock the way FileStore does, and keeps it
# until its stdin closes or it is killed.
LOCK_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""

# A child process whose threads each add `rounds` to the "counter" record's failures by CAS.
INCREMENTER = """
import sys, threading
from credkeeper import ConflictError
from credkeeper_file import FileStore

path, threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = FileStore(path, lock_timeout=120)

def work():
    for _ in range(rounds):
        while True:
            record = store.get("counter")
            try:
                store.put(record.replace(failures=record.failures + 1))
            except ConflictError:
                continue
            break

workers = [threading.Thread(target=work) for _ in range(threads)]
for worker in workers:
    worker.start()
for worker in workers:
    worker.join()
"""

# A child process that rewrites the "counter" record as fast as it can, every field derived
# from one number, so a torn write would show as fields that disagree.
CRASH_WRITER = """
import sys
from credkeeper_file import FileStore

store = FileStore(sys.argv[1])
announced = False
while True:
    record = store.get("counter")
    n = record.failures + 1
    store.put(record.replace(failures=n, access_token=f"access-{n}", refresh_token=f"refresh-{n}"))
    if not announced:
        print("writing", flush=True)
        announced = True
"""


def make_record(key: str = "alice", **changes: Any) -> Record:
    """A record as the engine would store it: token fields already sealed."""
    record = Record(
        key=key,
        access_token=f"sealed-access-{key}",
        refresh_token=f"sealed-refresh-{key}",
        expires_at=NOW + timedelta(hours=8),
        scopes=("user:inference", "user:profile"),
        subscription_type="max",
    )
    return record.replace(**changes)


def increment(store: FileStore, key: str = "counter") -> None:
    """Add one to the record's ``failures`` by compare-and-swap, retrying on conflict."""
    while True:
        record = store.get(key)
        assert record is not None
        try:
            store.put(record.replace(failures=record.failures + 1))
        except ConflictError:
            continue
        return


def temp_files(directory: Path) -> list[str]:
    """Names in ``directory`` that look like a writer's temp file."""
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


def run_python(script: str, *args: object) -> subprocess.Popen[str]:
    """Start ``script`` in a fresh interpreter of this venv."""
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@contextmanager
def lock_held_elsewhere(path: Path) -> Iterator[subprocess.Popen[str]]:
    """Hold ``path``'s write lock in another process for the duration of the block."""
    holder = run_python(LOCK_HOLDER, f"{path}.lock")
    try:
        assert holder.stdout is not None
        expected = "locked\n"
        assert expected == holder.stdout.readline()
        yield holder
    finally:
        holder.kill()
        holder.communicate()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Where the store under test keeps its file."""
    return tmp_path / "creds.json"


@pytest.fixture
def store(path: Path) -> Iterator[FileStore]:
    """A store on a file that does not exist yet."""
    with FileStore(path) as opened:
        yield opened


DAMAGED_FILES = {
    "not-json": b"{this is not json",
    "zero-bytes": b"",
    "foreign-json": b'{"users": {"alice": "hunter2"}}',
    "json-list": b"[1, 2, 3]",
    "future-format-version": b'{"format": "credkeeper.file", "format_version": 2, "records": {}}',
    "records-not-object": b'{"format": "credkeeper.file", "format_version": 1, "records": []}',
    "not-utf8": b"\xff\xfe\xfa garbage",
}


@pytest.fixture(params=sorted(DAMAGED_FILES))
def damaged(request: pytest.FixtureRequest, path: Path) -> bytes:
    """A file at ``path`` that is not a usable credkeeper file; returns its bytes."""
    content = DAMAGED_FILES[request.param]
    path.write_bytes(content)
    return content


def write_document(path: Path, records: dict[str, Any], **top: Any) -> bytes:
    """Write a file-store document by hand; returns its bytes."""
    data = {"format": "credkeeper.file", "format_version": 1, "records": records, **top}
    content = json.dumps(data).encode()
    path.write_bytes(content)
    return content


def stored_records(path: Path) -> dict[str, Any]:
    """Every record document the data file holds, by key, read with SQLite directly."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {
            key: json.loads(text) for key, text in db.execute("SELECT key, document FROM records")
        }


def stored_meta(path: Path) -> tuple[Any, ...]:
    """The data file's one meta row: format, format_version, last_version."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return tuple(db.execute("SELECT format, format_version, last_version FROM meta").fetchone())


def stored_bytes(path: Path) -> bytes:
    """The bytes of the data file and of the files SQLite keeps beside it."""
    return b"".join(p.read_bytes() for p in sorted(path.parent.glob(f"{path.name}*")))


def stored_document(key: str = "alice", version: int = 1, **changes: Any) -> dict[str, Any]:
    """What the file holds for a record, with ``changes`` applied to the document."""
    return {**make_record(key).to_document(), "version": version, **changes}


class TestFileStoreInit:
    def test_repr_shows_the_path_only(self, path: Path) -> None:
        """repr names the file and nothing else."""
        assert f"FileStore({str(path)!r})" == repr(FileStore(path))

    def test_path_is_resolved_to_an_absolute_path(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A relative path is fixed against the working directory at construction."""
        monkeypatch.chdir(tmp_path)
        assert tmp_path / "creds.json" == FileStore("creds.json").path

    def test_stores_through_a_symlinked_directory_share_the_real_file(self, tmp_path: Path) -> None:
        """A store reached through a symlinked directory writes the real file, keeping the link."""
        real = tmp_path / "real"
        link = tmp_path / "link"
        FileStore(real / "creds.json").put(make_record())
        link.symlink_to(real)
        FileStore(link / "creds.json").put(make_record("bob"))
        expected = (True, ["alice", "bob"])
        assert expected == (
            link.is_symlink(),
            sorted(stored_records(real / "creds.json")),
        )

    @pytest.mark.parametrize("bad", [b"/srv/creds.json", "", "/srv/dir/", "/srv/a\x00b", 42])
    def test_rejects_a_path_that_names_no_file(self, bad: Any) -> None:
        """bytes, empty, directory-like and non-path values raise ConfigurationError."""
        with pytest.raises(ConfigurationError, match="path"):
            FileStore(bad)

    @pytest.mark.parametrize("bad", [-1, 0, float("nan"), float("inf"), True, "soon"])
    def test_rejects_a_bad_lock_timeout(self, path: Path, bad: Any) -> None:
        """lock_timeout must be a positive, finite number of seconds."""
        message = "file store option lock_timeout must be a positive number of seconds"
        with pytest.raises(ConfigurationError, match=message):
            FileStore(path, lock_timeout=bad)

    def test_rejects_a_create_that_is_neither_true_nor_false(self, path: Path) -> None:
        """create must read as true or false; other text is refused, never taken as truthy."""
        with pytest.raises(ConfigurationError, match="option create must be true or false"):
            FileStore(path, create="maybe")  # type: ignore[arg-type]

    def test_constructing_touches_nothing(self, tmp_path: Path) -> None:
        """Opening a store creates neither its directory nor its file."""
        FileStore(tmp_path / "sub" / "creds.json")
        expected: list[str] = []
        assert expected == os.listdir(tmp_path)


class TestFromUrl:
    def test_opens_an_absolute_file_url(self, path: Path) -> None:
        """file:///absolute/path names that file."""
        assert path == FileStore.from_url(f"file://{path}").path

    def test_accepts_localhost(self, path: Path) -> None:
        """file://localhost/absolute/path names the same file."""
        assert path == FileStore.from_url(f"file://localhost{path}").path

    def test_decodes_percent_escapes(self, tmp_path: Path) -> None:
        """A percent-escaped space in the URL is a space in the path."""
        assert (
            tmp_path / "my creds.json"
            == FileStore.from_url(f"file://{tmp_path}/my%20creds.json").path
        )

    @pytest.mark.parametrize(
        "url",
        [
            "file://relative/creds.json",
            "file://example.com/var/lib/creds.json",
            "file:/var/lib/creds.json",
            "file:relative.json",
            "file://",
            "file:///var/lib/",
            "file:///var/lib/creds.json#frag",
            "memory:///var/lib/creds.json",
        ],
    )
    def test_rejects_other_forms_naming_the_expected_one(self, url: str) -> None:
        """Relative paths, other hosts and other schemes raise ConfigurationError with the form."""
        with pytest.raises(ConfigurationError, match="file:///"):
            FileStore.from_url(url)

    def test_takes_options_from_the_query(self, path: Path) -> None:
        """?create=false&lock_timeout=2.5 configures the store."""
        store = FileStore.from_url(f"file://{path}?create=false&lock_timeout=2.5")
        with pytest.raises(StoreUnavailable, match="create=False"):
            store.get("alice")

    def test_takes_keyword_options(self, path: Path) -> None:
        """Keyword options reach the constructor."""
        store = FileStore.from_url(f"file://{path}", create=False)
        with pytest.raises(StoreUnavailable, match="create=False"):
            store.get("alice")

    def test_rejects_unknown_query_options_by_name(self, path: Path) -> None:
        """An unknown query option raises ConfigurationError naming it."""
        with pytest.raises(ConfigurationError, match="mode"):
            FileStore.from_url(f"file://{path}?mode=0644")

    def test_rejects_unknown_keyword_options_by_name(self, path: Path) -> None:
        """Unknown keyword options raise ConfigurationError naming each."""
        with pytest.raises(ConfigurationError, match="encrypt, pool_size"):
            FileStore.from_url(f"file://{path}", pool_size=3, encrypt=True)

    @pytest.mark.parametrize("query", ["create=maybe", "lock_timeout=soon", "create=1&create=0"])
    def test_rejects_bad_query_values(self, path: Path, query: str) -> None:
        """A query value that does not parse raises ConfigurationError naming the option."""
        with pytest.raises(ConfigurationError, match=r"create|lock_timeout"):
            FileStore.from_url(f"file://{path}?{query}")

    def test_rejects_an_option_given_twice(self, path: Path) -> None:
        """An option in both the query and the keywords is ambiguous."""
        with pytest.raises(ConfigurationError, match="both"):
            FileStore.from_url(f"file://{path}?create=false", create=True)

    def test_open_store_finds_the_file_store_through_its_entry_point(self, path: Path) -> None:
        """credkeeper.open_store("file:///...") returns a working FileStore."""
        store = credkeeper.open_store(f"file://{path}")
        assert isinstance(store, FileStore)
        stored = store.put(make_record())
        assert stored == FileStore(path).get("alice")


class TestReadAndWrite:
    def test_get_of_a_missing_file_is_none(self, store: FileStore, path: Path) -> None:
        """With create=True a missing file reads as an empty store and is not created."""
        expected = (None, False)
        assert expected == (store.get("alice"), path.exists())

    def test_create_sets_the_first_version(self, store: FileStore) -> None:
        """A new record comes back with version "1"."""
        expected = "1"
        assert expected == store.put(make_record()).version

    def test_get_returns_what_put_returned(self, store: FileStore) -> None:
        """Every field survives the round trip through the file."""
        stored = store.put(
            make_record(
                status=Status.NEEDS_REAUTH,
                lease_owner="worker-1",
                lease_until=NOW + timedelta(seconds=30),
                failures=2,
                cooldown_until=NOW + timedelta(minutes=1),
                last_error="HTTP 503",
            )
        )
        assert stored == store.get("alice")

    def test_put_returns_the_record_as_it_reads_back(self, store: FileStore) -> None:
        """Times come back at the file's millisecond precision, equal to a later get."""
        stored = store.put(make_record(expires_at=NOW + timedelta(microseconds=1234)))
        assert (NOW + timedelta(milliseconds=1), stored) == (stored.expires_at, store.get("alice"))

    def test_update_moves_the_version(self, store: FileStore) -> None:
        """A put with the current version succeeds and returns a higher version."""
        first = store.put(make_record())
        second = store.put(first.replace(failures=1))
        expected = ("2", 1)
        assert expected == (second.version, store.get("alice").failures)  # type: ignore[union-attr]

    def test_create_over_an_existing_key_conflicts(self, store: FileStore) -> None:
        """A put with no version fails when the key exists."""
        store.put(make_record())
        with pytest.raises(ConflictError, match="'alice'") as caught:
            store.put(make_record())
        expected = "alice"
        assert expected == caught.value.key

    def test_stale_version_conflicts(self, store: FileStore) -> None:
        """A put with a version that moved raises ConflictError naming the key."""
        first = store.put(make_record())
        store.put(first.replace(failures=1))
        with pytest.raises(ConflictError, match="'alice'"):
            store.put(first.replace(failures=2))

    def test_update_of_a_deleted_record_conflicts(self, store: FileStore) -> None:
        """A put with a version fails when the record is gone."""
        first = store.put(make_record())
        store.delete("alice")
        with pytest.raises(ConflictError, match="deleted"):
            store.put(first.replace(failures=1))

    def test_versions_are_not_reused_after_delete(self, store: FileStore) -> None:
        """A key deleted and created again gets a version no old reader holds."""
        first = store.put(make_record())
        second = store.put(first.replace(failures=1))
        store.delete("alice")
        again = store.put(make_record())
        store.put(again.replace(failures=5))
        with pytest.raises(ConflictError):
            store.put(second.replace(failures=9))

    def test_delete_reports_whether_a_record_was_there(self, store: FileStore) -> None:
        """delete returns True once, then False."""
        store.put(make_record())
        expected = (True, False, None)
        assert expected == (
            store.delete("alice"),
            store.delete("alice"),
            store.get("alice"),
        )

    def test_delete_of_an_absent_key_creates_nothing(self, tmp_path: Path) -> None:
        """Deleting from a store that was never written leaves the disk as it was."""
        FileStore(tmp_path / "sub" / "creds.json").delete("alice")
        expected: list[str] = []
        assert expected == os.listdir(tmp_path)

    def test_scan_due_lists_keys_expiring_at_or_before(self, store: FileStore) -> None:
        """scan_due yields exactly the keys whose expires_at is not after ``before``."""
        store.put(make_record("early", expires_at=NOW))
        store.put(make_record("exact", expires_at=NOW + timedelta(hours=1)))
        store.put(make_record("late", expires_at=NOW + timedelta(hours=2)))
        expected = ["early", "exact"]
        assert expected == sorted(store.scan_due(NOW + timedelta(hours=1)))

    def test_scan_due_rejects_a_naive_datetime(self, store: FileStore) -> None:
        """A naive ``before`` raises ConfigurationError."""
        with pytest.raises(ConfigurationError, match="aware"):
            store.scan_due(datetime(2026, 1, 1))

    def test_file_holds_the_documented_format(self, store: FileStore, path: Path) -> None:
        """The file is a SQLite database: the format marker, and each record's document."""
        store.put(make_record())
        expected = (
            b"SQLite format 3\x00",
            ("credkeeper.file", 2, 1),
            {"alice": {**make_record().to_document(), "version": 1}},
        )
        assert expected == (path.read_bytes()[:16], stored_meta(path), stored_records(path))

    def test_reads_a_file_without_a_version_counter(self, path: Path) -> None:
        """A file holding only format, format_version and records continues its versions."""
        write_document(path, {"alice": stored_document(version=7)})
        store = FileStore(path)
        expected = "8"
        assert expected == store.put(store.get("alice").replace(failures=1)).version  # type: ignore[union-attr]

    def test_two_stores_on_one_path_see_each_others_writes(self, path: Path) -> None:
        """A write through one instance is read, and compared, by another."""
        first, second = FileStore(path), FileStore(path)
        stored = first.put(make_record())
        second.put(second.get("alice").replace(failures=1))  # type: ignore[union-attr]
        with pytest.raises(ConflictError):
            first.put(stored.replace(failures=2))

    def test_reads_do_not_wait_for_the_write_lock(self, store: FileStore, path: Path) -> None:
        """get works while another process holds the write lock."""
        stored = store.put(make_record())
        with lock_held_elsewhere(path):
            assert stored == store.get("alice")


class TestFileModes:
    def test_data_file_is_private(self, store: FileStore, path: Path) -> None:
        """The data file is mode 0600."""
        store.put(make_record())
        expected = 0o600
        assert expected == stat.S_IMODE(path.stat().st_mode)

    def test_lock_file_is_private(self, store: FileStore, path: Path) -> None:
        """The lock file is mode 0600."""
        store.put(make_record())
        expected = 0o600
        assert expected == stat.S_IMODE(Path(f"{path}.lock").stat().st_mode)

    def test_existing_file_becomes_private_on_write(self, path: Path) -> None:
        """A world-readable file is replaced by a 0600 one."""
        write_document(path, {})
        path.chmod(0o644)
        FileStore(path).put(make_record())
        expected = 0o600
        assert expected == stat.S_IMODE(path.stat().st_mode)

    def test_missing_directories_are_made_private(self, tmp_path: Path) -> None:
        """Every directory made for the store is mode 0700."""
        FileStore(tmp_path / "a" / "b" / "creds.json").put(make_record())
        modes = [stat.S_IMODE((tmp_path / sub).stat().st_mode) for sub in ("a", "a/b")]
        expected = [0o700, 0o700]
        assert expected == modes

    def test_private_despite_a_permissive_umask(self, path: Path) -> None:
        """Modes are exact even when the umask would allow more."""
        old = os.umask(0)
        try:
            FileStore(path).put(make_record())
        finally:
            os.umask(old)
        expected = 0o600
        assert expected == stat.S_IMODE(path.stat().st_mode)


class TestPlantedFiles:
    def test_a_symlink_as_the_data_file_is_refused(self, tmp_path: Path, path: Path) -> None:
        """A symbolic link planted as the data file is not followed: StoreCorrupted names it."""
        elsewhere = tmp_path / "elsewhere.json"
        FileStore(elsewhere).put(make_record())
        path.symlink_to(elsewhere)
        with pytest.raises(StoreCorrupted, match="symbolic link") as caught:
            FileStore(path).get("alice")
        assert str(path) in str(caught.value)

    def test_a_symlink_as_the_data_file_is_never_written_through(
        self, tmp_path: Path, path: Path
    ) -> None:
        """A put refuses a symlinked data file, leaving the link and its target as they were."""
        elsewhere = tmp_path / "elsewhere.json"
        content = write_document(elsewhere, {})
        path.symlink_to(elsewhere)
        with pytest.raises(StoreCorrupted):
            FileStore(path).put(make_record())
        expected = (True, content)
        assert expected == (path.is_symlink(), elsewhere.read_bytes())

    def test_a_fifo_as_the_data_file_is_refused_without_hanging(self, path: Path) -> None:
        """A FIFO planted as the data file raises StoreCorrupted at once instead of blocking."""
        os.mkfifo(path, 0o600)
        script = (
            "import sys\n"
            "from credkeeper import StoreCorrupted\n"
            "from credkeeper_file import FileStore\n"
            "try:\n"
            "    FileStore(sys.argv[1]).get('alice')\n"
            "except StoreCorrupted as exc:\n"
            "    print('refused:', exc)\n"
        )
        try:
            result = subprocess.run(
                [sys.executable, "-c", script, str(path)],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
        except subprocess.TimeoutExpired:
            pytest.fail("reading a FIFO planted as the data file blocked")
        expected = (True, True)
        assert expected == (
            result.stdout.startswith("refused:"),
            "not a regular file" in result.stdout,
        )

    def test_a_symlink_as_the_lock_file_is_refused(self, tmp_path: Path, path: Path) -> None:
        """A symbolic link where the lock file should be is not followed, nor its target made."""
        target = tmp_path / "made-through-the-link"
        Path(f"{path}.lock").symlink_to(target)
        with pytest.raises(StoreCorrupted, match="symbolic link"):
            FileStore(path).put(make_record())
        expected = (False, False)
        assert expected == (target.exists(), path.exists())


class TestHostileDirectory:
    @pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o1777])
    def test_a_directory_others_can_write_is_refused(self, tmp_path: Path, mode: int) -> None:
        """A directory group or others can write raises ConfigurationError with the fix."""
        directory = tmp_path / "shared"
        directory.mkdir()
        directory.chmod(mode)
        with pytest.raises(ConfigurationError, match="chmod go-w") as caught:
            FileStore(directory / "creds.json").get("alice")
        assert str(directory) in str(caught.value)

    def test_nothing_is_written_in_a_directory_others_can_write(self, tmp_path: Path) -> None:
        """A put into a directory others can write is refused before any file is made."""
        directory = tmp_path / "shared"
        directory.mkdir()
        directory.chmod(0o777)
        with pytest.raises(ConfigurationError):
            FileStore(directory / "creds.json").put(make_record())
        expected: list[str] = []
        assert expected == os.listdir(directory)

    def test_a_sticky_world_writable_parent_is_fine(self, tmp_path: Path) -> None:
        """A /tmp-like parent is allowed: only the directory holding the file must be private."""
        public = tmp_path / "public"
        public.mkdir()
        public.chmod(0o1777)
        store = FileStore(public / "private" / "creds.json")
        store.put(make_record())
        expected = "1"
        assert expected == store.get("alice").version  # type: ignore[union-attr]

    def test_directories_are_made_private_under_umask_000(self, tmp_path: Path) -> None:
        """Under umask 000 every directory the store makes, parents included, is 0700."""
        old = os.umask(0)
        try:
            FileStore(tmp_path / "a" / "b" / "creds.json").put(make_record())
        finally:
            os.umask(old)
        modes = [stat.S_IMODE((tmp_path / sub).stat().st_mode) for sub in ("a", "a/b")]
        expected = [0o700, 0o700]
        assert expected == modes


class TestTempFiles:
    def test_none_left_after_writes(self, store: FileStore, path: Path) -> None:
        """Creates, updates and deletes leave only the data and lock files, and SQLite's own."""
        stored = store.put(make_record())
        store.put(stored.replace(failures=1))
        store.put(make_record("bob"))
        store.delete("bob")
        expected = ["creds.json", "creds.json-shm", "creds.json-wal", "creds.json.lock"]
        assert expected == sorted(os.listdir(path.parent))

    @pytest.mark.parametrize("call", ["fsync", "replace"])
    def test_none_left_after_a_failed_write(
        self, store: FileStore, path: Path, monkeypatch: pytest.MonkeyPatch, call: str
    ) -> None:
        """A disk error while converting a file (injected) raises and keeps the old file."""
        before = write_document(path, {"alice": stored_document()})

        def no_space(*args: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, call, no_space)
        with pytest.raises(StoreUnavailable, match="No space left") as caught:
            store.put(make_record("bob"))
        monkeypatch.undo()
        assert ("bob", [], before) == (caught.value.key, temp_files(path.parent), path.read_bytes())

    @pytest.mark.parametrize("call", ["fsync", "replace"])
    def test_a_failed_first_write_makes_no_file(
        self, store: FileStore, path: Path, monkeypatch: pytest.MonkeyPatch, call: str
    ) -> None:
        """A disk error while creating the file (injected) leaves no file and no temp file."""

        def no_space(*args: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, call, no_space)
        with pytest.raises(StoreUnavailable, match="No space left"):
            store.put(make_record())
        monkeypatch.undo()
        assert ([], False) == (temp_files(path.parent), path.exists())

    def test_a_failed_directory_sync_says_the_write_may_not_last(
        self, store: FileStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An fsync error on the directory (injected) raises StoreUnavailable after the replace."""
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.EIO, "Input/output error")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(StoreUnavailable, match="power cut"):
            store.put(make_record())
        monkeypatch.undo()
        expected = "1"
        assert expected == store.get("alice").version  # type: ignore[union-attr]

    def test_a_killed_writers_temp_file_is_swept_by_the_next_write(
        self, store: FileStore, path: Path
    ) -> None:
        """Temp files only exist under the lock, so the next writer removes stale ones."""
        (path.parent / ".creds.json.0123456789abcdef.tmp").write_bytes(b"half a file")
        store.put(make_record())
        expected: list[str] = []
        assert expected == temp_files(path.parent)

    def test_other_files_are_never_swept(self, store: FileStore, path: Path) -> None:
        """Files that are not this store's temp files survive a write."""
        names = [".creds.json.backup.tmp", ".creds.json.bak.0123456789abcdef.tmp", "notes.tmp"]
        for name in names:
            (path.parent / name).write_text("keep me")
        store.put(make_record())
        assert names == temp_files(path.parent)


class TestDamagedFile:
    def test_get_raises_naming_the_path(self, damaged: bytes, path: Path) -> None:
        """A file that is not a credkeeper store raises StoreCorrupted naming it."""
        with pytest.raises(StoreCorrupted, match="untouched") as caught:
            FileStore(path).get("alice")
        assert str(path) in str(caught.value)

    def test_put_raises_and_leaves_the_bytes(self, damaged: bytes, path: Path) -> None:
        """A put refuses to overwrite a damaged file."""
        with pytest.raises(StoreCorrupted):
            FileStore(path).put(make_record())
        assert damaged == path.read_bytes()

    def test_delete_raises_and_leaves_the_bytes(self, damaged: bytes, path: Path) -> None:
        """A delete refuses to touch a damaged file."""
        with pytest.raises(StoreCorrupted):
            FileStore(path).delete("alice")
        assert damaged == path.read_bytes()

    def test_scan_due_raises(self, damaged: bytes, path: Path) -> None:
        """scan_due on a damaged file raises StoreCorrupted."""
        with pytest.raises(StoreCorrupted, match="untouched"):
            FileStore(path).scan_due(NOW)

    def test_a_newer_format_version_is_named(self, path: Path) -> None:
        """A file from a newer credkeeper says which format_version it has."""
        write_document(path, {}, format_version=2)
        with pytest.raises(StoreCorrupted, match="format_version is 2"):
            FileStore(path).get("alice")


class TestDamagedRecord:
    def test_bad_field_raises_naming_the_key(self, path: Path) -> None:
        """A record with a wrongly typed field raises StoreCorrupted naming its key."""
        write_document(path, {"alice": stored_document(expires_at="tomorrow")})
        with pytest.raises(StoreCorrupted, match="'alice'") as caught:
            FileStore(path).get("alice")
        expected = "alice"
        assert expected == caught.value.key

    @pytest.mark.parametrize("version", [None, "1", 0, True, 1.5])
    def test_bad_version_raises_naming_the_key(self, path: Path, version: object) -> None:
        """A record without a positive integer version raises StoreCorrupted naming its key."""
        write_document(path, {"alice": stored_document(version=version)})  # type: ignore[arg-type]
        with pytest.raises(StoreCorrupted, match=r"'alice'.*version"):
            FileStore(path).get("alice")

    def test_record_that_is_not_an_object_raises(self, path: Path) -> None:
        """A record that is not a JSON object raises StoreCorrupted naming its key."""
        write_document(path, {"alice": ["not", "a", "record"]})
        with pytest.raises(StoreCorrupted, match="'alice'"):
            FileStore(path).get("alice")

    def test_other_keys_stay_readable(self, path: Path) -> None:
        """One damaged record does not stop reads of another key."""
        write_document(path, {"alice": {"junk": 1}, "bob": stored_document("bob")})
        expected = "sealed-access-bob"
        assert expected == FileStore(path).get("bob").access_token  # type: ignore[union-attr]

    def test_other_keys_are_carried_over_verbatim(self, path: Path) -> None:
        """A write for one key keeps a damaged record of another key as it was."""
        write_document(path, {"alice": {"junk": 1}})
        FileStore(path).put(make_record("bob"))
        expected = {"junk": 1}
        assert expected == stored_records(path)["alice"]

    def test_a_damaged_record_can_be_deleted(self, path: Path) -> None:
        """delete removes a record that cannot be read, so it can be repaired."""
        write_document(path, {"alice": {"junk": 1}})
        store = FileStore(path)
        expected = (True, None)
        assert expected == (store.delete("alice"), store.get("alice"))

    def test_scan_due_skips_a_damaged_record(self, path: Path) -> None:
        """scan_due lists the due keys it can read and leaves out a damaged record."""
        write_document(
            path,
            {
                "alice": stored_document(expires_at=None),
                "bob": stored_document("bob", version=2),
            },
        )
        expected = ["bob"]
        assert expected == list(FileStore(path).scan_due(NOW + timedelta(days=1)))

    def test_scan_due_warns_naming_a_damaged_record(
        self, path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A record scan_due skips is named in a WARNING, with the reason."""
        write_document(path, {"alice": stored_document(expires_at=None)})
        list(FileStore(path).scan_due(NOW))
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        expected = 1
        assert expected == len([m for m in warnings if "'alice'" in m and "expires_at" in m])

    def test_damaged_records_names_each_with_its_reason(self, path: Path) -> None:
        """damaged_records() maps every unreadable record's key to why it cannot be read."""
        write_document(
            path,
            {
                "alice": stored_document(expires_at=None),
                "bob": stored_document("bob", version=2),
                "carol": ["not", "a", "record"],
            },
        )
        damaged = FileStore(path).damaged_records()
        expected = (["alice", "carol"], True, True)
        assert expected == (
            sorted(damaged),
            "'expires_at'" in damaged["alice"],
            "not a JSON object" in damaged["carol"],
        )

    def test_a_sound_file_has_no_damaged_records(self, store: FileStore) -> None:
        """damaged_records() is empty when every record reads, and for a missing file."""
        before = store.damaged_records()
        store.put(make_record())
        expected: tuple[dict[str, str], dict[str, str]] = ({}, {})
        assert expected == (before, store.damaged_records())


class TestUnavailable:
    def test_get_under_a_regular_file_raises(self, tmp_path: Path) -> None:
        """A path whose parent is a regular file (ENOTDIR) raises StoreUnavailable on read."""
        (tmp_path / "plain").write_text("")
        with pytest.raises(StoreUnavailable, match="Not a directory") as caught:
            FileStore(tmp_path / "plain" / "creds.json").get("alice")
        assert ("alice", NotADirectoryError) == (caught.value.key, type(caught.value.__cause__))

    def test_put_under_a_regular_file_raises(self, tmp_path: Path) -> None:
        """A path whose parent is a regular file raises StoreUnavailable on write."""
        (tmp_path / "plain").write_text("")
        with pytest.raises(StoreUnavailable) as caught:
            FileStore(tmp_path / "plain" / "creds.json").put(make_record())
        expected = ("alice", True)
        assert expected == (caught.value.key, isinstance(caught.value.__cause__, OSError))

    def test_path_that_is_a_directory_raises(self, path: Path) -> None:
        """A directory where the file should be raises StoreUnavailable."""
        path.mkdir()
        with pytest.raises(StoreUnavailable, match=str(path)):
            FileStore(path).get("alice")

    @pytest.mark.parametrize("call", ["get", "delete", "put"])
    def test_missing_file_without_create_raises_naming_the_path(
        self, path: Path, call: str
    ) -> None:
        """With create=False a missing file raises StoreUnavailable naming it."""
        store = FileStore(path, create=False)
        argument: object = make_record() if call == "put" else "alice"
        with pytest.raises(StoreUnavailable, match="create=False") as caught:
            getattr(store, call)(argument)
        assert str(path) in str(caught.value)

    def test_missing_directory_without_create_raises(self, tmp_path: Path) -> None:
        """With create=False a missing directory is not made."""
        with pytest.raises(StoreUnavailable, match="create=False"):
            FileStore(tmp_path / "sub" / "creds.json", create=False).put(make_record())
        expected: list[str] = []
        assert expected == os.listdir(tmp_path)

    def test_write_without_create_on_an_existing_file_works(self, path: Path) -> None:
        """create=False only refuses to make a file, not to write one."""
        write_document(path, {})
        expected = "1"
        assert expected == FileStore(path, create=False).put(make_record()).version

    def test_lock_held_elsewhere_times_out(self, path: Path) -> None:
        """A write waits lock_timeout for another process's lock, then raises StoreUnavailable."""
        store = FileStore(path, lock_timeout=0.2)
        with lock_held_elsewhere(path), pytest.raises(StoreUnavailable, match="lock") as caught:
            store.put(make_record())
        expected = ("alice", False)
        assert expected == (caught.value.key, path.exists())

    def test_delete_waits_for_the_lock_too(self, path: Path) -> None:
        """A delete of a present key needs the lock and times out like a put."""
        store = FileStore(path, lock_timeout=0.1)
        store.put(make_record())
        with lock_held_elsewhere(path), pytest.raises(StoreUnavailable, match="lock"):
            store.delete("alice")

    def test_lock_wait_stops_at_the_call_budget(self, path: Path) -> None:
        """Inside an engine call's budget, a held lock gives up at the budget, not lock_timeout."""
        store = FileStore(path, lock_timeout=30)
        with lock_held_elsewhere(path):
            started = time.monotonic()
            with budget(0.2), pytest.raises(StoreUnavailable) as caught:
                store.put(make_record())
            waited = time.monotonic() - started
        expected = (True, "alice", True)
        assert expected == (waited < 5, caught.value.key, "held" in str(caught.value))

    def test_a_thread_waiting_behind_another_stops_at_its_budget(self, path: Path) -> None:
        """A thread queued behind one that waits for the lock also gives up at its budget."""
        store = FileStore(path, lock_timeout=30)
        with lock_held_elsewhere(path) as holder:
            # No budget here: this thread waits for the other process, holding the store's
            # in-process lock, until that process dies.
            first = threading.Thread(target=store.put, args=(make_record("bob"),))
            first.start()
            time.sleep(0.1)
            started = time.monotonic()
            with budget(0.2), pytest.raises(StoreUnavailable):
                store.put(make_record())
            waited = time.monotonic() - started
            holder.kill()
            holder.wait()
            first.join(timeout=30)
        expected = (True, False, ["bob"])
        assert expected == (
            waited < 5,
            first.is_alive(),
            list(store.scan_due(NOW + timedelta(days=1))),
        )

    def test_a_killed_lock_holder_releases_the_lock(self, path: Path) -> None:
        """The OS drops the lock of a process that dies, so writes go on."""
        with lock_held_elsewhere(path) as holder:
            holder.kill()
            holder.wait()
            stored = FileStore(path, lock_timeout=5).put(make_record())
        expected = "1"
        assert expected == stored.version

    @pytest.mark.parametrize("call", ["get", "put", "delete", "scan_due"])
    def test_a_closed_store_refuses_calls(self, store: FileStore, call: str) -> None:
        """Every call after close() raises StoreUnavailable saying so."""
        argument = {"get": "alice", "put": make_record(), "delete": "alice", "scan_due": NOW}
        store.close()
        with pytest.raises(StoreUnavailable, match="closed"):
            getattr(store, call)(argument[call])

    def test_leaving_the_with_block_closes(self, path: Path) -> None:
        """The context manager closes the store."""
        with FileStore(path) as store:
            pass
        with pytest.raises(StoreUnavailable, match="closed"):
            store.get("alice")

    def test_close_twice_is_harmless(self, store: FileStore) -> None:
        """close() may be called again."""
        store.close()
        store.close()

    def test_import_without_fcntl_says_posix(self) -> None:
        """On a platform without fcntl the import fails with a clear message."""
        script = "import sys; sys.modules['fcntl'] = None; import credkeeper_file"
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=False
        )
        expected = (1, True)
        assert expected == (result.returncode, "POSIX file locks" in result.stderr)


class TestEncryption:
    def test_a_key_ring_leaves_no_plaintext_token_in_the_file(
        self, tmp_path: Path, path: Path
    ) -> None:
        """With the engine's key ring set, neither token appears in the file in the clear."""
        credentials = Credentials(
            access_token="sk-ant-oat01-PLAINACCESS",
            refresh_token="sk-ant-ort01-PLAINREFRESH",
            expires_at=NOW + timedelta(hours=8),
        )
        with TokenManager(
            FileStore(path),
            Provider.claude_code(),
            keyring=KeyRing.generate(),
            journal=tmp_path / "journal",
        ) as manager:
            manager.put("alice", credentials)
        raw = stored_bytes(path)
        expected = (["alice"], False, False)
        assert expected == (
            list(stored_records(path)),
            b"PLAINACCESS" in raw,
            b"PLAINREFRESH" in raw,
        )


@pytest.mark.slow
class TestConcurrency:
    def test_threads_sharing_a_store_lose_no_increment(self, store: FileStore) -> None:
        """8 threads, 25 compare-and-swap increments on one instance all land."""
        store.put(make_record("counter"))

        def work() -> None:
            for _ in range(25):
                increment(store)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        expected = 200
        assert expected == store.get("counter").failures  # type: ignore[union-attr]

    def test_processes_and_threads_lose_no_increment(self, path: Path) -> None:
        """3 processes of 2 threads, 20 compare-and-swap increments each, all land."""
        FileStore(path).put(make_record("counter"))
        workers = [run_python(INCREMENTER, path, 2, 20) for _ in range(3)]
        for worker in workers:
            worker.communicate(timeout=240)
        codes = [worker.returncode for worker in workers]
        expected = ([0, 0, 0], 120)
        assert expected == (codes, FileStore(path).get("counter").failures)  # type: ignore[union-attr]

    @pytest.mark.parametrize("attempt", range(5))
    def test_sigkill_mid_write_leaves_one_whole_record(self, path: Path, attempt: int) -> None:
        """A writer SIGKILLed in a tight write loop leaves a file holding one whole record."""
        # A larger file makes a kill mid-write likelier.
        others = {f"user-{i}": stored_document(f"user-{i}", version=i) for i in range(1, 201)}
        write_document(path, others, last_version=200)
        FileStore(path).put(
            make_record("counter", access_token="access-0", refresh_token="refresh-0")
        )
        writer = run_python(CRASH_WRITER, path)
        assert writer.stdout is not None
        announced = "writing\n"
        assert announced == writer.stdout.readline()
        threading.Event().wait(random.uniform(0.01, 0.2))
        writer.send_signal(signal.SIGKILL)
        writer.communicate()
        record = FileStore(path).get("counter")
        assert record is not None
        n = record.failures
        expected = (f"access-{n}", f"refresh-{n}", str(201 + n), 201)
        records = stored_records(path)
        assert expected == (record.access_token, record.refresh_token, record.version, len(records))


class TestFormatOneMigration:
    def test_an_old_json_file_is_converted_on_first_use(self, path: Path) -> None:
        """A format 1 file becomes a SQLite file holding the same records and version counter."""
        write_document(
            path,
            {"alice": stored_document(version=3), "bob": stored_document("bob", version=5)},
            last_version=9,
        )
        store = FileStore(path)
        alice = store.get("alice")
        assert alice is not None
        expected = ("3", b"SQLite format 3\x00", ("credkeeper.file", 2, 9), "10")
        assert expected == (
            alice.version,
            path.read_bytes()[:16],
            stored_meta(path),
            store.put(alice.replace(failures=1)).version,
        )

    def test_a_damaged_record_survives_the_conversion(self, path: Path) -> None:
        """A record that does not decode is carried over as it was, damaged for its key only."""
        write_document(path, {"alice": {"junk": 1}, "bob": stored_document("bob")})
        store = FileStore(path)
        expected = (["alice"], "sealed-access-bob", {"junk": 1})
        assert expected == (
            sorted(store.damaged_records()),
            store.get("bob").access_token,  # type: ignore[union-attr]
            stored_records(path)["alice"],
        )

    def test_the_converted_file_is_private(self, path: Path) -> None:
        """The converted data file is 0600 even when the old one was world-readable."""
        write_document(path, {"alice": stored_document()})
        path.chmod(0o644)
        FileStore(path).get("alice")
        expected = 0o600
        assert expected == stat.S_IMODE(path.stat().st_mode)

    def test_a_killed_conversion_leaves_the_old_file_and_is_redone(self, path: Path) -> None:
        """A converter killed before its rename leaves the JSON file and a temp file, swept next."""
        content = write_document(path, {"alice": stored_document()})
        # What a converter killed mid-build leaves: a half-built database beside the old file.
        (path.parent / ".creds.json.0123456789abcdef.tmp").write_bytes(b"SQLite format 3\x00")
        (path.parent / ".creds.json.0123456789abcdef.tmp-journal").write_bytes(b"half")
        before = (path.read_bytes(), json.loads(path.read_bytes())["records"]["alice"]["version"])
        record = FileStore(path).get("alice")
        expected = ((content, 1), "1", [])
        assert expected == (before, record.version, temp_files(path.parent))  # type: ignore[union-attr]

    def test_a_conversion_waits_for_the_old_writers_lock(self, path: Path) -> None:
        """An old writer holding the lock keeps the file JSON: the conversion times out."""
        content = write_document(path, {"alice": stored_document()})
        store = FileStore(path, lock_timeout=0.2)
        with lock_held_elsewhere(path), pytest.raises(StoreUnavailable, match="lock"):
            store.get("alice")
        assert content == path.read_bytes()

    def test_an_old_reader_of_the_converted_file_refuses_it(self, path: Path) -> None:
        """The format 1 decoder (an older credkeeper) calls the new file unusable, not empty."""
        from credkeeper_file._format import decode

        FileStore(path).put(make_record())
        with pytest.raises(StoreCorrupted, match="untouched"):
            decode(path.read_bytes(), path=str(path))


class TestSqliteFiles:
    def test_every_file_is_private(self, path: Path) -> None:
        """The data file, the lock file and SQLite's WAL and shared-memory files are 0600."""
        old = os.umask(0)
        try:
            with FileStore(path) as store:
                stored = store.put(make_record())
                store.put(stored.replace(failures=1))  # through SQLite: its files now exist
                modes = {
                    name: stat.S_IMODE((path.parent / name).stat().st_mode)
                    for name in os.listdir(path.parent)
                }
        finally:
            os.umask(old)
        expected = dict.fromkeys(
            ["creds.json", "creds.json-shm", "creds.json-wal", "creds.json.lock"], 0o600
        )
        assert expected == modes

    @pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
    def test_a_symlink_as_a_sqlite_file_is_refused(
        self, tmp_path: Path, path: Path, suffix: str
    ) -> None:
        """A link planted where SQLite keeps its WAL or shared memory is refused, not followed."""
        FileStore(path).put(make_record())
        for name in ("creds.json-wal", "creds.json-shm"):
            with contextlib.suppress(FileNotFoundError):
                (path.parent / name).unlink()
        target = tmp_path / "made-through-the-link"
        Path(f"{path}{suffix}").symlink_to(target)
        with pytest.raises(StoreCorrupted, match="symbolic link"):
            FileStore(path).get("alice")
        assert not target.exists()

    def test_a_foreign_sqlite_file_is_refused(self, path: Path) -> None:
        """A SQLite database credkeeper did not write raises StoreCorrupted and is left alone."""
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("CREATE TABLE users (name TEXT)")
            db.commit()
        before = path.read_bytes()
        with pytest.raises(StoreCorrupted, match="written by something else"):
            FileStore(path).put(make_record())
        assert before == path.read_bytes()

    def test_scan_due_lists_each_of_many_keys_once(self, store: FileStore) -> None:
        """Keys beyond one page are all listed, once each, and a write between pages is fine."""
        keys = [f"user-{i:04d}" for i in range(1300)]
        for key in keys:
            store.put(make_record(key, expires_at=NOW))
        seen = []
        for key in store.scan_due(NOW):
            seen.append(key)
            if len(seen) == 600:
                # A key updated mid-scan (still due) is not listed again.
                record = store.get("user-0001")
                store.put(record.replace(failures=1))  # type: ignore[union-attr]
        assert keys == seen

    def test_a_file_replaced_under_a_store_is_read_anew(self, tmp_path: Path, path: Path) -> None:
        """A store notices a restored file (another inode at the path) and reads it."""
        store = FileStore(path)
        store.put(make_record())
        other = tmp_path / "other" / "creds.json"
        FileStore(other).put(make_record("bob"))
        os.replace(other, path)
        expected = (None, "1")
        assert expected == (store.get("alice"), store.get("bob").version)  # type: ignore[union-attr]
