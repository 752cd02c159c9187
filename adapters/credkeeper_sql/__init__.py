"""credkeeper's SQL store: PostgreSQL, MySQL/MariaDB and SQLite through SQLAlchemy 2.

Registered for the ``sqlite``, ``postgresql``, ``postgres``, ``mysql`` and ``mariadb`` schemes of
the ``credkeeper.stores`` entry points, so ``credkeeper.open_store("postgresql+psycopg://...")``
opens a :class:`SQLStore` (or an :class:`AsyncSQLStore` for an async driver). Credentials live in
credkeeper's own table, whose definition :data:`metadata` exposes for Alembic, or in mapped
columns of a table the application already has (:class:`ColumnMap`).
"""

from __future__ import annotations

from ._schema import (
    DEFAULT_LEASE_TABLE,
    DEFAULT_TABLE,
    ColumnMap,
    credentials_table,
    leases_table,
    metadata,
)
from ._store import (
    AsyncSQLStore,
    FieldMapping,
    SQLStore,
    StoreCheck,
    check_store,
    init_store,
    upgrade_store,
)

__all__ = [
    "DEFAULT_LEASE_TABLE",
    "DEFAULT_TABLE",
    "AsyncSQLStore",
    "ColumnMap",
    "FieldMapping",
    "SQLStore",
    "StoreCheck",
    "check_store",
    "credentials_table",
    "init_store",
    "leases_table",
    "metadata",
    "upgrade_store",
]
