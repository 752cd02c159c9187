"""What ``WrapperClient`` costs on top of a bare ``httpx.Client`` per non-streaming call.

Both send the identical request to one ``FakeWrapper`` on loopback, interleaved call by call
(the order alternates, so neither side always runs on a warm cache), each over its own
keep-alive connection. The client side does everything it does in production: the token
manager's lookup (in-process cache on, as by default), request validation, the call, and the
parse into a typed ``Message``; the bare side posts the same JSON body and decodes the JSON.

    .venv/bin/python benchmarks/wrapper_overhead.py --calls 2000

Prints the medians and the median of the per-call ratios (client / bare); ``--json`` for a
machine-readable line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import httpx

from credkeeper import MemoryStore, TokenManager, WrapperClient
from credkeeper.testing import FakeProvider, FakeWrapper

MESSAGES = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


def measure(calls: int, warmup: int) -> dict[str, Any]:
    """Run ``warmup`` + ``calls`` interleaved pairs; the timings and their ratios."""
    with (
        tempfile.TemporaryDirectory() as journal,
        FakeProvider() as provider,
        FakeWrapper(provider) as wrapper,
        httpx.Client() as bare_http,
        httpx.Client() as client_http,
        TokenManager(MemoryStore(), provider.provider(), journal=journal) as manager,
        WrapperClient(manager, base_url=wrapper.url, http=client_http) as client,
    ):
        manager.put("user", provider.issue())
        body = {
            "oauth_credentials": {
                k: v for k, v in manager.get("user").to_wrapper().items() if v is not None
            },
            "messages": MESSAGES,
            "model": "sonnet",
        }
        url = wrapper.url + "/v1/messages"

        def with_client() -> object:
            return client.messages.create("user", MESSAGES).text

        def with_bare() -> object:
            response = bare_http.post(url, json=body)
            response.raise_for_status()
            return response.json()["content"][0]["text"]

        if with_client() != with_bare():
            raise SystemExit("the two sides got different answers; the comparison is void")
        client_times: list[float] = []
        bare_times: list[float] = []
        for index in range(warmup + calls):
            pair: list[tuple[Callable[[], object], list[float]]] = [
                (with_client, client_times),
                (with_bare, bare_times),
            ]
            for call, times in pair if index % 2 else reversed(pair):
                start = time.perf_counter_ns()
                call()
                elapsed = time.perf_counter_ns() - start
                if index >= warmup:
                    times.append(elapsed / 1000)
        refreshes = provider.refresh_count
    ratios = [c / b for c, b in zip(client_times, bare_times, strict=True)]
    return {
        "calls": calls,
        "client_median_us": round(statistics.median(client_times), 1),
        "bare_median_us": round(statistics.median(bare_times), 1),
        "ratio_of_medians": round(
            statistics.median(client_times) / statistics.median(bare_times), 3
        ),
        "median_per_call_ratio": round(statistics.median(ratios), 3),
        "provider_refreshes": refreshes,
        "python": platform.python_version(),
        "httpx": httpx.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="measured calls per side")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured calls first")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    result = measure(args.calls, args.warmup)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"calls per side:        {result['calls']}")
    print(f"WrapperClient median:  {result['client_median_us']} µs")
    print(f"bare httpx median:     {result['bare_median_us']} µs")
    print(f"ratio of medians:      {result['ratio_of_medians']}")
    print(f"median per-call ratio: {result['median_per_call_ratio']}  (goal <= 1.15)")
    print(f"provider refreshes:    {result['provider_refreshes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
