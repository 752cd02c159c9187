"""What ``credkeeper serve`` adds on top of calling the wrapper directly with AsyncWrapperClient.

Both sides send the same conversation as the same user to one ``FakeWrapper`` on loopback. The
direct side is an ``AsyncWrapperClient`` in this process; the other side posts to
``/v1/users/{key}/messages`` of a real ``credkeeper serve`` process (started as deployed, on a
loopback port, without the sweeper), which attaches the credentials and calls the same wrapper
with its own ``AsyncWrapperClient``. Both managers come from the same settings: one encrypted
file store holding the credential (valid for hours: no refresh may happen), one key ring, the
``FakeProvider``'s token URL. Three measures:

- latency at concurrency 1: single calls interleaved (``_harness.interleave``), p50 and p99 of
  each side and what the service adds (goal: under 1 ms at p50);
- throughput at concurrency 32: that many tasks calling in a loop, in slices A B B A ... per
  side (``_harness.abba``); the service's calls per second against the direct side's (goal: at
  least 0.7 of it), and the CPU time a call took in this process and in the service's;
- the first line of a streamed reply (``"stream": true``), with the wrapper sending its lines
  ``--stream-gap`` seconds apart: the time to the first line of the service's NDJSON (read with
  httpx's ``aiter_lines``) against the time to the first event of
  ``AsyncWrapperClient.messages.stream``, interleaved (goal: under 2 ms added at p50). A service
  without streaming (501) is reported as skipped.

    .venv/bin/python benchmarks/service.py

Prints the tables; ``--json`` for one machine-readable line. The service, the wrapper, the
provider and the clients share the machine's CPUs: on a small machine the figures include their
competition, which the direct side (one process) and the service side (two) feel differently.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

import _harness
from credkeeper import AsyncWrapperClient, KeyRing, Settings
from credkeeper._settings import ENVIRONMENT
from credkeeper.testing import FakeProvider, FakeWrapper

KEY = "bench-user"
MESSAGES = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]
NDJSON = "application/x-ndjson"
LATENCY_GOAL_US = 1000.0
THROUGHPUT_GOAL = 0.7
FIRST_LINE_GOAL_US = 2000.0
START_TIMEOUT = 30.0
# Enough connections for every task on both sides: a pool smaller than the concurrency would
# time connection churn instead of calls.
LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=256)
# The settings' variables, kept from the service so that only its options configure it.
_VARIABLES = {variable for variable, _ in ENVIRONMENT.values()} | {"CREDKEEPER_API_KEYS_FILE"}

Call = Callable[[], Awaitable[object]]


# -- the service process -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# How uvicorn starts an access line for a loopback client.
ACCESS_LINE = "INFO:     127.0.0.1:"


@contextlib.contextmanager
def serve(
    directory: Path, settings: Settings, keys_file: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``credkeeper serve`` on a free loopback port, over ``settings``; its base URL and process."""
    port = _free_port()
    env = {name: value for name, value in os.environ.items() if name not in _VARIABLES}
    env.update(HOME=str(directory / "home"), XDG_STATE_HOME=str(directory / "state"))
    command = [
        sys.executable,
        "-m",
        "credkeeper",
        "--store",
        str(settings.store),
        "--keys",
        f"@{keys_file}",
        "--journal",
        str(directory / "service-journal"),
        "--provider",
        settings.provider,
        "--wrapper-url",
        settings.wrapper_url,
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--no-sweep",
    ]
    log = directory / "service.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, process, log)
        try:
            yield url, process
        except Exception:
            # What the service saw of a call that failed is in its own log, among the access
            # lines (written through a buffer, so not the last ones).
            lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
            told = [line for line in lines if not line.startswith(ACCESS_LINE)]
            print("credkeeper serve's log, access lines left out:", file=sys.stderr)
            print(*told[-40:], sep="\n", file=sys.stderr)
            raise
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"credkeeper serve exited with {process.returncode}:\n{_tail(log)}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)
    raise SystemExit(f"credkeeper serve did not answer /healthz in {START_TIMEOUT:g} s")


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-20:])


