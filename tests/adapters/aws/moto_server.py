"""moto's Secrets Manager server, as the tests run it: ``python -m tests.adapters.aws.moto_server``.

It serves on a free loopback port, prints its URL as the first line of its output, and stops
when its standard input closes (``tests/adapters/aws/conftest.py`` starts it for the session).
Three adjustments make moto answer as AWS does where the tests depend on it, or answer faster,
without touching what a request does; each says why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest


@contextlib.contextmanager
def _cached_module_listing() -> Iterator[None]:
    """Make moto's server list its own package directory once instead of on every request.

    Routing a request calls ``moto.backends.list_of_moto_modules``, which lists moto's
    directory and stats each entry: most of the server's time per request on a small machine.
    The listing never changes while it runs; Secrets Manager's behaviour is untouched.
    """
    import moto.backends

    original = moto.backends.list_of_moto_modules
    listing = tuple(original())
    moto.backends.list_of_moto_modules = lambda: listing
    try:
        yield
    finally:
        moto.backends.list_of_moto_modules = original


@contextlib.contextmanager
def _secrets_found_by_name() -> Iterator[None]:
    """Make moto find a secret by its name in one dict lookup instead of a scan of them all.

    moto keeps a region's secrets in a dict keyed by name, but looks a secret up by comparing
    the name or ARN asked for with every secret's (``SecretsStore`` in
    ``moto/secretsmanager/models.py``): each request costs time in proportion to the secrets
    stored, and 10,000 of them (the migration chain's) make it milliseconds. A name held as a
    key whose secret has that name is the secret the scan would find first, as no ARN equals a
    name; every other lookup (an ARN, a partial ARN) still scans. What a request does is
    unchanged.
    """
    from moto.secretsmanager.models import SecretsStore

    def named(store: SecretsStore, key: str) -> Any:
        secret = dict.get(store, key)
        return secret if secret is not None and secret.name == key else None

    originals = {
        name: getattr(SecretsStore, name) for name in ("__getitem__", "__contains__", "get", "pop")
    }

    def getitem(store: SecretsStore, key: str) -> Any:
        found = named(store, key)
        return found if found is not None else originals["__getitem__"](store, key)

    def contains(store: SecretsStore, key: str) -> bool:
        return named(store, key) is not None or originals["__contains__"](store, key)

    def get(store: SecretsStore, key: str) -> Any:
        found = named(store, key)
        return found if found is not None else originals["get"](store, key)

    def pop(store: SecretsStore, key: str) -> Any:
        if named(store, key) is not None:
            return dict.pop(store, key)
        return originals["pop"](store, key)

    with pytest.MonkeyPatch.context() as patch:
        for name, function in (
            ("__getitem__", getitem),
            ("__contains__", contains),
            ("get", get),
            ("pop", pop),
        ):
            patch.setattr(SecretsStore, name, function)
        yield


@contextlib.contextmanager
def _one_request_at_a_time() -> Iterator[None]:
    """Make moto's server answer each Secrets Manager request whole, before the next one.

    AWS performs each request as one step, and the store relies on it: ``CreateSecret`` of a
    name succeeds once however many callers race, and ``UpdateSecretVersionStage`` checks and
    moves ``AWSCURRENT`` at once, so a read always finds it on some version. moto's backend
    changes plain dicts and lists from the server's threads, step by step: two racing creates
    can both succeed, a read in the middle of a stage move finds no ``AWSCURRENT``, and a move
    racing a ``PutSecretValue`` fails with an HTTP 500 after it happened (see
    ``moto/secretsmanager/models.py``). One lock around each request closes those windows
    without touching what a request does.
    """
    from moto.secretsmanager.responses import SecretsManagerResponse

    original = SecretsManagerResponse.call_action
    lock = threading.Lock()

    def call_action(self: SecretsManagerResponse) -> Any:
        with lock:
            return original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SecretsManagerResponse, "call_action", call_action)
        yield


def main() -> None:
    """Serve until standard input closes."""
    from moto.server import ThreadedMotoServer

    # One line per request otherwise.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with _cached_module_listing(), _secrets_found_by_name(), _one_request_at_a_time():
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            sys.stdout.write(f"http://{host}:{port}\n")
            sys.stdout.flush()
            # Nothing else goes to the pipe the tests read the URL from, which nobody drains.
            os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
            sys.stdin.read()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
