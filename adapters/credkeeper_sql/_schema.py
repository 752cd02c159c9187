"""Tables and statements of the SQL store, shared by the sync and the async engine; no I/O.

A read is one statement (``select(key)``, a :data:`Read`) and a function of the rows it returns
(``record_of(key, rows)``). Every write is a *plan*: a generator that yields SQLAlchemy
statements (each alone or with its parameters' values) and receives each one's
:class:`Outcome`, all inside one transaction. The sync and the async store only execute what
a layout gives them, so the SQL and the compare-and-swap decisions exist once.

Two layouts share that interface:

- :class:`OwnTable`, credkeeper's own table (``credkeeper_credentials`` by default): one row per
  key, compare-and-swap by ``UPDATE ... WHERE key = :k AND version = :v`` and the rowcount.
- :class:`ExistingTable`, credentials kept in mapped columns of a table the application already
  has (``users.claude_access_token``, ...). Coordination state lives in a side table; the
  version a reader sees binds the side row's version to a digest of the refresh token stored in
  the user's row, and a write re-reads that token under a row lock, so a write based on an old
  token loses even when the application changed the row behind credkeeper's back. The side
  row's version also names the refresh token its state belongs to: once the application stores
  another one (the user logged in again), the side row's state no longer applies.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from credkeeper import (
    ConfigurationError,
    ConflictError,
    Record,
    Status,
    StoreCorrupted,
    StoreError,
)
from credkeeper.storekit import (
    InvalidKey,
    new_version,
    read_epoch_ms,
    stored_record,
    to_epoch_ms,
    token_digest,
)

from ._formats import (
    JAVASCRIPT_ISO,
    SQLITE_DATETIME,
    WIDEST_OFFSET,
    ExpiryKind,
    IsoStyle,
    ScopesFormat,
    ScopesKind,
    json_array_scopes,
    json_scopes,
    parse_iso,
    read_scopes,
    text_scopes_format,
)

__all__ = [
    "DEFAULT_LEASE_TABLE",
    "DEFAULT_TABLE",
    "EXPIRES_AT_UNITS",
    "EXPIRES_AT_UNITS_TEXT",
    "SCOPES_FORMATS",
    "SCOPES_FORMATS_TEXT",
    "UPGRADE_COLUMNS",
    "ColumnMap",
    "ExistingTable",
    "Formats",
    "KeyKind",
    "Outcome",
    "OwnTable",
    "Plan",
    "Read",
    "Rows",
    "Step",
    "credentials_table",
    "formats_of",
    "key_kind",
    "leases_table",
    "metadata",
    "wall_time",
]

DEFAULT_TABLE = "credkeeper_credentials"
DEFAULT_LEASE_TABLE = "credkeeper_leases"

# Keys are compared byte for byte: MySQL's default collations fold case and accents, which
# would merge "Alice" and "alice" into one credential.
_KEY = sa.String(255).with_variant(
    mysql.VARCHAR(255, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"
)


def credentials_table(
    meta: sa.MetaData, name: str = DEFAULT_TABLE, *, refreshed_at: bool = True
) -> sa.Table:
    """credkeeper's own table, named ``name``, added to ``meta``.

    Times are epoch milliseconds in BIGINT columns, exact on every backend; ``scopes`` is a
    JSON array. The index on ``(expires_at, key)`` serves ``scan_due``'s keyset pages.
    ``refreshed_at=False`` describes a table made before credkeeper kept the last refresh
    (see :data:`UPGRADE_COLUMNS`).
    """
    return sa.Table(
        name,
        meta,
        sa.Column("key", _KEY, primary_key=True),
        sa.Column("access_token", sa.Text, nullable=False),
        sa.Column("refresh_token", sa.Text, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("subscription_type", sa.String(255)),
        *_state_columns(refreshed_at=refreshed_at),
        sa.Index(f"ix_{name}_expires_at", "expires_at", "key"),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )


def leases_table(
    meta: sa.MetaData, name: str = DEFAULT_LEASE_TABLE, *, refreshed_at: bool = True
) -> sa.Table:
    """The side table that holds coordination state for credentials in an existing table;
    ``refreshed_at`` as for :func:`credentials_table`."""
    return sa.Table(
        name,
        meta,
        sa.Column("key", _KEY, primary_key=True),
        *_state_columns(refreshed_at=refreshed_at),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )


def _state_columns(*, refreshed_at: bool = True) -> list[sa.Column[Any]]:
    columns: list[sa.Column[Any]] = [
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("lease_owner", sa.String(255)),
        sa.Column("lease_until", sa.BigInteger),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("cooldown_until", sa.BigInteger),
        sa.Column("last_error", sa.Text),
        sa.Column("version", sa.String(32), nullable=False),
    ]
    if refreshed_at:
        columns.insert(-1, _refreshed_at_column())
    return columns


def _refreshed_at_column() -> sa.Column[Any]:
    return sa.Column("refreshed_at", sa.BigInteger)


#: Columns credkeeper's tables gained after their first release, which a table created before
#: lacks: each nullable, so that a table without it keeps working (the field reads as None) until
#: ``init-store`` (:func:`credkeeper_sql.upgrade_store`) adds it.
UPGRADE_COLUMNS: tuple[Callable[[], sa.Column[Any]], ...] = (_refreshed_at_column,)


#: The default tables, for Alembic: ``target_metadata = [app_metadata, credkeeper_sql.metadata]``.
metadata = sa.MetaData()
credentials_table(metadata)
leases_table(metadata)


# -- reads and plans ---------------------------------------------------------------------

#: The rows a statement returned.
Rows = Sequence[sa.Row[*tuple[Any, ...]]]
#: The statement of a read, with its parameters' values. A statement made once and executed
#: with parameters skips what building one costs on every call: SQLAlchemy's constructs, and
#: the cache key under which it finds the compiled SQL.
Read = tuple[sa.Select[Any], Mapping[str, Any]]


class Outcome(NamedTuple):
    """What a plan learns from one statement: the rows it returned, or the rows it changed."""

    rows: Rows = ()
    rowcount: int = 0


#: One statement of a plan, alone or with the values of its bound parameters.
Step = sa.Executable | tuple[sa.Executable, Mapping[str, Any]]
Plan = Generator[Step, Outcome, Any]


def _scopes(key: str, value: Any) -> tuple[str, ...]:
    scopes = json_array_scopes(value) if isinstance(value, str) else None
    if scopes is None:
        raise StoreCorrupted(f"stored record for key {key!r} has a bad 'scopes' column", key=key)
    return scopes


_STATUSES = {status.value: status for status in Status}


def _status(key: str, value: Any) -> Status:
    status = _STATUSES.get(value) if isinstance(value, str) else None
    if status is None:
        raise StoreCorrupted(f"stored record for key {key!r} has an unknown status", key=key)
    return status


# The state columns but the version (in the side table and in credkeeper's own table), each
# named as the Record field it holds.
_STATE_FIELDS = tuple(column.name for column in _state_columns() if column.name != "version")


def _state_values(record: Record, version: str, table: sa.Table) -> dict[str, Any]:
    """The state columns' values for ``record``, as a write versioned ``version`` sets them in
    ``table`` (whose columns may predate some fields, see :data:`UPGRADE_COLUMNS`)."""
    document = record.to_document()
    values = {name: document[name] for name in _STATE_FIELDS if name in table.c}
    return {**values, "version": version}


def _conflict(record: Record, what: str) -> ConflictError:
    return ConflictError(f"the record for key {record.key!r} {what}", key=record.key)


# The columns OwnTable reads, in the order record_of unpacks them: by position, as a row's
# lookup by name costs more than the rest of the unpacking. refreshed_at comes last, where a
# table made before it has none.
_RECORD_COLUMNS = (
    *("access_token", "refresh_token", "expires_at", "scopes", "subscription_type"),
    *(name for name in _STATE_FIELDS if name != "refreshed_at"),
    "version",
)
# How many keys OwnTable remembers the last record read of (see OwnTable.record_of).
_READ_BACK_KEYS = 1024


class OwnTable:
    """credkeeper's own table: every field of a record in one row.

    Its statements are made once, with bound parameters (``:key``; ``:old_key`` and
    ``:old_version`` where an ``UPDATE`` sets the columns its parameters name), and executed
    with each call's values.
    """

    def __init__(self, table: sa.Table) -> None:
        self.table = table
        self.tables = (table,)
        self.key = table.c.key
        self.expires_at = table.c.expires_at
        by_key = self.key == sa.bindparam("key")
        #: Whether the table keeps the last refresh (one made before it did has no column).
        self.refreshed_at = "refreshed_at" in table.c
        read = (*_RECORD_COLUMNS, "refreshed_at") if self.refreshed_at else _RECORD_COLUMNS
        self._select = sa.select(*(table.c[name] for name in read)).where(by_key)
        self._insert = sa.insert(table)
        self._update = sa.update(table).where(
            self.key == sa.bindparam("old_key"), table.c.version == sa.bindparam("old_version")
        )
        self._delete = sa.delete(table).where(by_key)
        # The last row read per key, with the record made of it (see record_of).
        self._read_back: dict[str, tuple[sa.Row[*tuple[Any, ...]], Record]] = {}

    @property
    def order(self) -> sa.ColumnElement[Any]:
        """What ``scan_due`` compares and orders expiries by: the expiry column."""
        return self.expires_at

    def spelling(self, value: Any) -> str:
        """The key of a row whose key column holds ``value``."""
        return str(value)

    def due(self, before: datetime) -> tuple[sa.ColumnElement[bool], Any]:
        """The condition of ``scan_due`` and the bound it compares the expiry column with."""
        bound = to_epoch_ms(before)
        return self.expires_at <= bound, bound

    def is_due(self, expiry: Any, before: datetime) -> bool:
        """Whether a row :meth:`due` found is due: always, as its comparison is exact."""
        return True

    def select(self, key: str) -> Read:
        """The statement reading the record under ``key``, for :meth:`record_of`."""
        return self._select, {"key": key}

    def record_of(self, key: str, rows: Rows) -> Record | None:
        """The record under ``key`` in the ``rows`` :meth:`select` read, or ``None``.

        A row read again unchanged gives back the record made of it before, checked then:
        reading a credential until it is due is the common case, and making and checking a
        Record is most of what a SQLite read costs beyond its SELECT. Any change to the row
        makes and checks a new one.
        """
        if not rows:
            return None
        row = rows[0]
        known = self._read_back.get(key)
        if known is not None and known[0] == row:
            return known[1]
        record = self._record(key, row)
        if len(self._read_back) >= _READ_BACK_KEYS:
            self._read_back.clear()
        self._read_back[key] = (row, record)
        return record

    def _record(self, key: str, row: sa.Row[*tuple[Any, ...]]) -> Record:
        refreshed_at = row[-1] if self.refreshed_at else None
        (
            access_token,
            refresh_token,
            expires_at,
            scopes,
            subscription_type,
            status,
            lease_owner,
            lease_until,
            failures,
            cooldown_until,
            last_error,
            version,
        ) = row[: len(_RECORD_COLUMNS)]
        return stored_record(
            key=key,
            access_token=access_token,
            refresh_token=refresh_token,
            expires_at=read_epoch_ms(expires_at, key=key, field="expires_at") or _invalid(key),
            scopes=_scopes(key, scopes),
            subscription_type=subscription_type,
            status=_status(key, status),
            lease_owner=lease_owner,
            lease_until=read_epoch_ms(lease_until, key=key, field="lease_until"),
            failures=failures,
            cooldown_until=read_epoch_ms(cooldown_until, key=key, field="cooldown_until"),
            last_error=last_error,
            refreshed_at=read_epoch_ms(refreshed_at, key=key, field="refreshed_at"),
            version=version,
        )

    def put(self, record: Record) -> Plan:
        """Plan: compare-and-swap ``record`` on its version; the record as stored."""
        version = new_version()
        values = {
            **record.to_document(),
            "scopes": json.dumps(list(record.scopes)),
            "version": version,
        }
        if not self.refreshed_at:
            del values["refreshed_at"]
        if record.version is None:
            # A duplicate key fails the insert; the store turns that into ConflictError.
            yield self._insert, {"key": record.key, **values}
        else:
            outcome = yield (
                self._update,
                {"old_key": record.key, "old_version": record.version, **values},
            )
            if outcome.rowcount != 1:
                raise _conflict(record, "changed or was deleted since it was read")
        return record.replace(version=version)

    def delete(self, key: str) -> Plan:
        """Plan: remove the row; whether there was one."""
        outcome = yield self._delete, {"key": key}
        return outcome.rowcount > 0


def _invalid(key: str) -> datetime:
    raise StoreCorrupted(f"stored record for key {key!r} has no expiry", key=key)


# -- existing tables ---------------------------------------------------------------------


#: The values of ``expires_at_unit``, and what each means, for messages.
EXPIRES_AT_UNITS = ("ms", "s", "iso")
EXPIRES_AT_UNITS_TEXT = (
    "'ms' or 's' (epoch milliseconds or seconds in an integer column) or 'iso' (ISO-8601 text)"
)
#: The values of ``scopes_format``, and what each means, for messages.
SCOPES_FORMATS = ("space", "json", "array")
SCOPES_FORMATS_TEXT = (
    "'space' (one space-separated string), 'json' (a JSON array) or 'array' (a PostgreSQL text[])"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ColumnMap:
    """Which columns of an existing table hold a credential's fields, and how.

    ``key`` identifies the row (e.g. ``id`` or ``user_id``); the three token columns are
    required; ``scopes``, ``subscription_type`` and ``refreshed_at`` (when the tokens were
    last obtained) are optional. Without a ``refreshed_at`` column the last refresh is kept in
    the side table, with the rest of credkeeper's state.

    Every column is written back in the format it has (see ``docs/stores/sql.md``). The
    expiry column may be a timestamp, an integer of epoch milliseconds (``expires_at_unit="ms"``,
    the default) or seconds (``"s"``), or ISO-8601 text (``"iso"``, which a text column implies).
    A ``refreshed_at`` column may be of the same kinds as the expiry column, its integers in
    ``expires_at_unit``'s unit (milliseconds with ``"iso"``).
    The scopes column may be text holding space-separated scopes or a JSON array, a JSON column,
    or a PostgreSQL ``text[]``; ``scopes_format`` (``"space"``, ``"json"``, ``"array"``) names
    the format where neither the column type nor the row shows it, and is otherwise inferred
    (``"space"`` for text).

    With ``insert=True``, storing a credential for a key the table has no row for inserts one,
    holding the key and the mapped columns; every other ``NOT NULL`` column must have a default
    and the key column must be unique, both checked on first use. Without it credkeeper only
    ever writes rows that exist.

    With ``delete_rows=True``, deleting a credential deletes its whole row, the application's
    other columns with it. Without it deleting sets the mapped columns to ``NULL``, and where
    one of them is ``NOT NULL`` (the row cannot be without a credential) that is a
    ConfigurationError: credkeeper deletes the application's rows only when told to.
    """

    key: str
    access_token: str
    refresh_token: str
    expires_at: str
    scopes: str | None = None
    subscription_type: str | None = None
    refreshed_at: str | None = None
    expires_at_unit: Literal["ms", "s", "iso"] = "ms"
    scopes_format: ScopesFormat | None = None
    insert: bool = False
    delete_rows: bool = False

    def __post_init__(self) -> None:
        for name in ("key", "access_token", "refresh_token", "expires_at"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigurationError(f"ColumnMap.{name} must be a column name")
        if self.expires_at_unit not in EXPIRES_AT_UNITS:
            raise ConfigurationError(
                f"expires_at_unit must be {EXPIRES_AT_UNITS_TEXT}, got {self.expires_at_unit!r}"
            )
        if self.scopes_format is not None and self.scopes_format not in SCOPES_FORMATS:
            raise ConfigurationError(
                f"scopes_format must be {SCOPES_FORMATS_TEXT}, got {self.scopes_format!r}"
            )
        if self.scopes_format is not None and self.scopes is None:
            raise ConfigurationError(
                "scopes_format describes the scopes column: map one with scopes_column, or drop "
                "scopes_format"
            )
        if not isinstance(self.insert, bool):
            raise ConfigurationError(f"insert must be true or false, got {self.insert!r}")
        if not isinstance(self.delete_rows, bool):
            raise ConfigurationError(f"delete_rows must be true or false, got {self.delete_rows!r}")

    def columns(self) -> dict[str, str]:
        """Field name to column name, for the fields that are mapped."""
        mapped = {
            "key": self.key,
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "expires_at": self.expires_at,
            "scopes": self.scopes,
            "subscription_type": self.subscription_type,
            "refreshed_at": self.refreshed_at,
        }
        return {name: column for name, column in mapped.items() if column is not None}


_NO_SIDE_ROW = "-"

# Epoch seconds stay below it until the year 5138, epoch milliseconds passed it in March 1973:
# a positive expiry on the wrong side of it is in the other unit.
_SECONDS_LIMIT = 10**11


def _side_version(refresh_token: str) -> str:
    """A new side-row version naming the refresh token its state belongs to.

    15 random hex digits, ``:`` and the token's digest: 32 characters, the width the side
    table's ``version`` column already has in every deployment.
    """
    return f"{new_version()[:15]}:{token_digest(refresh_token)}"


def _side_applies(side: str, refresh_token: str) -> bool:
    """Whether the side row versioned ``side`` holds the state of ``refresh_token``.

    Not when the application stored another refresh token (a re-login) since credkeeper last
    wrote the row: a ``needs_reauth``, a lease or a cooldown of the old token must not hold
    the new one back. A version without a digest, written before versions named their token,
    always applies, so a lease taken before an upgrade is never dropped.
    """
    _, named, digest = side.partition(":")
    return not named or digest == token_digest(refresh_token)


#: How a key column compares keys: as text, as an integer, or as a uuid.
KeyKind = Literal["text", "integer", "uuid"]

# Wide enough for BIGINT UNSIGNED; a value beyond it is in no integer column.
_INTEGER_RANGE = range(-(2**63), 2**64)
_EXAMPLES = {"integer": "'123'", "uuid": "'123e4567-e89b-42d3-a456-426614174000'"}


def key_kind(column: sa.Column[Any]) -> KeyKind | None:
    """How ``column`` compares keys, from its reflected type.

    ``None`` for a type credkeeper cannot compare a key with: NUMERIC, a date, a binary
    string, a type SQLAlchemy does not know.
    """
    if isinstance(column.type, sa.Uuid):
        return "uuid"
    if isinstance(column.type, sa.Integer):
        return "integer"
    if isinstance(column.type, sa.String):
        return "text"
    return None


def _type_name(column: sa.Column[Any]) -> str:
    return str(getattr(column.type, "__visit_name__", type(column.type).__name__)).upper()


@dataclass(frozen=True, slots=True, kw_only=True)
class Formats:
    """How the application's table keeps the expiry, the scopes and the last refresh, from
    its column types.

    ``iso`` (``refreshed_iso``) is the ISO-8601 style written into a text expiry (last refresh)
    column whose row shows none;
    ``scopes_default`` the format of a text scopes column whose row shows none. ``json_cast``
    marks a PostgreSQL JSON or JSONB scopes column: read as its text and written by a cast from
    text, so the application's spelling of the array survives (``json`` keeps it byte for byte).
    """

    expires_at: ExpiryKind
    iso: IsoStyle = JAVASCRIPT_ISO
    scopes: ScopesKind | None = None
    refreshed_at: ExpiryKind | None = None
    refreshed_iso: IsoStyle = JAVASCRIPT_ISO
    scopes_default: Literal["space", "json"] = "space"
    json_cast: bool = False


def _expiry_kind(column: sa.Column[Any], dialect: str) -> ExpiryKind | None:
    if isinstance(column.type, sa.Integer):
        return "integer"
    if isinstance(column.type, sa.String):
        return "text"
    if dialect == "sqlite":
        # SQLite keeps what it is given: a DATETIME column holds the text its writer chose.
        return "text"
    if isinstance(column.type, sa.DateTime):
        return "timestamp"
    return None


def _scopes_kind(
    column: sa.Column[Any], dialect: str, json_columns: frozenset[str]
) -> ScopesKind | None:
    if isinstance(column.type, sa.ARRAY):
        return "array" if isinstance(column.type.item_type, sa.String) else None
    if isinstance(column.type, sa.JSON) or column.name in json_columns:
        return "json"
    if isinstance(column.type, sa.String) or dialect == "sqlite":
        return "text"
    return None


def formats_of(
    table: sa.Table, columns: ColumnMap, *, dialect: str, json_columns: frozenset[str] = frozenset()
) -> Formats:
    """The formats of ``table``'s mapped expiry and scopes columns, as reflected.

    ``json_columns`` names columns the database holds JSON in without a JSON type (MariaDB's
    ``JSON`` is ``LONGTEXT`` checked by ``json_valid``). An option that contradicts a column's
    type, or a type credkeeper cannot keep the field in, is a ConfigurationError naming both.
    """
    expiry = table.c[columns.expires_at]
    where = f"{table.name}.{columns.expires_at}"
    kind = _expiry_kind(expiry, dialect)
    if kind is None:
        raise ConfigurationError(
            f"expiry column {where} is {_type_name(expiry)}; credkeeper keeps expiries in "
            "timestamp (TIMESTAMP, TIMESTAMPTZ, DATETIME), integer (INTEGER, BIGINT: epoch "
            "milliseconds, or seconds with expires_at_unit=s) or text (ISO-8601) columns: map "
            "expires_at_column to one of those"
        )
    if columns.expires_at_unit == "iso" and kind != "text":
        fix = "use ms or s" if kind == "integer" else "drop expires_at_unit"
        raise ConfigurationError(
            f"expires_at_unit=iso declares ISO-8601 text, but expiry column {where} is "
            f"{_type_name(expiry)}: {fix}"
        )
    if kind == "integer":
        _check_width(expiry, where, columns.expires_at_unit, dialect)
    iso = SQLITE_DATETIME if isinstance(expiry.type, sa.DateTime) else JAVASCRIPT_ISO
    refreshed: dict[str, Any] = {}
    if columns.refreshed_at is not None:
        column = table.c[columns.refreshed_at]
        refreshed["refreshed_at"] = _expiry_kind(column, dialect)
        if refreshed["refreshed_at"] is None:
            raise ConfigurationError(
                f"last-refresh column {table.name}.{columns.refreshed_at} is "
                f"{_type_name(column)}; credkeeper keeps it in timestamp, integer or text "
                "(ISO-8601) columns, as the expiry: map refreshed_at_column to one of those"
            )
        if refreshed["refreshed_at"] == "integer":
            unit = "s" if columns.expires_at_unit == "s" else "ms"
            _check_width(column, f"{table.name}.{columns.refreshed_at}", unit, dialect)
        if isinstance(column.type, sa.DateTime):
            refreshed["refreshed_iso"] = SQLITE_DATETIME
    if columns.scopes is None:
        return Formats(expires_at=kind, iso=iso, **refreshed)
    scopes = table.c[columns.scopes]
    where = f"{table.name}.{columns.scopes}"
    scopes_kind = _scopes_kind(scopes, dialect, json_columns)
    if scopes_kind is None:
        raise ConfigurationError(
            f"scopes column {where} is {_type_name(scopes)}; credkeeper keeps scopes in text "
            "(space-separated, or a JSON array), JSON or PostgreSQL text[] columns: map "
            "scopes_column to one of those"
        )
    wanted = columns.scopes_format
    fits = {"text": ("space", "json"), "json": ("json",), "array": ("array",)}[scopes_kind]
    if wanted is not None and wanted not in fits:
        raise ConfigurationError(
            f"scopes_format={wanted} does not fit scopes column {where} "
            f"({_type_name(scopes)}), which holds {_HOLDS[scopes_kind]}: use "
            f"{' or '.join(fits)}, or drop scopes_format to have it inferred"
        )
    return Formats(
        expires_at=kind,
        iso=iso,
        scopes=scopes_kind,
        scopes_default="json" if wanted == "json" else "space",
        json_cast=dialect == "postgresql" and scopes_kind == "json",
        **refreshed,
    )


_HOLDS = {
    "text": "text",
    "json": "JSON",
    "array": "an array",
}


def wall_time(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """The wall time in ISO-8601 text held in ``column``: its first 19 characters, ``T`` made a
    space, which sort as time whatever separator or fraction each row spells.

    Its constants are SQL literals, not parameters: an expression index serves only a query
    spelling the very expression it was created on.
    """
    wall = sa.func.substr(column, sa.literal_column("1"), sa.literal_column("19"))
    return sa.func.replace(wall, sa.literal_column("'T'"), sa.literal_column("' '"))


def _check_width(column: sa.Column[Any], where: str, unit: str, dialect: str) -> None:
    """Refuse an integer expiry column too narrow for epoch values in ``unit``.

    Epoch milliseconds passed 2**31 in January 1970, so only a 64-bit column holds them; epoch
    seconds fit in 32 bits until 2038, in 16 or 24 never. SQLite's integers are 64-bit whatever
    the column is declared as.
    """
    if dialect == "sqlite" or isinstance(column.type, sa.BigInteger):
        return
    narrow = isinstance(column.type, sa.SmallInteger) or _type_name(column) in _NARROW
    if unit == "ms":
        raise ConfigurationError(
            f"expiry column {where} is {_type_name(column)}, a 32-bit integer or smaller, which "
            "cannot hold epoch milliseconds: set expires_at_unit=s if it holds epoch seconds, "
            "or widen it to BIGINT"
        )
    if narrow:
        raise ConfigurationError(
            f"expiry column {where} is {_type_name(column)}, narrower than 32 bits, which "
            "cannot hold epoch seconds: widen it to BIGINT"
        )


# MySQL's and MariaDB's integers narrower than INT (SMALLINT is a SmallInteger already).
_NARROW = frozenset({"TINYINT", "MEDIUMINT"})


@dataclass(slots=True)
class ExistingTable:
    """Credentials in mapped columns of the application's table, state in a side table.

    credkeeper only ever updates the mapped columns of rows that exist, each in the format it
    has (:class:`Formats`), and never touches another column. Creating a credential fills the
    token columns of a row whose refresh token is ``NULL``; deleting one sets the mapped columns
    back to ``NULL``. With ``insert`` (:class:`ColumnMap`), creating a credential for a key
    without a row inserts the row; with ``delete_rows``, deleting a credential deletes its row.

    The side row's state (status, lease, failures, cooldown, last error, last refresh) belongs
    to the refresh token credkeeper last wrote: where the application has stored another one
    since, by a re-login that bypasses credkeeper, the credential reads as active, with no
    lease, failures, cooldown or known last refresh, and credkeeper's next write replaces that
    state.

    Keys are compared in the key column's own type (:func:`key_kind`): bound as an ``int`` for
    an integer column and a ``uuid.UUID`` for a uuid column. Only a type's canonical spelling
    is accepted (``"123"``, not ``"0123"``; a lowercase hyphenated uuid), and a row the column's
    comparison matched under another spelling (a collation that ignores case) is refused: the
    side table is keyed by the string, so a row must answer to exactly one key.
    """

    table: sa.Table
    leases: sa.Table
    columns: ColumnMap
    formats: Formats
    tables: tuple[sa.Table, ...] = field(init=False)
    kind: KeyKind = field(init=False)
    # The first NOT NULL mapped column, if any: its rows cannot hold "no credential".
    not_null: str | None = field(init=False)
    # The statements reading and locking a key's row, made once; executed with ``:key``.
    _read: sa.Select[Any] = field(init=False, repr=False, compare=False)
    _lock_row: sa.Select[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.tables = (self.table, self.leases)
        for name, column in self.columns.columns().items():
            if column not in self.table.c:
                raise ConfigurationError(
                    f"table {self.table.name!r} has no column {column!r} (mapped to {name}); "
                    f"correct the {name}_column option"
                )
        kind = key_kind(self.key)
        if kind is None:
            raise ConfigurationError(
                f"key column {self._key_name()} is {_type_name(self.key)}; credkeeper compares "
                "keys with text (CHAR, VARCHAR, TEXT), integer (SMALLINT, INTEGER, BIGINT) or "
                "UUID columns: map key_column to one of those"
            )
        self.kind = kind
        self.not_null = next(
            (
                column
                for name, column in self.columns.columns().items()
                if name != "key" and not self.table.c[column].nullable
            ),
            None,
        )
        self._read, self._lock_row = self._reading(), self._locking()

    def _column(self, name: str) -> sa.Column[Any]:
        column: sa.Column[Any] = self.table.c[getattr(self.columns, name)]
        return column

    def _key_name(self) -> str:
        return f"{self.table.name}.{self.columns.key}"

    @property
    def key(self) -> sa.Column[Any]:
        """The column naming each row's credential."""
        return self._column("key")

    @property
    def expires_at(self) -> sa.Column[Any]:
        """The expiry column."""
        return self._column("expires_at")

    @property
    def order(self) -> sa.ColumnElement[Any]:
        """What ``scan_due`` compares and orders expiries by.

        ISO-8601 text sorts as time only when every row spells it alike; its first 19
        characters with the ``T`` made a space, the wall time, do whatever separator or
        fraction each row has, to the second. A row's offset is not in them: :meth:`due`
        widens its bound to cover every offset and :meth:`is_due` reads the real instant.
        """
        if self.formats.expires_at == "text":
            return wall_time(self.expires_at)
        return self.expires_at

    def _epoch(self, moment: datetime) -> int:
        milliseconds = to_epoch_ms(moment)
        return milliseconds // 1000 if self.columns.expires_at_unit == "s" else milliseconds

    def _expiry_value(self, moment: datetime, stored: Any) -> Any:
        """``moment`` as the expiry column keeps it: in the format of the ``stored`` value,
        else in the column type's (a naive timestamp is UTC)."""
        if isinstance(stored, str):
            parsed = parse_iso(stored)
            return (self.formats.iso if parsed is None else parsed[1]).render(moment)
        if isinstance(stored, int) and not isinstance(stored, bool):
            return self._epoch(moment)
        if self.formats.expires_at == "integer":
            return self._epoch(moment)
        if self.formats.expires_at == "text":
            return self.formats.iso.render(moment)
        if getattr(self.expires_at.type, "timezone", False):
            return moment.astimezone(UTC)
        return moment.astimezone(UTC).replace(tzinfo=None)

    def _refreshed_value(self, moment: datetime | None, stored: Any) -> Any:
        """``moment`` as the mapped last-refresh column keeps it, as :meth:`_expiry_value`
        does for the expiry; ``None`` stays ``None``."""
        if moment is None:
            return None
        if isinstance(stored, str):
            parsed = parse_iso(stored)
            return (self.formats.refreshed_iso if parsed is None else parsed[1]).render(moment)
        kind = self.formats.refreshed_at
        if (isinstance(stored, int) and not isinstance(stored, bool)) or kind == "integer":
            return self._epoch(moment)
        if kind == "text":
            return self.formats.refreshed_iso.render(moment)
        if getattr(self._column("refreshed_at").type, "timezone", False):
            return moment.astimezone(UTC)
        return moment.astimezone(UTC).replace(tzinfo=None)

    def _refreshed_of(self, key: str, value: Any) -> datetime | None:
        """The last refresh the mapped column holds; ``None`` for ``NULL``."""
        if value is None:
            return None
        if isinstance(value, datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if isinstance(value, int) and not isinstance(value, bool):
            scale = 1000 if self.columns.expires_at_unit == "s" else 1
            return read_epoch_ms(value * scale, key=key, field="refreshed_at")
        if isinstance(value, str):
            parsed = parse_iso(value)
            if parsed is not None:
                return parsed[0]
        raise StoreCorrupted(
            f"stored record for key {key!r} has a bad 'refreshed_at' column", key=key
        )

    def _from_column(self, key: str, value: Any) -> datetime:
        if isinstance(value, datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if isinstance(value, int) and not isinstance(value, bool):
            self._check_unit(key, value)
            return read_epoch_ms(
                value * 1000 if self.columns.expires_at_unit == "s" else value,
                key=key,
                field="expires_at",
            ) or _invalid(key)
        if isinstance(value, str):
            parsed = parse_iso(value)
            if parsed is not None:
                return parsed[0]
        raise StoreCorrupted(f"the credential for key {key!r} has no usable expiry", key=key)

    def _check_unit(self, key: str, value: int) -> None:
        """Refuse an epoch value that reads as the other unit than ``expires_at_unit``'s.

        Seconds read as milliseconds put an expiry in 1970 (refreshed on every call), and
        milliseconds read as seconds thousands of years ahead (never refreshed): the mapping is
        wrong, not the row. 0, which many programs write for "expired", is no value of either.
        """
        unit = self.columns.expires_at_unit
        where = f"{self.table.name}.{self.columns.expires_at}"
        if unit == "ms" and 0 < value < _SECONDS_LIMIT:
            raise ConfigurationError(
                f"the expiry of key {key!r} in column {where} is {value}, which is epoch "
                "seconds (as milliseconds it would fall in 1970-1973), but expires_at_unit=ms "
                "reads it as milliseconds: set expires_at_unit=s"
            )
        if unit == "s" and value >= _SECONDS_LIMIT:
            raise ConfigurationError(
                f"the expiry of key {key!r} in column {where} is {value}, which is epoch "
                "milliseconds (as seconds it would fall after the year 5000), but "
                "expires_at_unit=s reads it as seconds: set expires_at_unit=ms"
            )

    def due(self, before: datetime) -> tuple[sa.ColumnElement[bool], Any]:
        """The condition of ``scan_due``: due, and holding a credential.

        For ISO-8601 text, whose :attr:`order` is the wall time in the row's own offset, the
        bound is widened by the widest offset, so no due row is missed; :meth:`is_due` then
        drops the rows that are not due yet.
        """
        if self.formats.expires_at == "text":
            latest = before.astimezone(UTC)
            try:
                widened = latest + WIDEST_OFFSET
            except OverflowError:
                widened = datetime.max.replace(tzinfo=UTC)
            bound: Any = widened.replace(tzinfo=None, microsecond=0).isoformat(sep=" ")
        else:
            bound = self._expiry_value(before, None)
        return sa.and_(self.order <= bound, self._column("refresh_token").is_not(None)), bound

    def is_due(self, expiry: Any, before: datetime) -> bool:
        """Whether a row :meth:`due` found, holding ``expiry``, is due at ``before``.

        Only ISO-8601 text is read again, at its real instant; text that is not ISO-8601 is
        yielded, so that reading the credential reports it.
        """
        if self.formats.expires_at != "text" or not isinstance(expiry, str):
            return True
        parsed = parse_iso(expiry)
        return parsed is None or parsed[0] <= before

    def spelling(self, value: Any) -> str:
        """The key of a row whose key column holds ``value``.

        The canonical string of an int or a uuid; text as stored, without the padding
        PostgreSQL gives a CHAR(n) value (keys never end in spaces).
        """
        if isinstance(value, str):
            return value.rstrip(" ") if isinstance(self.key.type, sa.CHAR) else value
        return str(value)

    def _value(self, key: str) -> Any:
        """``key`` as a value of the key column's type; InvalidKey unless canonical."""
        if self.kind == "text":
            return key
        value: Any = None
        try:
            # int() also reads '+1', '0123', '1_000' and other scripts' digits, and UUID()
            # uppercase, braces and URNs: each names a value whose str() is the one spelling.
            value = int(key) if self.kind == "integer" else uuid.UUID(key)
        except ValueError:
            raise InvalidKey(
                f"key {key!r} cannot name a row of column {self._key_name()} "
                f"({_type_name(self.key)}): keys there are its values in canonical form, "
                f"e.g. {_EXAMPLES[self.kind]}"
            ) from None
        canonical = str(value)
        if canonical != key:
            raise InvalidKey(
                f"key {key!r} is not how column {self._key_name()} ({_type_name(self.key)}) "
                f"spells it: use {canonical!r}, its canonical form, so that a row and its lease "
                "are reached under one key"
            )
        if isinstance(value, int) and value not in _INTEGER_RANGE:
            raise InvalidKey(
                f"key {key!r} cannot name a row of column {self._key_name()} "
                f"({_type_name(self.key)}): it is beyond the range of any integer column"
            )
        if isinstance(value, uuid.UUID) and not getattr(self.key.type, "as_uuid", True):
            return canonical
        return value

    def _matches(self, key: str) -> sa.ColumnElement[bool]:
        """The application's row for ``key``, compared in the key column's own type."""
        matches: sa.ColumnElement[bool] = self.key == self._value(key)
        return matches

    def _exact(self, key: str, rows: Rows) -> sa.RowMapping | None:
        """The row named ``key``, or ``None``; refused if the comparison matched another spelling.

        A collation that folds case, accents or trailing spaces lets ``'Alice'`` reach the row
        of ``'alice'``, whose lease is in the side table under ``'alice'``: two keys, one row,
        two leases. Such a key is refused rather than used.
        """
        others = sorted({self.spelling(row._mapping["key"]) for row in rows} - {key})
        if others:
            raise ConfigurationError(
                f"key {key!r} reaches the row whose {self.columns.key} is {others[0]!r} in "
                f"column {self._key_name()}: the column's comparison (its collation) ignores "
                "case, accents or trailing spaces, so one row would answer to two keys; use the "
                "key exactly as the column holds it"
            )
        return rows[0]._mapping if rows else None

    def _mapped(self, name: str) -> sa.ColumnElement[Any]:
        column = self._column(name)
        if name == "scopes" and self.formats.json_cast:
            # psycopg hands JSON back parsed; its text shows how the application spaced it.
            return sa.cast(column, sa.Text).label(name)
        return column.label(name)

    def _reading(self) -> sa.Select[Any]:
        """The statement reading the row of ``:key`` with its side row: the mapped columns,
        each labelled with its field's name, and the state columns as ``lease_<column>``."""
        mapped = [self._mapped(name) for name in self.columns.columns()]
        state = [c.label(f"lease_{c.name}") for c in self.leases.c if c.name != "key"]
        # The side table's key is the canonical string; an int or a uuid cast to text is it.
        joined = self.key if self.kind == "text" else sa.cast(self.key, self.leases.c.key.type)
        return (
            sa.select(*mapped, *state)
            .select_from(self.table.outerjoin(self.leases, self.leases.c.key == joined))
            .where(self.key == sa.bindparam("key"))
        )

    def _locking(self) -> sa.Select[Any]:
        """The statement locking the row of ``:key``.

        Writers lock the application's row first, alone: PostgreSQL refuses FOR UPDATE on the
        nullable side of an outer join and MariaDB has no FOR UPDATE OF.
        """
        return (
            sa.select(self.key.label("key"))
            .where(self.key == sa.bindparam("key"))
            .with_for_update()
        )

    def select(self, key: str) -> Read:
        """Read the row of ``key`` with its side row (:meth:`_reading`), for :meth:`record_of`."""
        return self._read, {"key": self._value(key)}

    def _lock(self, key: str) -> Step:
        """Lock the row of ``key`` (:meth:`_locking`)."""
        return self._lock_row, {"key": self._value(key)}

    def _record(self, key: str, row: sa.RowMapping) -> Record | None:
        refresh = row["refresh_token"]
        if refresh is None:
            return None
        access = row["access_token"]
        if not isinstance(access, str) or not isinstance(refresh, str):
            raise StoreCorrupted(f"the credential for key {key!r} has no tokens", key=key)
        side = row["lease_version"]
        scopes = read_scopes(row.get("scopes"))
        if scopes is None:
            raise StoreCorrupted(
                f"stored record for key {key!r} has a bad 'scopes' column", key=key
            )
        fields: dict[str, Any] = {
            "key": key,
            "access_token": access,
            "refresh_token": refresh,
            "expires_at": self._from_column(key, row["expires_at"]),
            "scopes": scopes,
            "subscription_type": row.get("subscription_type"),
            # The version still binds the side row, so a write replaces its void state.
            "version": f"{side or _NO_SIDE_ROW}.{token_digest(refresh)}",
        }
        if side is not None:
            # A lease always holds: it may be a live refresh (the stored value changes without
            # a new token when the application re-seals it with a random nonce), and it ends by
            # itself. What the old token earned (needs_reauth, failures, a cooldown) is void
            # once the application stored another one.
            fields["lease_owner"] = row["lease_lease_owner"]
            fields["lease_until"] = read_epoch_ms(
                row["lease_lease_until"], key=key, field="lease_until"
            )
            if _side_applies(side, refresh):
                fields["status"] = _status(key, row["lease_status"])
                fields["failures"] = row["lease_failures"] or 0
                fields["cooldown_until"] = read_epoch_ms(
                    row["lease_cooldown_until"], key=key, field="cooldown_until"
                )
                fields["last_error"] = row["lease_last_error"]
                fields["refreshed_at"] = read_epoch_ms(
                    row.get("lease_refreshed_at"), key=key, field="refreshed_at"
                )
        if self.columns.refreshed_at is not None:
            # The application's own column, which a login bypassing credkeeper may set too.
            fields["refreshed_at"] = self._refreshed_of(key, row["refreshed_at"])
        return stored_record(**fields)

    def record_of(self, key: str, rows: Rows) -> Record | None:
        """The record under ``key`` in the ``rows`` :meth:`select` read, or ``None`` when the
        row holds no credential."""
        row = self._exact(key, rows)
        return None if row is None else self._record(key, row)

    def _scopes_value(self, scopes: tuple[str, ...], stored: Any) -> Any:
        """``scopes`` as the scopes column keeps them: its type's format, or for text the
        ``stored`` value's, else ``scopes_format``'s (space-separated by default)."""
        kind = self.formats.scopes
        if kind == "array":
            return list(scopes)
        if kind == "json" or (text_scopes_format(stored) or self.formats.scopes_default) == "json":
            text = json_scopes(scopes, stored)
        else:
            text = " ".join(scopes)
        if self.formats.json_cast:
            return sa.cast(sa.literal(text, sa.Text()), self._column("scopes").type)
        return text

    def _credential_values(self, record: Record, stored: sa.RowMapping | None) -> dict[str, Any]:
        """The mapped columns' new values, each in the format of the ``stored`` row (if any)."""
        before: Mapping[str, Any] = {} if stored is None else dict(stored)
        values: dict[str, Any] = {
            self.columns.access_token: record.access_token,
            self.columns.refresh_token: record.refresh_token,
            self.columns.expires_at: self._expiry_value(
                record.expires_at, before.get("expires_at")
            ),
        }
        if self.columns.scopes is not None:
            values[self.columns.scopes] = self._scopes_value(record.scopes, before.get("scopes"))
        if self.columns.subscription_type is not None:
            values[self.columns.subscription_type] = record.subscription_type
        if self.columns.refreshed_at is not None:
            values[self.columns.refreshed_at] = self._refreshed_value(
                record.refreshed_at, before.get("refreshed_at")
            )
        return values

    def _insert(self, record: Record) -> Plan:
        """Plan: create the row of a key the table has none for, if ``insert`` allows."""
        if not self.columns.insert:
            raise StoreError(
                f"table {self.table.name!r} has no row with {self.columns.key} = {record.key!r}; "
                "credkeeper stores credentials in existing rows and never inserts them, unless "
                "the store is opened with insert=true",
                key=record.key,
            )
        if record.version is not None:
            # Re-creating a row the application deleted would resurrect a credential.
            raise _conflict(record, "was deleted since it was read")
        version = _side_version(record.refresh_token)
        # A duplicate key, from another worker or the application creating the row first,
        # fails the insert (the key column is unique, checked on first use): ConflictError.
        yield sa.insert(self.table).values(
            {self.columns.key: self._value(record.key), **self._credential_values(record, None)}
        )
        # A side row left behind by a row the application deleted belongs to no credential.
        yield sa.delete(self.leases).where(self.leases.c.key == record.key)
        state = _state_values(record, version, self.leases)
        yield sa.insert(self.leases).values(key=record.key, **state)
        return record.replace(version=f"{version}.{token_digest(record.refresh_token)}")

    def put(self, record: Record) -> Plan:
        """Plan: compare-and-swap on the side row's version and the stored refresh token; with
        ``insert``, an insert where the table has no row for the key."""
        locked = yield self._lock(record.key)
        outcome = yield self.select(record.key)
        self._exact(record.key, locked.rows)
        if not locked.rows or self._exact(record.key, outcome.rows) is None:
            return (yield from self._insert(record))
        row = outcome.rows[0]._mapping
        current = self._record(record.key, row)
        expected = None if current is None else current.version
        if record.version != expected:
            raise _conflict(record, "changed, was created or was deleted since it was read")
        version = _side_version(record.refresh_token)
        state = _state_values(record, version, self.leases)
        yield (
            sa.update(self.table)
            .where(self._matches(record.key))
            .values(self._credential_values(record, row))
        )
        if row["lease_version"] is None:
            yield sa.delete(self.leases).where(self.leases.c.key == record.key)
            yield sa.insert(self.leases).values(key=record.key, **state)
        else:
            changed = yield (
                sa.update(self.leases)
                .where(
                    self.leases.c.key == record.key, self.leases.c.version == row["lease_version"]
                )
                .values(**state)
            )
            if changed.rowcount != 1:
                raise _conflict(record, "changed since it was read")
        return record.replace(version=f"{version}.{token_digest(record.refresh_token)}")

    def delete(self, key: str) -> Plan:
        """Plan: clear the mapped columns, or with ``delete_rows`` delete the row, and the side
        row; whether there was a credential.

        Where a mapped column is ``NOT NULL`` the row cannot be without a credential, and
        without ``delete_rows`` that is a ConfigurationError: the row may hold columns the
        application owns, so credkeeper deletes it only when told to.
        """
        locked = yield self._lock(key)
        outcome = yield self.select(key)
        self._exact(key, locked.rows)
        row = self._exact(key, outcome.rows)
        if row is None or self._record(key, row) is None:
            return False
        if self.columns.delete_rows:
            yield sa.delete(self.table).where(self._matches(key))
        elif self.not_null is None:
            cleared = {
                column: None for name, column in self.columns.columns().items() if name != "key"
            }
            yield sa.update(self.table).where(self._matches(key)).values(cleared)
        else:
            raise ConfigurationError(
                f"cannot delete the credential for key {key!r}: column "
                f"{self.table.name}.{self.not_null} is NOT NULL, so its row cannot be kept "
                "without one; open the store with delete_rows=true to let credkeeper delete "
                "such rows, or allow NULL in the mapped columns"
            )
        yield sa.delete(self.leases).where(self.leases.c.key == key)
        return True
