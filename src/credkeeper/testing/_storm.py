"""``run_storm``: many processes and threads asking for one due credential at once.

The scenario behind credkeeper's promise, reusable against any store reachable from several
processes: a credential is due, ``processes`` x ``threads`` callers ask for it at the same
moment, and the provider (``FakeProvider`` with reuse detection and real latency) must see
exactly one refresh, every caller must get the new access token, and nobody may fail.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import queue
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from credkeeper._codec import TokenCodec
from credkeeper._credentials import Credentials
from credkeeper._keyring import KeyRing
from credkeeper._manager import TokenManager
from credkeeper._provider import Provider
from credkeeper._registry import open_store
from credkeeper._secret import Secret
from credkeeper._store import CredentialStore

from ._clock import SkewedClock
from ._provider import FakeProvider

__all__ = ["StormReport", "run_storm"]


def _fingerprint(token: Secret) -> str:
    return hashlib.sha256(token.get_secret_value().encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class StormReport:
    """What a storm did: provider calls by outcome, callers' errors, and who got which token."""

    refreshes: int
    outcomes: tuple[str, ...]
    callers: int
    errors: tuple[str, ...]
    tokens_seen: frozenset[str] = field(repr=False)
    holding_current: int

    @property
    def ok(self) -> bool:
        """One refresh, no error, every caller holding the provider's current access token."""
        return (
            self.refreshes == 1
            and self.outcomes == ("ok",)
            and not self.errors
            and self.holding_current == self.callers
        )


def _open(store_url: str, store_options: Mapping[str, Any]) -> CredentialStore:
    store = open_store(store_url, **store_options)
    if not isinstance(store, CredentialStore):  # pragma: no cover - storms are sync
        raise TypeError("run_storm needs a store URL that opens a synchronous store")
    return store


def _storm_process(
    store_url: str,
    store_options: Mapping[str, Any],
    token_url: str,
    keys: str,
    journal: str,
    key: str,
    threads: int,
    skew: float,
    codec: Callable[[], TokenCodec] | None,
    start: Any,
    results: Any,
) -> None:
    """One storm process: ``threads`` threads call get(key) together; report through ``results``."""
    try:
        manager = TokenManager(
            _open(store_url, store_options),
            Provider.claude_code(token_url=token_url),
            keyring=KeyRing.parse(keys),
            journal=journal,
            clock=SkewedClock(skew),
            codec=None if codec is None else codec(),
        )
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the storm
        results.put(("error", traceback.format_exc(limit=3)))
        start.wait()
        return
    gate = threading.Barrier(threads)

    def call() -> None:
        gate.wait()
        try:
            results.put(("token", _fingerprint(manager.get(key).access_token)))
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            results.put(("error", f"{type(exc).__name__}: {exc}"))

    workers = [threading.Thread(target=call) for _ in range(threads)]
    start.wait()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    manager.close()


# Imported once by the fork server instead of by every storm process; any not installed is skipped.
_PRELOAD = [
    "credkeeper",
    "credkeeper.testing._storm",
    "credkeeper_file",
    "credkeeper_sql",
    "credkeeper_mongo",
    "credkeeper_aws",
    "sqlalchemy",
    "psycopg",
    "pymysql",
    "pymongo",
]


def process_context() -> Any:
    """Fresh processes for the storm: forked from a server that has credkeeper and the drivers
    imported already (a storm then starts in milliseconds, not seconds), spawned where the
    platform has no fork server. Either way no process inherits the caller's connections."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")  # pragma: no cover - Windows
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def run_storm(
    store_url: str,
    *,
    directory: str | Path,
    store_options: Mapping[str, Any] | None = None,
    key: str = "storm-user",
    processes: int = 4,
    threads: int = 16,
    latency: float = 0.2,
    timeout: float = 120.0,
    clock_skews: Sequence[float] = (),
    codec: Callable[[], TokenCodec] | None = None,
    seed: Callable[[Credentials], None] | None = None,
) -> StormReport:
    """Run one storm against the store at ``store_url`` and report what happened.

    ``directory`` holds the rescue journal. The store must be reachable from spawned processes
    with the same URL and options. Tokens are sealed with a fresh key ring, unless the store is
    declared plaintext or ``codec`` is given; the ring seals the rescue journal either way.
    ``clock_skews`` gives process ``i`` a clock off by ``clock_skews[i % len(clock_skews)]``
    seconds, as if each ran on a host whose clock disagrees with the others'. ``codec`` makes
    each manager's :class:`TokenCodec` (the application's own cipher); it must be picklable,
    like a module-level function, since every process calls it.

    The stormed credential is one the fake provider issues, already due. credkeeper stores it
    under ``key``, after deleting whatever the key held; with ``seed``, ``seed(credentials)``
    writes it instead, the way the application would (a plain ``INSERT`` of the row, say), so
    the storm runs on a credential credkeeper never wrote. Only the calling process calls
    ``seed``, so it need not be picklable; it must leave tokens in the form the store reads
    them (plain text for a store declared plaintext, else sealed by ``codec``).
    """
    options = dict(store_options or {})
    skews = tuple(float(skew) for skew in clock_skews) or (0.0,)
    keyring = KeyRing.generate()
    journal = str(Path(directory) / "journal")
    context = process_context()
    with FakeProvider(latency=latency, revoke_family_on_reuse=True) as fake:
        credentials = fake.issue(expires_in=0)
        if seed is None:
            with TokenManager(
                _open(store_url, options),
                fake.provider(),
                keyring=keyring,
                journal=journal,
                codec=None if codec is None else codec(),
            ) as setup:
                setup.delete(key)
                setup.put(key, credentials)
        else:
            seed(credentials)
        family = fake.family_of(credentials)
        start = context.Barrier(processes + 1)
        results = context.Queue()
        workers = [
            context.Process(
                target=_storm_process,
                args=(
                    store_url,
                    options,
                    fake.token_url,
                    keyring.export(),
                    journal,
                    key,
                    threads,
                    skews[number % len(skews)],
                    codec,
                    start,
                    results,
                ),
                daemon=True,
            )
            for number in range(processes)
        ]
        for worker in workers:
            worker.start()
        start.wait(timeout)
        expected = processes * threads
        tokens: list[str] = []
        errors: list[str] = []
        try:
            while len(tokens) + len(errors) < expected:
                kind, value = results.get(timeout=timeout)
                (tokens if kind == "token" else errors).append(value)
        except queue.Empty:
            errors.append(f"only {len(tokens) + len(errors)} of {expected} callers answered")
        for worker in workers:
            worker.join(timeout)
            if worker.is_alive():
                worker.kill()
                errors.append("a storm process hung")
        assert family is not None
        current = _fingerprint(fake.current_credentials(family).access_token)
        return StormReport(
            refreshes=fake.refresh_count,
            outcomes=tuple(call.outcome for call in fake.refresh_calls),
            callers=len(tokens) + len(errors),
            errors=tuple(errors),
            tokens_seen=frozenset(tokens),
            holding_current=sum(token == current for token in tokens),
        )
