"""What ``WrapperClient`` costs on top of a bare ``httpx.Client`` per non-streaming call.

Both send the identical request to one ``FakeWrapper`` on loopback, interleaved call by call
(in an order drawn afresh each round, so neither side always runs on a warm cache), each over
its own keep-alive connection. The client side does everything it does in production: the
token manager's lookup (in-process cache on, as by default), request validation, the call,
and the parse into a typed ``Message``; the bare side posts the same JSON body and decodes
the JSON.

    .venv/bin/python benchmarks/wrapper_overhead.py --calls 2000

Prints the medians and the median of the per-call ratios (client / bare); ``--json`` for a
machine-readable line.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from typing import Any

import httpx

import _harness
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
        times = _harness.interleave(
            {"client": with_client, "bare": with_bare}, calls=calls, warmup=warmup
        )
        refreshes = provider.refresh_count
    client_times, bare_times = times["client"], times["bare"]
    return {
        "calls": calls,
        "client_median_us": _harness.median_us(client_times),
        "bare_median_us": _harness.median_us(bare_times),
        "ratio_of_medians": round(
            statistics.median(client_times) / statistics.median(bare_times), 3
        ),
        "median_per_call_ratio": _harness.per_call_ratio(client_times, bare_times),
        "provider_refreshes": refreshes,
        **_harness.describe("credkeeper", "httpx"),
    }


def show(result: dict[str, Any]) -> None:
    """Print the result as a short table."""
    print(f"calls per side:        {result['calls']}")
    print(f"WrapperClient median:  {result['client_median_us']} µs")
    print(f"bare httpx median:     {result['bare_median_us']} µs")
    print(f"ratio of medians:      {result['ratio_of_medians']}")
    print(f"median per-call ratio: {result['median_per_call_ratio']}  (goal <= 1.05)")
    print(f"provider refreshes:    {result['provider_refreshes']}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the result."""
    parser = _harness.parser(
        __doc__, calls=2000, warmup=200, measured="calls", json_help="print one JSON line"
    )
    args = parser.parse_args(argv)
    _harness.emit(measure(args.calls, args.warmup), show, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
