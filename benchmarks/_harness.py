"""What the benchmarks share: their flags, side-by-side timing, ratios, memory and output.

Every benchmark measures credkeeper against a baseline doing the same work without it, in the
same run, and reports ratios. What this module guarantees to each of them:

- Single calls are timed interleaved (:func:`interleave`): every round calls each side once,
  in an order drawn afresh, so that no side runs more often on a warm cache, a quiet machine
  or after a particular other side; ratios are medians of per-call ratios
  (:func:`per_call_ratio`), each call against its pair.
- Longer runs (threads writing for a while, scans in subprocesses) alternate A B B A ...
  (:func:`abba`), so drift in the machine's load hits both sides alike.
- Memory is measured in a fresh process: the ``tracemalloc`` peak and the rise of the RSS
  high-water mark (:func:`measure_memory`, run by :func:`measure_scan`).
- Each result names the machine and the versions measured (:func:`describe`) and prints as
  tables, or as one JSON line per result with ``--json`` (:func:`emit`).

The scripts are run directly (``python benchmarks/stores.py``), which puts this directory on
``sys.path``; hence the plain ``import _harness``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import httpx

from credkeeper import ConflictError, CredentialStore, KeyRing, Record, TokenManager
from credkeeper.testing import FakeProvider

MEMORY_GOAL_MB = 50.0
SEED_CHUNK = 5000
HOUR_MS = 3_600_000

Number = TypeVar("Number", int, float)
_Work = Callable[[int, threading.Event], int]
"""One writer thread's loop: ``work(thread_index, stop)`` runs until ``stop``; its write count."""


# -- flags -------------------------------------------------------------------------------


