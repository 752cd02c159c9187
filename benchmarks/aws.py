"""What the Secrets Manager store costs over bare boto3 calls, against moto's server.

Two measurements, each against a baseline run side by side in the same run:

1. ``get`` latency: ``TokenManager.get(key)`` with the in-process cache off, on a credential
   valid for hours (no refresh may happen), against a bare ``store.get(key)`` and a bare
   ``get_secret_value(SecretId=name, VersionStage="AWSCURRENT")`` on a boto3 client of its
   own. Calls are interleaved one by one, rotating which side goes first; the medians and
   the medians of the per-call ratios show the manager's and the store's overhead.
2. Compare-and-swap writes: 8 threads doing read-modify-write increments (``get``, then
   ``put`` of ``failures + 1``, again after a ``ConflictError``), all on one key (contended)
   and each on its own key (uncontended), against 8 threads doing bare unconditional
   ``put_secret_value`` calls (which move ``AWSCURRENT`` themselves) on secrets of their own.
   The sides run in slices ordered A B B A ...; writes per second, conflicts, and a check
   that no increment was lost.

By default moto's ``ThreadedMotoServer`` runs in a child process on a free port (so the server
does not share this process's interpreter lock), with fake credentials; ``--endpoint`` points
at a server already running instead, e.g. the compose service::

    .venv/bin/python benchmarks/aws.py
    .venv/bin/python benchmarks/aws.py --endpoint http://127.0.0.1:55000 --json

moto's server is far slower per call than AWS and keeps every version of a secret, so the
absolute numbers describe moto on this machine; the ratios describe the store.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import boto3
import httpx

from credkeeper import ConflictError, KeyRing, Record, TokenManager
from credkeeper.testing import FakeProvider
from credkeeper_aws import SecretsManagerStore

REGION = "us-east-1"
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
}


# -- the server --------------------------------------------------------------------------


def _serve(ports: Any) -> None:
    """Child process: moto's threaded server on a free port, until the parent kills it."""
    # moto's thread-unsafe paths answer 500 under contention; the store retries those calls.
    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)
    import moto.backends  # noqa: PLC0415
    from moto.server import ThreadedMotoServer  # noqa: PLC0415

    # As in tests/adapters/aws/conftest.py: moto lists its package directory on every request.
    listing = tuple(moto.backends.list_of_moto_modules())
    moto.backends.list_of_moto_modules = lambda: listing
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    ports.put(server.get_host_and_port()[1])
    threading.Event().wait()


@contextlib.contextmanager
def moto_server(endpoint: str | None) -> Iterator[str]:
    """``endpoint``, or a moto server in a child process for the length of the block."""
    if endpoint is not None:
        yield endpoint
        return
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    child = context.Process(target=_serve, args=(ports,), daemon=True)
    child.start()
    try:
        yield f"http://127.0.0.1:{ports.get(timeout=60)}"
    finally:
        child.kill()
        child.join(10)


# -- the target --------------------------------------------------------------------------


def _record(key: str, *, expires_at: datetime) -> Record:
    return Record(
        key=key,
        access_token="A" * 160,
        refresh_token="R" * 160,
        expires_at=expires_at,
        scopes=("user:inference", "user:profile"),
        subscription_type="max",
    )