def cpu_seconds(pid: int) -> float | None:
    """The user and system CPU seconds process ``pid`` used so far; None without ``/proc``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the two sides -----------------------------------------------------------------------


@dataclass
class Sides:
    """The direct client, the service's client, and the calls each side makes."""

    direct: AsyncWrapperClient
    service: httpx.AsyncClient

    async def direct_text(self) -> str:
        """A message through the direct client: what production code does with the answer."""
        return (await self.direct.messages.create(KEY, MESSAGES)).text

    async def service_text(self) -> str:
        """The same message through the service, its JSON decoded as any client would."""
        response = await self.service.post(f"/v1/users/{KEY}/messages", json={"messages": MESSAGES})
        if response.status_code != 200:
            raise SystemExit(f"the service answered {response.status_code}: {response.text[:300]}")
        return str(response.json()["content"][0]["text"])

    async def direct_first(self) -> tuple[float, str]:
        """µs to the direct stream's first event, read to its end; the last event's type."""
        start = time.perf_counter_ns()
        first = None
        last = ""
        async with self.direct.messages.stream(KEY, MESSAGES) as events:
            async for event in events:
                if first is None:
                    first = time.perf_counter_ns()
                last = str(event.raw.get("type"))
        assert first is not None
        return (first - start) / 1000, last

    async def service_first(self) -> tuple[float, str] | str:
        """µs to the service stream's first line, read to its end, and the last line's type;
        or why the service did not stream."""
        body = {"messages": MESSAGES, "stream": True}
        start = time.perf_counter_ns()
        first = None
        last = ""
        async with self.service.stream("POST", f"/v1/users/{KEY}/messages", json=body) as answer:
            media_type = answer.headers.get("content-type", "").split(";")[0].strip()
            if answer.status_code != 200 or media_type != NDJSON:
                await answer.aread()
                return f"HTTP {answer.status_code} {media_type}: {answer.text[:200]}"
            async for line in answer.aiter_lines():
                if not line:
                    continue
                if first is None:
                    first = time.perf_counter_ns()
                last = str(json.loads(line).get("type"))
        assert first is not None
        return (first - start) / 1000, last


# -- what is measured --------------------------------------------------------------------


def _percentile(times: list[float], percent: int) -> float:
    """The ``percent``-th percentile of ``times``, as reported (µs, one decimal)."""
    if percent == 50 or len(times) < 2:
        return _harness.median_us(times)
    return round(statistics.quantiles(times, n=100, method="inclusive")[percent - 1], 1)


def _compare(direct: list[float], service: list[float], goal_us: float) -> dict[str, Any]:
    """p50 and p99 of each side's µs, what the service adds at each, and per-call figures."""
    result: dict[str, Any] = {"calls": len(direct)}
    for percent in (50, 99):
        low, high = _percentile(direct, percent), _percentile(service, percent)
        result[f"direct_p{percent}_us"] = low
        result[f"service_p{percent}_us"] = high
        result[f"added_p{percent}_us"] = round(high - low, 1)
    added = [s - d for s, d in zip(service, direct, strict=True)]
    result["median_per_call_added_us"] = round(statistics.median(added), 1)
    result["median_per_call_ratio"] = _harness.per_call_ratio(service, direct)
    result["goal_added_p50_us"] = goal_us
    result["goal_met"] = result["added_p50_us"] < goal_us
    return result


def measure_latency(
    run: Callable[[Awaitable[Any]], Any], sides: Sides, *, calls: int, warmup: int
) -> dict[str, Any]:
    """One call at a time, the two sides interleaved: ``_compare`` of their call times."""
    if run(sides.direct_text()) != run(sides.service_text()):
        raise SystemExit("the two sides got different answers; the comparison is void")
    times = _harness.interleave(
        {"direct": lambda: run(sides.direct_text()), "service": lambda: run(sides.service_text())},
        calls=calls,
        warmup=warmup,
    )
    return _compare(times["direct"], times["service"], LATENCY_GOAL_US)


async def _burst(call: Call, concurrency: int, seconds: float) -> tuple[int, float]:
    """``concurrency`` tasks calling in a loop for ``seconds``: the calls made, the time taken
    (until the last call started in time has returned)."""
    deadline = time.perf_counter() + seconds

    async def loop() -> int:
        made = 0
        while time.perf_counter() < deadline:
            await call()
            made += 1
        return made

    start = time.perf_counter()
    made = await asyncio.gather(*(loop() for _ in range(concurrency)))
    return sum(made), time.perf_counter() - start


