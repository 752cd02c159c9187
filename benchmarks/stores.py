"""What a credential store costs, measured against a baseline run side by side in the same run.

For each store URL, three measurements:

1. ``get`` latency: ``TokenManager.get(key)`` with the in-process cache off, on a credential
   valid for hours (no refresh may happen), against a bare ``store.get(key)`` and, for SQL
   stores, a bare SQLAlchemy ``SELECT * ... WHERE key = :k`` on the store's engine and table.
   Calls are interleaved one by one, in an order drawn afresh each round; the medians and
   the medians of the per-call ratios show the manager's overhead over the store read and the
   store's overhead over the raw query.
2. Compare-and-swap writes: 8 threads doing read-modify-write increments (``get``, then
   ``put`` of ``failures + 1``, again after a ``ConflictError``), all on one key (contended)
   and each on its own key (uncontended), against 8 threads doing a bare unconditional
   ``UPDATE ... SET failures = failures + 1 WHERE key = :k`` (SQL stores). The two sides run
   in half-second slices ordered A B B A A B B A ...; writes per second, conflicts, and a
   check that no increment was lost.
3. ``scan_due`` over ``--rows`` due records: peak memory growth while iterating
   ``scan_due(now + 1 day)`` to the end in a fresh subprocess, against
   ``SELECT key ... WHERE expires_at <= :b`` loaded whole with ``.all()`` in another fresh
   subprocess. Growth is the ``tracemalloc`` peak and the rise of the RSS high-water mark
   (``VmHWM`` on Linux: a child inherits its parent's ``ru_maxrss``). Elapsed time comes from
   a run without ``tracemalloc``, which slows allocation-heavy code. Goal: growth < 50 MB.

SQL stores get a fresh table (``ck_bench_<hex>``, created with ``init_store`` and dropped at
the end); other stores get keys under a random prefix, deleted at the end.

    .venv/bin/python benchmarks/stores.py sqlite:////tmp/ck_bench.db \\
        postgresql+psycopg://postgres@127.0.0.1:5432/test \\
        mysql+pymysql://root@127.0.0.1:3306/test --rows 100000

Prints a table per store; ``--json`` prints one JSON object per store instead.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import inspect
import json
import secrets
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import _harness
from credkeeper import CredentialStore, open_store

SQL_SCHEMES = frozenset({"sqlite", "postgresql", "postgres", "mysql", "mariadb"})


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].split("+", 1)[0].lower()


class Target:
    """One store under test: its URL, the store, and for SQL the engine and the fresh table."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"ck-bench-{secrets.token_hex(4)}-"
        self.sql = _scheme(url) in SQL_SCHEMES
        self.table_name: str | None = None
        self.table: Any = None
        self.keys: set[str] = set()
        if self.sql:
            import sqlalchemy as sa  # noqa: PLC0415 - only SQL stores need it

            from credkeeper_sql import credentials_table, init_store  # noqa: PLC0415

            self.table_name = f"ck_bench_{secrets.token_hex(4)}"
            parsed = sa.engine.make_url(url)
            self.store_url = parsed.update_query_dict({"table": self.table_name}).render_as_string(
                hide_password=False
            )
            init_store(self.store_url)
            self.table = credentials_table(sa.MetaData(), self.table_name)
            self.shown = parsed.render_as_string(hide_password=True)
        else:
            self.store_url = url
            self.shown = url
        opened = open_store(self.store_url)
        if not isinstance(opened, CredentialStore) or inspect.iscoroutinefunction(opened.get):
            opened.close()
            raise SystemExit(f"{self.shown}: not a synchronous store; use a sync driver URL")
        self.store: Any = opened

    @property
    def engine(self) -> Any:
        """The SQL store's SQLAlchemy engine."""
        return self.store.engine

    def key(self, name: str) -> str:
        """A key under this run's prefix, remembered for cleanup."""
        key = self.prefix + name
        self.keys.add(key)
        return key

    def versions(self) -> dict[str, str]:
        """Versions of what was measured."""
        found = _harness.describe("credkeeper", "sqlalchemy", "psycopg", "pymysql", "httpx")
        if self.sql:
            import sqlalchemy as sa  # noqa: PLC0415

            backend = self.engine.url.get_backend_name()
            query = "SELECT sqlite_version()" if backend == "sqlite" else "SELECT version()"
            with self.engine.connect() as connection:
                found["server"] = f"{backend} {connection.execute(sa.text(query)).scalar()}"
        return found

    def close(self) -> None:
        """Drop the table, or delete this run's keys; then close the store."""
        try:
            if self.sql:
                self.table.drop(self.engine, checkfirst=True)
            else:
                with concurrent.futures.ThreadPoolExecutor(8) as pool:
                    list(pool.map(self.store.delete, sorted(self.keys)))
        finally:
            self.store.close()


# -- 1. get ------------------------------------------------------------------------------


def measure_get(target: Target, calls: int, warmup: int) -> dict[str, Any]:
    """Manager ``get`` (cache off) vs bare ``store.get`` vs a raw SELECT (SQL), interleaved."""
    key = target.key("get")
    baseline = None
    if target.sql:
        import sqlalchemy as sa  # noqa: PLC0415

        engine, table = target.engine, target.table
        select = sa.select(table).where(table.c.key == sa.bindparam("k"))

        def raw() -> Any:
            with engine.connect() as connection:
                return connection.execute(select, {"k": key}).first()

        baseline = _harness.Baseline(
            "raw", raw, lambda row: None if row is None else row._mapping["version"]
        )
    return _harness.measure_get(target.store, key, baseline, calls=calls, warmup=warmup)


