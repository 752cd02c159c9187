"""``FileStore``: many credentials in one JSON file, safe for threads and processes on one host."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shlex
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

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

from ._format import Contents, decode, encode, record_of, version_of

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


def _describe(exc: Exception) -> str:
    reason = getattr(exc, "strerror", None) or type(exc).__name__
    filename = getattr(exc, "filename", None)
    return f"{reason} ({filename})" if filename else reason


class FileStore(kit.ClosingStore):
    """A :class:`~credkeeper.CredentialStore` keeping every record in one JSON file.

    The embedded default: no server, safe for many threads and processes on one host.
    Writes take an exclusive ``flock`` on a sibling ``<path>.lock`` file, re-read the file
    under it, compare versions, and replace the file atomically (temp file, ``fsync``,
    ``os.replace``, directory ``fsync``); a crash leaves the old file or the new one, never
    a mix. Reads take no lock: an atomic replace means they see one whole file or the other.

    Token fields are kept as given; the engine seals them when it has a key ring.
    The whole file is rewritten on every write, which suits up to a few thousand keys.

    ``create``: a missing file reads as empty and its directory is made (mode 0700) on the
    first write; with ``create=False`` a missing file raises ``StoreUnavailable``.
    ``lock_timeout``: seconds a write waits for the lock before ``StoreUnavailable``; inside
    an engine call it waits no longer than the call's budget (:func:`credkeeper.time_remaining`).

    Only the owner may write the directory holding the file: one group or others can write is
    refused with ``ConfigurationError``. A symbolic link, FIFO or any other non-regular file
    planted as the data or lock file is never followed or read: ``StoreCorrupted`` names it.
    A damaged record fails only the calls that read its key; ``scan_due`` skips it with a
    warning, and :meth:`damaged_records` lists every one.
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
        self._lock_path = f"{self._path}.lock"
        self._temp_prefix = f".{name}."
        self._temp_name = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{16}}\.tmp")
        self._create: bool = options["create"]
        self._lock_timeout: float = options["lock_timeout"]
        # Threads of one process queue here instead of all polling the file lock.
        self._thread_lock = threading.Lock()
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
        """See :meth:`CredentialStore.get`; reads the file without locking."""
        key = kit.check_key(key)
        self._check_open(key)
        document = self._read(key).records.get(key)
        return None if document is None else record_of(key, document)

    def put(self, record: Record) -> Record:
        """See :meth:`CredentialStore.put`; compares and writes under the file lock."""
        key = kit.check_record(record).key
        self._check_open(key)
        document = record.to_document()
        # What get() will return: times in UTC, to the millisecond.
        readback = Record.from_document(key, document, version="0")
        with self._locked(key):
            contents = self._read(key)
            current = contents.records.get(key)
            stored = None if current is None else version_of(key, current)
            if record.version != (None if stored is None else str(stored)):
                raise self._conflict(key, expected=record.version, stored=stored)
            version = contents.next_version(stored)
            contents.records[key] = {**document, "version": version}
            contents.last_version = version
            self._write(contents, key)
        return readback.replace(version=str(version))

    def delete(self, key: str) -> bool:
        """See :meth:`CredentialStore.delete`; a damaged record can be deleted too."""
        key = kit.check_key(key)
        self._check_open(key)
        # An absent key needs no lock: the lock-free read is a consistent snapshot.
        if key not in self._read(key).records:
            return False
        with self._locked(key):
            contents = self._read(key)
            if contents.records.pop(key, None) is None:
                return False
            self._write(contents, key)
        return True

    def scan_due(self, before: datetime) -> Iterator[str]:
        """See :meth:`CredentialStore.scan_due`; reads the file once, when called."""
        kit.check_moment("before", before)
        self._check_open(None)
        due: list[str] = []
        for key, document in self._read(None).records.items():
            try:
                record = record_of(key, document)
            except StoreCorrupted as exc:
                # One damaged record must not hide every other key from the sweeper and status.
                logger.warning("scan_due skips a damaged record in %s: %s", self._path, exc)
                continue
            if record.expires_at <= before:
                due.append(key)
        return iter(due)

    def damaged_records(self) -> dict[str, str]:
        """Every key whose stored record cannot be read, with the reason; read from the file now.

        ``scan_due`` skips these records (logging a warning for each), ``get`` raises
        ``StoreCorrupted`` naming the key, and ``delete`` removes one. ``credkeeper status``
        lists them. The reasons name keys and fields, never a value.
        """
        self._check_open(None)
        damaged: dict[str, str] = {}
        for key, document in self._read(None).records.items():
            try:
                record_of(key, document)
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
        """Mark the store closed; it holds no handle between calls, so nothing else is released."""
        self._closed = True

    # -- reading ------------------------------------------------------------------------------

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
        """Any other OSError inside the block as StoreUnavailable: could not ``action`` the file.

        The store's whole mapping of OS errors, but for the few that mean something else where
        they are raised: a missing file (an empty store, or the create=False error), a lock
        held by another process (wait), a directory that could not be synced (written, but
        maybe not durable).
        """

        def translate(exc: Exception) -> StoreUnavailable:
            for_key = "" if key is None else f" for key {key!r}"
            return StoreUnavailable(
                f"could not {action} {self._path}{for_key}: {_describe(exc)}", key=key
            )

        return kit.error_boundary(translate, OSError)

    def _read(self, key: str | None) -> Contents:
        self._check_directory()
        with self._boundary("read", key):
            try:
                fd = self._open_regular(self._path, os.O_RDONLY, key)
            except FileNotFoundError as exc:
                if self._create:
                    return Contents(records={}, last_version=0)
                raise self._missing(key) from exc
            with os.fdopen(fd, "rb") as file:
                raw = file.read()
        return decode(raw, path=self._path, key=key)

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

    # -- writing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        # One budget per engine call: the wait ends at lock_timeout or at the call's deadline,
        # whichever comes first, so a held lock cannot outlast the call that waits for it.
        budget = time_remaining()
        limit = self._lock_timeout if budget is None else min(self._lock_timeout, budget)
        deadline = time.monotonic() + limit
        if not self._thread_lock.acquire(timeout=limit):
            raise self._lock_timed_out(key, limit)
        try:
            fd = self._open_lock_file(key)
            try:
                self._flock(fd, deadline, limit, key)
                yield
            finally:
                # Closing the only descriptor of this open file releases the flock.
                with contextlib.suppress(OSError):
                    os.close(fd)
        finally:
            self._thread_lock.release()

    def _open_lock_file(self, key: str) -> int:
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

    def _flock(self, fd: int, deadline: float, limit: float, key: str) -> None:
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

    def _lock_timed_out(self, key: str, limit: float) -> StoreUnavailable:
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

    def _conflict(self, key: str, *, expected: str | None, stored: int | None) -> ConflictError:
        if expected is None:
            reason = "already exists; get() it and put() with its version"
        elif stored is None:
            reason = f"was deleted since version {expected} was read"
        else:
            reason = f"changed since it was read: version {expected} is now {stored}"
        return ConflictError(f"the record under key {key!r} {reason}", key=key)

    def _write(self, contents: Contents, key: str) -> None:
        """Replace the file with ``contents``; the caller holds the lock."""
        payload = encode(contents)
        with self._boundary("write", key):
            self._sweep_temp_files()
            fd, temp = self._open_temp_file()
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(payload)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temp, self._path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
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
