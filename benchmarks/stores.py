"""What a credential store costs, measured against a baseline run side by side in the same run.

For each store URL, three measurements:

1. ``get`` latency: ``TokenManager.get(key)`` with the in-process cache off, on a credential
   valid for hours (no refresh may happen), against a bare ``store.get(key)`` and, for SQL
   stores, a bare SQLAlchemy ``SELECT * ... WHERE key = :k`` on the store's engine and table.
   Calls are interleaved one by one, rotating which side goes first; the medians and the
   medians of the per-call ratios show the manager's overhead over the store read and the
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
import gc
import inspect
import json
import platform
import random
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import httpx

from credkeeper import (
    ConflictError,
    CredentialStore,
    KeyRing,
    Record,
    TokenManager,
    open_store,
)
from credkeeper.testing import FakeProvider

SQL_SCHEMES = frozenset({"sqlite", "postgresql", "postgres", "mysql", "mariadb"})
MEMORY_GOAL_MB = 50.0
SEED_CHUNK = 5000
MB = 1024 * 1024


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].split("+", 1)[0].lower()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _reset_high_water() -> str:
    """Start the RSS high-water mark afresh; which mark :func:`_high_water_kib` reads.

    ``ru_maxrss`` is preserved across ``execve``: a child spawned by this (large) process
    starts with the parent's high-water mark, which hides its own growth. On Linux the child
    reads ``VmHWM``, the high-water mark of its own address space, reset here to the current
    RSS (``ru_maxrss`` is the larger of the two). Elsewhere, ``ru_maxrss`` is all there is.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        Path("/proc/self/status").read_text()
    except OSError:
        return "ru_maxrss"
    return "VmHWM"


def _high_water_kib(source: str) -> int:
    """The RSS high-water mark in KiB, from ``VmHWM`` or ``ru_maxrss``."""
    if source == "VmHWM":
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    # In KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _record(key: str, *, expires_at: datetime) -> Record:
    return Record(
        key=key,
        access_token=secrets.token_urlsafe(120),
        refresh_token=secrets.token_urlsafe(120),
        expires_at=expires_at,
        scopes=("user:inference", "user:profile"),
        subscription_type="max",
    )


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
        found = {"python": platform.python_version()}
        for package in ("credkeeper", "sqlalchemy", "psycopg", "pymysql", "httpx"):
            with contextlib.suppress(PackageNotFoundError):
                found[package] = version(package)
        if self.sql:
            import sqlalchemy as sa  # noqa: PLC0415

            backend = self.engine.url.get_backend_name()
            query = "SELECT sqlite_version()" if backend == "sqlite" else "SELECT version()"
            with self.engine.connect() as connection:
                found["server"] = f"{backend} {connection.execute(sa.text(query)).scalar()}"
        return found

    def cleanup(self) -> None:
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
    """Manager ``get`` (cache off) vs bare ``store.get`` vs a raw SELECT, interleaved."""
    store = target.store
    key = target.key("get")
    with (
        tempfile.TemporaryDirectory() as journal,
        FakeProvider() as fake,
        httpx.Client() as http,
    ):
        # Not closed: closing the manager would close the shared store.
        manager = TokenManager(
            store,
            fake.provider(),
            keyring=KeyRing.generate(),
            cache=False,
            journal=journal,
            http=http,
        )
        manager.put(key, fake.issue(expires_in=6 * 3600))
        sides: dict[str, Callable[[], object]] = {
            "manager": lambda: manager.get(key),
            "store": lambda: store.get(key),
        }
        stored = store.get(key)
        if target.sql:
            import sqlalchemy as sa  # noqa: PLC0415

            engine, table = target.engine, target.table
            select = sa.select(table).where(table.c.key == sa.bindparam("k"))

            def raw() -> Any:
                with engine.connect() as connection:
                    return connection.execute(select, {"k": key}).first()

            row = raw()
            if row is None or row._mapping["version"] != stored.version:
                raise SystemExit("the raw SELECT read another row; the comparison is void")
            sides["raw"] = raw
        names = list(sides)
        times: dict[str, list[float]] = {name: [] for name in names}
        for index in range(warmup + calls):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter_ns()
                sides[name]()
                elapsed = time.perf_counter_ns() - start
                if index >= warmup:
                    times[name].append(elapsed / 1000)
        refreshes = fake.refresh_count
    if refreshes:
        raise SystemExit(f"{refreshes} refreshes happened; the get comparison is void")
    result: dict[str, Any] = {
        "calls": calls,
        "provider_refreshes": refreshes,
        **{f"{name}_median_us": round(statistics.median(times[name]), 1) for name in names},
        "manager_vs_store_ratio": _per_call(times["manager"], times["store"]),
    }
    if "raw" in times:
        result["store_vs_raw_ratio"] = _per_call(times["store"], times["raw"])
        result["manager_vs_raw_ratio"] = _per_call(times["manager"], times["raw"])
    return result


