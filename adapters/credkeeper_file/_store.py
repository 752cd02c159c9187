"""``FileStore``: many credentials in one SQLite file, safe for threads and processes on a host."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shlex
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from credkeeper import (
    ConfigurationError,
    ConflictError,
    Record,
    StoreCorrupted,
    StoreUnavailable,
    time_remaining,
)
from credkeeper import storekit as kit

# not yet public: credkeeper's own rules for files that hold credentials (private
# directories, never following a planted link), shared with the rescue journal; the store kit
# has no public home for them yet.
from credkeeper._files import (
    NotRegularFile,
    make_private_directories,
    open_regular,
    writable_by_others,
)

from ._database import build, columns_of, document_of, read_meta
from ._format import Contents, decode, record_of, version_of

try:
    import fcntl
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "credkeeper's file store needs POSIX file locks (the fcntl module), which this platform "
        "does not have; use another store, e.g. sqlite:///path/to/creds.db with credkeeper[sql]"
    ) from exc

__all__ = ["FileStore"]

logger = logging.getLogger("credkeeper.file")

_STORE = "file store"
_URL_FORM = "file:///absolute/path/to/creds.json (or file://localhost/absolute/path/to/creds.json)"
_OPTIONS: dict[str, kit.Option[Any]] = {"create": kit.FLAG, "lock_timeout": kit.SECONDS}

# Lock polling: start short so an uncontended wait costs little, cap it so a waiter notices
# a released lock within a few hundredths of a second.
_FIRST_POLL = 0.001
_MAX_POLL = 0.05

_FILE_MODE = 0o600
# The files SQLite keeps beside the data file: checked like it, never followed.
_COMPANIONS = ("-wal", "-shm", "-journal")
_SQLITE_HEADER = b"SQLite format 3\x00"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# scan_due reads this many keys per query: bounded memory whatever the store's size.
_PAGE = 512


def _describe(exc: Exception) -> str:
    reason = getattr(exc, "strerror", None) or type(exc).__name__
    filename = getattr(exc, "filename", None)
    return f"{reason} ({filename})" if filename else reason


class _Connection(sqlite3.Connection):
    """A SQLite connection the store can hold weakly (the base class takes no weak reference)."""


class _NotADatabase(Exception):
    """The data file is not SQLite: a format 1 (JSON) file to migrate, or something foreign."""


class FileStore(kit.ClosingStore):
    """A :class:`~credkeeper.CredentialStore` keeping every record in one SQLite file.

    The embedded default: no server, safe for many threads and processes on one host, and
    each call costs about the same with a hundred credentials or a hundred thousand. The file
    is a SQLite database (the standard library's ``sqlite3``) in WAL mode with
    ``synchronous=FULL``: a commit is durable when the call returns, a crash leaves the last
    committed state, and readers take no lock and never wait for a writer.
    Writes take an exclusive ``flock`` on a sibling ``<path>.lock`` file, then compare and
    write in one SQLite transaction; the flock keeps ``lock_timeout`` and the call's budget
    the bound on every wait, and shuts out writers of the older JSON format.
    A JSON file written by an older credkeeper is converted on first use, under that lock:
    the new file is built beside it and replaces it atomically, so a crash leaves one or the
    other.

    Token fields are kept as given; the engine seals them when it has a key ring.

    ``create``: a missing file reads as empty and its directory is made (mode 0700) on the
    first write; with ``create=False`` a missing file raises ``StoreUnavailable``.
    ``lock_timeout``: seconds a write waits for the lock before ``StoreUnavailable``; inside
    an engine call it waits no longer than the call's budget (:func:`credkeeper.time_remaining`).

    Only the owner may write the directory holding the file: one group or others can write is
    refused with ``ConfigurationError``. A symbolic link, FIFO or any other non-regular file
    planted as the data, lock or SQLite companion file is never followed or read:
    ``StoreCorrupted`` names it. A damaged record fails only the calls that read its key;
    ``scan_due`` skips it with a warning, and :meth:`damaged_records` lists every one.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        lock_timeout: float = 10.0,
    ) -> None:
        raw = os.fspath(path) if isinstance(path, str | os.PathLike) else path
        if not isinstance(raw, str):
            raise ConfigurationError(
                f"path must be a str or os.PathLike of str, not {type(raw).__name__}"
            )
        if not raw or "\x00" in raw or raw.endswith(os.sep):
            raise ConfigurationError(
                f"path must name a file, e.g. /var/lib/app/creds.json, got {raw!r}"
            )
        options, _ = kit.read_options(
            {"create": create, "lock_timeout": lock_timeout}, _OPTIONS, store=_STORE
        )
        directory, name = os.path.split(os.path.abspath(raw))
        if not name:
            raise ConfigurationError(
                f"path must name a file, e.g. /var/lib/app/creds.json, got {raw!r}"
            )
        # The directory's real path, so that stores reaching one file through different
        # symlinked directories share one lock file. The file's own name is never resolved:
        # a symlink planted there is refused when opened, so it cannot redirect the store.
        self._dir = os.path.realpath(directory)
        self._path = os.path.join(self._dir, name)
        self._uri = f"file:{quote(self._path)}?mode=rw"
        self._lock_path = f"{self._path}.lock"
        self._temp_prefix = f".{name}."
        self._temp_name = re.compile(
            rf"\.{re.escape(name)}\.[0-9a-f]{{16}}\.tmp(?:-wal|-shm|-journal)?"
        )
        self._create: bool = options["create"]
        self._lock_timeout: float = options["lock_timeout"]
        # Threads of one process queue here instead of all polling the file lock.
        self._thread_lock = threading.Lock()
        # One SQLite connection per thread, so a transaction never mixes two threads' calls;
        # the set lets close() reach them all and forgets those of threads that ended.
        self._local = threading.local()
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._connections_lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> FileStore:
        """Open ``file:///absolute/path.json``; ``create`` and ``lock_timeout`` may be given
        as keyword options or in the query (``?create=false&lock_timeout=5``)."""
        if not isinstance(url, str):
            raise ConfigurationError(f"file store URL must be {_URL_FORM}, got {url!r}")
        parts = urlsplit(url)
        if (
            not url.lower().startswith("file://")
            or parts.netloc.lower() not in ("", "localhost")
            or not parts.path.startswith("/")
            or parts.path.endswith("/")
            or parts.fragment
        ):
            raise ConfigurationError(f"file store URL must be {_URL_FORM}, got {url!r}")
        given = kit.merge_options(
            kit.query_options(parts.query, store=_STORE), options, store=_STORE
        )
        values, _ = kit.read_options(given, _OPTIONS, store=_STORE)
        return cls(unquote(parts.path), **values)

    @property
    def path(self) -> Path:
        """The data file, its directory's symlinks resolved; its lock file adds ``.lock``."""
        return Path(self._path)

    def __repr__(self) -> str:
        return f"FileStore({self._path!r})"

    # -- the CredentialStore protocol ------------------------------------------------------

    def get(self, key: str) -> Record | None:
        """See :meth:`CredentialStore.get`; one indexed read, without the write lock."""
        key = kit.check_key(key)
        self._check_open(key)
        db = self._open(key)
        if db is None:
            return None
        with self._boundary("read", key):
            row = db.execute("SELECT document FROM records WHERE key = ?", (key,)).fetchone()
        return None if row is None else record_of(key, document_of(key, row[0]))

    def put(self, record: Record) -> Record:
        """See :meth:`CredentialStore.put`; compares and writes under the file lock."""
        key = kit.check_record(record).key
        self._check_open(key)
        document = record.to_document()
        # What get() will return: times in UTC, to the millisecond.
        readback = Record.from_document(key, document, version="0")
        with self._locked(key) as (deadline, limit):
            db = self._open(key, locked=True)
            if db is None:
                # The first write makes the file whole, record included, or not at all.
                contents = Contents(records={}, last_version=0)
                self._check_version(key, record.version, None)
                version = contents.next_version(None)
                contents.records[key] = {**document, "version": version}
                contents.last_version = version
                self._replace(contents, key)
            else:
                with self._transaction(db, key, deadline, limit):
                    version = self._swap(db, key, document, record.version)
        return readback.replace(version=str(version))

    def delete(self, key: str) -> bool:
        """See :meth:`CredentialStore.delete`; a damaged record can be deleted too."""
        key = kit.check_key(key)
        self._check_open(key)
        # An absent key needs no lock: the lock-free read is a consistent snapshot.
        db = self._open(key)
        if db is None or not self._holds(db, key):
            return False
        with self._locked(key) as (deadline, limit):
            db = self._open(key, locked=True)
            if db is None:
                return False
            with self._transaction(db, key, deadline, limit):
                removed = db.execute("DELETE FROM records WHERE key = ?", (key,)).rowcount
        return removed > 0

    def scan_due(self, before: datetime) -> Iterator[str]:
        """See :meth:`CredentialStore.scan_due`; streams keys in pages, each listed once.

        Keys come in key order, ``_PAGE`` at a time from an index of keys and expiry times,
        so memory stays bounded and a key updated during the scan is not listed again.
        Errors about the file itself are raised by the call, not by the first ``next()``.
        """
        kit.check_moment("before", before)
        self._check_open(None)
        # Whole milliseconds, as stored: expires_at <= before, to the microsecond.
        bound = (before - _EPOCH) // timedelta(microseconds=1) // 1000
        if self._open(None) is None:
            return iter(())
        return self._due(bound)

    def damaged_records(self) -> dict[str, str]:
        """Every key whose stored record cannot be read, with the reason; read from the file now.

        ``scan_due`` skips these records (logging a warning for each), ``get`` raises
        ``StoreCorrupted`` naming the key, and ``delete`` removes one. ``credkeeper status``
        lists them. The reasons name keys and fields, never a value.
        """
        self._check_open(None)
        db = self._open(None)
        damaged: dict[str, str] = {}
        if db is None:
            return damaged
        with self._boundary("read", None):
            # The cursor streams rows: one document in memory at a time.
            for key, text in db.execute("SELECT key, document FROM records"):
                try:
                    record_of(key, document_of(key, text))
                except StoreCorrupted as exc:
                    damaged[key] = str(exc)
        return damaged

    def now(self) -> datetime:
        """The host's clock: every process using the file shares it, so leases are judged on it.

        A file store serves one host; over a network file system, hosts would also need their
        clocks closer than the provider's timeout (see docs/custom-stores.md).
        """
        return datetime.now(UTC)

    def close(self) -> None:
        """Close the store's SQLite connections; later calls raise ``StoreUnavailable``."""
        self._closed = True
        with self._connections_lock:
            connections = list(self._connections)
            self._connections.clear()
        for db in connections:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    # -- opening the file ---------------------------------------------------------------------

    def _check_open(self, key: str | None) -> None:
        if self._closed:
            raise StoreUnavailable(f"{self!r} is closed; open a new store", key=key)

    def _missing(self, key: str | None) -> StoreUnavailable:
        return StoreUnavailable(
            f"{self._path} does not exist and the store was opened with create=False; "
            "create the file or open the store with create=True",
            key=key,
        )

    def _boundary(self, action: str, key: str | None) -> contextlib.AbstractContextManager[None]:
        """Any other OSError or SQLite error inside the block as a credkeeper error.

        The store's whole mapping of driver errors, but for the few that mean something else
        where they are raised: a missing file (an empty store, or the create=False error), a
        lock held by another process (wait), a directory that could not be synced (written,
        but maybe not durable). SQLite's "damaged file" errors are ``StoreCorrupted``.
        """

        def translate(exc: Exception) -> StoreUnavailable | StoreCorrupted:
            for_key = "" if key is None else f" for key {key!r}"
            if isinstance(exc, sqlite3.DatabaseError) and getattr(
                exc, "sqlite_errorcode", None
            ) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                return StoreCorrupted(
                    f"{self._path} is not a usable credkeeper file store ({exc}); it was left "
                    "untouched: move it aside and restore a backup, or point the store at "
                    "another path",
                    key=key,
                )
            if isinstance(exc, sqlite3.ProgrammingError) and self._closed:
                return StoreUnavailable(f"{self!r} is closed; open a new store", key=key)
            return StoreUnavailable(
                f"could not {action} {self._path}{for_key}: {_describe(exc)}", key=key
            )

        return kit.error_boundary(translate, OSError, sqlite3.Error)

    def _open(self, key: str | None, *, locked: bool = False) -> sqlite3.Connection | None:
        """This thread's connection to the data file, None while it does not exist.

        A format 1 (JSON) file is converted first, under the write lock (``locked``: the
        caller holds it already); a file that is neither raises ``StoreCorrupted``.
        """
        self._check_directory()
        with self._boundary("read", key):
            try:
                return self._connect(key)
            except _NotADatabase:
                pass
            # Decoded before locking, so a damaged file fails without waiting or a lock file.
            if self._read_old_format(key) is not None:
                if locked:
                    self._convert(key)
                else:
                    with self._locked(key):
                        self._convert(key)
            return self._connect(key)

    def _connect(self, key: str | None) -> sqlite3.Connection | None:
        """The cached connection if it still reaches the file at the path, else a new one."""
        identity = self._identify(key)
        local = self._local
        cached: sqlite3.Connection | None = getattr(local, "db", None)
        if identity is None:
            return None
        if cached is not None and local.identity == identity:
            return cached
        # The path now holds another file (converted, restored, or the process forked):
        # a new connection reaches it. An inherited one is kept open, never used: closing
        # it in a child could disturb the parent's locks.
        if cached is not None and local.identity[2] == identity[2]:
            with contextlib.suppress(sqlite3.Error):
                cached.close()
        local.db = None
        self._check_companions(key)
        db = sqlite3.connect(
            self._uri,
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=0,
            factory=_Connection,
        )
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self._lock_timeout * 1000)}")
            db.execute("PRAGMA synchronous = FULL")
            read_meta(db, path=self._path, key=key)
        except sqlite3.DatabaseError as exc:
            db.close()
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_NOTADB:
                raise _NotADatabase from exc
            raise
        except BaseException:
            db.close()
            raise
        with self._connections_lock:
            if self._closed:
                db.close()
                raise StoreUnavailable(f"{self!r} is closed; open a new store", key=key)
            self._connections.add(db)
        local.db, local.identity = db, identity
        return db

    def _identify(self, key: str | None) -> tuple[int, int, int] | None:
        """The data file's device, inode and this process's id; None if missing (create=True).

        Checked without opening the file: closing any descriptor of a SQLite file drops every
        POSIX lock this process holds on it, other connections' included.
        """
        try:
            info = os.lstat(self._path)
        except FileNotFoundError as exc:
            if self._create:
                return None
            raise self._missing(key) from exc
        if stat.S_ISLNK(info.st_mode):
            raise self._planted(self._path, "a symbolic link", key)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), self._path)
        if not stat.S_ISREG(info.st_mode):
            raise self._planted(self._path, "not a regular file", key)
        if info.st_size == 0:
            # SQLite would take an empty file for an empty database; it is damage here.
            decode(b"", path=self._path, key=key)
        if stat.S_IMODE(info.st_mode) != _FILE_MODE:
            os.chmod(self._path, _FILE_MODE)  # a file copied in with a looser mode
        return info.st_dev, info.st_ino, os.getpid()

    def _check_companions(self, key: str | None) -> None:
        # SQLite opens these itself, following links: refuse planted ones before it does.
        for suffix in _COMPANIONS:
            companion = self._path + suffix
            try:
                info = os.lstat(companion)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(info.st_mode):
                raise self._planted(companion, "a symbolic link", key)
            if not stat.S_ISREG(info.st_mode):
                raise self._planted(companion, "not a regular file", key)
            if stat.S_IMODE(info.st_mode) != _FILE_MODE:
                os.chmod(companion, _FILE_MODE)

    def _read_old_format(self, key: str | None) -> Contents | None:
        """The format 1 file at the path, decoded; None if the path now holds something else.

        Anything that is neither format raises ``StoreCorrupted`` and is left untouched.
        """
        try:
            fd = self._open_regular(self._path, os.O_RDONLY, key)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as file:
            raw = file.read()
        if raw.startswith(_SQLITE_HEADER):
            return None  # converted meanwhile by another process
        return decode(raw, path=self._path, key=key)

    def _convert(self, key: str | None) -> None:
        """Replace a format 1 file with its SQLite equivalent; the caller holds the lock."""
        contents = self._read_old_format(key)
        if contents is not None:
            self._replace(contents, key)
            logger.info(
                "converted %s to the SQLite file format (%d records)",
                self._path,
                len(contents.records),
            )

    def _check_directory(self) -> None:
        # Whoever can write the directory can swap the data file for one of their own.
        mode = writable_by_others(self._dir)
        if mode is not None:
            raise ConfigurationError(
                f"the file store's directory {self._dir} is writable by group or others "
                f"(mode {mode:04o}), who could replace or plant the credentials file; "
                f"run `chmod go-w {shlex.quote(self._dir)}` (mode 0700 is best), or keep the "
                "file in a directory only its owner can write"
            )

    def _open_regular(self, path: str, flags: int, key: str | None) -> int:
        """``path`` opened with ``flags``, if it is a regular file and not a symbolic link.

        A directory raises ``IsADirectoryError``, any other OS error passes through.
        """
        try:
            return open_regular(path, flags, _FILE_MODE)
        except NotRegularFile as exc:
            raise self._planted(path, exc.what, key) from None

    def _planted(self, path: str, what: str, key: str | None) -> StoreCorrupted:
        return StoreCorrupted(
            f"{path} is {what}; the file store never follows or reads such a file in its "
            "place, so it was left untouched: remove it, or point the store at another path",
            key=key,
        )

    # -- reading ------------------------------------------------------------------------------

    def _holds(self, db: sqlite3.Connection, key: str) -> bool:
        with self._boundary("read", key):
            row = db.execute("SELECT 1 FROM records WHERE key = ?", (key,)).fetchone()
        return row is not None

    def _due(self, bound: int) -> Iterator[str]:
        after = ""
        while True:
            self._check_open(None)
            db = self._open(None)
            if db is None:
                return  # the file was removed during the scan
            with self._boundary("read", None):
                page = db.execute(
                    "SELECT key, expires_at FROM records INDEXED BY records_due"
                    " WHERE key > ? AND (expires_at IS NULL OR expires_at <= ?)"
                    " ORDER BY key LIMIT ?",
                    (after, bound, _PAGE),
                ).fetchall()
            for key, expires_at in page:
                if expires_at is None and self._damage(db, key) is not None:
                    continue
                yield key
            if len(page) < _PAGE:
                return
            after = page[-1][0]

    def _damage(self, db: sqlite3.Connection, key: str) -> str | None:
        """Why ``key``'s record cannot be read, logged as scan_due skips it; None if it can."""
        with self._boundary("read", key):
            row = db.execute("SELECT document FROM records WHERE key = ?", (key,)).fetchone()
        if row is None:
            return "deleted"  # gone since the page was read: not due any more
        try:
            record_of(key, document_of(key, row[0]))
        except StoreCorrupted as exc:
            # One damaged record must not hide every other key from the sweeper and status.
            logger.warning("scan_due skips a damaged record in %s: %s", self._path, exc)
            return str(exc)
        return None

    # -- writing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, key: str | None) -> Iterator[tuple[float, float]]:
        """Hold the write lock; yields the wait's deadline (monotonic) and its length."""
        # One budget per engine call: the wait ends at lock_timeout or at the call's deadline,
        # whichever comes first, so a held lock cannot outlast the call that waits for it.
        budget = time_remaining()
        limit = self._lock_timeout if budget is None else min(self._lock_timeout, budget)
        deadline = time.monotonic() + limit
        if not self._thread_lock.acquire(timeout=max(limit, 0)):
            raise self._lock_timed_out(key, limit)
        try:
            fd = self._open_lock_file(key)
            try:
                self._flock(fd, deadline, limit, key)
                yield deadline, limit
            finally:
                # Closing the only descriptor of this open file releases the flock.
                with contextlib.suppress(OSError):
                    os.close(fd)
        finally:
            self._thread_lock.release()

    def _open_lock_file(self, key: str | None) -> int:
        with self._boundary("lock", key):
            try:
                if self._create:
                    make_private_directories(self._dir)
                elif not os.path.exists(self._path):
                    # Checked before creating a lock file, so a wrong path leaves nothing behind.
                    raise self._missing(key)
                self._check_directory()
                return self._open_regular(self._lock_path, os.O_RDWR | os.O_CREAT, key)
            except FileNotFoundError as exc:
                if not self._create:
                    raise self._missing(key) from exc  # the directory went away meanwhile
                raise

    def _flock(self, fd: int, deadline: float, limit: float, key: str | None) -> None:
        delay = _FIRST_POLL
        while True:
            with self._boundary("lock", key), contextlib.suppress(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._lock_timed_out(key, limit)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, _MAX_POLL)

    def _lock_timed_out(self, key: str | None, limit: float) -> StoreUnavailable:
        if limit < self._lock_timeout:
            fix = "or give the call more time (the manager's refresh_timeout)"
            waited = f"{limit:.3g}s, the rest of the call's time budget,"
        else:
            fix = "or raise lock_timeout"
            waited = f"{limit:g}s"
        return StoreUnavailable(
            f"waited {waited} for the write lock {self._lock_path} for key {key!r}; it was "
            "held throughout, by another process or by another thread of this one waiting "
            f"for it: find that process, {fix}",
            key=key,
        )

    def _check_version(self, key: str, expected: str | None, stored: int | None) -> None:
        if expected != (None if stored is None else str(stored)):
            raise self._conflict(key, expected=expected, stored=stored)

    def _conflict(self, key: str, *, expected: str | None, stored: int | None) -> ConflictError:
        if expected is None:
            reason = "already exists; get() it and put() with its version"
        elif stored is None:
            reason = f"was deleted since version {expected} was read"
        else:
            reason = f"changed since it was read: version {expected} is now {stored}"
        return ConflictError(f"the record under key {key!r} {reason}", key=key)

    @contextlib.contextmanager
    def _transaction(
        self, db: sqlite3.Connection, key: str, deadline: float, limit: float
    ) -> Iterator[None]:
        """One write transaction, committed when the block ends, rolled back if it raises.

        The flock already shuts out other writers; SQLite's own lock is waited for (a
        checkpoint may hold it a moment) only until the same deadline.
        """
        remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
        with self._boundary("write", key):
            try:
                db.execute(f"PRAGMA busy_timeout = {remaining_ms}")
                db.execute("BEGIN IMMEDIATE")
                yield
                db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._roll_back(db)
                if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY:
                    raise self._lock_timed_out(key, limit) from exc
                raise
            except BaseException:
                self._roll_back(db)
                raise

    @staticmethod
    def _roll_back(db: sqlite3.Connection) -> None:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")

    def _swap(
        self, db: sqlite3.Connection, key: str, document: dict[str, Any], expected: str | None
    ) -> int:
        """Compare ``expected`` with the stored version and write; inside a transaction."""
        row = db.execute("SELECT version, document FROM records WHERE key = ?", (key,)).fetchone()
        stored: int | None = None
        if row is not None:
            # A NULL version marks a damaged record: version_of says how.
            stored = row[0] if row[0] is not None else version_of(key, document_of(key, row[1]))
        self._check_version(key, expected, stored)
        (last_version,) = db.execute("SELECT last_version FROM meta").fetchone()
        version = Contents(records={}, last_version=last_version).next_version(stored)
        stored_document = {**document, "version": version}
        db.execute(
            "INSERT INTO records (key, version, expires_at, document) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (key) DO UPDATE SET version = excluded.version,"
            " expires_at = excluded.expires_at, document = excluded.document",
            (
                key,
                *columns_of(key, stored_document),
                json.dumps(stored_document, separators=(",", ":")),
            ),
        )
        db.execute("UPDATE meta SET last_version = ?", (version,))
        return version

    def _replace(self, contents: Contents, key: str | None) -> None:
        """Put a new data file holding ``contents`` in place; the caller holds the lock.

        Built in a temp file beside it, synced, then renamed over the path: a crash leaves
        the old file (or none) or the new one, whole.
        """
        with self._boundary("write", key):
            self._sweep_temp_files()
            fd, temp = self._open_temp_file()
            try:
                os.close(fd)
                build(temp, contents.records.items(), contents.last_version)
                fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(temp, self._path)
            except BaseException:
                for leftover in (temp, *(temp + suffix for suffix in _COMPANIONS)):
                    with contextlib.suppress(OSError):
                        os.unlink(leftover)
                raise
        try:
            self._fsync_directory()
        except OSError as exc:
            # The new file is in place and readers see it, but a power cut may undo the
            # rename: say so, so the caller keeps its own copy until a later write lands.
            raise StoreUnavailable(
                f"wrote {self._path} for key {key!r} but could not sync its directory "
                f"({_describe(exc)}); the write may not survive a power cut",
                key=key,
            ) from exc

    def _open_temp_file(self) -> tuple[int, str]:
        while True:
            temp = os.path.join(self._dir, f"{self._temp_prefix}{secrets.token_hex(8)}.tmp")
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
            except FileExistsError:
                continue
            try:
                os.fchmod(fd, _FILE_MODE)  # exactly 0600, whatever the umask
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
            return fd, temp

    def _sweep_temp_files(self) -> None:
        # Temp files are only made under the lock, which the caller holds: any found now
        # was left by a writer that was killed mid-write.
        with contextlib.suppress(OSError), os.scandir(self._dir) as entries:
            for entry in entries:
                if self._temp_name.fullmatch(entry.name):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

    def _fsync_directory(self) -> None:
        # Makes the rename itself durable: without it a power cut may bring the old file back.
        fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # a filesystem that cannot sync directories
                raise
        finally:
            os.close(fd)
