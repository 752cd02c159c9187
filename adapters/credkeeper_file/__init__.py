"""credkeeper's file store: many credentials in one JSON file, the embedded default.

Registered as the ``file`` scheme of the ``credkeeper.stores`` entry points, so
``credkeeper.open_store("file:///var/lib/app/creds.json")`` opens a :class:`FileStore`.
POSIX only: it locks with ``fcntl.flock``.
"""

from __future__ import annotations

from ._store import FileStore

__all__ = ["FileStore"]
