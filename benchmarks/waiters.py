"""How long callers wait for a refresh another process is making, on every backend.

When a credential expires under load, one caller in the fleet takes the lease and asks the
provider; every other caller waits for its result. Callers in the holder's own process wait on
it in memory; callers in other processes (and hosts) must learn from the store that the refresh
is done. The limit is one provider round trip: this benchmark reports how close each backend
comes to it.

For each backend and each layout (``PROCESSES x THREADS``), the worker processes stay up for
``--expiries`` rounds. Each round the credential is replaced by one already expired, and every
thread of every worker calls ``TokenManager.get`` at once. Reported per layout:

- p50/p99 wait of the callers in processes other than the refreshing one, and that p99 as a
  ratio of the provider's latency (``--latency``, 200 ms by default);
- p50/p99 of the refresh itself (the refreshing caller's own call: lease, provider, journal,
  store write), the floor no waiter can go below on a loaded machine;
- store reads per waiting process per expiry (the load waiting puts on the store);
- provider refreshes per expiry (must be 1).

The first round of each layout is not measured: it warms connections and caches, as in a
running service.

    .venv/bin/python benchmarks/waiters.py                 # every backend
    .venv/bin/python benchmarks/waiters.py --backend postgresql --layout 16x1

SQLite and the file store run on a temporary file; PostgreSQL and MariaDB on the local servers
(``--postgresql-url``, ``--mariadb-url``); MongoDB on a SecantusDB started for the run;
Secrets Manager on a moto server started for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import _harness
from _forwarding import ForwardingStore
from credkeeper import CredentialStore, KeyRing, Provider, Record, TokenManager, open_store
from credkeeper._events import EventKind, RefreshEvent
from credkeeper.testing import FakeProvider
from credkeeper.testing._storm import process_context

BACKENDS = ("file", "sqlite", "postgresql", "mariadb", "mongodb", "aws")
KEY = "waiting-user"


class CountingStore(ForwardingStore):
    """A real store that counts the reads made through it (the load waiting puts on it)."""

    def __init__(self, store: CredentialStore) -> None:
        super().__init__(store)
        self.reads = 0

    def get(self, key: str) -> Record | None:
        """The real store's record, counted."""
        self.reads += 1
        return self.store.get(key)


@dataclass(frozen=True)
class Round:
    """What one worker process saw in one round."""

    waits: list[float]
    refreshed: bool
    reads: int


def _worker(
    url: str, token_url: str, keys: str, journal: str, threads: int, conn: Connection
) -> None:
    """One worker process: each round, ``threads`` threads call get() together and time it."""
    started: list[RefreshEvent] = []
    store = CountingStore(open_store(url))  # type: ignore[arg-type]
    manager = TokenManager(
        store,
        Provider.claude_code(token_url=token_url),
        keyring=KeyRing.parse(keys),
        journal=journal,
        # Every round replaces the credential behind the managers' backs: no cached copy.
        cache=False,
        events=lambda event: (
            started.append(event) if event.kind is EventKind.REFRESH_STARTED else None
        ),
    )
    gate = threading.Barrier(threads + 1)
    waits: list[float] = []

    def call() -> None:
        while True:
            gate.wait()
            if stop.is_set():
                return
            begin = time.perf_counter()
            manager.get(KEY)
            waits.append(time.perf_counter() - begin)
            gate.wait()

    stop = threading.Event()
    workers = [threading.Thread(target=call) for _ in range(threads)]
    for worker in workers:
        worker.start()
    conn.send("ready")
    while conn.recv() == "go":
        waits.clear()
        started.clear()
        store.reads = 0
        gate.wait()  # release the callers
        gate.wait()  # every caller has its token
        conn.send(Round(list(waits), bool(started), store.reads))
    stop.set()
    gate.wait()
    for worker in workers:
        worker.join()
    manager.close()


