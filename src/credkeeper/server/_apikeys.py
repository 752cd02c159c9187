"""API keys for ``credkeeper serve``: who may call which routes, for which credential keys.

An API key file holds one JSON object a line, one line per key::

    {"name": "web", "hash": "sha256:<hex>", "scopes": ["messages"], "keys_matching": "acme:*",
     "created_at": "2026-01-01T12:00:00Z"}

The file never holds a key, only the SHA-256 digest of it: a key is ``ck_`` followed by 256
random bits, so a plain hash is as strong as a slow password hash would be (there is nothing to
guess), and checking a request costs one digest. Keys are compared in constant time, against
every line, so the time a check takes says nothing about which key nearly matched.

Writers serialise on an ``flock`` of a ``<file>.lock`` beside it, read the file whole, and put
the new content in place with a synced temp file and ``os.replace``: concurrent ``create`` calls
all land, and a crash leaves the old file or the new one, never half of one. The file is
written with mode 0600; a file group or others may write is refused when loaded, since whoever
can write it can grant themselves any scope.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from credkeeper._exceptions import ConfigurationError
from credkeeper._files import NotRegularFile, atomic_write, make_private_directories, open_regular

__all__ = [
    "KEY_PREFIX",
    "SCOPES",
    "ApiKey",
    "ApiKeys",
    "create_api_key",
    "list_api_keys",
    "revoke_api_key",
]

#: Every scope an API key may hold; each route of the service requires one (or none).
SCOPES: frozenset[str] = frozenset(
    {"messages", "credentials:read", "credentials:write", "admin", "metrics"}
)

#: What every API key starts with, so that a leaked one is recognisable (secret scanners).
KEY_PREFIX = "ck_"

_HASH_PREFIX = "sha256:"
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
# Names show in listings and audit lines: short, printable, no spaces or quotes to escape.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")
_FIELDS = frozenset({"name", "hash", "scopes", "keys_matching", "created_at"})
_FILE_MODE = 0o600
# An API key file of a few thousand keys is a few hundred kilobytes; refuse to read a runaway one.
_MAX_FILE = 16 << 20


def _scope_list() -> str:
    return ", ".join(sorted(SCOPES))


def _check_name(name: object, what: str = "API key name") -> str:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise ConfigurationError(
            f"{what} {name!r} is not usable; give 1 to 64 letters, digits and . _ : @ -, "
            "starting with a letter or digit"
        )
    return name


def _check_scopes(scopes: object, what: str = "API key scopes") -> frozenset[str]:
    if isinstance(scopes, str) or not isinstance(scopes, Iterable):
        raise ConfigurationError(
            f"{what} must be a list of scope names, not {type(scopes).__name__}; "
            f"give any of {_scope_list()}"
        )
    given = list(scopes)
    unknown = sorted(
        repr(scope) for scope in given if not isinstance(scope, str) or scope not in SCOPES
    )
    if unknown:
        raise ConfigurationError(
            f"{what} holds unknown scope {', '.join(unknown)}; give any of {_scope_list()}"
        )
    if not given:
        raise ConfigurationError(
            f"{what} is empty, so the key could call nothing; give at least one of {_scope_list()}"
        )
    return frozenset(given)


def _check_glob(keys_matching: object, what: str = "API key keys_matching") -> str | None:
    if keys_matching is None:
        return None
    if not isinstance(keys_matching, str) or not keys_matching.strip():
        raise ConfigurationError(
            f"{what} {keys_matching!r} is not a glob; give a pattern such as "
            "'acme:*' (fnmatch, case-sensitive), or none for every credential key"
        )
    return keys_matching


@dataclass(frozen=True, slots=True)
class ApiKey:
    """What one API key may do: its ``scopes``, over the credential keys ``keys_matching``.

    ``keys_matching`` is an ``fnmatch`` glob (case-sensitive) limiting the key to one tenant's
    credentials; None lets it reach every credential key. ``created_at`` is informative only
    and takes no part in comparisons. Invalid fields raise ConfigurationError naming the fix.
    """

    name: str
    scopes: frozenset[str]
    keys_matching: str | None = None
    created_at: datetime | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_name(self.name)
        # A set or list is accepted and kept as a frozenset, so instances stay hashable.
        object.__setattr__(self, "scopes", _check_scopes(self.scopes))
        _check_glob(self.keys_matching)
        if self.created_at is not None and self.created_at.utcoffset() is None:
            raise ConfigurationError("API key created_at must be an aware datetime, not naive")

    def allows(self, scope: str) -> bool:
        """Whether this key holds ``scope``."""
        return scope in self.scopes

    def covers(self, credential_key: str) -> bool:
        """Whether this key may reach the credential stored under ``credential_key``."""
        return self.keys_matching is None or fnmatchcase(credential_key, self.keys_matching)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The API keys of one file, checked in constant time; see :meth:`load`."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Iterable[tuple[bytes, ApiKey]] = ()) -> None:
        """Keys from ``(sha256 digest, ApiKey)`` pairs; :meth:`load` is the usual way in."""
        self._entries: tuple[tuple[bytes, ApiKey], ...] = tuple(entries)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ApiKeys:
        """The keys in the API key file at ``path``.

        Raises ConfigurationError naming the file, and the line, when the file is missing,
        writable by others, or holds a line that is not a valid key.
        """
        return cls((bytes.fromhex(hashed[len(_HASH_PREFIX) :]), key) for hashed, key in _read(path))

    def verify(self, presented: str) -> ApiKey | None:
        """The key ``presented`` is, or None when it is none of them.

        Its digest is compared with every stored digest by ``hmac.compare_digest``, with no
        early exit, so the time taken does not depend on which key matched or how closely.
        """
        try:
            digest = _digest(presented)
        except (AttributeError, UnicodeEncodeError):  # not a str, or lone surrogates
            return None
        found: ApiKey | None = None
        for stored, key in self._entries:
            if hmac.compare_digest(stored, digest):
                found = key
        return found

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        names = ", ".join(key.name for _, key in self._entries)
        return f"ApiKeys([{names}])"


def create_api_key(
    path: str | os.PathLike[str],
    name: str,
    scopes: Iterable[str],
    *,
    keys_matching: str | None = None,
) -> str:
    """Make a new API key, append its hash to the file at ``path``, and return the key.

    The file (and its directory, mode 0700) is created when missing, with mode 0600. The
    returned key is the only copy: the file keeps its SHA-256 digest. Raises ConfigurationError
    for an invalid name, scope or glob, a name already in the file, or a file that does not
    read back as API keys (which is then left as it was).
    """
    created = datetime.now(UTC).replace(microsecond=0)
    api_key = ApiKey(name, _check_scopes(scopes), keys_matching, created)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    hashed = _HASH_PREFIX + _digest(key).hex()
    target = Path(path)
    make_private_directories(target.parent)
    with _locked(target):
        entries = _read(target, missing_ok=True)
        if any(existing.name == name for _, existing in entries):
            raise ConfigurationError(
                f"API key file {target} already holds a key named {name!r}; choose another "
                f"name, or revoke that key first (credkeeper apikey revoke {name} --file {target})"
            )
        _write(target, [*entries, (hashed, api_key)])
    return key


def list_api_keys(path: str | os.PathLike[str]) -> list[ApiKey]:
    """Every key in the file at ``path``, in the file's order; never a hash or a key."""
    return [key for _, key in _read(path)]