def measure_throughput(
    run: Callable[[Awaitable[Any]], Any],
    sides: Sides,
    *,
    concurrency: int,
    seconds: float,
    service_pid: int,
) -> dict[str, Any]:
    """Calls per second of each side at ``concurrency``, in slices A B B A ..., ``seconds``
    per side in all, after an unmeasured second each; and the CPU time a call took in this
    process (the client, the fake wrapper and provider) and in the service's.

    With every core busy, the rates are set by these CPU times: the service's side pays for
    a second HTTP hop and a second process, the direct side for neither."""
    calls: dict[str, Call] = {"direct": sides.direct_text, "service": sides.service_text}
    for call in calls.values():
        run(_burst(call, concurrency, 1.0))
    made = dict.fromkeys(calls, 0)
    elapsed = dict.fromkeys(calls, 0.0)
    own_cpu = dict.fromkeys(calls, 0.0)
    service_cpu = dict.fromkeys(calls, 0.0)
    # Without /proc (not Linux) the service's CPU time is not reported.
    service_cpu_known = cpu_seconds(service_pid) is not None
    order = _harness.abba(list(calls), 2 * max(1, round(seconds)))
    for name in order:
        own, served = time.process_time(), cpu_seconds(service_pid) or 0.0
        count, took = run(_burst(calls[name], concurrency, seconds / order.count(name)))
        made[name] += count
        elapsed[name] += took
        own_cpu[name] += time.process_time() - own
        service_cpu[name] += (cpu_seconds(service_pid) or 0.0) - served
    rate = {name: made[name] / elapsed[name] for name in calls}
    per_call: dict[str, int | None] = {}
    for name in calls:
        per_call[f"{name}_own_cpu_us_per_call"] = round(own_cpu[name] / made[name] * 1e6)
        per_call[f"{name}_service_cpu_us_per_call"] = (
            round(service_cpu[name] / made[name] * 1e6) if service_cpu_known else None
        )
    return {
        "concurrency": concurrency,
        "seconds_per_side": seconds,
        "slices": len(order),
        "direct_calls_per_s": round(rate["direct"], 1),
        "service_calls_per_s": round(rate["service"], 1),
        "direct_calls": made["direct"],
        "service_calls": made["service"],
        "ratio": round(rate["service"] / rate["direct"], 3),
        "goal_ratio": THROUGHPUT_GOAL,
        "goal_met": rate["service"] / rate["direct"] >= THROUGHPUT_GOAL,
        **per_call,
    }


def measure_first_line(
    run: Callable[[Awaitable[Any]], Any], sides: Sides, *, calls: int, warmup: int, gap: float
) -> dict[str, Any]:
    """Time to the first streamed line, interleaved; skipped when the service does not stream."""
    probe = run(sides.service_first())
    if isinstance(probe, str):
        return {"skipped": f"the service did not stream ({probe})"}
    firsts: dict[str, list[float]] = {"direct": [], "service": []}
    ends: set[str] = set()

    def direct() -> None:
        first, last = run(sides.direct_first())
        firsts["direct"].append(first)
        ends.add(last)

    def service() -> None:
        outcome = run(sides.service_first())
        if isinstance(outcome, str):
            raise SystemExit(f"the service stopped streaming: {outcome}")
        firsts["service"].append(outcome[0])
        ends.add(outcome[1])

    _harness.interleave({"direct": direct, "service": service}, calls=calls, warmup=warmup)
    if ends != {"result"}:
        raise SystemExit(
            f"a stream ended with {sorted(ends)}, not a result; the comparison is void"
        )
    result = _compare(firsts["direct"][warmup:], firsts["service"][warmup:], FIRST_LINE_GOAL_US)
    return {"stream_gap_ms": round(gap * 1000, 3), **result}


