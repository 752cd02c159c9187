"""credkeeper's MongoDB store, through pymongo's ``MongoClient`` and ``AsyncMongoClient``.

Registered for the ``mongodb`` and ``mongodb+srv`` schemes of the ``credkeeper.stores`` entry
points, so ``credkeeper.open_store("mongodb://host/app")`` opens a :class:`MongoStore`, and
``open_store("mongodb://host/app?async=true")`` an :class:`AsyncMongoStore`. Credentials live in
credkeeper's own collection (``credkeeper_credentials`` by default), or in a sub-document of
documents the application already has, described by an :class:`EmbeddedLayout`.
"""

from __future__ import annotations

from ._layout import DEFAULT_COLLECTION, EmbeddedLayout
from ._store import AsyncMongoStore, MongoStore

__all__ = ["DEFAULT_COLLECTION", "AsyncMongoStore", "EmbeddedLayout", "MongoStore"]
