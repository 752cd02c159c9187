"""The rescue journal: new tokens on local disk until the store has them.

A refresh consumes the old refresh token at the provider. From that moment the new one exists
only in the provider's answer; if the process dies or the store is down before the store write,
the user is logged out. So the engine writes the answer here first (encrypted, fsynced), then to
the store, then discards the entry. Entries left behind are applied on the next use of their key,
in this process or the next one to start.

The journal trusts its directory: whoever can write it could remove entries, or plant a key file
and entries sealed under it. So the directory must be writable by its owner only (it is refused
otherwise), directories the journal makes are mode 0700 whatever the umask, and files in it are
read only when they are regular files reached without following a symbolic link.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shlex
import stat
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from ._credentials import Credentials, from_epoch_ms, to_epoch_ms
from ._exceptions import ConfigurationError, CredentialsError, DecryptionError
from ._files import (
    NotRegularFile,
    atomic_write,
    fsync_directory,
    make_private_directories,
    open_regular,
    synced_temp_file,
    writable_by_others,
)
from ._keyring import KeyRing
from ._secret import Secret

__all__ = ["RescueEntry", "RescueJournal", "default_journal_dir", "fingerprint"]

logger = logging.getLogger("credkeeper.journal")

_FORMAT = "credkeeper.rescue"
_FIELD = "rescue"
_KEY_FILE = "journal.key"
# An entry offered to a store that does not hold the token it replaces, and this old, belongs
# to another store or to a credential replaced since; it cannot help anyone any more.
_RETENTION = timedelta(days=30)
# The key id of a sealed value (``ck1:<key id>:<body>``), to name it in a warning.
_SEALED_KEY_ID = re.compile(r"ck1:([A-Za-z0-9_-]{1,32}):")
# Creating the key file loops only while other processes create or replace it at the same time.
_KEY_FILE_ATTEMPTS = 5


def fingerprint(token: Secret) -> str:
    """A one-way name for a token, to tell which stored token a rescue entry replaces."""
    digest = hashlib.sha256(b"credkeeper-fingerprint\x00" + token.get_secret_value().encode())
    return digest.hexdigest()[:40]


def default_journal_dir() -> Path:
    """``$CREDKEEPER_JOURNAL``, else ``$XDG_STATE_HOME/credkeeper/journal`` (``~/.local/state``)."""
    explicit = os.environ.get("CREDKEEPER_JOURNAL")
    if explicit:
        return Path(explicit)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "credkeeper" / "journal"


@dataclass(frozen=True, slots=True)
class RescueEntry:
    """New credentials for ``key`` that replace the stored refresh token ``replaces`` names."""

    id: str
    key: str
    credentials: Credentials
    replaces: str
    created_at: datetime


class _Skipped(Exception):
    """A file in the journal that cannot be applied; the message names it, the cause and the fix."""


class RescueJournal:
    """A directory of encrypted rescue entries, one file each, shared by the processes of a host.

    Entries are sealed with ``keyring``; without one, the journal keeps its own key in
    ``journal.key`` (mode 0600) beside the entries, so an entry copied alone reveals nothing.
    Files are written with temp file, fsync, ``os.replace`` and a directory fsync; the key file
    is linked into place complete, so a process never reads half of it.
    A directory that group or others can write is refused with a ``ConfigurationError``.
    :meth:`problems` reports what is wrong without raising, for ``credkeeper status``.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, keyring: KeyRing | None = None
    ) -> None:
        self.directory = Path(directory)
        self._keyring = keyring
        # Without a key ring the journal seals under its own key file, read or made on first use.
        self._own_key = keyring is None
        self._lock = threading.Lock()
        self._index: dict[str, dict[str, RescueEntry]] | None = None

    def __repr__(self) -> str:
        return f"RescueJournal({str(self.directory)!r})"

    # -- operations the engine's drivers perform --------------------------------------

    def pending(self, key: str, *, rescan: bool = False) -> list[RescueEntry]:
        """Entries for ``key``, oldest first; ``rescan`` reads the directory again."""
        with self._lock:
            if self._index is None or rescan:
                self._index = self._scan()
            return sorted(self._index.get(key, {}).values(), key=lambda entry: entry.id)

    def has_pending(self, key: str) -> bool:
        """Whether an entry for ``key`` is known, without touching the disk after the first scan."""
        with self._lock:
            if self._index is None:
                self._index = self._scan()
            return bool(self._index.get(key))

    def write(self, entry: RescueEntry) -> None:
        """Persist ``entry`` durably before the store is asked to take it.

        Raises ``ConfigurationError`` when the directory is writable by group or others, or the
        key file is unusable; ``OSError`` when the disk refuses.
        """
        payload = json.dumps(
            {
                "format": _FORMAT,
                "format_version": 1,
                "key": entry.key,
                "replaces": entry.replaces,
                "created_at": to_epoch_ms(entry.created_at),
                "credentials": self._ring().seal(
                    json.dumps(entry.credentials.to_wrapper()), key=entry.key, field=_FIELD
                ),
            }
        ).encode()
        self._ensure_directory()
        atomic_write(self.directory / f"{entry.id}.json", payload)
        with self._lock:
            if self._index is not None:
                self._index.setdefault(entry.key, {})[entry.id] = entry

    def discard(self, entry: RescueEntry) -> None:
        """Delete ``entry``: the store holds its tokens, or they can no longer matter."""
        try:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / f"{entry.id}.json").unlink()
            fsync_directory(self.directory)
        finally:
            # Judged either way: a file that would not go is not offered again in this process.
            self._unindex(entry)

    def forget(self, entry: RescueEntry) -> None:
        """Stop offering ``entry`` in this process, leaving its file for whoever it belongs to.

        The store it was offered to does not hold the tokens it replaces; another store
        sharing the journal may. Once its file is past retention (judged on the wall clock, as
        file times are) nobody is expected to, and the file is deleted.
        """
        path = self.directory / f"{entry.id}.json"
        if _mtime(path) < time.time() - _RETENTION.total_seconds():
            logger.info("removing rescue entry %s for key %r past retention", path.name, entry.key)
            self.discard(entry)
        else:
            self._unindex(entry)

    def _unindex(self, entry: RescueEntry) -> None:
        with self._lock:
            if self._index is not None:
                self._index.get(entry.key, {}).pop(entry.id, None)

    def count_pending(self) -> int:
        """How many entry files wait in the directory, whoever's they are (0 without one).

        Counts files without opening them, so it is cheap enough for every metrics scrape.
        """
        try:
            return sum(1 for _ in self.directory.glob("*.json"))
        except OSError:
            return 0

    @staticmethod
    def new_id() -> str:
        """A unique, time-ordered entry id."""
        return f"{time.time_ns():020d}-{secrets.token_hex(6)}"

    # -- the health report ---------------------------------------------------------------

    def problems(self) -> list[str]:
        """What stops this journal from keeping or applying tokens: one line each, with the fix.

        Lists, in this order: the directory (writable by group or others, not readable and
        writable by this user, or impossible to create); the key file, when the journal keeps
        its own key (unusable, and why); then every entry file that is skipped (unreadable, not
        a regular file, or sealed under a key this journal does not hold: a key dropped from the
        key ring, or another deployment's). An empty list means the journal is ready. Never
        raises, and only reads: asking creates neither the directory nor the key file.
        """
        found: list[str] = []
        try:
            if not self._directory_problems(found):
                return found
            ring, holder, check_seal = self._ring_for_report(found)
            for path in sorted(self.directory.glob("*.json")):
                try:
                    self._load(path, ring, holder=holder, check_seal=check_seal)
                except _Skipped as skipped:
                    found.append(str(skipped))
        except OSError as exc:
            found.append(f"cannot check the rescue journal in {self.directory}: {_reason(exc)}")
        return found

    def _directory_problems(self, found: list[str]) -> bool:
        """Append the directory's problems to ``found``; whether it exists to be looked into."""
        try:
            mode = os.stat(self.directory).st_mode
        except (FileNotFoundError, NotADirectoryError):
            blocker = _creation_blocker(self.directory)
            if blocker is not None:
                found.append(
                    f"the rescue journal's directory {self.directory} cannot be created: "
                    f"{blocker}; point CREDKEEPER_JOURNAL (or --journal) at a directory "
                    "this user can create"
                )
            return False
        if not stat.S_ISDIR(mode):
            found.append(
                f"the rescue journal's directory {self.directory} is not a directory; "
                "move it aside or point CREDKEEPER_JOURNAL (or --journal) elsewhere"
            )
            return False
        hostile = _others_can_write(self.directory)
        if hostile is not None:
            found.append(hostile)
        if not os.access(self.directory, os.R_OK | os.W_OK | os.X_OK):
            found.append(
                f"the rescue journal's directory {self.directory} is not readable and writable "
                "by this user, so new tokens cannot be journalled before the store write, nor "
                "journalled ones applied; make it this user's, mode 0700 "
                f"(`chmod 700 {shlex.quote(str(self.directory))}`)"
            )
        return True

    def _ring_for_report(self, found: list[str]) -> tuple[KeyRing | None, str, bool]:
        """The ring to try entries with, what holds it (for messages), and whether to try."""
        if not self._own_key:
            return self._keyring, self._holder(self._keyring), True
        try:
            # Read afresh, not cached: the report is about the file as it is now.
            ring = _read_key_file(self.directory / _KEY_FILE)
        except ConfigurationError as exc:
            found.append(str(exc))
            # Every entry would fail to open for this one reason, already reported.
            return None, "", False
        return ring, self._holder(ring), True

    def _holder(self, ring: KeyRing | None) -> str:
        """What holds the keys entries are opened with, for messages."""
        if not self._own_key:
            return "the key ring"
        path = self.directory / _KEY_FILE
        if ring is None:
            return f"this journal (no key ring was given, and it has no key in {path})"
        return f"the journal's own key file {path} (no key ring was given)"

    # -- internals ---------------------------------------------------------------------

    def _ensure_directory(self) -> None:
        make_private_directories(self.directory)
        hostile = _others_can_write(self.directory)
        if hostile is not None:
            raise ConfigurationError(hostile)

    def _ring(self) -> KeyRing:
        if self._keyring is None:
            self._keyring = self._local_ring()
        return self._keyring

    def _local_ring(self) -> KeyRing:
        """The journal's own key, made on first use; an empty key file gets a fresh key."""
        self._ensure_directory()
        path = self.directory / _KEY_FILE
        for _ in range(_KEY_FILE_ATTEMPTS):
            try:
                fd = _open_key_file(path)
            except FileNotFoundError:
                _create_exclusive(path, KeyRing.generate().export().encode())
                continue
            try:
                ring = _key_ring_of(path, fd)
                if ring is not None:
                    return ring
                _replace_empty_key_file(path, fd)
            finally:
                os.close(fd)
        raise ConfigurationError(
            f"the rescue journal's key file {path} kept changing while it was read; "
            "check what else writes to that directory"
        )

    def _existing_ring(self) -> KeyRing | None:
        """The ring entries are opened with, without creating a key file; None if there is none."""
        if self._keyring is None:
            self._keyring = _read_key_file(self.directory / _KEY_FILE)
        return self._keyring

    def _scan(self) -> dict[str, dict[str, RescueEntry]]:
        index: dict[str, dict[str, RescueEntry]] = {}
        if not self.directory.is_dir():
            return index
        hostile = _others_can_write(self.directory)
        if hostile is not None:
            # Entries there may have been planted: none is applied until the mode is fixed.
            logger.warning("%s; its rescue entries are left unapplied until then", hostile)
            return index
        paths = sorted(self.directory.glob("*.json"))
        if not paths:
            return index
        try:
            ring = self._existing_ring()
        except ConfigurationError as exc:
            logger.warning("skipping every rescue entry in %s: %s", self.directory, exc)
            return index
        holder = self._holder(ring)
        for path in paths:
            # However old, an entry is offered: it may hold the only copy of a refresh token
            # (a host back after a long outage). Age counts only once it is judged (forget).
            try:
                entry = self._load(path, ring, holder=holder, check_seal=True)
            except _Skipped as skipped:
                logger.warning("%s", skipped)
                continue
            if entry is None:
                continue
            index.setdefault(entry.key, {})[entry.id] = entry
        return index

    def _load(
        self, path: Path, ring: KeyRing | None, *, holder: str, check_seal: bool
    ) -> RescueEntry | None:
        """The entry in ``path``; None if it vanished; ``_Skipped`` saying why it cannot be used.

        With ``check_seal`` false only the file and its shape are checked, not its seal.
        """
        try:
            data = _read_regular(path)
        except FileNotFoundError:
            return None  # discarded by another process since the directory was listed
        except NotRegularFile as exc:
            raise _Skipped(
                f"skipping rescue entry {path}: it is {exc.what}, and the journal reads only "
                "regular files it wrote; delete it"
            ) from None
        except OSError as exc:
            raise _Skipped(f"skipping unreadable rescue entry {path}: {_reason(exc)}") from None
        try:
            document = json.loads(data)
            if not isinstance(document, dict) or document.get("format") != _FORMAT:
                raise ValueError("not a rescue entry")
            key = document["key"]
            sealed = document["credentials"]
            replaces = str(document["replaces"])
            created_at = from_epoch_ms(int(document["created_at"]))
            if not isinstance(key, str) or not isinstance(sealed, str):
                raise TypeError("not a rescue entry")
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError, CredentialsError):
            # No detail from the parser: it may quote the file, and the file holds tokens.
            raise _Skipped(
                f"skipping unreadable rescue entry {path}: it is not a rescue entry credkeeper "
                "wrote, or it was damaged; delete it"
            ) from None
        if not check_seal:
            return None
        if ring is None:
            raise _Skipped(_cannot_open(path, key, sealed, ring, holder))
        try:
            plain = ring.unseal(sealed, key=key, field=_FIELD)
        except DecryptionError:
            raise _Skipped(_cannot_open(path, key, sealed, ring, holder)) from None
        try:
            credentials = Credentials.from_wrapper(plain)
        except (CredentialsError, ValueError, TypeError):
            raise _Skipped(
                f"skipping rescue entry {path} for key {key!r}: it opened but holds no usable "
                "credentials; delete it"
            ) from None
        return RescueEntry(
            id=path.stem, key=key, credentials=credentials, replaces=replaces, created_at=created_at
        )