async def _open(settings: Settings, service_url: str) -> tuple[contextlib.AsyncExitStack, Sides]:
    """The direct client over a manager from ``settings``, and a client of the service; made
    inside the loop that runs them, as an asyncio manager belongs to one loop."""
    stack = contextlib.AsyncExitStack()
    manager = await stack.enter_async_context(settings.async_manager())
    direct_http = await stack.enter_async_context(httpx.AsyncClient(limits=LIMITS))
    service_http = await stack.enter_async_context(
        httpx.AsyncClient(base_url=service_url, limits=LIMITS, timeout=60.0)
    )
    direct = await stack.enter_async_context(
        AsyncWrapperClient(manager, base_url=settings.wrapper_url, http=direct_http)
    )
    return stack, Sides(direct, service_http)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Start the fakes and the service, seed one credential, and take the three measures."""
    with (
        tempfile.TemporaryDirectory(prefix="credkeeper-bench-") as temporary,
        FakeProvider() as provider,
        FakeWrapper(provider, stream_gap=args.stream_gap, latency=args.latency) as wrapper,
    ):
        directory = Path(temporary)
        keys_file = directory / "keys"
        keys_file.write_text(KeyRing.generate().export() + "\n", encoding="utf-8")
        os.chmod(keys_file, 0o600)
        settings = Settings(
            store=(directory / "store" / "credentials.json").as_uri(),
            keys=f"@{keys_file}",
            provider=provider.token_url,
            journal=directory / "journal",
            wrapper_url=wrapper.url,
        )
        with settings.manager() as seeding:
            seeding.put(KEY, provider.issue(expires_in=6 * 3600))
        with serve(directory, settings, keys_file) as (service_url, process):
            loop = asyncio.new_event_loop()
            try:
                stack, sides = loop.run_until_complete(_open(settings, service_url))
                try:
                    result = {
                        "latency": measure_latency(
                            loop.run_until_complete, sides, calls=args.calls, warmup=args.warmup
                        ),
                        "throughput": measure_throughput(
                            loop.run_until_complete,
                            sides,
                            concurrency=args.concurrency,
                            seconds=args.seconds,
                            service_pid=process.pid,
                        ),
                        "first_line": measure_first_line(
                            loop.run_until_complete,
                            sides,
                            calls=args.stream_calls,
                            warmup=max(1, args.warmup // 10),
                            gap=args.stream_gap,
                        ),
                    }
                finally:
                    loop.run_until_complete(stack.aclose())
            finally:
                loop.close()
        refreshes = provider.refresh_count
    if refreshes:
        raise SystemExit(f"{refreshes} refreshes happened; the comparison is void")
    return {
        **result,
        "provider_refreshes": refreshes,
        "versions": _harness.describe("credkeeper", "httpx", "fastapi", "uvicorn"),
    }


# -- output ------------------------------------------------------------------------------


def _verdict(entry: dict[str, Any]) -> str:
    return "met" if entry["goal_met"] else "NOT met"


def _show_percentiles(entry: dict[str, Any]) -> None:
    print(f"  {'':6} {'direct':>10} {'service':>10} {'added':>10}")
    for percent in (50, 99):
        print(
            f"  p{percent:<5} {entry[f'direct_p{percent}_us']:>10} "
            f"{entry[f'service_p{percent}_us']:>10} {entry[f'added_p{percent}_us']:>10}  µs"
        )
    print(
        f"  median per-call added {entry['median_per_call_added_us']} µs, "
        f"ratio {entry['median_per_call_ratio']}"
    )


def show(result: dict[str, Any]) -> None:
    """Print the result as three short tables."""
    _harness.show_header("credkeeper serve against AsyncWrapperClient", result["versions"])
    latency = result["latency"]
    print(f"messages, concurrency 1, {latency['calls']} interleaved calls per side")
    _show_percentiles(latency)
    print(f"  goal: added p50 under {LATENCY_GOAL_US:g} µs: {_verdict(latency)}")
    throughput = result["throughput"]
    print(
        f"messages, concurrency {throughput['concurrency']}, "
        f"{throughput['seconds_per_side']} s per side in {throughput['slices']} slices A B B A"
    )
    print(f"  direct   {throughput['direct_calls_per_s']:>10} calls/s")
    print(f"  service  {throughput['service_calls_per_s']:>10} calls/s")
    print(f"  ratio    {throughput['ratio']:>10}")
    print(f"  CPU per call {'direct':>15} {'service':>8}")
    for where, label in (("own", "in this process"), ("service", "in the service")):
        print(
            f"    {label:15} {throughput[f'direct_{where}_cpu_us_per_call']!s:>10} "
            f"{throughput[f'service_{where}_cpu_us_per_call']!s:>8}  µs"
        )
    print(f"  goal: ratio at least {THROUGHPUT_GOAL:g}: {_verdict(throughput)}")
    first = result["first_line"]
    if "skipped" in first:
        print(f"first streamed line skipped: {first['skipped']}")
    else:
        print(
            f"first streamed line, lines {first['stream_gap_ms']} ms apart, "
            f"{first['calls']} interleaved calls per side"
        )
        _show_percentiles(first)
        print(f"  goal: added p50 under {FIRST_LINE_GOAL_US:g} µs: {_verdict(first)}")
    print(f"provider refreshes: {result['provider_refreshes']}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the result."""
    parser = _harness.parser(
        __doc__, calls=1000, warmup=100, measured="calls", json_help="print one JSON line"
    )
    parser.add_argument(
        "--concurrency",
        type=_harness._at_least(1, int),
        default=32,
        help="tasks calling at once for the throughput",
    )
    parser.add_argument(
        "--seconds",
        type=_harness._at_least(0.1, float),
        default=10.0,
        help="calling time per side for the throughput",
    )
    parser.add_argument(
        "--stream-calls",
        type=_harness._at_least(1, int),
        default=100,
        help="measured streamed calls per side",
    )
    parser.add_argument(
        "--stream-gap",
        type=_harness._at_least(0.001, float),
        default=0.01,
        help="seconds between the wrapper's streamed lines",
    )
    parser.add_argument(
        "--latency",
        type=_harness._at_least(0.0, float),
        default=0.0,
        help="seconds the wrapper takes per call (the real one runs a CLI for seconds); 0 "
        "measures the service's own cost, where a small machine's CPUs bound both sides",
    )
    args = parser.parse_args(argv)
    _harness.emit(measure(args), show, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
