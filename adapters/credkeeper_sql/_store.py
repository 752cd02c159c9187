"""``SQLStore`` and ``AsyncSQLStore``: credentials in PostgreSQL, MySQL/MariaDB or SQLite.

Both execute the plans of ``_schema`` (one transaction each) with their kind of engine; this
module adds engines, options, and the translation of driver errors into credkeeper's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Self, TypeVar

import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from credkeeper import (
    ConfigurationError,
    ConflictError,
    CredkeeperError,
    Record,
    StoreError,
    StoreUnavailable,
    time_remaining,
)
from credkeeper import storekit as kit

from ._listen import channel_for, listener, notify_statement
from ._schema import (
    DEFAULT_LEASE_TABLE,
    DEFAULT_TABLE,
    EXPIRES_AT_UNITS,
    EXPIRES_AT_UNITS_TEXT,
    SCOPES_FORMATS,
    SCOPES_FORMATS_TEXT,
    UPGRADE_COLUMNS,
    ColumnMap,
    ExistingTable,
    Formats,
    Outcome,
    OwnTable,
    Plan,
    Rows,
    Step,
    credentials_table,
    formats_of,
    key_kind,
    leases_table,
    wall_time,
)

__all__ = ["AsyncSQLStore", "SQLStore", "init_store", "upgrade_store"]

logger = logging.getLogger("credkeeper")

Layout = OwnTable | ExistingTable

# The driver each backend gets when a URL names none: the ones credkeeper is tested with.
_DEFAULT_DRIVERS = {
    "postgresql": "psycopg",
    "postgres": "psycopg",
    "mysql": "pymysql",
    "mariadb": "pymysql",
}
_COLUMN_OPTIONS = {
    "key_column": "key",
    "access_token_column": "access_token",
    "refresh_token_column": "refresh_token",
    "expires_at_column": "expires_at",
    "scopes_column": "scopes",
    "subscription_type_column": "subscription_type",
    "refreshed_at_column": "refreshed_at",
}
# Options describing an existing-table mapping beyond its columns: ColumnMap's own fields.
_MAPPING_OPTIONS = ("expires_at_unit", "scopes_format", "insert", "delete_rows")
# The store's name in messages.
_STORE = "SQL store"


def _one_of(values: tuple[str, ...]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if not isinstance(value, str) or value not in values:
            raise ValueError(value)
        return value

    return parse


# The options of a URL's query and of the constructors' keywords (but ``columns``, a
# ColumnMap, which only a keyword can give).
_OPTIONS: dict[str, kit.Option[Any]] = {
    "table": kit.NAME,
    "schema": kit.NAME,
    "lease_table": kit.NAME,
    "page_size": kit.COUNT,
    "create": kit.FLAG,
    "plaintext": kit.FLAG,
    "notify": kit.FLAG,
    "expires_at_unit": kit.Option(_one_of(EXPIRES_AT_UNITS), EXPIRES_AT_UNITS_TEXT),
    "scopes_format": kit.Option(_one_of(SCOPES_FORMATS), SCOPES_FORMATS_TEXT),
    "insert": kit.FLAG,
    "delete_rows": kit.FLAG,
    **dict.fromkeys(_COLUMN_OPTIONS, kit.NAME),
}

# A duplicate key: on a create, another writer created the record first.
_DUPLICATE_CODES = frozenset(
    {"23505", "1062", "1586", "SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"}
)

# Lost races that left nothing written: serialization failures and deadlocks (PostgreSQL
# SQLSTATE, MySQL error numbers), SQLite's "database is locked" between two writers.
_RACE_CODES = frozenset({"40001", "40P01", "1213", "SQLITE_BUSY", "SQLITE_LOCKED"})

# What may pass by itself, so StoreUnavailable whatever exception class the driver chose:
# PostgreSQL's read-only standby after a failover, too many connections, lock and statement
# timeouts, shutdowns and restarts (and class 08, connection exceptions, by prefix); MySQL's
# too many connections, lock wait timeout, read-only server or transaction, killed or lost
# connections.
_PASSING_CODES = frozenset(
    {
        *_RACE_CODES,
        *("25006", "53300", "55P03", "57014", "57P01", "57P02", "57P03"),
        *("1040", "1205", "1290", "1792", "1836", "1927", "2002", "2003", "2006", "2013", "4031"),
    }
)

# What the store's configuration gets wrong, and its fix. Retrying cannot help, so these are
# ConfigurationError (the CLI's exit 2), never StoreUnavailable. The server's own message is
# quoted with them: it names databases, users, tables and columns, never a row's value.
# Values the table refuses, reported by MySQL (3819 CHECK, 1364 no default) and MariaDB
# (4025 CHECK) outside IntegrityError.
_REFUSED_VALUE_CODES = frozenset({"3819", "4025", "1364"})

_DATABASE = ("the database does not exist", "create it, or correct the database in the store URL")
_LOGIN = (
    "the server refused the login",
    "check the user and password in the store URL, and that the server lets that user in "
    "from this host",
)
_PRIVILEGE = (
    "the user lacks a privilege",
    "grant it SELECT, INSERT, UPDATE and DELETE on credkeeper's tables, and SELECT and UPDATE "
    "on a mapped table (INSERT too with insert=true, DELETE with delete_rows=true)",
)
_SCHEMA = ("the schema does not exist", "create it, or correct the schema option")
_TABLE = (
    "a table does not exist",
    "create credkeeper's tables with `credkeeper init-store URL` (or add credkeeper_sql.metadata "
    "to your migrations), and check the table, schema and lease_table options",
)
_COLUMN = (
    "a column does not exist",
    "check the *_column options against the table's columns",
)
_FILE = (
    "the database file cannot be opened or written",
    "check that its directory exists and that this process may read and write the file there",
)
_MISCONFIGURED = {
    # PostgreSQL SQLSTATEs
    "3D000": _DATABASE,
    "28000": _LOGIN,
    "28P01": _LOGIN,
    "42501": _PRIVILEGE,
    "3F000": _SCHEMA,
    "42P01": _TABLE,
    "42703": _COLUMN,
    # MySQL and MariaDB error numbers
    "1049": _DATABASE,
    "1045": _LOGIN,
    "1698": _LOGIN,
    "1044": _PRIVILEGE,
    "1142": _PRIVILEGE,
    "1143": _PRIVILEGE,
    "1146": _TABLE,
    "1054": _COLUMN,
    # SQLite result codes
    "SQLITE_CANTOPEN": _FILE,
    "SQLITE_READONLY": _FILE,
    "SQLITE_READONLY_DIRECTORY": _FILE,
    "SQLITE_READONLY_DBMOVED": _FILE,
    "SQLITE_PERM": _FILE,
}
# libpq reports a server's refusal at connection time as text only, without its SQLSTATE; and
# SQLite reports a missing table or column as the generic SQLITE_ERROR.
_UNCODED = (
    ("psycopg", re.compile(r'database ".*" does not exist'), _DATABASE),
    (
        "psycopg",
        re.compile(
            r'role ".*" does not exist|password authentication failed|no pg_hba\.conf entry'
            r"|authentication failed for user|no password supplied"
        ),
        _LOGIN,
    ),
    ("psycopg", re.compile(r"permission denied for database"), _PRIVILEGE),
    ("sqlite3", re.compile(r"^no such table"), _TABLE),
    ("sqlite3", re.compile(r"^no such column"), _COLUMN),
)
# How messages name each server; a mysql:// URL may well point at MariaDB.
_SERVERS = {
    "postgresql": ("PostgreSQL", 5432),
    "mysql": ("MySQL/MariaDB", 3306),
    "mariadb": ("MariaDB", 3306),
}
# MariaDB's check on a JSON column, as information_schema shows it.
_SKIPPED_INDEX = "Skipped unsupported reflection of expression-based index"
_JSON_VALID = re.compile(r"json_valid\(`([^`]+)`\)")
# Enough of a server's message to say what is wrong.
_REASON_LENGTH = 300


# -- options -----------------------------------------------------------------------------


def _split_url(url: str) -> tuple[URL, dict[str, Any]]:
    """The engine URL without the store's query options, and those options, read.

    The rest of the query is the driver's (``application_name``, ``charset``,
    ``connect_timeout``, a repeated ``host``, ...) and stays in the engine URL for it.
    """
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        raise ConfigurationError(
            "SQL store URL must look like postgresql+psycopg://user@host/db, "
            "mysql+pymysql://user@host/db or sqlite:///path/to/creds.db"
        ) from None
    for name, value in parsed.query.items():
        if name in _OPTIONS and not isinstance(value, str):
            raise ConfigurationError(f"SQL store URL gives option {name!r} more than once")
    ours, _ = kit.read_options(parsed.query, _OPTIONS, store=_STORE, others="return")
    engine_url = parsed.difference_update_query(list(ours))
    backend, _, driver = engine_url.drivername.partition("+")
    if backend == "postgres":  # a common alias SQLAlchemy does not know
        backend = "postgresql"
    driver = driver or _DEFAULT_DRIVERS.get(backend, "")
    engine_url = engine_url.set(drivername=f"{backend}+{driver}" if driver else backend)
    return engine_url, ours


_DRIVER_PACKAGES = {
    "psycopg": "'psycopg[binary]'",
    "psycopg_async": "'psycopg[binary]'",
    "psycopg2": "psycopg2-binary",
    "asyncpg": "asyncpg",
    "pymysql": "PyMySQL",
    "aiomysql": "aiomysql",
    "asyncmy": "asyncmy",
    "mysqldb": "mysqlclient",
    "aiosqlite": "aiosqlite",
}


def _make_engine(url: URL) -> sa.Engine | AsyncEngine:
    """An engine for ``url``; a missing dialect or driver is a ConfigurationError naming it."""
    try:
        if url.get_dialect().is_async:
            return create_async_engine(url, **_engine_options(url))
        return sa.create_engine(url, **_engine_options(url))
    except sa_exc.NoSuchModuleError:
        raise ConfigurationError(
            f"SQLAlchemy has no database dialect {url.drivername!r}; use e.g. "
            "postgresql+psycopg://, mysql+pymysql:// or sqlite:///"
        ) from None
    except ImportError as exc:
        driver = url.drivername.partition("+")[2]
        package = _DRIVER_PACKAGES.get(driver, exc.name or driver)
        raise ConfigurationError(
            f"the database driver for {url.drivername!r} is not installed; "
            f"install it with pip install {package}"
        ) from exc


def _engine_from_string(url: str, *, want_async: bool) -> Any:
    engine_url, options = _split_url(url)
    if options:
        raise ConfigurationError(
            f"store option(s) {', '.join(sorted(options))} in a URL given to the constructor; "
            "pass them as keywords, or open the URL with open_store()"
        )
    engine = _make_engine(engine_url)
    if isinstance(engine, AsyncEngine) != want_async:
        wanted = "AsyncSQLStore" if isinstance(engine, AsyncEngine) else "SQLStore"
        raise ConfigurationError(f"{engine_url.drivername!r} needs {wanted}, not this class")
    return engine


def _connect_args(url: URL) -> dict[str, Any]:
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if backend == "sqlite":
        # Writers wait for each other's locks instead of failing at once.
        return {"timeout": 30}
    arguments: dict[str, Any] = {}
    if driver in ("psycopg", "psycopg_async", "pymysql", "aiomysql") and (
        "connect_timeout" not in url.query
    ):
        arguments["connect_timeout"] = 10
    if backend in ("mysql", "mariadb") and "charset" not in url.query:
        arguments["charset"] = "utf8mb4"
    return arguments


def _engine_options(url: URL) -> dict[str, Any]:
    # hide_parameters keeps bound values, the tokens among them, out of error messages and
    # SQLAlchemy's logs.
    options: dict[str, Any] = {"hide_parameters": True, "connect_args": _connect_args(url)}
    if url.get_backend_name() != "sqlite":
        # At most 15 connections, as SQLAlchemy's default pool (5 kept, 10 more on demand)
        # allows, but all 15 kept: that pool closes each connection beyond the fifth when it is
        # returned, so a sweep's threads opened a new database session every few calls, and
        # PostgreSQL forked a backend for each.
        options.update(pool_pre_ping=True, pool_recycle=3600, pool_size=15, max_overflow=0)
    return options


@dataclass(frozen=True, slots=True)
class _StoreOptions:
    """The store's options, read once; the layout they describe is built on first use."""

    table: str = DEFAULT_TABLE
    schema: str | None = None
    columns: ColumnMap | None = None
    lease_table: str = DEFAULT_LEASE_TABLE
    page_size: int = 500
    create: bool = False
    plaintext: bool = False
    notify: bool = True

    @classmethod
    def read(cls, given: Mapping[str, Any]) -> _StoreOptions:
        """The options ``given`` in a URL's query or as keywords, the same way; ``None``
        stands for an option's default.

        An existing-table mapping comes as ``columns`` (a :class:`ColumnMap`, only as a
        keyword) or as the ``*_column`` options with ``expires_at_unit``, ``scopes_format``,
        ``insert`` and ``delete_rows``. An option the store does not know is refused.
        """
        given = {name: value for name, value in given.items() if value is not None}
        columns = given.pop("columns", None)
        if columns is not None and not isinstance(columns, ColumnMap):
            raise ConfigurationError("columns must be a credkeeper_sql.ColumnMap")
        values, _ = kit.read_options(given, _OPTIONS, store=_STORE)
        mapped = {
            field: values.pop(option)
            for option, field in _COLUMN_OPTIONS.items()
            if option in values
        }
        described = {name: values.pop(name) for name in _MAPPING_OPTIONS if name in values}
        if described and not mapped:
            names = ", ".join(sorted(described))
            if columns is not None:
                raise ConfigurationError(
                    f"give {names} as fields of the ColumnMap passed as columns=, not as options"
                )
            raise ConfigurationError(
                f"SQL store option(s) {names} only apply to an existing-table mapping: give "
                "table, key_column, access_token_column, refresh_token_column and "
                "expires_at_column too"
            )
        if mapped and columns is not None:
            raise ConfigurationError(
                "give either columns=ColumnMap(...) or the *_column options, not both"
            )
        if mapped:
            missing = [
                option
                for option, field in _COLUMN_OPTIONS.items()
                if field in ("key", "access_token", "refresh_token", "expires_at")
                and field not in mapped
            ]
            if missing:
                raise ConfigurationError(
                    f"mapping credentials onto an existing table needs {', '.join(missing)} too"
                )
            columns = ColumnMap(**mapped, **described)
        if columns is not None and "table" not in values:
            raise ConfigurationError("an existing-table mapping needs table=<the table's name>")
        return cls(columns=columns, **values)

    def build(self, connection: sa.Connection) -> Layout:
        """The layout, reflecting the application's table when there is a mapping.

        A credkeeper table made before a column of :data:`UPGRADE_COLUMNS` existed is used
        without it (the field reads as None), with a warning naming the fix.
        """
        if self.columns is None:
            kept = not _missing_columns(connection, self.table, self.schema)
            layout: Layout = OwnTable(
                credentials_table(sa.MetaData(schema=self.schema), self.table, refreshed_at=kept)
            )
        else:
            where = _where(connection.engine.url)
            try:
                with warnings.catch_warnings():
                    # SQLite's reflection says it skips an expression index, such as the one
                    # init-store --check names for ISO-8601 text; none is needed here.
                    warnings.filterwarnings("ignore", _SKIPPED_INDEX, sa_exc.SAWarning)
                    table, formats = self._reflect(connection, self.columns)
                kept = not _missing_columns(connection, self.lease_table, self.schema)
                leases = leases_table(table.metadata, self.lease_table, refreshed_at=kept)
                layout = ExistingTable(table, leases, self.columns, formats)
            except ConfigurationError as exc:
                raise ConfigurationError(f"cannot use the {where}: {exc}") from None
        if self.create:
            for table in layout.tables:
                if table.name != self.table or self.columns is None:
                    _create(connection, table)
        return layout

    def _reflect(self, connection: sa.Connection, columns: ColumnMap) -> tuple[sa.Table, Formats]:
        """The application's table as the database has it, and the formats of its columns.

        A missing table or mapped column is a ConfigurationError naming it, with the columns
        the table does have; so is a table that ``insert`` cannot insert rows into.
        """
        wanted = list(columns.columns().values())
        try:
            table = sa.Table(
                self.table,
                sa.MetaData(schema=self.schema),
                autoload_with=connection,
                include_columns=wanted,
            )
        except sa_exc.NoSuchTableError:
            schema = f" in schema {self.schema!r}" if self.schema else ""
            raise ConfigurationError(
                f"table {self.table!r} does not exist{schema}; the existing-table mapping needs "
                "the application's own table: check the table and schema options"
            ) from None
        missing = [
            (name, column) for name, column in columns.columns().items() if column not in table.c
        ]
        inspector = sa.inspect(connection)
        if missing:
            name, column = missing[0]
            present = inspector.get_columns(self.table, schema=self.schema)
            raise ConfigurationError(
                f"table {self.table!r} has no column {column!r} (mapped to {name}); its columns "
                f"are {', '.join(c['name'] for c in present)}: correct the {name}_column option"
            )
        dialect = connection.dialect.name
        formats = formats_of(
            table, columns, dialect=dialect, json_columns=self._json_columns(connection)
        )
        if columns.insert:
            self._check_insertable(inspector, columns)
        # Columns whose values credkeeper reads and writes as the driver hands them over,
        # without SQLAlchemy's conversions: SQLite keeps what it is given (a column declared
        # UUID holds the text the application wrote, a DATETIME column its text), and a JSON
        # type would serialize again the JSON text credkeeper writes in the row's own spelling.
        raw = [
            column
            for column, wanted_raw in (
                (columns.key, dialect == "sqlite" and key_kind(table.c[columns.key]) is None),
                (
                    columns.expires_at,
                    formats.expires_at == "text"
                    and not isinstance(table.c[columns.expires_at].type, sa.String),
                ),
                (
                    columns.refreshed_at,
                    formats.refreshed_at == "text"
                    and not isinstance(table.c[str(columns.refreshed_at)].type, sa.String),
                ),
                (
                    columns.scopes,
                    formats.scopes == "json"
                    and not formats.json_cast
                    and not isinstance(table.c[str(columns.scopes)].type, sa.String),
                ),
            )
            if wanted_raw and column is not None
        ]
        if raw:
            table = sa.Table(
                self.table,
                sa.MetaData(schema=self.schema),
                *(
                    sa.Column(
                        column,
                        sa.Text,
                        primary_key=table.c[column].primary_key,
                        nullable=table.c[column].nullable,
                    )
                    for column in raw
                ),
                autoload_with=connection,
                include_columns=wanted,
            )
        return table, formats

    def _json_columns(self, connection: sa.Connection) -> frozenset[str]:
        """Columns MariaDB keeps JSON in: its JSON type is LONGTEXT checked by json_valid()."""
        if not getattr(connection.dialect, "is_mariadb", False):
            return frozenset()
        clauses = connection.execute(
            sa.text(
                "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS "
                "WHERE CONSTRAINT_SCHEMA = COALESCE(:schema, DATABASE()) AND TABLE_NAME = :table"
            ),
            {"schema": self.schema, "table": self.table},
        ).scalars()
        return frozenset(
            match[1] for clause in clauses if (match := _JSON_VALID.fullmatch(str(clause)))
        )

    def _check_insertable(self, inspector: sa.Inspector, columns: ColumnMap) -> None:
        """Refuse ``insert`` unless rows holding only the mapped columns can be inserted, and
        the key column is unique, so that two workers creating one key insert one row."""
        mapped = set(columns.columns().values())
        primary = inspector.get_pk_constraint(self.table, schema=self.schema)
        pk = list(primary.get("constrained_columns") or [])
        described = inspector.get_columns(self.table, schema=self.schema)
        required = [
            str(column["name"])
            for column in described
            if column["name"] not in mapped
            and not column.get("nullable", True)
            and column.get("default") is None
            and column.get("autoincrement") is not True
            and not column.get("identity")
            and not column.get("computed")
            # SQLite's INTEGER PRIMARY KEY is the rowid, which SQLite numbers by itself.
            and not (
                inspector.dialect.name == "sqlite"
                and pk == [column["name"]]
                and type(column["type"]) is sa.INTEGER
            )
        ]
        name = self.table
        if required:
            listed = ", ".join(required)
            raise ConfigurationError(
                f"insert=true inserts rows holding {columns.key} and the mapped columns only, "
                f"but the NOT NULL column(s) {listed} of table {name!r} have no default; give "
                f"them one (ALTER TABLE {name} ALTER COLUMN {required[0]} SET DEFAULT ...) or "
                "allow NULL there"
            )
        indexes: list[Mapping[str, Any]] = [
            *inspector.get_indexes(name, schema=self.schema),
            *inspector.get_unique_constraints(name, schema=self.schema),
        ]
        unique = pk == [columns.key] or any(
            index.get("column_names") == [columns.key]
            and index.get("unique", True)
            # A partial index (PostgreSQL's or SQLite's WHERE) leaves other rows unchecked.
            and not any(
                option.endswith("_where") and value is not None
                for option, value in (index.get("dialect_options") or {}).items()
            )
            for index in indexes
        )
        if not unique:
            raise ConfigurationError(
                f"insert=true needs {name}.{columns.key} to be unique (its primary key, or a "
                "unique index on it alone): without that, two workers creating the same key at "
                f"once would insert two rows. Create it, e.g. CREATE UNIQUE INDEX "
                f"{name}_{columns.key}_key ON {name} ({columns.key})"
            )