def _cannot_open(path: Path, key: str, sealed: str, ring: KeyRing | None, holder: str) -> str:
    """Why an entry's seal did not open, and what to do, naming no secret."""
    match = _SEALED_KEY_ID.match(sealed)
    key_id = match.group(1) if match else None
    if key_id is not None and ring is not None and key_id in ring.key_ids:
        return (
            f"skipping rescue entry {path} for key {key!r}: it does not open under key "
            f"{key_id!r}, so it was altered or copied from another credential; delete it"
        )
    sealed_under = f"key {key_id!r}" if key_id is not None else "an unknown key"
    # A key dropped from the ring and another deployment's key look the same from here.
    return (
        f"skipping rescue entry {path} for key {key!r}: it is sealed under {sealed_under}, "
        f"which {holder} does not hold. Either that key was dropped from the key ring, or the "
        "entry belongs to another deployment sharing this directory: add the old key back to "
        "CREDKEEPER_KEYS (the entry is applied on the next use of its credential), or delete "
        "the entry if it is another deployment's"
    )


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _others_can_write(directory: Path) -> str | None:
    """Why ``directory`` cannot be trusted with the journal (others can write it), or None."""
    mode = writable_by_others(directory)
    if mode is None:
        return None
    return (
        f"the rescue journal's directory {directory} is writable by group or others "
        f"(mode {mode:04o}), who could remove entries or plant a key file and entries of their "
        f"own; run `chmod go-w {shlex.quote(str(directory))}` (it should be mode 0700)"
    )


