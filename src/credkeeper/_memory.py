"""``MemoryStore``: a thread-safe in-process store, for tests and single-process tools."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from ._exceptions import ConfigurationError, ConflictError
from ._record import Record, check_key, check_moment
from .storekit import ClosingStore, check_record

__all__ = ["MemoryStore"]


class MemoryStore(ClosingStore):
    """A :class:`CredentialStore` in a dict, guarded by a lock. Nothing survives the process."""

    def __init__(self) -> None:
        self._records: dict[str, Record] = {}
        self._lock = threading.Lock()
        self._versions = itertools.count(1)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryStore:
        """``memory://``: a new, empty store. It takes no options."""
        parts = urlsplit(url)
        if parts.netloc or parts.path not in ("", "/") or parts.query:
            raise ConfigurationError(f"memory:// takes no host, path or query, got {url!r}")
        if options:
            raise ConfigurationError(f"memory:// takes no options, got {sorted(options)}")
        return cls()

    def __repr__(self) -> str:
        return f"MemoryStore(<{len(self._records)} records>)"

    def get(self, key: str) -> Record | None:
        """See :meth:`CredentialStore.get`."""
        with self._lock:
            return self._records.get(check_key(key))

    def put(self, record: Record) -> Record:
        """See :meth:`CredentialStore.put`."""
        key = check_record(record).key
        with self._lock:
            current = self._records.get(key)
            stored_version = None if current is None else current.version
            if stored_version != record.version:
                raise ConflictError(
                    f"the record under key {key!r} changed since it was read", key=key
                )
            stored = record.replace(version=str(next(self._versions)))
            self._records[key] = stored
            return stored

    def delete(self, key: str) -> bool:
        """See :meth:`CredentialStore.delete`."""
        with self._lock:
            return self._records.pop(check_key(key), None) is not None

    def scan_due(self, before: datetime) -> Iterator[str]:
        """See :meth:`CredentialStore.scan_due`; iterates over a snapshot of the keys."""
        check_moment("before", before)
        with self._lock:
            due = [key for key, record in self._records.items() if record.expires_at <= before]
        return iter(due)

    def close(self) -> None:
        """Nothing to release."""
