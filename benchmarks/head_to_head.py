"""Head to head: one user's rotating credentials kept fresh from many workers, three ways.

The same credential, in the same store, asked for by ``--processes`` x ``--threads`` workers in
a loop across ``--expiries`` expiries, by each contender in turn:

- ``credkeeper``: ``TokenManager(store, provider).get(key)`` on every call;
- ``authlib``: an Authlib ``OAuth2Session`` (requests client) per worker thread, given the
  token read from the store on every call, refreshing it through ``ensure_active_token()``
  (``token_endpoint`` and ``leeway``), its ``update_token`` writing the new token back;
- ``requests-oauthlib``: a requests-oauthlib ``OAuth2Session`` per worker thread, given the
  token read from the store on every call, refreshing it when a request finds it expired
  (``auto_refresh_url``), its ``token_updater`` writing the new token back.

The two libraries keep the token the way an application without credkeeper does: a plain read
of the record, and a plain write where the last writer wins (:class:`TokenRow`); no lease, no
re-read after a refused refresh. All three talk to one ``FakeProvider`` over HTTP on loopback,
with the standard RFC 6749 profile all three speak (a form body carrying ``client_id``, no
client secret), single-use refresh tokens, a family revoked when a spent refresh token comes
back, and ``--latency`` seconds per refresh.

Tokens live ``--lifetime`` seconds; credkeeper and Authlib refresh ``--leeway`` seconds before
the end (requests-oauthlib has no leeway: it refreshes once expired). Every worker calls every
``--pause`` seconds (shorter than the provider's latency), so every expiry finds all of them
calling while the refresh is in flight: each expiry is a storm. The run watches each expiry
settle; when the stored refresh token is no longer one the provider accepts (its family was
revoked, or the store kept a spent one), that login is lost and the user logs in again, so that
the next expiry is a storm on a working credential again. Reported per contender:

- provider calls and ``invalid_grant`` answers (ideal: one call per expiry, none refused);
- logins lost (the re-logins the run had to do, and the final credential if unusable);
- errors seen by the workers' calls, by exception type;
- p50 / p99 / max of the time each call spent getting a usable token (the store read included
  for the libraries, which read it on every call; the cache for credkeeper, which has one);
- wall time and the number of calls made.

    .venv/bin/python benchmarks/head_to_head.py \\
        postgresql+psycopg://postgres@127.0.0.1:5432/test --expiries 20

Needs ``authlib`` and ``requests-oauthlib``. The provider runs in this process, beside the
workers, on the same CPUs.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa
from authlib.integrations.requests_client import (  # type: ignore[import-untyped]
    OAuth2Session as AuthlibSession,
)
from requests.adapters import BaseAdapter
from requests_oauthlib import OAuth2Session as OAuthlibSession  # type: ignore[import-untyped]

import _harness
from credkeeper import (
    ConflictError,
    CredentialStore,
    KeyRing,
    Provider,
    Record,
    Status,
    StoreError,
    TokenManager,
    open_store,
)
from credkeeper.testing import FakeProvider
from credkeeper.testing._storm import process_context
from credkeeper_sql import init_store

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CONTENDERS = ("credkeeper", "authlib", "requests-oauthlib")
CLIENT_ID = "head-to-head"
# requests-oauthlib refreshes inside a request; this one is answered in-process, never sent.
RESOURCE = "https://api.example.test/"

# One worker thread's step: get a usable token; returns perf_counter_ns() when it had one.
_Step = Callable[[], int]


@dataclass(frozen=True, slots=True)
class Setup:
    """What a worker process needs, picklable."""

    contender: str
    store_url: str
    token_url: str
    keys: str
    journal: str
    key: str
    threads: int
    pause: float
    leeway: float


class TokenRow:
    """One user's token in the store, kept the way an application without credkeeper keeps it.

    ``load`` reads the record; ``save`` writes the token over whatever is there, the last writer
    winning, as ``UPDATE tokens SET ... WHERE user = ?`` does: the store's compare-and-swap is
    retried with the newest version until the write lands. Tokens are sealed with the same key
    ring credkeeper uses, so all contenders keep the same bytes in the same table.
    """

    def __init__(self, store: CredentialStore, ring: KeyRing, key: str) -> None:
        self.store, self.ring, self.key = store, ring, key

    def load(self) -> dict[str, Any]:
        """The token as both libraries take it: an ``expires_at`` in whole epoch seconds."""
        record = self.store.get(self.key)
        if record is None:
            raise LookupError(f"no credential under {self.key!r}")
        return {
            "access_token": self._open(record.access_token, "access_token"),
            "refresh_token": self._open(record.refresh_token, "refresh_token"),
            "token_type": "Bearer",
            "expires_at": int(record.expires_at.timestamp()),
        }

    def save(self, token: Mapping[str, Any]) -> None:
        """Write ``token`` (a library's token dict) over the stored one."""
        expires_at = token.get("expires_at") or time.time() + int(token["expires_in"])
        access = self._seal(token["access_token"], "access_token")
        refresh = self._seal(token["refresh_token"], "refresh_token")
        expiry = datetime.fromtimestamp(float(expires_at), UTC)
        while True:
            current = self.store.get(self.key)
            if current is None:
                record = Record(
                    key=self.key, access_token=access, refresh_token=refresh, expires_at=expiry
                )
            else:
                record = current.replace(
                    access_token=access, refresh_token=refresh, expires_at=expiry
                )
            try:
                self.store.put(record)
            except ConflictError:
                continue
            return

    def _open(self, value: str, field: str) -> str:
        return self.ring.unseal(value, key=self.key, field=field)

    def _seal(self, value: str, field: str) -> str:
        return self.ring.seal(value, key=self.key, field=field)


class _Resource(BaseAdapter):
    """The API behind the token: notes when a request reached it (token attached), answers 204."""

    def __init__(self) -> None:
        super().__init__()
        self.reached = 0

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        self.reached = time.perf_counter_ns()
        response = requests.Response()
        response.status_code = 204
        response.request = request
        response.url = request.url or RESOURCE
        return response

    def close(self) -> None:
        pass


def _credkeeper(setup: Setup, store: CredentialStore, ring: KeyRing) -> Callable[[], _Step]:
    manager = TokenManager(
        store,
        Provider(token_url=setup.token_url, client_id=CLIENT_ID),
        keyring=ring,
        journal=setup.journal,
        leeway=setup.leeway,
    )

    def step() -> int:
        manager.get(setup.key)
        return time.perf_counter_ns()

    return lambda: step


def _authlib(setup: Setup, store: CredentialStore, ring: KeyRing) -> Callable[[], _Step]:
    row = TokenRow(store, ring, setup.key)

    def update_token(token: Mapping[str, Any], refresh_token: str | None = None, **_: Any) -> None:
        row.save(token)

    def thread() -> _Step:
        session = AuthlibSession(
            client_id=CLIENT_ID,
            token_endpoint=setup.token_url,
            update_token=update_token,
            leeway=setup.leeway,
        )

        def step() -> int:
            session.token = row.load()
            session.ensure_active_token(session.token)
            return time.perf_counter_ns()

        return step

    return thread


def _requests_oauthlib(setup: Setup, store: CredentialStore, ring: KeyRing) -> Callable[[], _Step]:
    row = TokenRow(store, ring, setup.key)

    def thread() -> _Step:
        session = OAuthlibSession(
            client_id=CLIENT_ID,
            auto_refresh_url=setup.token_url,
            auto_refresh_kwargs={"client_id": CLIENT_ID},
            token_updater=row.save,
        )
        resource = _Resource()
        session.mount(RESOURCE, resource)

        def step() -> int:
            session.token = row.load()
            session.get(RESOURCE)
            return resource.reached

        return step

    return thread


_CLIENTS: Mapping[str, Callable[[Setup, CredentialStore, KeyRing], Callable[[], _Step]]] = {
    "credkeeper": _credkeeper,
    "authlib": _authlib,
    "requests-oauthlib": _requests_oauthlib,
}


def _worker(setup: Setup, ready: Any, stop: Any, results: Any) -> None:
    """One process: ``setup.threads`` threads call their step every ``setup.pause`` seconds."""
    # The fake provider speaks plain http on loopback; oauthlib refuses that unless told.
    os.environ["OAUTHLIB_INSECURE_TRANSPORT"] = "1"
    try:
        store = open_store(setup.store_url)
        assert isinstance(store, CredentialStore)
        thread_step = _CLIENTS[setup.contender](setup, store, KeyRing.parse(setup.keys))
    except Exception:  # noqa: BLE001 - reported to the parent, which stops the run
        results.put(("failed", traceback.format_exc(limit=3)))
        ready.wait()
        return
    gate = threading.Barrier(setup.threads + 1)
    durations: list[int] = []
    errors: Counter[str] = Counter()
    samples: dict[str, str] = {}

    def run() -> None:
        step = thread_step()
        rng = random.Random()
        gate.wait()
        # Spread the threads' calls over the pause, as independent requests would be.
        stop.wait(rng.uniform(0, setup.pause))
        while not stop.is_set():
            start = time.perf_counter_ns()
            try:
                end = step()
            except Exception as exc:  # noqa: BLE001 - counted by type; messages may quote tokens
                end = time.perf_counter_ns()
                errors[type(exc).__name__] += 1
                # A store's messages never carry a token; they say why the store failed.
                if isinstance(exc, StoreError):
                    samples.setdefault(type(exc).__name__, str(exc))
            durations.append(end - start)
            stop.wait(setup.pause)

    workers = [threading.Thread(target=run) for _ in range(setup.threads)]
    for worker in workers:
        worker.start()
    ready.wait()
    gate.wait()
    for worker in workers:
        worker.join()
    store.close()
    results.put(("done", {"durations_ns": durations, "errors": dict(errors), "samples": samples}))


class _Login:
    """The user's login: a new token family written to the store, and whether it still works."""

    def __init__(
        self, contender: str, store: CredentialStore, ring: KeyRing, fake: FakeProvider, key: str
    ) -> None:
        self.contender, self.fake, self.key = contender, fake, key
        self.store, self.ring = store, ring
        self.manager = TokenManager(
            store, Provider(token_url=fake.token_url, client_id=CLIENT_ID), keyring=ring
        )
        self.row = TokenRow(store, ring, key)
        self.family = ""

    def login(self) -> None:
        """Log in: issue a family, store it as the contender's application would."""
        credentials = self.fake.issue(expires_in=self.fake.access_token_lifetime)
        self.family = self.fake.family_of(credentials) or ""
        if self.contender == "credkeeper":
            self.manager.put(self.key, credentials)
        else:
            self.row.save(
                {
                    "access_token": credentials.access_token.get_secret_value(),
                    "refresh_token": credentials.refresh_token.get_secret_value(),
                    "expires_at": credentials.expires_at.timestamp(),
                }
            )

    def usable(self) -> bool:
        """Whether the stored refresh token is one the provider still accepts."""
        record = self.store.get(self.key)
        if record is None or record.status is not Status.ACTIVE:
            return False
        token = self.ring.unseal(record.refresh_token, key=self.key, field="refresh_token")
        return self.fake.refresh_token_state(token) == "current"

    def lost(self, *, wait: float) -> bool:
        """Unusable now and after ``wait`` seconds twice: a write in flight gets time to land."""
        for _ in range(3):
            if self.usable():
                return False
            time.sleep(wait)
        return True


def _watch(login: _Login, args: argparse.Namespace, leeway: float, results: Any) -> int:
    """Let ``args.expiries`` expiries happen and settle; the logins lost (and redone) meanwhile.

    Stops early when a worker has reported a failure to start on ``results``.
    """
    settle = 1.0 + 2 * args.latency
    relogins = expiries = 0
    waited_for = None
    while expiries < args.expiries and results.empty():
        current = login.fake.current_credentials(login.family)
        if current.access_token == waited_for:
            # Nobody has refreshed since the last expiry settled: it is still that expiry.
            time.sleep(args.latency)
        else:
            due = current.expires_at.timestamp() - leeway
            time.sleep(max(0.0, due - time.time()) + settle)
            waited_for = current.access_token
            expiries += 1
        if login.lost(wait=args.latency + 0.1):
            relogins += 1
            login.login()
    return relogins


def run_contender(
    contender: str, url: str, fake: FakeProvider, ring: KeyRing, args: argparse.Namespace
) -> dict[str, Any]:
    """One contender's run from login to the last expiry, and what it cost."""
    key = f"h2h-{contender}"
    leeway = 0.0 if contender == "requests-oauthlib" else args.leeway
    store = open_store(url)
    assert isinstance(store, CredentialStore)
    context = process_context()
    with tempfile.TemporaryDirectory() as directory:
        setup = Setup(
            contender=contender,
            store_url=url,
            token_url=fake.token_url,
            keys=ring.export(),
            journal=str(Path(directory) / "journal"),
            key=key,
            threads=args.threads,
            pause=args.pause,
            leeway=leeway,
        )
        login = _Login(contender, store, ring, fake, key)
        ready = context.Barrier(args.processes + 1)
        stop = context.Event()
        results = context.Queue()
        workers = [
            context.Process(target=_worker, args=(setup, ready, stop, results), daemon=True)
            for _ in range(args.processes)
        ]
        for worker in workers:
            worker.start()
        login.login()
        fake.reset_log()
        ready.wait(120)
        started = time.monotonic()
        relogins = _watch(login, args, leeway, results)
        stop.set()
        durations: list[int] = []
        errors: Counter[str] = Counter()
        samples: dict[str, str] = {}
        for _ in workers:
            kind, value = results.get(timeout=120)
            if kind == "failed":
                stop.set()
                raise SystemExit(f"a {contender} worker failed:\n{value}")
            durations += value["durations_ns"]
            errors.update(value["errors"])
            samples = value["samples"] | samples
        wall = time.monotonic() - started
        for worker in workers:
            worker.join(30)
        calls = fake.refresh_calls
        final_lost = not login.usable()
        login.manager.close()
    outcomes = Counter(call.outcome for call in calls)
    ms = sorted(duration / 1e6 for duration in durations)
    return {
        "contender": contender,
        "expiries": args.expiries,
        "provider_calls": len(calls),
        "refreshes": outcomes["ok"],
        "invalid_grant": outcomes["invalid_grant"],
        "other_answers": {k: v for k, v in outcomes.items() if k not in ("ok", "invalid_grant")},
        "logins_lost": relogins + final_lost,
        "caller_calls": len(ms),
        "caller_errors": sum(errors.values()),
        "errors_by_type": dict(errors),
        "store_errors_seen": samples,
        "p50_ms": round(statistics.median(ms), 3) if ms else None,
        "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 1) if ms else None,
        "max_ms": round(ms[-1], 1) if ms else None,
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("url", nargs="?", default=DEFAULT_URL, help="the store (SQL)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=16, help="worker threads per process")
    parser.add_argument("--expiries", type=int, default=20)
    parser.add_argument("--lifetime", type=int, default=4, help="access token lifetime, s")
    parser.add_argument("--leeway", type=float, default=1.0, help="refresh this early, s")
    parser.add_argument("--latency", type=float, default=0.2, help="provider latency, s")
    parser.add_argument("--pause", type=float, default=0.1, help="between a worker's calls, s")
    args = parser.parse_args()
    if args.pause >= args.latency:
        parser.error("--pause must be shorter than --latency, or an expiry is no storm")
    if args.lifetime - args.leeway <= 1.0 + 2 * args.latency:
        parser.error("--lifetime must exceed --leeway by more than 1 s + 2 x --latency")
    table = f"ck_bench_{uuid.uuid4().hex[:8]}"
    url = f"{args.url}{'&' if '?' in args.url else '?'}table={table}"
    init_store(args.url, table=table)
    ring = KeyRing.generate()
    results = []
    try:
        with FakeProvider(
            latency=args.latency,
            access_token_lifetime=args.lifetime,
            revoke_family_on_reuse=True,
            client_id=CLIENT_ID,
        ) as fake:
            for contender in args.contenders:
                results.append(run_contender(contender, url, fake, ring, args))
    finally:
        engine = sa.create_engine(args.url)
        with engine.begin() as connection:
            sa.Table(table, sa.MetaData()).drop(connection, checkfirst=True)
        engine.dispose()
    summary = {
        "versions": _harness.describe(
            "credkeeper", "authlib", "requests-oauthlib", "oauthlib", "sqlalchemy"
        ),
        "processes": args.processes,
        "threads": args.threads,
        "expiries": args.expiries,
        "lifetime_s": args.lifetime,
        "leeway_s": args.leeway,
        "latency_s": args.latency,
        "pause_s": args.pause,
        "contenders": results,
    }
    _harness.emit(summary, show, as_json=args.json)


def show(summary: dict[str, Any]) -> None:
    _harness.show_header("head-to-head storm", summary["versions"])
    print(
        f"{summary['processes']} processes x {summary['threads']} threads, "
        f"{summary['expiries']} expiries of a {summary['lifetime_s']} s token, provider "
        f"{summary['latency_s'] * 1000:.0f} ms, a call per worker every "
        f"{summary['pause_s'] * 1000:.0f} ms"
    )
    head = (
        f"  {'':18} {'provider':>9} {'invalid':>8} {'logins':>7} {'caller':>7} "
        f"{'p50':>7} {'p99':>7} {'max':>7} {'wall':>6} {'calls':>7}"
    )
    print(head)
    print(
        f"  {'':18} {'calls':>9} {'grant':>8} {'lost':>7} {'errors':>7} "
        f"{'ms':>7} {'ms':>7} {'ms':>7} {'s':>6} {'made':>7}"
    )
    for entry in summary["contenders"]:
        print(
            f"  {entry['contender']:18} {entry['provider_calls']:>9} {entry['invalid_grant']:>8} "
            f"{entry['logins_lost']:>7} {entry['caller_errors']:>7} {entry['p50_ms']!s:>7} "
            f"{entry['p99_ms']!s:>7} {entry['max_ms']!s:>7} {entry['wall_s']:>6} "
            f"{entry['caller_calls']:>7}"
        )
    for entry in summary["contenders"]:
        if entry["errors_by_type"] or entry["other_answers"]:
            errors = ", ".join(f"{k} {v}" for k, v in sorted(entry["errors_by_type"].items()))
            other = ", ".join(f"{k} {v}" for k, v in sorted(entry["other_answers"].items()))
            print(f"  {entry['contender']}: errors {errors or '-'}; other answers {other or '-'}")
        for name, message in entry["store_errors_seen"].items():
            print(f"  {entry['contender']}: first {name}: {message}")


if __name__ == "__main__":
    main()