def _create(connection: sa.Connection, table: sa.Table) -> None:
    """Create ``table`` unless it exists, when other processes may be creating it too: the
    loser of that race finds the table made and goes on, instead of failing its first call.

    PostgreSQL aborts a transaction on any error, so there the attempt has a savepoint of its
    own; MySQL commits DDL at once (a savepoint would not survive it) and SQLite's error leaves
    the transaction usable.
    """
    postgresql = connection.dialect.name == "postgresql"
    try:
        with connection.begin_nested() if postgresql else contextlib.nullcontext():
            table.create(connection, checkfirst=True)
    except sa_exc.DBAPIError:
        if not sa.inspect(connection).has_table(table.name, schema=table.schema):
            raise


def _missing_columns(
    connection: sa.Connection, table: str, schema: str | None, *, warn: bool = True
) -> list[str]:
    """The columns of :data:`UPGRADE_COLUMNS` that credkeeper's existing ``table`` lacks, with
    (``warn``) a warning naming the fix; none for a table that does not exist yet (it is made
    whole)."""
    inspector = sa.inspect(connection)
    if not inspector.has_table(table, schema=schema):
        return []
    present = {column["name"] for column in inspector.get_columns(table, schema=schema)}
    missing = [made().name for made in UPGRADE_COLUMNS if made().name not in present]
    if missing and warn:
        logger.warning(
            "table %r has no column %s (it was created by an older credkeeper): the last "
            "refresh of each credential is not kept, so the sweeper's keep-alive refreshes "
            "every credential at each pass; run `credkeeper init-store URL` to add it",
            table,
            ", ".join(missing),
        )
    return missing