def run_layout(
    url: str, processes: int, threads: int, expiries: int, latency: float
) -> dict[str, Any]:
    """``expiries`` measured rounds of ``processes x threads`` callers after one warm-up round."""
    ring = KeyRing.generate()
    context = process_context()
    other_waits: list[float] = []
    holder_waits: list[float] = []
    reads: list[int] = []
    refreshes: list[int] = []
    with (
        tempfile.TemporaryDirectory() as journals,
        FakeProvider(latency=latency, revoke_family_on_reuse=True) as fake,
        TokenManager(open_store(url), fake.provider(), keyring=ring) as admin,  # type: ignore[arg-type]
    ):
        admin.put(KEY, fake.issue(expires_in=0))
        pipes = []
        for n in range(processes):
            ours, theirs = context.Pipe()
            args = (url, fake.token_url, ring.export(), f"{journals}/{n}", threads, theirs)
            context.Process(target=_worker, args=args, daemon=True).start()
            pipes.append(ours)
        for pipe in pipes:
            assert pipe.recv() == "ready"
        for index in range(expiries + 1):
            admin.put(KEY, fake.issue(expires_in=0))
            before = fake.refresh_count
            for pipe in pipes:
                pipe.send("go")
            rounds: list[Round] = [pipe.recv() for pipe in pipes]
            if index == 0:
                continue
            refreshes.append(fake.refresh_count - before)
            for seen in rounds:
                if seen.refreshed:
                    holder_waits.append(max(seen.waits))
                else:
                    other_waits.extend(seen.waits)
                    reads.append(seen.reads)
        for pipe in pipes:
            pipe.send("stop")
    return {
        "layout": f"{processes}x{threads}",
        "refresh_p50_ms": _ms(statistics.median(holder_waits)),
        "refresh_p99_ms": _ms(_percentile(holder_waits, 0.99)),
        "p50_ms": _ms(statistics.median(other_waits)) if other_waits else None,
        "p99_ms": _ms(_percentile(other_waits, 0.99)) if other_waits else None,
        "p99_ratio": round(_percentile(other_waits, 0.99) / latency, 2) if other_waits else None,
        "reads_per_waiting_process": round(statistics.mean(reads), 1) if reads else None,
        "refreshes_per_expiry": round(statistics.mean(refreshes), 2),
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@contextlib.contextmanager
def backend_url(name: str, args: argparse.Namespace) -> Iterator[str]:
    """A store URL on a fresh table, file, collection or prefix of backend ``name``."""
    suffix = uuid.uuid4().hex[:8]
    if name == "file":
        with tempfile.TemporaryDirectory() as directory:
            yield f"file:///{directory}/credentials.ck"
        return
    if name == "sqlite":
        from credkeeper_sql import init_store  # noqa: PLC0415

        with tempfile.TemporaryDirectory() as directory:
            init_store(f"sqlite:///{directory}/credentials.db")
            yield f"sqlite:///{directory}/credentials.db"
        return
    if name in ("postgresql", "mariadb"):
        import sqlalchemy as sa  # noqa: PLC0415

        from credkeeper_sql import init_store  # noqa: PLC0415

        base = args.postgresql_url if name == "postgresql" else args.mariadb_url
        table = f"ck_wait_{suffix}"
        init_store(base, table=table)
        try:
            off = "&notify=false" if name == "postgresql" and not args.notify else ""
            yield f"{base}?table={table}{off}"
        finally:
            engine = sa.create_engine(base)
            with engine.begin() as connection:
                sa.Table(table, sa.MetaData()).drop(connection, checkfirst=True)
            engine.dispose()
        return
    if name == "mongodb":
        import mongo  # noqa: PLC0415

        with mongo.secantus() as server:
            # MongoDB's change stream is opt-in (a cursor each process polls).
            notify = "true" if args.notify else "false"
            yield f"{server}ck_wait_{suffix}?collection=credentials&notify={notify}"
        return
    import aws  # noqa: PLC0415

    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(variable, "testing")
    with aws.moto_server(None) as endpoint:
        yield f"aws-sm://us-east-1/ck-wait-{suffix}/?endpoint_url={endpoint}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=BACKENDS, help="(repeatable)")
    parser.add_argument("--layout", action="append", help="PROCESSESxTHREADS (repeatable)")
    parser.add_argument("--expiries", type=int, default=10, help="measured rounds per layout")
    parser.add_argument("--latency", type=float, default=0.2, help="provider latency, seconds")
    parser.add_argument(
        "--postgresql-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test"
    )
    parser.add_argument("--mariadb-url", default="mysql+pymysql://root@127.0.0.1:3306/test")
    parser.add_argument(
        "--no-notify",
        dest="notify",
        action="store_false",
        help="waiters without change notices (PostgreSQL's NOTIFY, MongoDB's change stream, "
        "which this benchmark turns on), on their schedule only",
    )
    parser.add_argument("--json", action="store_true", help="one JSON line per result")
    args = parser.parse_args()
    layouts = [tuple(int(n) for n in text.split("x")) for text in args.layout or ["16x1", "4x16"]]
    for backend in args.backend or BACKENDS:
        with backend_url(backend, args) as url:
            for processes, threads in layouts:
                result = run_layout(url, processes, threads, args.expiries, args.latency)
                result |= {"backend": backend, "latency_ms": _ms(args.latency)}
                _harness.emit(result, show, as_json=args.json)


def show(result: dict[str, Any]) -> None:
    print(
        f"{result['backend']:<11} {result['layout']:>5}: the refresh p50 "
        f"{result['refresh_p50_ms']} ms, p99 {result['refresh_p99_ms']} ms; other processes "
        f"wait p50 "
        f"{result['p50_ms']} ms, p99 {result['p99_ms']} ms = {result['p99_ratio']}x the "
        f"provider's {result['latency_ms']:.0f} ms; {result['reads_per_waiting_process']} reads"
        f" per waiting process, {result['refreshes_per_expiry']} refreshes per expiry"
    )


if __name__ == "__main__":
    main()
