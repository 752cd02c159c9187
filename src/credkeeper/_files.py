"""Files that hold credentials: private directories, opening only what credkeeper wrote, and
writing a file whole or not at all.

The file store, the rescue journal and the service's API key file share these rules. Whoever
can write the directory a credential file lives in can replace that file, plant a symbolic link
to one of their own, or a FIFO that blocks every reader; so the directory must be its owner's
alone, and files are opened without following links and used only when they are regular files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

__all__ = [
    "PRIVATE_DIR_MODE",
    "NotRegularFile",
    "atomic_write",
    "fsync_directory",
    "make_private_directories",
    "open_regular",
    "synced_temp_file",
    "writable_by_others",
    "write_all",
]

PRIVATE_DIR_MODE = 0o700
# O_NOFOLLOW: a symbolic link planted at a file's name is refused, not followed.
# O_NONBLOCK: a FIFO planted there opens at once (and is then refused) instead of blocking.
_SAFE_OPEN = (
    getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
)


class NotRegularFile(Exception):
    """A symbolic link, FIFO, socket or device where a regular file should be.

    ``what`` says which, for a message: ``"a symbolic link"`` or ``"not a regular file"``.
    """

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        super().__init__(f"{path} is {what}")
        self.path = path
        self.what = what


def make_private_directories(directory: str | os.PathLike[str]) -> None:
    """Make ``directory`` and its missing parents, each mode 0700 whatever the umask.

    ``Path.mkdir(mode, parents=True)`` applies ``mode`` to the last directory only; the parents
    would get the umask's mode, which may let others in.
    """
    missing: list[Path] = []
    current = Path(directory)
    while not os.path.exists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # another process made it first
        # The umask may have narrowed the mode; credentials want exactly 0700.
        os.chmod(path, PRIVATE_DIR_MODE)


def writable_by_others(directory: str | os.PathLike[str]) -> int | None:
    """The permission bits of ``directory`` when group or others may write it, else None.

    Only the directory holding the files counts: a sticky, world-writable parent such as /tmp
    is fine, since nobody else can rename or remove what is inside a directory they cannot
    write. A missing or unreachable directory gives None: whatever uses it reports that.
    """
    if os.name != "posix":
        return None  # Windows keeps access rights in ACLs these bits do not describe
    try:
        mode = stat.S_IMODE(os.stat(directory).st_mode)
    except OSError:
        return None
    return mode if mode & (stat.S_IWGRP | stat.S_IWOTH) else None


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """``path`` opened with ``flags``, if it is a regular file reached without a symbolic link.

    Raises :class:`NotRegularFile` for a link, FIFO, socket or device, ``IsADirectoryError``
    for a directory, and any other ``OSError`` (``FileNotFoundError`` included) as it comes.
    """
    try:
        fd = os.open(path, flags | _SAFE_OPEN, mode)
    except OSError as exc:
        # O_NOFOLLOW fails with ELOOP on Linux and macOS, EMLINK on FreeBSD.
        if exc.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            raise NotRegularFile(path, "a symbolic link") from None
        if exc.errno == errno.ENXIO:  # a socket
            raise NotRegularFile(path, "not a regular file") from None
        raise
    try:
        kind = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if stat.S_ISREG(kind):
        return fd
    os.close(fd)
    if stat.S_ISDIR(kind):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    raise NotRegularFile(path, "not a regular file")


def write_all(fd: int, payload: bytes) -> None:
    """Write all of ``payload`` to ``fd``, however few bytes each ``os.write`` takes."""
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view) :]


def fsync_directory(directory: Path) -> None:
    """Sync ``directory``, so that a file just renamed into it survives a crash."""
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def synced_temp_file(path: Path, payload: bytes) -> str:
    """A new file beside ``path`` holding ``payload``, mode 0600, on disk; its name."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        write_all(fd, payload)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    os.close(fd)
    return temp


def atomic_write(path: Path, payload: bytes) -> None:
    """Put ``payload`` at ``path`` (mode 0600): a crash leaves the old file or the new one."""
    temp = synced_temp_file(path, payload)
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_directory(path.parent)
