"""What the MongoDB store costs, measured against bare pymongo run side by side in the same run.

Three measurements, the same as ``benchmarks/stores.py`` makes for the SQL store:

1. ``get`` latency: ``TokenManager.get(key)`` with the in-process cache off, on a credential
   valid for hours (no refresh may happen), against a bare ``store.get(key)`` and a bare
   ``collection.find_one({"_id": key})`` on the store's own client. Calls are interleaved one
   by one, in an order drawn afresh each round; medians, and medians of the per-call ratios.
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
import json
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bson import Int64
from pymongo import MongoClient

import _harness
from credkeeper import open_store
from credkeeper_mongo import MongoStore

COLLECTION = "credentials"


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
        found = _harness.describe("credkeeper", "pymongo", "secantusdb", "httpx")
        info = self.store.client.server_info()
        hello = self.store.client.admin.command("hello")
        found["server"] = f"MongoDB wire protocol {info.get('version')} ({hello.get('setName')})"
        found["write_concern"] = str(self.collection.write_concern.document)
        return found

    def close(self) -> None:
        """Drop this run's database; close the store."""
        try:
            self.store.client.drop_database(self.database)
        finally:
            self.store.close()


# -- 1. get ------------------------------------------------------------------------------


def measure_get(target: Target, calls: int, warmup: int) -> dict[str, Any]:
    """Manager ``get`` (cache off) vs bare ``store.get`` vs a bare ``find_one``, interleaved."""
    collection, key = target.collection, target.key("get")
    baseline = _harness.Baseline(
        "raw",
        lambda: collection.find_one({"_id": key}),
        lambda document: None if document is None else document["version"],
    )
    return _harness.measure_get(target.store, key, baseline, calls=calls, warmup=warmup)


# -- 2. compare-and-swap writes ----------------------------------------------------------


def measure_cas(target: Target, threads: int, seconds: float) -> dict[str, Any]:
    """CAS increments on one key and on a key per thread, vs bare ``$inc`` updates."""
    collection = target.collection
    return _harness.measure_cas(
        target.store,
        target.key,
        lambda key: collection.update_one({"_id": key}, {"$inc": {"failures": 1}}),
        threads=threads,
        seconds=seconds,
        bare_increments=True,
    )


# -- 3. scan_due -------------------------------------------------------------------------


def seed(target: Target, due: list[tuple[str, int]]) -> None:
    """Insert a due document per ``(key, expires_at in epoch ms)``, in the store's own format."""
    for first in range(0, len(due), _harness.SEED_CHUNK):
        chunk = []
        for key, expires in due[first : first + _harness.SEED_CHUNK]:
            record = _harness.record(key, expires_at=datetime.fromtimestamp(expires / 1000, UTC))
            document = record.to_document()
            document["expires_at"] = Int64(document["expires_at"])
            chunk.append({"_id": key, **document, "version": uuid.uuid4().hex})
        target.collection.insert_many(chunk, ordered=False)


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: iterate ``scan_due`` (or load the bare find) and measure it."""
    store = open_store(args.url)
    assert isinstance(store, MongoStore)

    def raw() -> Iterator[str]:
        bound = {"expires_at": {"$lte": Int64(args.before_ms)}}
        found = list(store.collection.find(bound, {"_id": 1}))
        return (document["_id"] for document in found)

    return _harness.scan_child(store, raw if args.child == "raw" else None, args)


def measure_scan(target: Target, rows: int) -> dict[str, Any]:
    """Seed ``rows`` due documents, then scan them in fresh subprocesses, store and raw."""
    # Four timed runs a side, so that the server settling after the seed hits both sides alike.
    return _harness.measure_scan(
        __file__,
        target.store_url,
        target.prefix,
        lambda due: seed(target, due),
        rows=rows,
        modes=["store", "raw"],
        runs=4,
    )


# -- driver ------------------------------------------------------------------------------


def show(result: dict[str, Any]) -> None:
    """Print the result as readable tables."""
    _harness.show_header(result["store"], result["versions"])
    _harness.show_get(result["get"], baseline="raw", label="bare find_one")
    _harness.show_cas(result["cas"], bare="bare $inc")
    _harness.show_scan(
        result["scan_due"],
        labels={"store": "scan_due", "raw": "list(find())"},
        rows="documents",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark against the URL given, or a SecantusDB started for it."""
    parser = _harness.parser(
        __doc__, calls=2000, warmup=200, measured="get calls", json_help="print one JSON object"
    )
    parser.add_argument("url", nargs="?", help="server URL; default: start a SecantusDB")
    _harness.add_write_flags(parser, seconds=5.0)
    _harness.add_scan_flags(parser, rows="documents")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(secantus())
        target = stack.enter_context(contextlib.closing(Target(url)))
        result = {
            "store": target.shown,
            "versions": target.versions(),
            "get": measure_get(target, args.calls, args.warmup),
            "cas": measure_cas(target, args.threads, args.seconds),
            "scan_due": measure_scan(target, args.rows),
        }
    _harness.emit(result, show, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
