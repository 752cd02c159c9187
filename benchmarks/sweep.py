"""How fast sweepers refresh a fleet, against the ideal the provider's latency allows.

``--credentials`` credentials, all due, in a fresh table of the store at URL (PostgreSQL by
default); a ``FakeProvider`` answering each refresh after ``--latency`` seconds, revoking a token
family whose refresh token is used twice; ``--sweepers`` ``credkeeper sweep --json`` processes
started together, each with ``--concurrency`` threads. Reported:

- wall time from the start of the processes to the end of the last, against the ideal:
  ``credentials x latency / (sweepers x concurrency)``, the time the provider alone needs;
- duplicate refreshes (provider refreshes beyond one per credential; must be 0) and families
  refreshed more than once (must be 0);
- each sweeper's own report, its peak resident memory (``ru_maxrss`` of the process) and its CPU
  seconds (user and system);
- where the CPU went during the sweep: the sweepers', this process's (the provider, answering
  in threads), PostgreSQL's (every process of the server, those that exited included, read
  from ``/proc``; ``null`` where the server is not on this host) and the whole machine's, beside
  what the machine can give in the wall time (its cores x the wall time). Machine CPU well beyond
  the sum of the others means something else ran meanwhile, and the figures are not clean.

    .venv/bin/python benchmarks/sweep.py \\
        postgresql+psycopg://postgres@127.0.0.1:5432/test --credentials 10000

The provider runs in this process, beside the sweepers: on a small machine its threads compete
with them for the CPU, which the ratio then shows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import _harness
from credkeeper import KeyRing, Record, open_store
from credkeeper.testing import FakeProvider
from credkeeper_sql import init_store

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

# Runs `credkeeper sweep --json` and prints its report with the process's peak memory.
_SWEEPER = """
import contextlib, io, json, resource, sys
from credkeeper.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(sys.argv[1:])
report = json.loads(out.getvalue())
report["exit_code"] = code
usage = resource.getrusage(resource.RUSAGE_SELF)
report["peak_rss_mib"] = usage.ru_maxrss / 1024
report["cpu_s"] = usage.ru_utime + usage.ru_stime
print(json.dumps(report))
"""


def seed(url: str, fake: FakeProvider, ring: KeyRing, count: int) -> list[str]:
    """``count`` due credentials the provider issued, sealed under ``ring``; their families."""
    store = open_store(url)
    families = []
    try:
        for n in range(count):
            key = f"user-{n:06d}"
            credentials = fake.issue(expires_in=60)
            families.append(fake.family_of(credentials) or "")
            store.put(  # type: ignore[union-attr]
                Record(
                    key=key,
                    access_token=ring.seal(
                        credentials.access_token.get_secret_value(), key=key, field="access_token"
                    ),
                    refresh_token=ring.seal(
                        credentials.refresh_token.get_secret_value(),
                        key=key,
                        field="refresh_token",
                    ),
                    expires_at=credentials.expires_at,
                    scopes=credentials.scopes,
                )
            )
    finally:
        store.close()
    return families


def _ticks(stat: str) -> list[int]:
    """The numeric fields of a ``/proc/PID/stat`` line after the command name."""
    return [int(field) for field in stat[stat.rindex(")") + 2 :].split()[1:]]


def postgres_cpu() -> float | None:
    """CPU seconds PostgreSQL's processes on this host used so far: the live ones, and the
    backends its postmaster has reaped; ``None`` where no PostgreSQL process is visible."""
    ticks, seen = 0, False
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat[stat.find("(") + 1 : stat.rfind(")")] != "postgres":
            continue
        seen = True
        fields = _ticks(stat)
        ticks += fields[10] + fields[11]  # utime, stime
        if fields[0] == 1:  # the postmaster: its reaped children's too
            ticks += fields[12] + fields[13]
    return ticks / os.sysconf("SC_CLK_TCK") if seen else None


def machine_cpu() -> float:
    """CPU seconds all the machine's cores spent busy since boot."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sweep(url: str, keys: Path, token_url: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        "-c",
        _SWEEPER,
        "--store",
        url,
        "--keys",
        f"@{keys}",
        "--provider",
        token_url,
    ]
    with tempfile.TemporaryDirectory() as journals:
        own, postgres, machine = own_cpu(), postgres_cpu(), machine_cpu()
        started = time.monotonic()
        workers = [
            subprocess.Popen(
                [
                    *command,
                    "--journal",
                    str(Path(journals) / f"journal-{n}"),
                    "sweep",
                    "--json",
                    "--concurrency",
                    str(args.concurrency),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for n in range(args.sweepers)
        ]
        outputs = [worker.communicate()[0] for worker in workers]
        wall = time.monotonic() - started
        postgres_after = postgres_cpu()
        cpu = {
            "provider": own_cpu() - own,
            "postgres": None
            if postgres is None or postgres_after is None
            else postgres_after - postgres,
            "machine": machine_cpu() - machine,
            "capacity": (os.cpu_count() or 1) * wall,
        }
    reports = [json.loads(out) for out in outputs]
    cpu["sweepers"] = sum(report["cpu_s"] for report in reports)
    return {"wall_s": wall, "reports": reports, "cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("url", nargs="?", default=DEFAULT_URL)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--credentials", type=int, default=10_000)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sweepers", type=int, default=2)
    args = parser.parse_args()
    table = f"ck_bench_{uuid.uuid4().hex[:8]}"
    url = f"{args.url}{'&' if '?' in args.url else '?'}table={table}"
    init_store(args.url, table=table)
    ring = KeyRing.generate()
    try:
        with (
            tempfile.TemporaryDirectory() as home,
            FakeProvider(latency=args.latency, revoke_family_on_reuse=True) as fake,
        ):
            keys = Path(home) / "keys"
            keys.write_text(ring.export())
            os.chmod(keys, 0o600)
            families = seed(url, fake, ring, args.credentials)
            result = sweep(url, keys, fake.token_url, args)
            refreshed = Counter(c.family for c in fake.refresh_calls if c.outcome == "ok")
    finally:
        engine = sa.create_engine(args.url)
        with engine.begin() as connection:
            sa.Table(table, sa.MetaData()).drop(connection, checkfirst=True)
        engine.dispose()
    ideal = args.credentials * args.latency / (args.sweepers * args.concurrency)
    summary = {
        "store": _harness.describe("credkeeper", "sqlalchemy"),
        "credentials": args.credentials,
        "latency_s": args.latency,
        "sweepers": args.sweepers,
        "concurrency": args.concurrency,
        "wall_s": round(result["wall_s"], 2),
        "ideal_s": round(ideal, 2),
        "ratio": round(result["wall_s"] / ideal, 2),
        "provider_refreshes": sum(refreshed.values()),
        "duplicate_refreshes": sum(refreshed.values()) - len(refreshed),
        "families_refreshed_twice": sum(1 for n in refreshed.values() if n > 1),
        "families_not_refreshed": len(set(families) - set(refreshed)),
        "cpu_s": {name: _rounded(value) for name, value in result["cpu_s"].items()},
        "sweepers_report": result["reports"],
    }
    _harness.emit(summary, show, as_json=args.json)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def show(summary: dict[str, Any]) -> None:
    print(
        f"{summary['credentials']:,} due credentials, provider {summary['latency_s'] * 1000:.0f}"
        f" ms, {summary['sweepers']} sweepers x {summary['concurrency']} threads"
    )
    print(
        f"  wall {summary['wall_s']} s, ideal {summary['ideal_s']} s: {summary['ratio']}x"
        f"; provider refreshes {summary['provider_refreshes']:,}, duplicates "
        f"{summary['duplicate_refreshes']}, families twice {summary['families_refreshed_twice']},"
        f" not refreshed {summary['families_not_refreshed']}"
    )
    for n, report in enumerate(summary["sweepers_report"]):
        print(
            f"  sweeper {n}: refreshed {report['refreshed']:,}, fresh {report['fresh']:,}, "
            f"deferred {len(report['deferred'])}, failed {len(report['failed'])}, "
            f"{report['seconds']} s, peak RSS {report['peak_rss_mib']:.0f} MiB, "
            f"CPU {report['cpu_s']:.1f} s, exit {report['exit_code']}"
        )
    cpu = summary["cpu_s"]
    print(
        f"  CPU s: sweepers {cpu['sweepers']}, provider {cpu['provider']}, PostgreSQL "
        f"{cpu['postgres']}, machine {cpu['machine']} of {cpu['capacity']} the cores had"
    )


if __name__ == "__main__":
    main()