def _per_call(numerator: list[float], denominator: list[float]) -> float:
    return round(statistics.median(n / d for n, d in zip(numerator, denominator, strict=True)), 3)


# -- 2. compare-and-swap writes ----------------------------------------------------------


def _run_threads(work: Callable[[int, threading.Event], int], threads: int, seconds: float) -> int:
    """Run ``work(thread_index, stop)`` on ``threads`` threads for ``seconds``; the sum."""
    ready = threading.Barrier(threads + 1)
    stop = threading.Event()
    results = [0] * threads
    errors: list[BaseException] = []

    def run(index: int) -> None:
        ready.wait()
        try:
            results[index] = work(index, stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(index,)) for index in range(threads)]
    for worker in workers:
        worker.start()
    ready.wait()
    stop.wait(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return sum(results)


def measure_cas(target: Target, threads: int, seconds: float) -> dict[str, Any]:
    """CAS increments on one key and on a key per thread, vs bare UPDATEs (SQL)."""
    store = target.store
    far = datetime.now(UTC) + timedelta(days=1)
    shared = target.key("cas-shared")
    own = [target.key(f"cas-{index}") for index in range(threads)]
    for key in (shared, *own):
        store.put(_record(key, expires_at=far))
    conflicts = [0] * threads

    def cas(keys: list[str]) -> Callable[[int, threading.Event], int]:
        def work(index: int, stop: threading.Event) -> int:
            key, writes = keys[index], 0
            while not stop.is_set():
                record = store.get(key)
                try:
                    store.put(record.replace(failures=record.failures + 1))
                except ConflictError:
                    conflicts[index] += 1
                    continue
                writes += 1
            return writes

        return work

    def bare(keys: list[str]) -> Callable[[int, threading.Event], int]:
        import sqlalchemy as sa  # noqa: PLC0415

        engine, table = target.engine, target.table
        update = (
            sa.update(table)
            .where(table.c.key == sa.bindparam("k"))
            .values(failures=table.c.failures + 1)
        )

        def work(index: int, stop: threading.Event) -> int:
            writes = 0
            while not stop.is_set():
                with engine.begin() as connection:
                    connection.execute(update, {"k": keys[index]})
                writes += 1
            return writes

        return work

    def failures_of(keys: Iterable[str]) -> int:
        return sum(store.get(key).failures for key in set(keys))

    result: dict[str, Any] = {"threads": threads, "seconds_per_side": seconds}
    for scenario, keys in (("contended", [shared] * threads), ("uncontended", own)):
        sides: dict[str, Callable[[int, threading.Event], int]] = {"store": cas(keys)}
        if target.sql:
            sides["bare"] = bare(keys)
        writes = dict.fromkeys(sides, 0)
        elapsed = dict.fromkeys(sides, 0.0)
        conflicts[:] = [0] * threads
        before = failures_of(keys)
        # A B B A in half-second slices, so drift in the machine's load hits both sides alike.
        rounds = max(1, round(seconds))
        order = ["store", "bare", "bare", "store"] * rounds if target.sql else ["store"]
        for name in order:
            start = time.perf_counter()
            writes[name] += _run_threads(sides[name], threads, seconds / order.count(name))
            elapsed[name] += time.perf_counter() - start
        lost = before + sum(writes.values()) - failures_of(keys)
        if lost:
            raise SystemExit(f"{scenario}: {lost} increments were lost; CAS is broken")
        entry: dict[str, Any] = {
            "store_writes_per_s": round(writes["store"] / elapsed["store"]),
            "store_writes": writes["store"],
            "conflicts": sum(conflicts),
            "lost_updates": lost,
        }
        if "bare" in sides:
            entry["bare_writes_per_s"] = round(writes["bare"] / elapsed["bare"])
            entry["ratio"] = round(entry["store_writes_per_s"] / entry["bare_writes_per_s"], 3)
        result[scenario] = entry
    return result


# -- 3. scan_due -------------------------------------------------------------------------


def seed(target: Target, rows: int) -> int:
    """Store ``rows`` due records quickly; the epoch-ms bound that covers them all."""
    now = _now_ms()
    rng = random.Random(1)
    # Due within the past hour up to twelve hours ahead: scan_due(now + 1 day) sees them all.
    expiries = [now - 3_600_000 + rng.randrange(13 * 3_600_000) for _ in range(rows)]
    keys = [target.prefix + f"scan-{index:07d}" for index in range(rows)]
    if target.sql:
        import sqlalchemy as sa  # noqa: PLC0415

        # The column encoding of OwnTable.put: epoch ms, scopes as a JSON array.
        scopes = json.dumps(["user:inference", "user:profile"])
        insert = sa.insert(target.table)
        for first in range(0, rows, SEED_CHUNK):
            chunk = [
                {
                    "key": keys[index],
                    "access_token": secrets.token_urlsafe(120),
                    "refresh_token": secrets.token_urlsafe(120),
                    "expires_at": expiries[index],
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
                for index in range(first, min(first + SEED_CHUNK, rows))
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
        target.keys.update(keys)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda pair: target.store.put(
                        _record(pair[0], expires_at=datetime.fromtimestamp(pair[1] / 1000, UTC))
                    ),
                    zip(keys, expiries, strict=True),
                )
            )
    return now + 86_400_000


def _child(mode: str, url: str, prefix: str, before_ms: int, trace: bool) -> dict[str, Any]:
    """In a fresh process: iterate ``scan_due`` (or load the raw SELECT) and measure it.

    Only keys under ``prefix`` are counted: the other measurements' few keys are due too.
    """
    store: Any = open_store(url)
    before = datetime.fromtimestamp(before_ms / 1000, UTC)
    # Connect and build the table's layout before measuring.
    store.get(prefix + "warm-up")
    if mode == "raw":
        import sqlalchemy as sa  # noqa: PLC0415

        from credkeeper_sql import credentials_table  # noqa: PLC0415

        table = credentials_table(sa.MetaData(), str(sa.engine.make_url(url).query["table"]))
        select = sa.select(table.c.key).where(table.c.expires_at <= sa.bindparam("b"))

        def run() -> int:
            with store.engine.connect() as connection:
                keys = connection.execute(select, {"b": before_ms}).all()
            return sum(1 for (key,) in keys if key.startswith(prefix))

    else:

        def run() -> int:
            return sum(1 for key in store.scan_due(before) if key.startswith(prefix))

    gc.collect()
    if trace:
        tracemalloc.start()
    source = _reset_high_water()
    rss_before = _high_water_kib(source)
    start = time.perf_counter()
    count = run()
    elapsed = time.perf_counter() - start
    rss_growth = _high_water_kib(source) - rss_before
    peak = tracemalloc.get_traced_memory()[1] if trace else None
    store.close()
    return {
        "count": count,
        "elapsed_s": round(elapsed, 3),
        "rss_growth_kib": rss_growth,
        "rss_source": source,
        "tracemalloc_peak_kib": None if peak is None else peak // 1024,
    }


def _in_child(mode: str, target: Target, before_ms: int, *, trace: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", mode, target.store_url]
    command += ["--prefix", target.prefix + "scan-", "--before-ms", str(before_ms)]
    if trace:
        command.append("--trace")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {mode} scan subprocess failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def measure_scan(target: Target, rows: int) -> dict[str, Any]:
    """Seed ``rows`` due records, then scan them in fresh subprocesses, store and raw."""
    if _scheme(target.url) == "memory":
        return {"skipped": "a memory:// store lives in one process; no subprocess can scan it"}
    start = time.perf_counter()
    before_ms = seed(target, rows)
    result: dict[str, Any] = {"rows": rows, "seed_s": round(time.perf_counter() - start, 1)}
    modes = ["store", "raw"] if target.sql else ["store"]
    for mode in modes:
        timed = _in_child(mode, target, before_ms, trace=False)
        traced = _in_child(mode, target, before_ms, trace=True)
        for run in (timed, traced):
            if run["count"] != rows:
                raise SystemExit(f"{mode} scan saw {run['count']} keys, expected {rows}")
        result[mode] = {
            "count": timed["count"],
            "elapsed_s": timed["elapsed_s"],
            "rss_growth_mb": round(timed["rss_growth_kib"] / 1024, 1),
            "rss_source": timed["rss_source"],
            "tracemalloc_peak_mb": round(traced["tracemalloc_peak_kib"] / 1024, 1),
        }
    store = result["store"]
    store["under_goal"] = max(store["rss_growth_mb"], store["tracemalloc_peak_mb"]) < (
        MEMORY_GOAL_MB
    )
    if "raw" in result:
        raw = result["raw"]
        result["ratios"] = {
            name: round(store[name] / raw[name], 3) if raw[name] else None
            for name in ("elapsed_s", "rss_growth_mb", "tracemalloc_peak_mb")
        }
    return result


# -- driver ------------------------------------------------------------------------------


def run_one(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement for one store URL, cleaning up whatever happens."""
    target = Target(url)
    try:
        return {
            "url": target.shown,
            "table": target.table_name,
            "versions": target.versions(),
            "get": measure_get(target, args.calls, args.warmup),
            "cas": measure_cas(target, args.threads, args.seconds),
            "scan_due": measure_scan(target, args.rows),
        }
    finally:
        target.cleanup()


def show(result: dict[str, Any]) -> None:
    """Print one store's result as readable tables."""
    print(f"== {result['url']}  ({', '.join(f'{k} {v}' for k, v in result['versions'].items())})")
    get = result["get"]
    print(f"get, cache off, {get['calls']} interleaved calls per side")
    print(f"  TokenManager.get median  {get['manager_median_us']:>9} µs")
    print(f"  store.get median         {get['store_median_us']:>9} µs")
    if "raw_median_us" in get:
        print(f"  raw SELECT median        {get['raw_median_us']:>9} µs")
    print(f"  manager / store          {get['manager_vs_store_ratio']:>9}  (median per-call)")
    if "store_vs_raw_ratio" in get:
        print(f"  store / raw SELECT       {get['store_vs_raw_ratio']:>9}  (median per-call)")
        print(f"  manager / raw SELECT     {get['manager_vs_raw_ratio']:>9}  (median per-call)")
    cas = result["cas"]
    print(f"CAS read-modify-write, {cas['threads']} threads, {cas['seconds_per_side']} s per side")
    print(f"  {'':12} {'store w/s':>10} {'conflicts':>10} {'bare w/s':>10} {'ratio':>7}")
    for scenario in ("contended", "uncontended"):
        entry = cas[scenario]
        print(
            f"  {scenario:12} {entry['store_writes_per_s']:>10} {entry['conflicts']:>10} "
            f"{entry.get('bare_writes_per_s', '-'):>10} {entry.get('ratio', '-'):>7}"
        )
    scan = result["scan_due"]
    if "skipped" in scan:
        print(f"scan_due skipped: {scan['skipped']}")
    else:
        print(f"scan_due over {scan['rows']} due rows (seeded in {scan['seed_s']} s)")
        print(f"  {'':12} {'elapsed s':>10} {'tracemalloc':>12} {'RSS growth':>11}")
        for mode in ("store", "raw"):
            if mode in scan:
                side = scan[mode]
                print(
                    f"  {mode:12} {side['elapsed_s']:>10} {side['tracemalloc_peak_mb']:>9} MB "
                    f"{side['rss_growth_mb']:>8} MB"
                )
        if "ratios" in scan:
            ratios = scan["ratios"]
            print(
                f"  {'store / raw':12} {ratios['elapsed_s']!s:>10} "
                f"{ratios['tracemalloc_peak_mb']!s:>12} {ratios['rss_growth_mb']!s:>11}"
            )
        verdict = "under" if scan["store"]["under_goal"] else "NOT under"
        print(f"  scan_due peak memory growth is {verdict} {MEMORY_GOAL_MB:g} MB")
    print()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark for every URL given and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", nargs="+", metavar="URL", help="store URLs")
    parser.add_argument("--rows", type=int, default=100_000, help="due rows for scan_due")
    parser.add_argument("--calls", type=int, default=2000, help="measured get calls per side")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured get calls first")
    parser.add_argument("--threads", type=int, default=8, help="writer threads")
    parser.add_argument("--seconds", type=float, default=5.0, help="write time per side")
    parser.add_argument("--json", action="store_true", help="one JSON object per store")
    parser.add_argument("--child", choices=["store", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--before-ms", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = _child(args.child, args.urls[0], args.prefix, args.before_ms, args.trace)
        print(json.dumps(result))
        return 0
    for url in args.urls:
        result = run_one(url, args)
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            show(result)
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