def _where(url: URL) -> str:
    """The database ``url`` names, for messages: host, port, database and user, no password."""
    backend = url.get_backend_name()
    if backend == "sqlite":
        return f"SQLite database {url.database or ':memory:'!r}"
    name, port = _SERVERS.get(backend, (backend, None))
    user = f", user {url.username!r}" if url.username else ""
    return (
        f"{name} server {url.host or 'localhost'}:{url.port or port}, "
        f"database {url.database!r}{user}"
    )


def _code(exc: BaseException) -> str | None:
    """The driver's code for ``exc``, or ``None``.

    SQLite's result code name; MySQL's error number, finer than its SQLSTATE (42000 is both an
    unknown database and a denied SELECT); else the SQLSTATE.
    """
    original = getattr(exc, "orig", None) or exc
    name = getattr(original, "sqlite_errorname", None)
    if isinstance(name, str):
        return name
    args = getattr(original, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):
        return str(args[0])
    for attribute in ("sqlstate", "pgcode"):
        value = getattr(original, attribute, None)
        if isinstance(value, str):
            return value
    return None


def _reason(exc: BaseException, url: URL) -> str:
    """The server's message for ``exc``, without the SQL, connection details or password."""
    original = getattr(exc, "orig", None) or exc
    primary = getattr(getattr(original, "diag", None), "message_primary", None)
    args: tuple[Any, ...] = getattr(original, "args", ())
    if isinstance(primary, str) and primary:  # psycopg, after connecting
        text = primary
    elif len(args) >= 2 and isinstance(args[0], int) and isinstance(args[1], str):  # MySQL
        text = args[1]
    else:
        # libpq puts the server's reason last, after "FATAL:".
        text = str(original).rpartition("FATAL:")[2]
    # A DETAIL or HINT line may quote the failing row, tokens included: keep the reason only.
    text = re.split(r"\n\s*(?:DETAIL|HINT|LINE \d+)\s*:", text, maxsplit=1)[0]
    text = " ".join(text.split())
    if url.password:
        text = text.replace(str(url.password), "***")
    return text[:_REASON_LENGTH]