def revoke_api_key(path: str | os.PathLike[str], name: str) -> bool:
    """Remove the key named ``name`` from the file at ``path``; False when there is none."""
    target = Path(path)
    _read(target)  # a missing or damaged file is reported before a lock file is made beside it
    with _locked(target):
        entries = _read(target)
        kept = [(hashed, key) for hashed, key in entries if key.name != name]
        if len(kept) == len(entries):
            return False
        _write(target, kept)
    return True


# -- the file --------------------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _line(hashed: str, key: ApiKey) -> str:
    document: dict[str, Any] = {
        "name": key.name,
        "hash": hashed,
        "scopes": sorted(key.scopes),
        "keys_matching": key.keys_matching,
        "created_at": None if key.created_at is None else _iso(key.created_at),
    }
    return json.dumps(document) + "\n"


def _read(path: str | os.PathLike[str], *, missing_ok: bool = False) -> list[tuple[str, ApiKey]]:
    """The ``(hash, key)`` pairs of the file at ``path``; [] for a missing one if ``missing_ok``."""
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        if missing_ok:
            return []
        raise ConfigurationError(
            f"API key file {path} does not exist; create a key in it with "
            f"`credkeeper apikey create NAME --scope SCOPE --file {path}`"
        ) from None
    except NotRegularFile as exc:
        raise ConfigurationError(f"API key file {exc}; give the path of a regular file") from None
    with os.fdopen(fd, "rb") as handle:
        mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        if os.name == "posix" and mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigurationError(
                f"API key file {path} has mode {mode:04o}: others may write it and grant "
                f"themselves any scope; run chmod 600 {path}"
            )
        data = handle.read(_MAX_FILE + 1)
    if len(data) > _MAX_FILE:
        raise ConfigurationError(f"API key file {path} is larger than {_MAX_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigurationError(f"API key file {path} is not UTF-8 text") from None
    entries: list[tuple[str, ApiKey]] = []
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            hashed, key = _parse_line(line)
        except ConfigurationError as exc:
            raise ConfigurationError(f"API key file {path}, line {number}: {exc}") from None
        if key.name in names:
            raise ConfigurationError(
                f"API key file {path}, line {number}: the name {key.name!r} is already used "
                "by an earlier line; remove one of them"
            )
        names.add(key.name)
        entries.append((hashed, key))
    return entries


def _parse_line(line: str) -> tuple[str, ApiKey]:
    try:
        document = json.loads(line)
    except ValueError:
        raise ConfigurationError("not a JSON object") from None
    if not isinstance(document, dict):
        raise ConfigurationError("not a JSON object")
    unknown = sorted(set(document) - _FIELDS)
    if unknown:
        # Refused rather than ignored: a restriction this version does not know must not lapse.
        raise ConfigurationError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; a key holds only "
            f"{', '.join(sorted(_FIELDS))}"
        )
    for required in ("name", "hash", "scopes"):
        if required not in document:
            raise ConfigurationError(f"the field {required!r} is missing")
    hashed = document["hash"]
    if not isinstance(hashed, str) or _HASH.fullmatch(hashed) is None:
        raise ConfigurationError(
            "the field 'hash' must be 'sha256:' and 64 lowercase hex digits; "
            "make keys with `credkeeper apikey create`"
        )
    if not isinstance(document["scopes"], list):
        raise ConfigurationError(f"the field 'scopes' must be a list of any of {_scope_list()}")
    return hashed, ApiKey(
        _check_name(document["name"], "the field 'name'"),
        _check_scopes(document["scopes"], "the field 'scopes'"),
        _check_glob(document.get("keys_matching"), "the field 'keys_matching'"),
        _parse_time(document.get("created_at")),
    )


def _parse_time(value: object) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.utcoffset() is None:
        raise ConfigurationError(
            f"the field 'created_at' must be an ISO 8601 time with its offset, such as "
            f"'2026-01-01T12:00:00Z', not {value!r}"
        )
    return moment


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock on ``path``'s lock file: one writer at a time, across processes.

    ``flock`` locks belong to an open file description, so threads of one process, each
    opening the lock file, exclude each other too.
    """
    fd = open_regular(f"{path}.lock", os.O_RDWR | os.O_CREAT, _FILE_MODE)
    try:
        try:
            # Imported here: the package imports on platforms without fcntl.
            import fcntl  # noqa: PLC0415
        except ImportError:  # pragma: no cover - Windows: single writer assumed
            pass
        else:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _write(path: Path, entries: list[tuple[str, ApiKey]]) -> None:
    """Put a file holding ``entries`` at ``path``: whole, synced, mode 0600; the caller locks."""
    atomic_write(path, "".join(_line(hashed, key) for hashed, key in entries).encode("utf-8"))