def _creation_blocker(directory: Path) -> str | None:
    """Why ``directory`` could not be made by this user, or None if it could."""
    ancestor = directory.parent
    while not os.path.exists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not os.path.isdir(ancestor):
        return f"{ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable by this user"
    return None


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path``, if it is a regular file reached without following a symlink.

    Raises ``NotRegularFile`` otherwise, and ``OSError`` (``FileNotFoundError`` included) as
    the system does.
    """
    fd = open_regular(path)
    try:
        return _read_all(fd)
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _unusable(path: Path, reason: str) -> ConfigurationError:
    return ConfigurationError(f"the rescue journal's key file {path} is unusable: {reason}")


def _open_key_file(path: Path) -> int:
    """``path`` opened for reading; ``FileNotFoundError`` when missing, else ConfigurationError."""
    try:
        return open_regular(path)
    except NotRegularFile as exc:
        raise _unusable(
            path,
            f"it is {exc.what}; remove it (a new key is made on the next write) or put the "
            "real key file there",
        ) from None
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _unusable(path, f"cannot open it ({_reason(exc)})") from None


def _key_ring_of(path: Path, fd: int) -> KeyRing | None:
    """The key ring in the open key file ``fd``; None if the file is empty."""
    try:
        mode = os.fstat(fd).st_mode
        data = _read_all(fd)
    except OSError as exc:
        raise _unusable(path, f"cannot read it ({_reason(exc)})") from None
    if not data:
        return None
    # As KeyRing.from_file: a key others can read is leaked, one they can write is theirs.
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise _unusable(
            path,
            f"it is readable or writable by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run `chmod 600 {shlex.quote(str(path))}`",
        )
    restore = (
        "restore it from a backup, or, if no rescue entry was sealed under it, move it aside "
        "(a new key is made on the next write)"
    )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # from None: the exception holds the file's bytes, key included.
        raise _unusable(path, f"it is not UTF-8 text; {restore}") from None
    try:
        return KeyRing.parse(text)
    except ConfigurationError as exc:
        raise _unusable(path, f"{exc}; {restore}") from None


def _read_key_file(path: Path) -> KeyRing | None:
    """The key ring in ``path``: None when missing or empty, ConfigurationError when unusable."""
    try:
        fd = _open_key_file(path)
    except FileNotFoundError:
        return None
    try:
        return _key_ring_of(path, fd)
    finally:
        os.close(fd)


def _replace_empty_key_file(path: Path, fd: int) -> None:
    """Give the empty key file open as ``fd`` a fresh key, unless another process already did.

    An empty key file is what a crash between creating and writing it used to leave; no entry
    can be sealed under it. Processes finding it together serialise on a lock on that file,
    and each re-checks under the lock that the name still holds that empty file, so exactly one
    writes the new key and every process then reads that one.
    """
    try:
        # Imported here: the core imports on platforms without fcntl, and this path is rare.
        import fcntl  # noqa: PLC0415
    except ImportError:
        pass  # no flock (Windows): processes finding the empty file together may each replace it
    else:
        fcntl.flock(fd, fcntl.LOCK_EX)
    opened = os.fstat(fd)
    try:
        current = os.lstat(path)
    except FileNotFoundError:
        return
    if (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino) or opened.st_size:
        return
    logger.warning("the rescue journal's key file %s was empty; writing a new key to it", path)
    atomic_write(path, KeyRing.generate().export().encode())


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def _create_exclusive(path: Path, payload: bytes) -> None:
    """Create ``path`` holding ``payload``, whole or not at all; keep it if it already exists.

    The file is written and synced under a temporary name, then linked to ``path``: a link
    never replaces an existing file, so of processes creating it together one wins, and none
    ever sees it partly written.
    """
    temp = synced_temp_file(path, payload)
    try:
        with contextlib.suppress(FileExistsError):  # another process won; its file is read
            os.link(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    fsync_directory(path.parent)