def _misconfiguration(exc: BaseException, code: str | None) -> tuple[str, str] | None:
    """What ``exc`` says is wrong with the store's configuration, and the fix; or ``None``."""
    if code in _MISCONFIGURED:
        return _MISCONFIGURED[code]
    original = getattr(exc, "orig", None) or exc
    module = type(original).__module__
    text = str(original)
    for driver, pattern, cause in _UNCODED:
        if module.startswith(driver) and code in (None, "SQLITE_ERROR") and pattern.search(text):
            return cause
    return None


def _translate(exc: BaseException, key: str | None, *, writing: bool, url: URL) -> CredkeeperError:
    """A driver or SQLAlchemy error as credkeeper's; the message never quotes SQL or values.

    A wrong database, login, privilege, table or column is a ConfigurationError naming the
    database (host, port, name, user; never the password) and the server's reason, since
    retrying cannot help; only what may pass is StoreUnavailable.
    """
    about = f" for key {key!r}" if key is not None else ""
    if isinstance(exc, ValueError | OverflowError):
        # Raised while binding a value (a lone surrogate, an integer too large): the record
        # cannot be stored as it is, and retrying will not help.
        return StoreError(
            f"the SQL store cannot store a value{about} ({type(exc).__name__})", key=key
        )
    code = _code(exc)
    detail = f"{type(getattr(exc, 'orig', None) or exc).__name__}{f' {code}' if code else ''}"
    # MySQL and MariaDB report some refused values (CHECK, a column without a default) as
    # OperationalError: the same refusal, whatever the class.
    if writing and (isinstance(exc, sa_exc.IntegrityError) or code in _REFUSED_VALUE_CODES):
        if code is None or code in _DUPLICATE_CODES:
            return ConflictError(f"a record{about} already exists ({detail})", key=key)
        # NOT NULL, CHECK or FOREIGN KEY: the table refuses these values whoever writes first,
        # so this is no lost race. The server's message names the column or constraint.
        return StoreError(
            f"the {_where(url)} refused the values written{about} ({detail}: "
            f"{_reason(exc, url)}); check the mapped columns' constraints",
            key=key,
        )
    if writing and code in _RACE_CODES:
        return ConflictError(
            f"a concurrent write{about} won (deadlock or serialization failure, {detail}); "
            "read the record again",
            key=key,
        )
    misconfigured = _misconfiguration(exc, code)
    if misconfigured is not None:
        what, fix = misconfigured
        source = "SQLite" if url.get_backend_name() == "sqlite" else "the server"
        return ConfigurationError(
            f"cannot use the {_where(url)}: {what} ({source} says: {_reason(exc, url)}); {fix}"
        )
    if (
        code in _PASSING_CODES
        or (code is not None and code.startswith("08"))
        or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError | OSError
        )
        or getattr(exc, "connection_invalidated", False)
    ):
        return StoreUnavailable(
            f"the SQL store failed{about} ({_where(url)}): {detail}; retry later", key=key
        )
    return StoreError(f"the SQL store failed{about} ({_where(url)}): {detail}", key=key)


# What SQLAlchemy and the drivers raise; ValueError and OverflowError while binding a value.
_DRIVER_ERRORS = (sa_exc.SQLAlchemyError, OSError, ValueError, OverflowError)


def _boundary_at(url: URL, key: str | None, *, writing: bool) -> AbstractContextManager[None]:
    """Translate what the driver raises inside the block, on the database at ``url``, with
    :func:`_translate`: the one place the store maps driver errors. credkeeper's own errors
    pass; ``writing`` tells a lost race (a write) from a failed read."""
    return kit.error_boundary(
        lambda exc: _translate(exc, key, writing=writing, url=url), *_DRIVER_ERRORS
    )


def _page(
    layout: Layout, before: datetime, after: tuple[Any, Any] | None, size: int
) -> sa.Select[Any]:
    """One keyset page of ``scan_due``: candidate keys after ``after``, in (expiry, key) order.

    Each row is the key, the expiry as ordered, and the expiry as stored, for
    ``layout.is_due``; a page is full or the last one whatever that keeps of it.
    """
    condition, _ = layout.due(before)
    expiry = layout.order
    statement = sa.select(layout.key, expiry, layout.expires_at).where(condition)
    if after is not None:
        last_key, last_expiry = after
        # The redundant lower bound lets PostgreSQL and SQLite seek the index to the page's
        # start; without it they filter the OR from the first row on every page (quadratic).
        # The row-value form (expires_at, key) > (...) would be quadratic on MariaDB instead.
        statement = statement.where(
            expiry >= last_expiry,
            sa.or_(
                expiry > last_expiry,
                sa.and_(expiry == last_expiry, layout.key > last_key),
            ),
        )
    return statement.order_by(expiry, layout.key).limit(size)


