"""A credkeeper credential store on Redis, through redis-py: the worked example of
``docs/custom-stores.md``.

Installed, it registers the ``redis`` scheme in the ``credkeeper.stores`` entry points, so
``credkeeper.open_store("redis://127.0.0.1:6379/0")`` opens a :class:`RedisStore`, and
``open_store("redis://127.0.0.1:6379/0?async=true")`` an :class:`AsyncRedisStore`.
"""

from __future__ import annotations

from .store import DEFAULT_PREFIX, AsyncRedisStore, RedisStore

__all__ = ["DEFAULT_PREFIX", "AsyncRedisStore", "RedisStore"]
