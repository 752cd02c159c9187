"""The file's JSON shape, decoded and encoded without I/O.

A file store holds one JSON object::

    {"format": "credkeeper.file", "format_version": 1, "last_version": 7,
     "records": {"<key>": {...Record.to_document()..., "version": 7}}}

``last_version`` is the highest version ever handed out in this file. Versions come from it
rather than from each record, so a key deleted and created again never gets back a version
an old reader still holds (no ABA on compare-and-swap). It is optional on read: a file
without it continues from the highest version it holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeGuard

from credkeeper import Record, StoreCorrupted

__all__ = ["FORMAT", "FORMAT_VERSION", "Contents", "decode", "encode", "record_of", "version_of"]

FORMAT = "credkeeper.file"
FORMAT_VERSION = 1


@dataclass(slots=True)
class Contents:
    """A decoded file: the raw record documents by key, and the version counter.

    Record documents stay raw, so a damaged record fails only the calls that touch its key,
    and a write carries the other records over byte for byte.
    """

    records: dict[str, Any]
    last_version: int

    def next_version(self, current: int | None) -> int:
        """A version above every one this file has handed out, ``current`` included."""
        return max(self.last_version, current or 0) + 1


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def decode(raw: bytes, *, path: str, key: str | None = None) -> Contents:
    """Parse a whole file; anything that is not a credkeeper file raises StoreCorrupted.

    ``path`` and ``key`` only name the file and the credential in error messages.
    """

    def corrupted(reason: str) -> StoreCorrupted:
        return StoreCorrupted(
            f"{path} is not a usable credkeeper file store ({reason}); "
            "it was left untouched: move it aside or point the store at another path",
            key=key,
        )

    if not raw.strip():
        raise corrupted("the file is empty" if not raw else "the file holds only whitespace")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        # ValueError covers both JSONDecodeError and UnicodeDecodeError.
        raise corrupted("the file is not valid JSON") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise corrupted(f"no 'format': {FORMAT!r} marker; it was written by something else")
    format_version = data.get("format_version")
    if format_version != FORMAT_VERSION or not _is_int(format_version):
        raise corrupted(
            f"format_version is {format_version!r}, this credkeeper reads {FORMAT_VERSION}; "
            "a newer credkeeper may have written it"
        )
    records = data.get("records")
    if not isinstance(records, dict):
        raise corrupted("'records' is not a JSON object")
    last_version = data.get("last_version")
    if last_version is None:
        versions = [doc.get("version") for doc in records.values() if isinstance(doc, dict)]
        last_version = max([v for v in versions if _is_int(v)], default=0)
    elif not _is_int(last_version) or last_version < 0:
        raise corrupted("'last_version' is not a non-negative integer")
    return Contents(records=records, last_version=last_version)


def encode(contents: Contents) -> bytes:
    """The file's bytes for ``contents``."""
    data = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "last_version": contents.last_version,
        "records": contents.records,
    }
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode("ascii") + b"\n"


def version_of(key: str, document: object) -> int:
    """The stored version of the record document under ``key``; StoreCorrupted if it has none."""
    if not isinstance(document, dict):
        raise StoreCorrupted(
            f"stored record for key {key!r} is not a JSON object; it was not written by credkeeper",
            key=key,
        )
    version = document.get("version")
    if not _is_int(version) or version < 1:
        raise StoreCorrupted(
            f"stored record for key {key!r} has a bad 'version' field; "
            "it was not written by credkeeper",
            key=key,
        )
    return version


def record_of(key: str, document: object) -> Record:
    """The :class:`Record` a stored document holds, its version as a string."""
    version = version_of(key, document)
    assert isinstance(document, dict)  # checked by version_of
    return Record.from_document(key, document, version=str(version))