def _keys_due(
    layout: Layout, rows: Rows, before: datetime, size: int
) -> tuple[list[str], tuple[Any, Any] | None]:
    """The due keys of one page's ``rows`` (:func:`_page`), and where the next page starts:
    ``None`` after the last page."""
    keys = [layout.spelling(row[0]) for row in rows if layout.is_due(row[2], before)]
    return keys, ((rows[-1][0], rows[-1][1]) if len(rows) == size else None)


def _outcome(result: sa.CursorResult[Any]) -> Outcome:
    if result.returns_rows:
        return Outcome(result.all())
    return Outcome((), result.rowcount)


def _split(step: Step) -> tuple[sa.Executable, Mapping[str, Any] | None]:
    """A plan's step as a statement and its parameters' values, if it has any."""
    return step if isinstance(step, tuple) else (step, None)


def _execute(connection: sa.Connection, plan: Plan) -> Any:
    """Execute ``plan``'s statements on ``connection``, each outcome sent back; its result."""
    try:
        step = next(plan)
        while True:
            step = plan.send(_outcome(connection.execute(*_split(step))))
    except StopIteration as stop:
        return stop.value


async def _execute_async(connection: AsyncConnection, plan: Plan) -> Any:
    """:func:`_execute` on an async connection."""
    try:
        step = next(plan)
        while True:
            step = plan.send(_outcome(await connection.execute(*_split(step))))
    except StopIteration as stop:
        return stop.value


# -- SQLite's lock waits ------------------------------------------------------------------

# A connection's busy timeout as it was configured, and as it is now: in Connection.info,
# which belongs to the DBAPI connection and so survives pool checkouts.
_BUSY_TIMEOUT = "credkeeper_sqlite_busy_timeout"


def _busy_timeout(configured: int, current: int, remaining: float | None) -> int:
    """Milliseconds SQLite may wait for another writer's lock: no longer than the call has.

    The ``current`` setting stays while it is within that and at least half of it: calls whose
    budgets differ by milliseconds, or calls with and without one, would otherwise each send a
    PRAGMA, a statement of its own that makes a read half as slow again.
    """
    wanted = configured if remaining is None else min(configured, int(remaining * 1000))
    return current if wanted // 2 <= current <= wanted else wanted


def _lock_waits(info: dict[Any, Any], remaining: float | None) -> Plan | None:
    """The plan making SQLite's wait for another writer's lock end by the call's deadline, or
    ``None`` when the connection's setting already does (most calls).

    SQLite retries a locked file for the connection's busy timeout (30 s for a store's own
    engine) by itself; inside a credkeeper call that wait is part of the call's one budget.
    ``info`` is the connection's; one no budget ever touched keeps its own setting untouched.
    """
    state: list[int] | None = info.get(_BUSY_TIMEOUT)
    if state is None:
        return None if remaining is None else _set_lock_waits(info, remaining)
    if _busy_timeout(state[0], state[1], remaining) == state[1]:
        return None
    return _set_lock_waits(info, remaining)


def _set_lock_waits(info: dict[Any, Any], remaining: float | None) -> Plan:
    state: list[int] | None = info.get(_BUSY_TIMEOUT)
    if state is None:
        outcome = yield sa.text("PRAGMA busy_timeout")
        configured = int(outcome.rows[0][0])
        state = info[_BUSY_TIMEOUT] = [configured, configured]
    wanted = _busy_timeout(state[0], state[1], remaining)
    if wanted != state[1]:
        yield sa.text(f"PRAGMA busy_timeout = {wanted}")
        state[1] = wanted


def _bound_lock_waits(connection: sa.Connection) -> None:
    """Bound SQLite's lock waits on ``connection`` by the call's deadline: :func:`_lock_waits`."""
    if connection.dialect.name == "sqlite":
        plan = _lock_waits(connection.info, time_remaining())
        if plan is not None:
            _execute(connection, plan)


async def _bound_lock_waits_async(connection: AsyncConnection) -> None:
    """:func:`_bound_lock_waits` on an async connection."""
    if connection.dialect.name == "sqlite":
        plan = _lock_waits(connection.info, time_remaining())
        if plan is not None:
            await _execute_async(connection, plan)


# -- the database's clock ----------------------------------------------------------------

# Dialects whose clock expression below gives a naive time that is UTC.
_NAIVE_UTC = frozenset({"mysql", "mariadb", "sqlite"})


def _clock_query(dialect: sa.Dialect) -> sa.Select[Any]:
    """One statement reading the database's own clock, for ``dialect``."""
    if dialect.name == "postgresql":
        # timestamptz: an instant, whatever the session's TimeZone.
        return sa.select(sa.func.now())
    if dialect.name in ("mysql", "mariadb"):
        # CURRENT_TIMESTAMP is naive in the session's time zone; UTC_TIMESTAMP is always UTC.
        return sa.select(sa.literal_column("UTC_TIMESTAMP(6)"))
    if dialect.name == "sqlite":
        # There is no server: the file lives on one host, and every process there reads the
        # same clock.
        return sa.select(sa.func.strftime("%Y-%m-%d %H:%M:%f", "now"))
    return sa.select(sa.func.current_timestamp())


def _clock_value(value: object, dialect: sa.Dialect) -> datetime | None:
    """What :func:`_clock_query` returned, as an aware UTC datetime; None if it cannot tell."""
    moment = value
    if isinstance(value, str):  # SQLite's strftime
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            moment = None
    if not isinstance(moment, datetime):
        raise StoreError(
            f"the {dialect.name} database's clock read as {type(value).__name__}, not a time"
        )
    if moment.utcoffset() is not None:
        return moment.astimezone(UTC)
    if dialect.name in _NAIVE_UTC:
        return moment.replace(tzinfo=UTC)
    # A time in an unknown zone: no clock at all is better than a wrong one, and leases are
    # then judged on each manager's clock, as for a store without now().
    return None


# -- what both classes share ----------------------------------------------------------------

EngineT = TypeVar("EngineT", sa.Engine, AsyncEngine)


