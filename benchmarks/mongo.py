"""What the MongoDB store costs, measured against bare pymongo run side by side in the same run.

Three measurements, the same as ``benchmarks/stores.py`` makes for the SQL store:

1. ``get`` latency: ``TokenManager.get(key)`` with the in-process cache off, on a credential
   valid for hours (no refresh may happen), against a bare ``store.get(key)`` and a bare
   ``collection.find_one({"_id": key})`` on the store's own client. Calls are interleaved one
   by one, rotating which side goes first; medians, and medians of the per-call ratios.
2. Compare-and-swap writes: 8 threads doing read-modify-write increments (``get``, then ``put``
   of ``failures + 1``, again after a ``ConflictError``), all on one key (contended) and each on
   its own key (uncontended), against 8 threads doing a bare unconditional
   ``update_one({"_id": key}, {"$inc": {"failures": 1}})``. The sides run in slices ordered
   A B B A; writes per second, conflicts, and a check that no increment was lost.
3. ``scan_due`` over ``--rows`` due documents: peak memory growth while iterating
   ``scan_due(now + 1 day)`` to the end in a fresh subprocess, against
   ``list(collection.find(filter, {"_id": 1}))`` in another fresh subprocess. Growth is the
   ``tracemalloc`` peak and the rise of the RSS high-water mark (``VmHWM`` on Linux). Elapsed
   time is the median of four runs without ``tracemalloc``, ordered A B B A A B B A.
   Goal: growth < 50 MB.

Everything happens in a fresh database (``ck_bench_<hex>``), dropped at the end. Without a URL
the benchmark starts a SecantusDB server of its own in a temporary directory.

    .venv/bin/python benchmarks/mongo.py                          # a SecantusDB it starts
    .venv/bin/python benchmarks/mongo.py mongodb://127.0.0.1:57017/ --rows 100000

Prints a table; ``--json`` prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import resource
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from bson import Int64
from pymongo import MongoClient

from credkeeper import ConflictError, KeyRing, Record, TokenManager, open_store
from credkeeper.testing import FakeProvider
from credkeeper_mongo import MongoStore

MEMORY_GOAL_MB = 50.0
SEED_CHUNK = 5000
COLLECTION = "credentials"


def _reset_high_water() -> str:
    """Start the RSS high-water mark afresh; which mark :func:`_high_water_kib` reads.

    A child spawned by this process starts with the parent's ``ru_maxrss``, which hides its
    own growth; on Linux ``VmHWM`` is reset here to the current RSS instead.
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


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@contextlib.contextmanager
def secantus() -> Iterator[str]:
    """A SecantusDB server on a free port in a temporary directory, for the run."""
    with tempfile.TemporaryDirectory() as directory, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        command = [sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--storage-path", directory, "--log-level", "WARNING"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"mongodb://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + 60
            while True:
                client: MongoClient[dict[str, Any]] = MongoClient(url, serverSelectionTimeoutMS=500)
                try:
                    client.admin.command("ping")
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise SystemExit("SecantusDB did not start") from None
                    time.sleep(0.2)
                finally:
                    client.close()
            yield url
        finally:
            process.kill()
            process.wait(10)


class Target:
    """The server, this run's database, and a store on credkeeper's own collection in it."""

    def __init__(self, url: str) -> None:
        self.database = f"ck_bench_{secrets.token_hex(4)}"
        self.store_url = f"{_with_database(url, self.database)}?collection={COLLECTION}"
        self.prefix = f"ck-bench-{secrets.token_hex(4)}-"
        store = open_store(self.store_url)
        assert isinstance(store, MongoStore)
        self.store = store
        self.collection = store.collection
        self.shown = repr(store)

    def key(self, name: str) -> str:
        """A key under this run's prefix."""
        return self.prefix + name

    def versions(self) -> dict[str, str]:
        """Versions of what was measured."""
        found = {"python": platform.python_version()}
        for package in ("credkeeper", "pymongo", "secantusdb", "httpx"):
            with contextlib.suppress(PackageNotFoundError):
                found[package] = version(package)
        info = self.store.client.server_info()
        hello = self.store.client.admin.command("hello")
        found["server"] = f"MongoDB wire protocol {info.get('version')} ({hello.get('setName')})"
        found["write_concern"] = str(self.collection.write_concern.document)
        found["cpus"] = str(len(os.sched_getaffinity(0)))
        return found

    def cleanup(self) -> None:
        """Drop this run's database; close the store."""
        try:
            self.store.client.drop_database(self.database)
        finally:
            self.store.close()


# -- 1. get ------------------------------------------------------------------------------


def _per_call(numerator: list[float], denominator: list[float]) -> float:
    return round(statistics.median(n / d for n, d in zip(numerator, denominator, strict=True)), 3)


def measure_get(target: Target, calls: int, warmup: int) -> dict[str, Any]:
    """Manager ``get`` (cache off) vs bare ``store.get`` vs a bare ``find_one``, interleaved."""
    store, collection = target.store, target.collection
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
        stored = store.get(key)
        raw = collection.find_one({"_id": key})
        if stored is None or raw is None or raw["version"] != stored.version:
            raise SystemExit("the bare find_one read another document; the comparison is void")
        sides: dict[str, Callable[[], object]] = {
            "manager": lambda: manager.get(key),
            "store": lambda: store.get(key),
            "raw": lambda: collection.find_one({"_id": key}),
        }
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
    return {
        "calls": calls,
        **{f"{name}_median_us": round(statistics.median(times[name]), 1) for name in names},
        "manager_vs_store_ratio": _per_call(times["manager"], times["store"]),
        "store_vs_raw_ratio": _per_call(times["store"], times["raw"]),
        "manager_vs_raw_ratio": _per_call(times["manager"], times["raw"]),
    }


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
    """CAS increments on one key and on a key per thread, vs bare ``$inc`` updates."""
    store, collection = target.store, target.collection
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
                current = store.get(key)
                assert current is not None
                try:
                    store.put(current.replace(failures=current.failures + 1))
                except ConflictError:
                    conflicts[index] += 1
                    continue
                writes += 1
            return writes

        return work

    def bare(keys: list[str]) -> Callable[[int, threading.Event], int]:
        def work(index: int, stop: threading.Event) -> int:
            writes = 0
            while not stop.is_set():
                collection.update_one({"_id": keys[index]}, {"$inc": {"failures": 1}})
                writes += 1
            return writes

        return work

    def failures_of(keys: Iterable[str]) -> int:
        total = 0
        for key in set(keys):
            current = store.get(key)
            assert current is not None
            total += current.failures
        return total

    result: dict[str, Any] = {"threads": threads, "seconds_per_side": seconds}
    for scenario, keys in (("contended", [shared] * threads), ("uncontended", own)):
        sides = {"store": cas(keys), "bare": bare(keys)}
        writes = dict.fromkeys(sides, 0)
        elapsed = dict.fromkeys(sides, 0.0)
        conflicts[:] = [0] * threads
        before = failures_of(keys)
        rounds = max(1, round(seconds))
        order = ["store", "bare", "bare", "store"] * rounds
        for name in order:
            start = time.perf_counter()
            writes[name] += _run_threads(sides[name], threads, seconds / order.count(name))
            elapsed[name] += time.perf_counter() - start
        lost = before + sum(writes.values()) - failures_of(keys)
        if lost:
            raise SystemExit(f"{scenario}: {lost} increments were lost; CAS is broken")
        store_rate = round(writes["store"] / elapsed["store"])
        bare_rate = round(writes["bare"] / elapsed["bare"])
        result[scenario] = {
            "store_writes_per_s": store_rate,
            "store_writes": writes["store"],
            "conflicts": sum(conflicts),
            "bare_writes_per_s": bare_rate,
            "ratio": round(store_rate / bare_rate, 3),
            "lost_updates": lost,
        }
    return result


# -- 3. scan_due -------------------------------------------------------------------------


def seed(target: Target, rows: int) -> int:
    """Insert ``rows`` due documents in the store's own format; the epoch-ms bound over them."""
    now = int(time.time() * 1000)
    rng = random.Random(1)
    for first in range(0, rows, SEED_CHUNK):
        chunk = []
        for index in range(first, min(first + SEED_CHUNK, rows)):
            expires = now - 3_600_000 + rng.randrange(13 * 3_600_000)
            record = _record(
                target.key(f"scan-{index:07d}"),
                expires_at=datetime.fromtimestamp(expires / 1000, UTC),
            )
            document = record.to_document()
            document["expires_at"] = Int64(document["expires_at"])
            chunk.append({"_id": record.key, **document, "version": uuid.uuid4().hex})
        target.collection.insert_many(chunk, ordered=False)
    return now + 86_400_000


def _child(mode: str, url: str, prefix: str, before_ms: int, trace: bool) -> dict[str, Any]:
    """In a fresh process: iterate ``scan_due`` (or load the bare find) and measure it."""
    store = open_store(url)
    assert isinstance(store, MongoStore)
    before = datetime.fromtimestamp(before_ms / 1000, UTC)
    store.get(prefix + "warm-up")  # connect and create the index before measuring
    if mode == "raw":

        def run() -> int:
            found = list(
                store.collection.find({"expires_at": {"$lte": Int64(before_ms)}}, {"_id": 1})
            )
            return sum(1 for document in found if document["_id"].startswith(prefix))

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
    """Seed ``rows`` due documents, then scan them in fresh subprocesses, store and raw."""
    start = time.perf_counter()
    before_ms = seed(target, rows)
    result: dict[str, Any] = {"rows": rows, "seed_s": round(time.perf_counter() - start, 1)}
    # Timed runs A B B A, so that the server settling after the seed hits both sides alike.
    timed: dict[str, list[dict[str, Any]]] = {"store": [], "raw": []}
    for mode in ("store", "raw", "raw", "store") * 2:
        timed[mode].append(_in_child(mode, target, before_ms, trace=False))
    for mode in ("store", "raw"):
        traced = _in_child(mode, target, before_ms, trace=True)
        for run in (*timed[mode], traced):
            if run["count"] != rows:
                raise SystemExit(f"{mode} scan saw {run['count']} keys, expected {rows}")
        result[mode] = {
            "count": traced["count"],
            "elapsed_s": round(statistics.median(run["elapsed_s"] for run in timed[mode]), 3),
            "rss_growth_mb": round(max(run["rss_growth_kib"] for run in timed[mode]) / 1024, 1),
            "rss_source": traced["rss_source"],
            "tracemalloc_peak_mb": round(traced["tracemalloc_peak_kib"] / 1024, 1),
        }
    store, raw = result["store"], result["raw"]
    store["under_goal"] = max(store["rss_growth_mb"], store["tracemalloc_peak_mb"]) < (
        MEMORY_GOAL_MB
    )
    result["ratios"] = {
        name: round(store[name] / raw[name], 3) if raw[name] else None
        for name in ("elapsed_s", "rss_growth_mb", "tracemalloc_peak_mb")
    }
    return result


# -- driver ------------------------------------------------------------------------------


def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, cleaning up whatever happens."""
    target = Target(url)
    try:
        return {
            "store": target.shown,
            "versions": target.versions(),
            "get": measure_get(target, args.calls, args.warmup),
            "cas": measure_cas(target, args.threads, args.seconds),
            "scan_due": measure_scan(target, args.rows),
        }
    finally:
        target.cleanup()


def show(result: dict[str, Any]) -> None:
    """Print the result as readable tables."""
    print(f"== {result['store']}")
    print("   " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    get = result["get"]
    print(f"get, cache off, {get['calls']} interleaved calls per side")
    print(f"  TokenManager.get median  {get['manager_median_us']:>9} µs")
    print(f"  store.get median         {get['store_median_us']:>9} µs")
    print(f"  bare find_one median     {get['raw_median_us']:>9} µs")
    print(f"  manager / store          {get['manager_vs_store_ratio']:>9}  (median per-call)")
    print(f"  store / find_one         {get['store_vs_raw_ratio']:>9}  (median per-call)")
    print(f"  manager / find_one       {get['manager_vs_raw_ratio']:>9}  (median per-call)")
    cas = result["cas"]
    print(f"CAS read-modify-write, {cas['threads']} threads, {cas['seconds_per_side']} s per side")
    print(f"  {'':12} {'store w/s':>10} {'conflicts':>10} {'bare w/s':>10} {'ratio':>7}")
    for scenario in ("contended", "uncontended"):
        entry = cas[scenario]
        print(
            f"  {scenario:12} {entry['store_writes_per_s']:>10} {entry['conflicts']:>10} "
            f"{entry['bare_writes_per_s']:>10} {entry['ratio']:>7}"
        )
    scan = result["scan_due"]
    print(f"scan_due over {scan['rows']} due documents (seeded in {scan['seed_s']} s)")
    print(f"  {'':12} {'elapsed s':>10} {'tracemalloc':>12} {'RSS growth':>11}")
    for mode, label in (("store", "scan_due"), ("raw", "list(find())")):
        side = scan[mode]
        print(
            f"  {label:12} {side['elapsed_s']:>10} {side['tracemalloc_peak_mb']:>9} MB "
            f"{side['rss_growth_mb']:>8} MB"
        )
    ratios = scan["ratios"]
    print(
        f"  {'store / raw':12} {ratios['elapsed_s']!s:>10} "
        f"{ratios['tracemalloc_peak_mb']!s:>12} {ratios['rss_growth_mb']!s:>11}"
    )
    verdict = "under" if scan["store"]["under_goal"] else "NOT under"
    print(f"  scan_due peak memory growth is {verdict} {MEMORY_GOAL_MB:g} MB")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark against the URL given, or a SecantusDB started for it."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("url", nargs="?", help="server URL; default: start a SecantusDB")
    parser.add_argument("--rows", type=int, default=100_000, help="due documents for scan_due")
    parser.add_argument("--calls", type=int, default=2000, help="measured get calls per side")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured get calls first")
    parser.add_argument("--threads", type=int, default=8, help="writer threads")
    parser.add_argument("--seconds", type=float, default=5.0, help="write time per side")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--child", choices=["store", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--before-ms", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.url, args.prefix, args.before_ms, args.trace)))
        return 0
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(secantus())
        result = run(url, args)
    if args.json:
        print(json.dumps(result))
    else:
        show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
