"""The data file's SQLite shape (format 2): schema, row decoding, and building a new file.

One table keeps each record as its document (``Record.to_document()`` plus ``version``) in
JSON text, beside the two fields queries need: ``version`` for compare-and-swap and
``expires_at`` (epoch ms, indexed) for ``scan_due``. Both are NULL for a record carried over
from a format 1 file that does not decode, so the damage stays the record's own. A one-row
``meta`` table holds the format marker and ``last_version``, the highest version ever handed
out, so a key deleted and created again never gets back a version an old reader holds.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from credkeeper import StoreCorrupted

from ._format import FORMAT, record_of, version_of

__all__ = ["FORMAT_VERSION", "SCHEMA", "build", "columns_of", "document_of", "read_meta"]

FORMAT_VERSION = 2

SCHEMA = (
    "CREATE TABLE meta (format TEXT NOT NULL, format_version INTEGER NOT NULL,"
    " last_version INTEGER NOT NULL)",
    "CREATE TABLE records (key TEXT PRIMARY KEY, version INTEGER, expires_at INTEGER,"
    " document TEXT NOT NULL) WITHOUT ROWID",
    # Covers scan_due's walk in key order, so a sweep reads keys and expiries, not documents.
    "CREATE INDEX records_due ON records (key, expires_at)",
)


def columns_of(key: str, document: Any) -> tuple[int | None, int | None]:
    """``version`` and ``expires_at`` of a stored document, each None when it does not decode.

    A record with a sound version but another bad field keeps its version, so a put with that
    version may overwrite it, as with format 1.
    """
    try:
        version = version_of(key, document)
    except StoreCorrupted:
        return None, None
    try:
        record_of(key, document)
    except StoreCorrupted:
        return version, None
    return version, document["expires_at"]


def document_of(key: str, text: str) -> Any:
    """The stored document under ``key``; StoreCorrupted if the row's text is not JSON."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise StoreCorrupted(
            f"stored record for key {key!r} is not valid JSON; it was not written by credkeeper",
            key=key,
        ) from None


def read_meta(db: sqlite3.Connection, *, path: str, key: str | None) -> int:
    """Check the format marker of an open data file and return its ``last_version``.

    A SQLite file that credkeeper did not write, or a newer format, raises StoreCorrupted in
    the same words as a foreign or newer format 1 file.
    """

    def corrupted(reason: str) -> StoreCorrupted:
        return StoreCorrupted(
            f"{path} is not a usable credkeeper file store ({reason}); "
            "it was left untouched: move it aside or point the store at another path",
            key=key,
        )

    foreign = f"no 'format': {FORMAT!r} marker; it was written by something else"
    try:
        rows = db.execute("SELECT format, format_version, last_version FROM meta").fetchall()
    except sqlite3.OperationalError:
        # No meta table (or one of another shape): some other program's database.
        raise corrupted(foreign) from None
    if len(rows) != 1 or rows[0][0] != FORMAT:
        raise corrupted(foreign)
    _, format_version, last_version = rows[0]
    if format_version != FORMAT_VERSION:
        raise corrupted(
            f"format_version is {format_version!r}, this credkeeper reads {FORMAT_VERSION}; "
            "a newer credkeeper may have written it"
        )
    if not isinstance(last_version, int) or last_version < 0:
        raise corrupted("'last_version' is not a non-negative integer")
    return last_version


def build(path: str, records: Iterable[tuple[str, Any]], last_version: int) -> None:
    """Write a complete data file at ``path`` (a new, empty file) holding ``records``.

    The file is left in WAL mode, so readers of the finished store never wait for a writer.
    The caller makes it durable (``fsync``) and moves it into place.
    """
    db = sqlite3.connect(path, isolation_level=None)
    try:
        # The file is private to its builder until it is moved into place: no journal needed.
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("BEGIN")
        for statement in SCHEMA:
            db.execute(statement)
        db.execute("INSERT INTO meta VALUES (?, ?, ?)", (FORMAT, FORMAT_VERSION, last_version))
        db.executemany(
            "INSERT INTO records VALUES (?, ?, ?, ?)",
            (
                (key, *columns_of(key, document), json.dumps(document, separators=(",", ":")))
                for key, document in records
            ),
        )
        db.execute("COMMIT")
        # Persistent in the file's header: every later connection opens it in WAL mode.
        db.execute("PRAGMA journal_mode = WAL")
    finally:
        db.close()