class _SQLStoreBase(Generic[EngineT]):
    """What :class:`SQLStore` and :class:`AsyncSQLStore` share: the constructor and its
    options, ``from_url``, the error boundary, how a store shows; each class adds only its
    calls to its engine."""

    _engine_kind: ClassVar[type[sa.Engine] | type[AsyncEngine]]
    engine: EngineT

    def __init__(
        self,
        engine: EngineT | str,
        *,
        table: str | None = None,
        schema: str | None = None,
        columns: ColumnMap | None = None,
        lease_table: str = DEFAULT_LEASE_TABLE,
        page_size: int = 500,
        create: bool = False,
        plaintext: bool = False,
        notify: bool = True,
    ) -> None:
        options = _StoreOptions.read(
            {
                "table": table,
                "schema": schema,
                "columns": columns,
                "lease_table": lease_table,
                "page_size": page_size,
                "create": create,
                "plaintext": plaintext,
                "notify": notify,
            }
        )
        kind = self._engine_kind
        if isinstance(engine, str):
            made = _engine_from_string(engine, want_async=kind is AsyncEngine)
            self._setup(made, options, owned=True)
        elif isinstance(engine, kind):
            self._setup(engine, options, owned=False)
        else:
            raise ConfigurationError(
                f"engine must be a SQLAlchemy {kind.__name__} or a database URL"
            )

    def _setup(self, engine: EngineT, options: _StoreOptions, *, owned: bool) -> None:
        self.engine = engine
        self._options = options
        self._own_engine = owned
        self._layout: Layout | None = None
        self._listener: kit.ChangeListener | None = None
        self._channel: str | None = None
        if options.notify and engine.dialect.name == "postgresql":
            self._channel = channel_for(options.schema, options.table)
            self._listener = listener(engine.url, self._channel)
        if self._listener is not None:
            # A store dropped without close() stops listening too.
            weakref.finalize(self, self._listener.close)

    @classmethod
    def _with(cls, engine: EngineT, options: _StoreOptions) -> Self:
        store = cls.__new__(cls)
        store._setup(engine, options, owned=True)
        return store

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLStore | AsyncSQLStore:
        """Open a store from a URL; an async driver (``+asyncpg``, ``+aiomysql``,
        ``+aiosqlite``, ``+psycopg_async``) gives an :class:`AsyncSQLStore`, any other a
        :class:`SQLStore`, whichever class is asked.

        Options go as keywords or in the query string, which is otherwise the driver's:
        ``table``, ``schema``, ``lease_table``, ``page_size``, ``create``, ``plaintext``,
        ``notify``, and
        for an existing table ``key_column``, ``access_token_column``,
        ``refresh_token_column``, ``expires_at_column``, ``scopes_column``,
        ``subscription_type_column``, ``refreshed_at_column``, ``expires_at_unit``,
        ``scopes_format``, ``insert`` and ``delete_rows``.
        """
        if not isinstance(url, str):
            raise ConfigurationError(f"SQL store URL must be a string, got {url!r}")
        engine_url, from_query = _split_url(url)
        store_options = _StoreOptions.read(kit.merge_options(from_query, options, store=_STORE))
        engine = _make_engine(engine_url)
        if isinstance(engine, AsyncEngine):
            return AsyncSQLStore._with(engine, store_options)
        return SQLStore._with(engine, store_options)

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"{type(self).__name__}({url!r}, table={self._options.table!r})"

    @property
    def plaintext(self) -> bool:
        """Whether the application keeps this store's tokens in plain text (option
        ``plaintext``): the engine then neither seals tokens nor expects sealed ones."""
        return self._options.plaintext

    def _boundary(self, key: str | None, *, writing: bool) -> AbstractContextManager[None]:
        """Translate what the driver raises inside the block (:func:`_boundary_at`)."""
        return _boundary_at(self.engine.url, key, writing=writing)

    def changes(self) -> kit.ChangeNotices | None:
        """The store's change notices (see :class:`~credkeeper.storekit.ChangeNotices`): on
        PostgreSQL, every write is announced with ``NOTIFY`` and the first call starts
        listening, on a connection of its own; ``None`` on other databases, with option
        ``notify`` off, or without psycopg installed."""
        return None if self._listener is None else self._listener.notices()

    def _announce(self, key: str, result: object) -> tuple[sa.TextClause, dict[str, str]] | None:
        """The statement a write of ``key`` ends with, so that its waiters hear of it: the
        record's new version, for a put."""
        if self._channel is None:
            return None
        version = result.version if isinstance(result, Record) else None
        return notify_statement(self._channel, key, version)


# -- sync --------------------------------------------------------------------------------


class SQLStore(kit.ClosingStore, _SQLStoreBase[sa.Engine]):
    """A :class:`~credkeeper.CredentialStore` in a SQL database, through SQLAlchemy.

    ``engine`` is a SQLAlchemy :class:`~sqlalchemy.engine.Engine` you already have (it stays
    open on :meth:`close`) or a URL. By default credentials live in credkeeper's own table
    (``table``, default ``credkeeper_credentials``; create it with :func:`init_store`, the
    ``credkeeper init-store`` command, or ``credkeeper_sql.metadata`` in your migrations).
    With ``columns`` they live in mapped columns of an existing ``table`` instead, each
    written back in the format it has, and coordination state in ``lease_table``.
    ``create=True`` creates missing credkeeper tables on first use. ``plaintext=True`` declares
    that the application keeps its tokens in plain text, so the engine must neither seal what it
    writes nor expect sealed values; the store itself stores whatever it is given either way,
    and shows the declaration as :attr:`plaintext`. On PostgreSQL every write also sends a
    ``NOTIFY`` so that callers waiting on a peer's refresh wake at once (:meth:`changes`);
    ``notify=False`` turns that off.
    """

    _engine_kind = sa.Engine

    def _setup(self, engine: sa.Engine, options: _StoreOptions, *, owned: bool) -> None:
        super()._setup(engine, options, owned=owned)
        self._layout_lock = threading.Lock()

    def _get_layout(self) -> Layout:
        """The layout, built by the first call in a transaction of its own, so that the tables
        ``create`` makes are committed whatever that call does."""
        layout = self._layout
        if layout is None:
            with self._layout_lock:
                if self._layout is None:
                    with self.engine.begin() as connection:
                        _bound_lock_waits(connection)
                        self._layout = self._options.build(connection)
                layout = self._layout
        return layout

    def _run(self, key: str, plan_of: Callable[[Layout], Plan]) -> Any:
        with self._boundary(key, writing=True):
            layout = self._get_layout()
            with self.engine.begin() as connection:
                _bound_lock_waits(connection)
                result = _execute(connection, plan_of(layout))
                if (announce := self._announce(key, result)) is not None:
                    connection.execute(*announce)
                return result

    def get(self, key: str) -> Record | None:
        """See :meth:`credkeeper.CredentialStore.get`."""
        kit.check_key(key)
        # One SELECT, which needs no transaction of its own: the one the driver opens ends
        # when the connection returns to the pool.
        with self._boundary(key, writing=False):
            layout = self._get_layout()
            with self.engine.connect() as connection:
                _bound_lock_waits(connection)
                rows = connection.execute(*layout.select(key)).all()
            return layout.record_of(key, rows)

    def put(self, record: Record) -> Record:
        """See :meth:`credkeeper.CredentialStore.put`: an insert, or an update on the version."""
        key = kit.check_record(record).key
        return self._run(key, lambda layout: layout.put(record))  # type: ignore[no-any-return]

    def delete(self, key: str) -> bool:
        """See :meth:`credkeeper.CredentialStore.delete`."""
        kit.check_key(key)
        return self._run(key, lambda layout: layout.delete(key))  # type: ignore[no-any-return]

    def scan_due(self, before: datetime) -> Iterator[str]:
        """See :meth:`credkeeper.CredentialStore.scan_due`: keyset pages on the expiry index."""
        return self._scan(kit.check_moment("before", before))

    def _scan(self, before: datetime) -> Iterator[str]:
        after: tuple[Any, Any] | None = None
        size = self._options.page_size
        while True:
            with self._boundary(None, writing=False):
                layout = self._get_layout()
                with self.engine.connect() as connection:
                    _bound_lock_waits(connection)
                    rows = connection.execute(_page(layout, before, after, size)).all()
            keys, after = _keys_due(layout, rows, before, size)
            yield from keys
            if after is None:
                return

    def now(self) -> datetime | None:
        """The database's clock (aware, UTC), read in one round trip.

        PostgreSQL's ``now()``, MySQL's and MariaDB's ``UTC_TIMESTAMP(6)``; for SQLite, whose
        file lives on one host, that host's clock through ``strftime('%f', 'now')``. Leases
        are judged on it, so hosts whose clocks disagree agree on when a lease ends.
        """
        dialect = self.engine.dialect
        with self._boundary(None, writing=False), self.engine.connect() as connection:
            value = connection.execute(_clock_query(dialect)).scalar_one()
        return _clock_value(value, dialect)

    def close(self) -> None:
        """Stop listening for changes; dispose of the engine's connections, if the store made
        the engine."""
        if self._listener is not None:
            self._listener.close()
        if self._own_engine:
            self.engine.dispose()