def _at_least(minimum: Number, kind: Callable[[str], Number]) -> Callable[[str], Number]:
    def parse(text: str) -> Number:
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum:g} or more, not {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def parser(
    doc: str | None, *, calls: int, warmup: int, measured: str, json_help: str
) -> argparse.ArgumentParser:
    """A parser with ``doc``'s first paragraph and ``--calls``, ``--warmup`` and ``--json``."""
    made = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    made.add_argument(
        "--calls", type=_at_least(1, int), default=calls, help=f"measured {measured} per side"
    )
    made.add_argument(
        "--warmup", type=_at_least(0, int), default=warmup, help=f"unmeasured {measured} first"
    )
    made.add_argument("--json", action="store_true", help=json_help)
    return made


def add_write_flags(parser: argparse.ArgumentParser, *, seconds: float) -> None:
    """``--threads`` and ``--seconds``, for :func:`measure_cas`."""
    parser.add_argument("--threads", type=_at_least(1, int), default=8, help="writer threads")
    parser.add_argument(
        "--seconds", type=_at_least(0.1, float), default=seconds, help="write time per side"
    )


def add_scan_flags(parser: argparse.ArgumentParser, *, rows: str) -> None:
    """``--rows``, and the hidden flags that make a script a :func:`measure_scan` child."""
    parser.add_argument(
        "--rows", type=_at_least(1, int), default=100_000, help=f"due {rows} for scan_due"
    )
    parser.add_argument("--child", choices=["store", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--before-ms", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)


# -- timing ------------------------------------------------------------------------------


def interleave(
    sides: Mapping[str, Callable[[], object]], *, calls: int, warmup: int
) -> dict[str, list[float]]:
    """Call each side once a round for ``warmup + calls`` rounds; µs of the measured calls.

    Each round calls the sides in an order drawn afresh (seeded, so runs repeat it), so that
    no side follows another more often than any other does. A call runs slower after one
    that filled the CPU's caches with other code (the manager's), so a fixed rotation would
    bias the comparison: with three sides, ``store.get`` followed ``TokenManager.get`` two
    rounds in three, the raw read one in three, and the same SELECT measured 5-7 % slower in
    the store's place than in the raw read's.
    """
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(len(names))
    for index in range(warmup + calls):
        order.shuffle(names)
        for name in names:
            start = time.perf_counter_ns()
            sides[name]()
            elapsed = time.perf_counter_ns() - start
            if index >= warmup:
                times[name].append(elapsed / 1000)
    return times


def median_us(times: Iterable[float]) -> float:
    """The median of call times in µs, as reported."""
    return round(statistics.median(times), 1)


def per_call_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """The median of the ratios of calls made in the same round."""
    return round(statistics.median(n / d for n, d in zip(numerator, denominator, strict=True)), 3)


def abba(names: Sequence[str], runs: int) -> list[str]:
    """The order of ``runs`` runs per side of two sides, A B B A A B ...; a lone side runs once."""
    if len(names) == 1:
        return list(names)
    first, second = names
    pattern = (first, second, second, first)
    return [pattern[index % 4] for index in range(2 * runs)]


def _run_threads(work: _Work, threads: int, seconds: float) -> int:
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


# -- what the store benchmarks measure ---------------------------------------------------


def record(key: str, *, expires_at: datetime) -> Record:
    """A record with tokens of a real credential's size."""
    return Record(
        key=key,
        access_token=secrets.token_urlsafe(120),
        refresh_token=secrets.token_urlsafe(120),
        expires_at=expires_at,
        scopes=("user:inference", "user:profile"),
        subscription_type="max",
    )


@dataclass(frozen=True)
class Baseline:
    """A bare read of the credential that ``store.get`` reads, timed beside it."""

    name: str
    """The word for this side in the result's keys: ``raw`` or ``bare``."""
    call: Callable[[], object]
    version: Callable[[Any], object]
    """The record version in what ``call`` returned: both sides must read the same one."""


def measure_get(
    store: CredentialStore, key: str, baseline: Baseline | None, *, calls: int, warmup: int
) -> dict[str, Any]:
    """``TokenManager.get`` (cache off) vs ``store.get`` vs ``baseline``, interleaved.

    The credential is valid for hours, so no refresh may happen; one would void the comparison.
    """
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
        if baseline is not None:
            stored = store.get(key)
            if stored is None or baseline.version(baseline.call()) != stored.version:
                raise SystemExit(
                    f"the {baseline.name} read saw another version; the comparison is void"
                )
            sides[baseline.name] = baseline.call
        times = interleave(sides, calls=calls, warmup=warmup)
        refreshes = fake.refresh_count
    if refreshes:
        raise SystemExit(f"{refreshes} refreshes happened; the get comparison is void")
    result: dict[str, Any] = {
        "calls": calls,
        "provider_refreshes": refreshes,
        **{f"{name}_median_us": median_us(times[name]) for name in sides},
        "manager_vs_store_ratio": per_call_ratio(times["manager"], times["store"]),
    }
    if baseline is not None:
        bare = times[baseline.name]
        result[f"store_vs_{baseline.name}_ratio"] = per_call_ratio(times["store"], bare)
        result[f"manager_vs_{baseline.name}_ratio"] = per_call_ratio(times["manager"], bare)
    return result


def _increments(store: CredentialStore, keys: list[str], conflicts: list[int]) -> _Work:
    """Read-modify-write ``failures + 1`` on thread ``i``'s key ``keys[i]``, again on conflict."""

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


def _repeat(write: Callable[[str], object], keys: list[str]) -> _Work:
    """``write(keys[i])`` on thread ``i``, again and again."""

    def work(index: int, stop: threading.Event) -> int:
        key, writes = keys[index], 0
        while not stop.is_set():
            write(key)
            writes += 1
        return writes

    return work


def _failures(store: CredentialStore, keys: Iterable[str]) -> int:
    total = 0
    for key in set(keys):
        current = store.get(key)
        assert current is not None
        total += current.failures
    return total


def cas_keys(threads: int) -> tuple[str, list[str]]:
    """The names of the key all threads write (contended) and of each thread's own key."""
    return "cas-shared", [f"cas-{index}" for index in range(threads)]


def measure_cas(
    store: CredentialStore,
    key: Callable[[str], str],
    bare: Callable[[str], object] | None,
    *,
    threads: int,
    seconds: float,
    bare_increments: bool,
    digits: int | None = None,
) -> dict[str, Any]:
    """CAS increments through ``store`` against bare writes; no increment may be lost.

    Thread ``i`` increments ``keys[i]``: all one key (contended), or a key each (uncontended),
    the keys named by ``key`` from :func:`cas_keys`. On the baseline's side, thread ``i`` calls
    ``bare(keys[i])``, if there is a baseline. The sides run in slices A B B A ..., ``seconds``
    per side in all. The counters must rise by the store side's writes, plus the bare side's
    when ``bare_increments`` (it writes the same counters). Rates are rounded to ``digits``.
    """
    far = datetime.now(UTC) + timedelta(days=1)
    shared, own = cas_keys(threads)
    shared, own = key(shared), [key(name) for name in own]
    for name in (shared, *own):
        store.put(record(name, expires_at=far))
    result: dict[str, Any] = {"threads": threads, "seconds_per_side": seconds}
    for scenario, keys in (("contended", [shared] * threads), ("uncontended", own)):
        conflicts = [0] * threads
        sides = {"store": _increments(store, keys, conflicts)}
        if bare is not None:
            sides["bare"] = _repeat(bare, keys)
        writes = dict.fromkeys(sides, 0)
        elapsed = dict.fromkeys(sides, 0.0)
        before = _failures(store, keys)
        order = abba(list(sides), 2 * max(1, round(seconds)))
        for name in order:
            start = time.perf_counter()
            writes[name] += _run_threads(sides[name], threads, seconds / order.count(name))
            elapsed[name] += time.perf_counter() - start
        counted = sum(writes.values()) if bare_increments else writes["store"]
        lost = before + counted - _failures(store, keys)
        if lost:
            raise SystemExit(f"{scenario}: {lost} increments were lost; CAS is broken")
        rate = {name: writes[name] / elapsed[name] for name in sides}
        entry: dict[str, Any] = {
            "store_writes_per_s": round(rate["store"], digits),
            "store_writes": writes["store"],
            "conflicts": sum(conflicts),
            "lost_updates": lost,
        }
        if bare is not None:
            entry["bare_writes_per_s"] = round(rate["bare"], digits)
            entry["ratio"] = round(rate["store"] / rate["bare"], 3)
        result[scenario] = entry
    return result


# -- memory ------------------------------------------------------------------------------


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


def measure_memory(run: Callable[[], int], *, trace: bool) -> dict[str, Any]:
    """Time ``run()`` (which counts what it saw) and the memory it grew this process by.

    With ``trace``, also the ``tracemalloc`` peak, which slows allocation-heavy code: the
    elapsed time of a traced run is not reported.
    """
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
    return {
        "count": count,
        "elapsed_s": round(elapsed, 3),
        "rss_growth_kib": rss_growth,
        "rss_source": source,
        "tracemalloc_peak_kib": None if peak is None else peak // 1024,
    }


def scan_child(
    store: CredentialStore, raw: Callable[[], Iterable[str]] | None, args: argparse.Namespace
) -> dict[str, Any]:
    """As the ``--child`` process: iterate ``scan_due``, or ``raw()``, and measure it.

    ``raw()`` is the baseline, given for ``--child raw``: it loads every due key at once.
    ``args`` are the hidden flags of :func:`add_scan_flags`. Only keys under ``--prefix`` are
    counted: the other measurements' few keys are due too. Closes ``store``.
    """
    prefix: str = args.prefix
    before = datetime.fromtimestamp(args.before_ms / 1000, UTC)
    # Connect, and build the table's layout or the index, before measuring.
    store.get(prefix + "warm-up")

    def run() -> int:
        keys = store.scan_due(before) if raw is None else raw()
        return sum(1 for key in keys if key.startswith(prefix))

    try:
        return measure_memory(run, trace=args.trace)
    finally:
        store.close()


def _in_child(
    script: str, mode: str, url: str, prefix: str, before_ms: int, *, trace: bool
) -> dict[str, Any]:
    command = [sys.executable, script, "--child", mode, url]
    command += ["--prefix", prefix, "--before-ms", str(before_ms)]
    if trace:
        command.append("--trace")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {mode} scan subprocess failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def measure_scan(
    script: str,
    url: str,
    prefix: str,
    seed: Callable[[list[tuple[str, int]]], None],
    *,
    rows: int,
    modes: Sequence[str],
    runs: int,
) -> dict[str, Any]:
    """Seed ``rows`` due records, then scan them in fresh processes of ``script --child MODE``.

    ``seed(due)`` stores a record per ``(key, expires_at in epoch ms)``, the keys under
    ``prefix``; it is timed. ``modes`` are ``store`` (``scan_due``) and, if there is a baseline,
    ``raw``. Elapsed time is the median of ``runs`` untraced runs per mode, ordered A B B A ...;
    RSS growth is their largest; the ``tracemalloc`` peak comes from one more, traced, run.
    """
    prefix += "scan-"
    now = int(time.time() * 1000)
    rng = random.Random(1)
    # Due from an hour ago to twelve hours ahead: scanning up to a day ahead sees them all.
    due = [
        (f"{prefix}{index:07d}", now - HOUR_MS + rng.randrange(13 * HOUR_MS))
        for index in range(rows)
    ]
    before_ms = now + 24 * HOUR_MS
    start = time.perf_counter()
    seed(due)
    result: dict[str, Any] = {"rows": rows, "seed_s": round(time.perf_counter() - start, 1)}
    timed: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for mode in abba(modes, runs):
        timed[mode].append(_in_child(script, mode, url, prefix, before_ms, trace=False))
    for mode in modes:
        traced = _in_child(script, mode, url, prefix, before_ms, trace=True)
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


# -- output ------------------------------------------------------------------------------


def describe(*packages: str) -> dict[str, str]:
    """The Python, machine and CPUs measured on, and the versions of ``packages`` installed."""
    found = {"python": platform.python_version(), "machine": platform.machine()}
    for package in packages:
        with suppress(PackageNotFoundError):
            found[package] = version(package)
    # The CPUs this process may run on, which a container or taskset can make fewer.
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    found["cpus"] = str(os.cpu_count() if cpus is None else len(cpus))
    return found


def emit(result: dict[str, Any], show: Callable[[dict[str, Any]], None], *, as_json: bool) -> None:
    """Print ``result`` as one JSON line, or as ``show`` draws it; at once, for long runs."""
    if as_json:
        print(json.dumps(result))
    else:
        show(result)
    sys.stdout.flush()


def show_header(title: str, versions: Mapping[str, str]) -> None:
    """The line that names what a result measured."""
    print(f"== {title}  ({', '.join(f'{k} {v}' for k, v in versions.items())})")


def show_get(get: Mapping[str, Any], *, baseline: str, label: str) -> None:
    """The table of :func:`measure_get`'s result; ``label`` names the ``baseline`` side, if any."""
    rows = [
        ("TokenManager.get median", "manager_median_us"),
        ("store.get median", "store_median_us"),
    ]
    ratios = [("manager / store", "manager_vs_store_ratio")]
    if f"{baseline}_median_us" in get:
        rows.append((f"{label} median", f"{baseline}_median_us"))
        ratios.append((f"store / {label}", f"store_vs_{baseline}_ratio"))
        ratios.append((f"manager / {label}", f"manager_vs_{baseline}_ratio"))
    print(f"get, cache off, {get['calls']} interleaved calls per side")
    for name, field in rows:
        print(f"  {name:32} {get[field]:>9} µs")
    for name, field in ratios:
        print(f"  {name:32} {get[field]:>9}  (median per-call)")


def show_cas(cas: Mapping[str, Any], *, bare: str) -> None:
    """The write table of :func:`measure_cas`'s result; ``bare`` names the baseline's writes."""
    print(f"CAS read-modify-write, {cas['threads']} threads, {cas['seconds_per_side']} s per side")
    print(f"  {'':12} {'store w/s':>10} {'conflicts':>10} {bare + ' w/s':>16} {'ratio':>7}")
    for scenario in ("contended", "uncontended"):
        entry = cas[scenario]
        print(
            f"  {scenario:12} {entry['store_writes_per_s']:>10} {entry['conflicts']:>10} "
            f"{entry.get('bare_writes_per_s', '-'):>16} {entry.get('ratio', '-'):>7}"
        )


def show_scan(scan: Mapping[str, Any], *, labels: Mapping[str, str], rows: str) -> None:
    """The table of a ``scan_due`` result; ``labels`` names the modes' rows."""
    if "skipped" in scan:
        print(f"scan_due skipped: {scan['skipped']}")
        return
    print(f"scan_due over {scan['rows']} due {rows} (seeded in {scan['seed_s']} s)")
    print(f"  {'':12} {'elapsed s':>10} {'tracemalloc':>12} {'RSS growth':>11}")
    for mode, label in labels.items():
        if mode in scan:
            side = scan[mode]
            print(
                f"  {label:12} {side['elapsed_s']:>10} {side['tracemalloc_peak_mb']:>9} MB "
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