class Target:
    """The store under test on a fresh prefix, and a bare client on the same endpoint."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.prefix = f"ck-bench-{uuid.uuid4().hex[:8]}/"
        self.store = SecretsManagerStore(self.prefix, region=REGION, endpoint_url=endpoint)
        self.client: Any = boto3.client("secretsmanager", region_name=REGION, endpoint_url=endpoint)

    def name(self, key: str) -> str:
        """The secret name the store gives ``key`` (the benchmark's keys need no escaping)."""
        return self.prefix + key

    def versions(self) -> dict[str, str]:
        """Versions of what was measured."""
        found = {"python": platform.python_version(), "machine": platform.machine()}
        for package in ("credkeeper", "boto3", "botocore", "moto"):
            with contextlib.suppress(PackageNotFoundError):
                found[package] = version(package)
        found["cpus"] = str(os.cpu_count())
        return found

    def cleanup(self) -> None:
        """Delete every secret under the prefix, then close both clients."""
        try:
            for page in self.client.get_paginator("list_secrets").paginate(
                Filters=[{"Key": "name", "Values": [self.prefix]}]
            ):
                for entry in page["SecretList"]:
                    self.client.delete_secret(
                        SecretId=entry["Name"], ForceDeleteWithoutRecovery=True
                    )
        finally:
            self.store.close()
            self.client.close()


# -- 1. get ------------------------------------------------------------------------------


def _per_call(numerator: list[float], denominator: list[float]) -> float:
    return round(statistics.median(n / d for n, d in zip(numerator, denominator, strict=True)), 3)


def measure_get(target: Target, calls: int, warmup: int) -> dict[str, Any]:
    """Manager ``get`` (cache off) vs bare ``store.get`` vs bare ``get_secret_value``."""
    store, client = target.store, target.client
    key = "get"
    with tempfile.TemporaryDirectory() as journal, FakeProvider() as fake, httpx.Client() as http:
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
        name = target.name(key)
        stored = store.get(key)
        answer = client.get_secret_value(SecretId=name, VersionStage="AWSCURRENT")
        if stored is None or answer["VersionId"] != stored.version:
            raise SystemExit("the bare call read another version; the comparison is void")
        sides: dict[str, Callable[[], object]] = {
            "manager": lambda: manager.get(key),
            "store": lambda: store.get(key),
            "bare": lambda: client.get_secret_value(SecretId=name, VersionStage="AWSCURRENT"),
        }
        names = list(sides)
        times: dict[str, list[float]] = {side: [] for side in names}
        for index in range(warmup + calls):
            shift = index % len(names)
            for side in names[shift:] + names[:shift]:
                start = time.perf_counter_ns()
                sides[side]()
                elapsed = time.perf_counter_ns() - start
                if index >= warmup:
                    times[side].append(elapsed / 1000)
        refreshes = fake.refresh_count
    if refreshes:
        raise SystemExit(f"{refreshes} refreshes happened; the get comparison is void")
    return {
        "calls": calls,
        **{f"{side}_median_us": round(statistics.median(times[side]), 1) for side in names},
        "manager_vs_store_ratio": _per_call(times["manager"], times["store"]),
        "store_vs_bare_ratio": _per_call(times["store"], times["bare"]),
        "manager_vs_bare_ratio": _per_call(times["manager"], times["bare"]),
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
    """CAS increments through the store vs bare ``put_secret_value`` calls, 8 threads each."""
    store, client = target.store, target.client
    far = datetime.now(UTC) + timedelta(days=1)
    conflicts = [0] * threads

    def cas(keys: list[str]) -> Callable[[int, threading.Event], int]:
        def work(index: int, stop: threading.Event) -> int:
            key, writes = keys[index], 0
            while not stop.is_set():
                record = store.get(key)
                assert record is not None
                try:
                    store.put(record.replace(failures=record.failures + 1))
                except ConflictError:
                    conflicts[index] += 1
                    continue
                writes += 1
            return writes

        return work

    def bare(names: list[str]) -> Callable[[int, threading.Event], int]:
        value = json.dumps({"record": _record("bare", expires_at=far).to_document()})

        def work(index: int, stop: threading.Event) -> int:
            writes = 0
            while not stop.is_set():
                client.put_secret_value(SecretId=names[index], SecretString=value)
                writes += 1
            return writes

        return work

    def failures_of(keys: list[str]) -> int:
        total = 0
        for key in set(keys):
            record = store.get(key)
            assert record is not None
            total += record.failures
        return total

    result: dict[str, Any] = {"threads": threads, "seconds_per_side": seconds}
    for scenario in ("contended", "uncontended"):
        store_keys = [
            f"cas-{scenario}-{index if scenario == 'uncontended' else 0}"
            for index in range(threads)
        ]
        bare_keys = [
            f"bare-{scenario}-{index if scenario == 'uncontended' else 0}"
            for index in range(threads)
        ]
        for key in {*store_keys, *bare_keys}:
            store.put(_record(key, expires_at=far))
        sides = {
            "store": cas(store_keys),
            "bare": bare([target.name(key) for key in bare_keys]),
        }
        writes = dict.fromkeys(sides, 0)
        elapsed = dict.fromkeys(sides, 0.0)
        conflicts[:] = [0] * threads
        before = failures_of(store_keys)
        # A B B A in slices, so drift in the machine's load hits both sides alike.
        rounds = max(1, round(seconds))
        order = ["store", "bare", "bare", "store"] * rounds
        for side in order:
            start = time.perf_counter()
            writes[side] += _run_threads(sides[side], threads, seconds / order.count(side))
            elapsed[side] += time.perf_counter() - start
        lost = before + writes["store"] - failures_of(store_keys)
        if lost:
            raise SystemExit(f"{scenario}: {lost} increments were lost; CAS is broken")
        store_rate = writes["store"] / elapsed["store"]
        bare_rate = writes["bare"] / elapsed["bare"]
        result[scenario] = {
            "store_writes_per_s": round(store_rate, 1),
            "store_writes": writes["store"],
            "conflicts": sum(conflicts),
            "lost_updates": lost,
            "bare_writes_per_s": round(bare_rate, 1),
            "ratio": round(store_rate / bare_rate, 3),
        }
    return result


# -- driver ------------------------------------------------------------------------------


def run(endpoint: str, args: argparse.Namespace) -> dict[str, Any]:
    """Both measurements against ``endpoint``, cleaning up whatever happens."""
    target = Target(endpoint)
    try:
        return {
            "endpoint": endpoint,
            "versions": target.versions(),
            "get": measure_get(target, args.calls, args.warmup),
            "cas": measure_cas(target, args.threads, args.seconds),
        }
    finally:
        target.cleanup()


def show(result: dict[str, Any]) -> None:
    """Print the result as readable tables."""
    print(
        f"== {result['endpoint']}  ({', '.join(f'{k} {v}' for k, v in result['versions'].items())})"
    )
    get = result["get"]
    print(f"get, cache off, {get['calls']} interleaved calls per side")
    print(f"  TokenManager.get median   {get['manager_median_us']:>9} µs")
    print(f"  store.get median          {get['store_median_us']:>9} µs")
    print(f"  bare get_secret_value     {get['bare_median_us']:>9} µs")
    print(f"  manager / store           {get['manager_vs_store_ratio']:>9}  (median per-call)")
    print(f"  store / bare              {get['store_vs_bare_ratio']:>9}  (median per-call)")
    print(f"  manager / bare            {get['manager_vs_bare_ratio']:>9}  (median per-call)")
    cas = result["cas"]
    print(f"writes, {cas['threads']} threads, {cas['seconds_per_side']} s per side")
    print(f"  {'':12} {'CAS w/s':>9} {'conflicts':>10} {'bare put w/s':>13} {'ratio':>7}")
    for scenario in ("contended", "uncontended"):
        entry = cas[scenario]
        print(
            f"  {scenario:12} {entry['store_writes_per_s']:>9} {entry['conflicts']:>10} "
            f"{entry['bare_writes_per_s']:>13} {entry['ratio']:>7}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", help="a running moto server (default: start one)")
    parser.add_argument("--calls", type=int, default=1000, help="measured get calls per side")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured get calls first")
    parser.add_argument("--threads", type=int, default=8, help="writer threads")
    parser.add_argument("--seconds", type=float, default=6.0, help="write time per side")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    for variable, value in FAKE_CREDENTIALS.items():
        os.environ.setdefault(variable, value)
    with moto_server(args.endpoint) as endpoint:
        result = run(endpoint, args)
    if args.json:
        print(json.dumps(result))
    else:
        show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