# -- async -------------------------------------------------------------------------------


class AsyncSQLStore(kit.AsyncClosingStore, _SQLStoreBase[AsyncEngine]):
    """The :class:`~credkeeper.AsyncCredentialStore` twin of :class:`SQLStore`, on a SQLAlchemy
    :class:`~sqlalchemy.ext.asyncio.AsyncEngine` (asyncpg, psycopg, aiomysql, aiosqlite)."""

    _engine_kind = AsyncEngine

    async def _get_layout(self) -> Layout:
        """See :meth:`SQLStore._get_layout`."""
        # Building twice under a race is harmless: both results are equal and one is kept.
        if self._layout is None:
            async with self.engine.begin() as connection:
                await _bound_lock_waits_async(connection)
                self._layout = await connection.run_sync(self._options.build)
        return self._layout

    async def _run(self, key: str, plan_of: Callable[[Layout], Plan]) -> Any:
        with self._boundary(key, writing=True):
            layout = await self._get_layout()
            async with self.engine.begin() as connection:
                await _bound_lock_waits_async(connection)
                result = await _execute_async(connection, plan_of(layout))
                if (announce := self._announce(key, result)) is not None:
                    await connection.execute(*announce)
                return result

    async def get(self, key: str) -> Record | None:
        """See :meth:`credkeeper.AsyncCredentialStore.get`."""
        kit.check_key(key)
        # See SQLStore.get: a read needs no transaction of its own.
        with self._boundary(key, writing=False):
            layout = await self._get_layout()
            async with self.engine.connect() as connection:
                await _bound_lock_waits_async(connection)
                rows = (await connection.execute(*layout.select(key))).all()
            return layout.record_of(key, rows)

    async def put(self, record: Record) -> Record:
        """See :meth:`credkeeper.AsyncCredentialStore.put`."""
        key = kit.check_record(record).key
        return await self._run(key, lambda layout: layout.put(record))  # type: ignore[no-any-return]

    async def delete(self, key: str) -> bool:
        """See :meth:`credkeeper.AsyncCredentialStore.delete`."""
        kit.check_key(key)
        return await self._run(key, lambda layout: layout.delete(key))  # type: ignore[no-any-return]

    def scan_due(self, before: datetime) -> AsyncIterator[str]:
        """See :meth:`SQLStore.scan_due`."""
        return self._scan(kit.check_moment("before", before))

    async def _scan(self, before: datetime) -> AsyncIterator[str]:
        after: tuple[Any, Any] | None = None
        size = self._options.page_size
        while True:
            with self._boundary(None, writing=False):
                layout = await self._get_layout()
                async with self.engine.connect() as connection:
                    await _bound_lock_waits_async(connection)
                    rows = (await connection.execute(_page(layout, before, after, size))).all()
            keys, after = _keys_due(layout, rows, before, size)
            for key in keys:
                yield key
            if after is None:
                return

    async def now(self) -> datetime | None:
        """See :meth:`SQLStore.now`."""
        dialect = self.engine.dialect
        with self._boundary(None, writing=False):
            async with self.engine.connect() as connection:
                value = (await connection.execute(_clock_query(dialect))).scalar_one()
        return _clock_value(value, dialect)

    async def close(self) -> None:
        """See :meth:`SQLStore.close`."""
        if self._listener is not None:
            self._listener.close()
        if self._own_engine:
            await self.engine.dispose()


# -- init-store --------------------------------------------------------------------------


def _setup_engine(
    url: str | sa.Engine, options: Mapping[str, Any], *, command: str
) -> tuple[sa.Engine, _StoreOptions, bool]:
    """The engine, the store's options and whether the engine is ours, for a setup command."""
    if isinstance(url, str):
        engine_url, from_query = _split_url(url)
        made = _make_engine(engine_url)
        if isinstance(made, AsyncEngine):
            raise ConfigurationError(
                f"{command} needs a synchronous driver URL, e.g. postgresql+psycopg:// "
                "instead of postgresql+asyncpg://"
            )
        engine, owned = made, True
    else:
        engine, from_query, owned = url, {}, False
    store_options = _StoreOptions.read(kit.merge_options(from_query, options, store=_STORE))
    return engine, dataclasses.replace(store_options, create=False), owned


def init_store(url: str | sa.Engine, **options: Any) -> list[str]:
    """Create credkeeper's tables if they are absent; the names of the tables created.

    Idempotent. For the own-table layout that is the credentials table; with an existing-table
    mapping, only the side table for leases: the application's table is never created,
    altered or dropped. ``options`` are :meth:`SQLStore.from_url`'s.
    """
    engine, store_options, owned = _setup_engine(url, options, command="init-store")
    try:
        with _boundary_at(engine.url, None, writing=True), engine.begin() as connection:
            layout = store_options.build(connection)
            mine = layout.tables if store_options.columns is None else layout.tables[1:]
            inspector = sa.inspect(connection)
            created = [
                table.name
                for table in mine
                if not inspector.has_table(table.name, schema=store_options.schema)
            ]
            for table in mine:
                table.create(connection, checkfirst=True)
            return created
    finally:
        if owned:
            engine.dispose()


