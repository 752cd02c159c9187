"""What the Secrets Manager store costs over bare boto3 calls, against moto's server.

Two measurements, each against a baseline run side by side in the same run:

1. ``get`` latency: ``TokenManager.get(key)`` with the in-process cache off, on a credential
   valid for hours (no refresh may happen), against a bare ``store.get(key)`` and a bare
   ``get_secret_value(SecretId=name, VersionStage="AWSCURRENT")`` on a boto3 client of its
   own. Calls are interleaved one by one, in an order drawn afresh each round; the medians
   and the medians of the per-call ratios show the manager's and the store's overhead.
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

import contextlib
import json
import logging
import multiprocessing
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3

import _harness
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


class Target:
    """The store under test on a fresh prefix, and a bare client on the same endpoint."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.prefix = f"ck-bench-{uuid.uuid4().hex[:8]}/"
        self.store = SecretsManagerStore(self.prefix, region=REGION, endpoint_url=endpoint)
        self.client: Any = boto3.client("secretsmanager", region_name=REGION, endpoint_url=endpoint)

    def versions(self) -> dict[str, str]:
        """Versions of what was measured."""
        return _harness.describe("credkeeper", "boto3", "botocore", "moto")

    def close(self) -> None:
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


def measure_get(target: Target, calls: int, warmup: int) -> dict[str, Any]:
    """Manager ``get`` (cache off) vs bare ``store.get`` vs bare ``get_secret_value``."""
    client, key = target.client, "get"
    # The store's name for the key: ``get`` needs no escaping.
    name = target.prefix + key
    baseline = _harness.Baseline(
        "bare",
        lambda: client.get_secret_value(SecretId=name, VersionStage="AWSCURRENT"),
        lambda answer: answer["VersionId"],
    )
    return _harness.measure_get(target.store, key, baseline, calls=calls, warmup=warmup)


# -- 2. compare-and-swap writes ----------------------------------------------------------


def measure_cas(target: Target, threads: int, seconds: float) -> dict[str, Any]:
    """CAS increments through the store vs bare ``put_secret_value`` calls, 8 threads each."""
    store, client = target.store, target.client
    record = _harness.record("bare", expires_at=datetime.now(UTC) + timedelta(days=1))
    value = json.dumps({"record": record.to_document()})

    # The baseline writes secrets of its own, so it adds no conflicts; cleanup deletes them.
    shared, own = _harness.cas_keys(threads)
    names = {key: f"{target.prefix}bare/{key}" for key in (shared, *own)}
    for name in names.values():
        client.create_secret(Name=name, SecretString=value)

    def bare(key: str) -> None:
        client.put_secret_value(SecretId=names[key], SecretString=value)

    return _harness.measure_cas(
        store,
        lambda key: key,
        bare,
        threads=threads,
        seconds=seconds,
        bare_increments=False,
        digits=1,
    )


# -- driver ------------------------------------------------------------------------------


def show(result: dict[str, Any]) -> None:
    """Print the result as readable tables."""
    _harness.show_header(result["endpoint"], result["versions"])
    _harness.show_get(result["get"], baseline="bare", label="bare get_secret_value")
    _harness.show_cas(result["cas"], bare="bare put")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the results."""
    parser = _harness.parser(
        __doc__, calls=1000, warmup=100, measured="get calls", json_help="print one JSON object"
    )
    parser.add_argument("--endpoint", help="a running moto server (default: start one)")
    _harness.add_write_flags(parser, seconds=6.0)
    args = parser.parse_args(argv)
    for variable, value in FAKE_CREDENTIALS.items():
        os.environ.setdefault(variable, value)
    with (
        moto_server(args.endpoint) as endpoint,
        contextlib.closing(Target(endpoint)) as target,
    ):
        result = {
            "endpoint": endpoint,
            "versions": target.versions(),
            "get": measure_get(target, args.calls, args.warmup),
            "cas": measure_cas(target, args.threads, args.seconds),
        }
    _harness.emit(result, show, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
