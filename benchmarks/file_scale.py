"""How the file store's calls scale with its size: get, a CAS write, puts one by one.

    python benchmarks/file_scale.py [--sizes 100,10000,100000] [--old PATH_TO_OLD_STORE_PY]

Each size gets a fresh store filled in one step (not timed), then ``get`` and a
compare-and-swap ``put`` of random keys are timed (medians in µs), then ``--puts`` new keys
are stored one by one (total seconds). ``--old`` names the format 1 ``_store.py``
(``git show <rev>:adapters/credkeeper_file/_store.py``) to measure side by side; its file is
filled by writing the JSON directly. Memory of a full ``scan_due`` is its tracemalloc peak.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from credkeeper import Record
from credkeeper_file import FileStore, _database, _format

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def record(key: str) -> Record:
    """A record shaped like a sealed one (token fields of realistic length)."""
    return Record(
        key=key,
        access_token="v1:" + "a" * 180,
        refresh_token="v1:" + "r" * 180,
        expires_at=NOW + timedelta(hours=8),
        scopes=("user:inference", "user:profile"),
    )


def fill(path: Path, size: int, *, old: bool) -> None:
    """``size`` records, versions 1..size, written straight into the file."""
    docs = {
        f"user-{i}": {**record(f"user-{i}").to_document(), "version": i + 1} for i in range(size)
    }
    if old:
        path.write_bytes(_format.encode(_format.Contents(records=docs, last_version=size)))
    else:
        _database.build(str(path), docs.items(), size)


def median_us(call: Any, args: list[Any]) -> float:
    times = []
    for arg in args:
        start = time.perf_counter_ns()
        call(arg)
        times.append((time.perf_counter_ns() - start) / 1000)
    return statistics.median(times)


def measure(store_class: Any, size: int, *, old: bool, calls: int, puts: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "creds.json"
        fill(path, size, old=old)
        store = store_class(path)
        rng = random.Random(size)
        keys = [f"user-{rng.randrange(size)}" for _ in range(calls)]
        store.get(keys[0])  # opens the connection
        get = median_us(store.get, keys)

        def cas(key: str) -> None:
            store.put(store.get(key).replace(failures=1))

        cas_us = median_us(cas, keys) - get
        start = time.perf_counter()
        for i in range(puts):
            store.put(record(f"new-{i}"))
        put_s = time.perf_counter() - start
        tracemalloc.start()
        due = sum(1 for _ in store.scan_due(NOW + timedelta(days=1)))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return {
            "get_us": get,
            "cas_us": cas_us,
            "puts_s": put_s,
            "due": due,
            "scan_kib": peak // 1024,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,10000,100000")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--puts", type=int, default=200)
    parser.add_argument("--old", help="path of the format 1 _store.py to compare with")
    args = parser.parse_args()
    sides: dict[str, Any] = {"sqlite": FileStore}
    if args.old:
        spec = importlib.util.spec_from_file_location("credkeeper_file._old_store", args.old)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        sides["json"] = module.FileStore
    print(f"{'side':6} {'size':>7} {'get µs':>9} {'CAS µs':>9} {'puts s':>8} {'scan KiB':>9}")
    for size in map(int, args.sizes.split(",")):
        for name, store_class in sides.items():
            row = measure(store_class, size, old=name == "json", calls=args.calls, puts=args.puts)
            print(
                f"{name:6} {size:>7} {row['get_us']:>9.1f} {row['cas_us']:>9.1f}"
                f" {row['puts_s']:>8.2f} {row['scan_kib']:>9}",
                flush=True,
            )


if __name__ == "__main__":
    main()