def upgrade_store(url: str | sa.Engine, **options: Any) -> list[str]:
    """Add to credkeeper's existing tables the columns a newer credkeeper keeps; the columns
    added, as ``table.column``.

    Idempotent; only credkeeper's own tables (the credentials table, or with an existing-table
    mapping the side table) are altered, never the application's, and only by adding nullable
    columns (:data:`UPGRADE_COLUMNS`), which older credkeeper processes ignore, so they may keep
    running meanwhile. ``options`` are :meth:`SQLStore.from_url`'s.
    """
    engine, store_options, owned = _setup_engine(url, options, command="init-store")
    try:
        with _boundary_at(engine.url, None, writing=True), engine.begin() as connection:
            own = store_options.columns is None
            name = store_options.table if own else store_options.lease_table
            added = []
            for column in _missing_columns(connection, name, store_options.schema, warn=False):
                table = sa.Table(name, sa.MetaData(schema=store_options.schema))
                made = next(make() for make in UPGRADE_COLUMNS if make().name == column)
                table.append_column(made)
                ddl = sa.schema.CreateColumn(made).compile(dialect=connection.dialect)
                preparer = connection.dialect.identifier_preparer
                connection.execute(
                    sa.text(f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN {ddl}")
                )
                added.append(f"{name}.{column}")
            return added
    finally:
        if owned:
            engine.dispose()


@dataclass(frozen=True, slots=True)
class FieldMapping:
    """One credential field: the column holding it, the column's type, and how it is kept."""

    field: str
    column: str
    type: str
    format: str


@dataclass(frozen=True, slots=True)
class StoreCheck:
    """What :func:`check_store` found, without writing anything.

    ``where`` names the database; ``fields`` the mapping the store will use; ``tables`` and
    ``indexes`` each with whether it exists; ``problems`` what must be fixed first, each with
    its fix. An empty ``problems`` means the store is ready.
    """

    where: str
    fields: tuple[FieldMapping, ...] = ()
    tables: tuple[tuple[str, bool], ...] = ()
    indexes: tuple[tuple[str, bool], ...] = ()
    problems: tuple[str, ...] = ()


def check_store(url: str | sa.Engine, **options: Any) -> StoreCheck:
    """Reflect the live database and report the mapping the store would use; writes nothing.

    ``options`` are :meth:`SQLStore.from_url`'s. A missing table or column, a type the store
    cannot keep a field in, a table ``insert=true`` cannot insert into, and a missing index
    ``scan_due`` needs are reported as problems with their fix, not raised.
    """
    engine, store_options, owned = _setup_engine(url, options, command="init-store --check")
    where = _where(engine.url)
    try:
        with _boundary_at(engine.url, None, writing=False), engine.connect() as connection:
            try:
                layout = store_options.build(connection)
            except ConfigurationError as exc:
                return StoreCheck(where=where, problems=(str(exc),))
            inspector = sa.inspect(connection)
            tables = tuple(
                (table.name, inspector.has_table(table.name, schema=store_options.schema))
                for table in layout.tables
            )
            index = _expiry_index(connection, layout, store_options.schema)
    finally:
        if owned:
            engine.dispose()
    problems = [
        f"table {name!r} does not exist: run `credkeeper init-store URL` to create it"
        for name, exists in tables
        if not exists
    ]
    mine = layout.tables[1:] if isinstance(layout, ExistingTable) else layout.tables
    problems.extend(
        f"table {table.name!r} has no column {column!r}, which this credkeeper keeps the last "
        "refresh in: run `credkeeper init-store URL` to add it (or ALTER TABLE "
        f"{table.name} ADD COLUMN {column} BIGINT)"
        for table in mine
        if dict(tables).get(table.name, False)
        for column in (make().name for make in UPGRADE_COLUMNS)
        if column not in table.c
    )
    table_name, indexed, found = index
    if not found and dict(tables).get(table_name, False):
        problems.append(_index_problem(engine.dialect, layout, table_name, indexed))
    return StoreCheck(
        where=where,
        fields=_field_mappings(layout, store_options),
        tables=tables,
        indexes=((f"{table_name}({indexed})", found),),
        problems=tuple(problems),
    )


def _index_problem(dialect: sa.Dialect, layout: Layout, table: str, indexed: str) -> str:
    """The problem of an expiry no index serves, with its fix."""
    column = layout.expires_at.name
    if indexed == column:
        return (
            f"no index starts with {table}.{column}, so scan_due reads the whole table: "
            f"CREATE INDEX ix_{table}_{column} ON {table} ({column})"
        )
    why = (
        f"scan_due compares the ISO-8601 text in {table}.{column} by its wall time, "
        f"{indexed}, which an index on the column itself does not serve, so it reads the whole "
        "table"
    )
    if getattr(dialect, "is_mariadb", False):
        return (
            f"{why}, and MariaDB cannot index that expression: keep the expiry in a BIGINT "
            "(epoch milliseconds) or DATETIME column for an index to serve scan_due"
        )
    return f"{why}: CREATE INDEX ix_{table}_{column}_wall ON {table} (({indexed}))"


def _expiry_index(
    connection: sa.Connection, layout: Layout, schema: str | None
) -> tuple[str, str, bool]:
    """The table, what ``scan_due`` orders by in it, and whether an index leads with that.

    That is the expiry column, or for ISO-8601 text the expression of its wall time
    (:func:`wall_time`), which only an expression index on exactly it serves.
    """
    inspector = sa.inspect(connection)
    table = layout.tables[0]
    column = layout.expires_at.name
    text = isinstance(layout, ExistingTable) and layout.formats.expires_at == "text"
    indexed = (
        str(wall_time(sa.column(column)).compile(dialect=connection.dialect)) if text else column
    )
    if not inspector.has_table(table.name, schema=schema):
        return table.name, indexed, False
    if not text:
        leading = {
            index["column_names"][0]
            for index in inspector.get_indexes(table.name, schema=schema)
            if index["column_names"]
        }
        return table.name, column, column in leading
    wanted = _normal(indexed)
    if connection.dialect.name == "sqlite":
        # SQLite's reflection skips expression indexes; their CREATE INDEX shows the terms.
        master = "sqlite_master" if schema is None else f'"{schema}".sqlite_master'
        statements = connection.execute(
            sa.text(f"SELECT sql FROM {master} WHERE type = 'index' AND tbl_name = :table"),  # noqa: S608 - the schema option, quoted
            {"table": table.name},
        ).scalars()
        found = any(
            f"on{_normal(table.name)}{wanted}" in _normal(str(sql)) for sql in statements if sql
        )
        return table.name, indexed, found
    found = any(
        _normal(str(terms[0])) == wanted
        for index in inspector.get_indexes(table.name, schema=schema)
        if (terms := index.get("expressions") or index["column_names"])
    )
    return table.name, indexed, found


def _normal(sql: str) -> str:
    """``sql`` without what databases add or drop when they show an expression back:
    PostgreSQL's ``::text`` casts, parentheses, quotes around names, case and spaces."""
    return re.sub(r"::[a-z ]+|[\s\"`()]", "", sql.lower())


_KEY_FORMATS = {
    "text": "text, compared exactly",
    "integer": "integer; keys spelled canonically ('123', not '0123')",
    "uuid": "uuid; keys spelled canonically (lowercase, hyphenated)",
}


def _field_mappings(layout: Layout, store_options: _StoreOptions) -> tuple[FieldMapping, ...]:
    """One row per mapped field, saying how the store keeps it."""
    tokens = (
        "as written (plaintext=true)"
        if store_options.plaintext
        else "sealed by the manager's key ring or codec"
    )

    def row(field: str, column: sa.Column[Any], kept: str) -> FieldMapping:
        return FieldMapping(field, column.name, str(column.type), kept)

    table = layout.tables[0]
    if not isinstance(layout, ExistingTable):
        return (
            row("key", table.c.key, "text, compared exactly"),
            row("access_token", table.c.access_token, tokens),
            row("refresh_token", table.c.refresh_token, tokens),
            row("expires_at", table.c.expires_at, "epoch milliseconds"),
            row("scopes", table.c.scopes, "JSON array"),
            row("subscription_type", table.c.subscription_type, "text"),
            *(
                [row("refreshed_at", table.c.refreshed_at, "epoch milliseconds")]
                if "refreshed_at" in table.c
                else []
            ),
        )
    columns, formats = layout.columns, layout.formats
    expiry = {
        "timestamp": "timestamp",
        "integer": "epoch seconds" if columns.expires_at_unit == "s" else "epoch milliseconds",
        "text": "ISO-8601 text, in the row's own style",
    }[formats.expires_at]
    scopes = {
        None: "",
        "json": "JSON array",
        "array": "text[] array",
        "text": f"text as the row has it ({formats.scopes_default} when it has none)",
    }[formats.scopes]
    kept = {
        "key": _KEY_FORMATS[layout.kind],
        "access_token": tokens,
        "refresh_token": tokens,
        "expires_at": expiry,
        "scopes": scopes,
        "subscription_type": "text",
        "refreshed_at": {
            None: "",
            "timestamp": "timestamp",
            "integer": "epoch seconds" if columns.expires_at_unit == "s" else "epoch milliseconds",
            "text": "ISO-8601 text, in the row's own style",
        }[formats.refreshed_at],
    }
    return tuple(
        row(field, table.c[column], kept[field]) for field, column in columns.columns().items()
    )
