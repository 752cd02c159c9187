"""The rescue journal: new tokens on local disk until the store has them.

A refresh consumes the old refresh token at the provider. From that moment the new one exists
only in the provider's answer; if the process dies or the store is down before the store write,
the user is logged out. So the engine writes the answer here first (encrypted, fsynced), then to
the store, then discards the entry. Entries left behind are applied on the next use of their key,
in this process or the next one to start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from ._credentials import Credentials, from_epoch_ms, to_epoch_ms
from ._exceptions import ConfigurationError, CredentialsError, DecryptionError
from ._keyring import KeyRing
from ._secret import Secret

__all__ = ["RescueEntry", "RescueJournal", "default_journal_dir", "fingerprint"]

logger = logging.getLogger("credkeeper.journal")

_FORMAT = "credkeeper.rescue"
_FIELD = "rescue"
_KEY_FILE = "journal.key"
# An entry whose consumed token is not in the store after this long belongs to another store
# or a credential replaced since; it cannot help anyone any more.
_RETENTION = timedelta(days=30)


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


class RescueJournal:
    """A directory of encrypted rescue entries, one file each, shared by the processes of a host.

    Entries are sealed with ``keyring``; without one, the journal keeps its own key in
    ``journal.key`` (mode 0600) beside the entries, so an entry copied alone reveals nothing.
    Files are written with temp file, fsync, ``os.replace`` and a directory fsync.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, keyring: KeyRing | None = None
    ) -> None:
        self.directory = Path(directory)
        self._keyring = keyring
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
        """Persist ``entry`` durably before the store is asked to take it."""
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
        _atomic_write(self.directory / f"{entry.id}.json", payload)
        with self._lock:
            if self._index is not None:
                self._index.setdefault(entry.key, {})[entry.id] = entry

    def discard(self, entry: RescueEntry) -> None:
        """Delete ``entry``: the store holds its tokens, or they can no longer matter."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{entry.id}.json").unlink()
        _fsync_directory(self.directory)
        self.forget(entry)

    def forget(self, entry: RescueEntry) -> None:
        """Stop offering ``entry`` in this process, leaving its file for whoever it belongs to."""
        with self._lock:
            if self._index is not None:
                self._index.get(entry.key, {}).pop(entry.id, None)

    @staticmethod
    def new_id() -> str:
        """A unique, time-ordered entry id."""
        return f"{time.time_ns():020d}-{secrets.token_hex(6)}"

    # -- internals ---------------------------------------------------------------------

    def _ensure_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _ring(self) -> KeyRing:
        if self._keyring is None:
            self._keyring = self._local_ring()
        return self._keyring

    def _local_ring(self) -> KeyRing:
        self._ensure_directory()
        path = self.directory / _KEY_FILE
        if not path.exists():
            fresh = KeyRing.generate().export().encode()
            with contextlib.suppress(FileExistsError):  # another process made one first
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, fresh)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                _fsync_directory(self.directory)
        try:
            return KeyRing.from_file(path)
        except ConfigurationError as exc:
            raise ConfigurationError(f"the rescue journal's key file is unusable: {exc}") from None

    def _scan(self) -> dict[str, dict[str, RescueEntry]]:
        index: dict[str, dict[str, RescueEntry]] = {}
        if not self.directory.is_dir():
            return index
        # Judged on file times, the wall clock's, whatever clock stamped the entries.
        cutoff = time.time() - _RETENTION.total_seconds()
        for path in sorted(self.directory.glob("*.json")):
            entry = self._read(path)
            if entry is None:
                continue
            if _mtime(path) < cutoff:
                logger.info(
                    "removing rescue entry %s for key %r past retention", path.name, entry.key
                )
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            index.setdefault(entry.key, {})[entry.id] = entry
        return index

    def _read(self, path: Path) -> RescueEntry | None:
        try:
            document = json.loads(path.read_bytes())
            if document.get("format") != _FORMAT:
                raise ValueError("not a rescue entry")
            key = document["key"]
            sealed = document["credentials"]
            plain = self._ring().unseal(sealed, key=key, field=_FIELD)
            return RescueEntry(
                id=path.stem,
                key=key,
                credentials=Credentials.from_wrapper(plain),
                replaces=str(document["replaces"]),
                created_at=from_epoch_ms(int(document["created_at"])),
            )
        except DecryptionError:
            # Sealed under another deployment's key ring: not ours to apply.
            logger.debug("skipping rescue entry %s sealed under another key ring", path.name)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, CredentialsError):
            logger.warning("skipping unreadable rescue entry %s", path.name)
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, payload: bytes) -> None:
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, payload)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_directory(path.parent)