# -- 2. compare-and-swap writes ----------------------------------------------------------


def measure_cas(target: Target, threads: int, seconds: float) -> dict[str, Any]:
    """CAS increments on one key and on a key per thread, vs bare UPDATEs (SQL)."""
    bare: Callable[[str], object] | None = None
    if target.sql:
        import sqlalchemy as sa  # noqa: PLC0415

        engine, table = target.engine, target.table
        update = (
            sa.update(table)
            .where(table.c.key == sa.bindparam("k"))
            .values(failures=table.c.failures + 1)
        )

        def increment(key: str) -> None:
            with engine.begin() as connection:
                connection.execute(update, {"k": key})

        bare = increment

    return _harness.measure_cas(
        target.store,
        target.key,
        bare,
        threads=threads,
        seconds=seconds,
        bare_increments=True,
    )


# -- 3. scan_due -------------------------------------------------------------------------


def seed(target: Target, due: list[tuple[str, int]]) -> None:
    """Store a due record per ``(key, expires_at in epoch ms)``, quickly."""
    if target.sql:
        import sqlalchemy as sa  # noqa: PLC0415

        # The column encoding of OwnTable.put: epoch ms, scopes as a JSON array.
        scopes = json.dumps(["user:inference", "user:profile"])
        insert = sa.insert(target.table)
        for first in range(0, len(due), _harness.SEED_CHUNK):
            chunk = [
                {
                    "key": key,
                    "access_token": secrets.token_urlsafe(120),
                    "refresh_token": secrets.token_urlsafe(120),
                    "expires_at": expires,
                    "scopes": scopes,
                    "subscription_type": "max",
                    "status": "active",
                    "lease_owner": None,
                    "lease_until": None,
                    "failures": 0,
                    "cooldown_until": None,
                    "last_error": None,
                    "version": uuid.uuid4().hex,
                }
                for key, expires in due[first : first + _harness.SEED_CHUNK]
            ]
            with target.engine.begin() as connection:
                connection.execute(insert, chunk)
        # A table in service has planner statistics; a bulk load has none until autovacuum
        # (PostgreSQL) or an explicit ANALYZE runs, and PostgreSQL then plans each keyset page
        # as a sort of the whole range. Measure the table as it will be used.
        analyze = {"mysql": "ANALYZE TABLE {}", "mariadb": "ANALYZE TABLE {}"}.get(
            target.engine.dialect.name, "ANALYZE {}"
        )
        with target.engine.begin() as connection:
            connection.execute(sa.text(analyze.format(target.table.name)))
    else:
        target.keys.update(key for key, _ in due)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda pair: target.store.put(
                        _harness.record(
                            pair[0], expires_at=datetime.fromtimestamp(pair[1] / 1000, UTC)
                        )
                    ),
                    due,
                )
            )


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: iterate ``scan_due`` (or load the raw SELECT) and measure it."""
    url = args.urls[0]
    store: Any = open_store(url)
    raw = None
    if args.child == "raw":
        import sqlalchemy as sa  # noqa: PLC0415

        from credkeeper_sql import credentials_table  # noqa: PLC0415

        table = credentials_table(sa.MetaData(), str(sa.engine.make_url(url).query["table"]))
        select = sa.select(table.c.key).where(table.c.expires_at <= sa.bindparam("b"))

        def load() -> Iterator[str]:
            with store.engine.connect() as connection:
                rows = connection.execute(select, {"b": args.before_ms}).all()
            return (key for (key,) in rows)

        raw = load
    return _harness.scan_child(store, raw, args)


def measure_scan(target: Target, rows: int) -> dict[str, Any]:
    """Seed ``rows`` due records, then scan them in fresh subprocesses, store and raw."""
    if _scheme(target.url) == "memory":
        return {"skipped": "a memory:// store lives in one process; no subprocess can scan it"}
    return _harness.measure_scan(
        __file__,
        target.store_url,
        target.prefix,
        lambda due: seed(target, due),
        rows=rows,
        modes=["store", "raw"] if target.sql else ["store"],
        runs=1,
    )


# -- driver ------------------------------------------------------------------------------


def run_one(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement for one store URL, cleaning up whatever happens."""
    with contextlib.closing(Target(url)) as target:
        return {
            "url": target.shown,
            "table": target.table_name,
            "versions": target.versions(),
            "get": measure_get(target, args.calls, args.warmup),
            "cas": measure_cas(target, args.threads, args.seconds),
            "scan_due": measure_scan(target, args.rows),
        }


def show(result: dict[str, Any]) -> None:
    """Print one store's result as readable tables."""
    _harness.show_header(result["url"], result["versions"])
    _harness.show_get(result["get"], baseline="raw", label="raw SELECT")
    _harness.show_cas(result["cas"], bare="bare UPDATE")
    _harness.show_scan(
        result["scan_due"], labels={"store": "scan_due", "raw": "raw SELECT"}, rows="rows"
    )
    print()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark for every URL given and print the results."""
    parser = _harness.parser(
        __doc__, calls=2000, warmup=200, measured="get calls", json_help="one JSON object per store"
    )
    parser.add_argument("urls", nargs="+", metavar="URL", help="store URLs")
    _harness.add_write_flags(parser, seconds=5.0)
    _harness.add_scan_flags(parser, rows="rows")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    for url in args.urls:
        _harness.emit(run_one(url, args), show, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
