"""The embedded demo: many workers, short-lived tokens, one refresh per expiry.

Everything runs on this machine: a ``FakeProvider`` on loopback with rotating single-use refresh
tokens and reuse detection, an encrypted ``FileStore`` in a temporary directory, and a manager per
worker group, so the refreshes really go through the store's compare-and-swap lease.
"""

from __future__ import annotations

import math
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TextIO

from ._keyring import KeyRing
from ._manager import TokenManager
from ._registry import open_store
from ._store import CredentialStore

# Tokens live 3 s and are refreshed 1 s before expiry, so a few seconds cross several expiries.
_LIFETIME = 3.0
_LEEWAY = 1.0


def run_demo(*, workers: int, seconds: float, out: TextIO) -> int:
    """Run the demo and print a summary; 0 when every call succeeded with one refresh per expiry."""
    from .testing import FakeProvider  # noqa: PLC0415 - test tooling, loaded for the demo only

    with tempfile.TemporaryDirectory(prefix="credkeeper-demo-") as directory:
        root = Path(directory)
        url = f"file://{root / 'credentials.json'}"
        keyring = KeyRing.generate()
        print(
            f"store:    {url} (tokens sealed with AES-256-GCM key {keyring.primary_id})", file=out
        )
        with FakeProvider(
            latency=0.05, access_token_lifetime=_LIFETIME, revoke_family_on_reuse=True
        ) as fake:
            print(f"provider: {fake.token_url} (rotating single-use refresh tokens)", file=out)
            managers = [
                TokenManager(
                    _sync(open_store(url)),
                    fake.provider(),
                    keyring=keyring,
                    leeway=_LEEWAY,
                    journal=root / "journal",
                )
                for _ in range(4)
            ]
            managers[0].put("demo-user", fake.issue(expires_in=_LIFETIME))
            print(
                f"running:  {workers} workers for {seconds:g} s on 4 managers, "
                f"tokens living {_LIFETIME:g} s",
                file=out,
            )
            outcomes: Counter[str] = Counter()
            lock = threading.Lock()
            deadline = time.monotonic() + seconds

            def work(manager: TokenManager) -> None:
                while time.monotonic() < deadline:
                    try:
                        credentials = manager.get("demo-user")
                        state = fake.access_token_state(credentials.access_token)
                        result = "ok" if state == "valid" else f"stale token ({state})"
                    except Exception as exc:  # noqa: BLE001 - counted and reported
                        result = type(exc).__name__
                    with lock:
                        outcomes[result] += 1
                    time.sleep(0.01)

            threads = [
                threading.Thread(target=work, args=(managers[n % 4],)) for n in range(workers)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for manager in managers:
                manager.close()
            calls = Counter(call.outcome for call in fake.refresh_calls)
        # The token enters the leeway every LIFETIME - LEEWAY seconds: one refresh each time.
        expected = max(1, math.ceil(seconds / (_LIFETIME - _LEEWAY)) - 1)
        errors = sum(count for result, count in outcomes.items() if result != "ok")
        print(f"calls:    {sum(outcomes.values())} get() calls, {errors} errors", file=out)
        print(
            f"refresh:  {calls['ok']} provider refreshes for {expected} expiries, "
            f"{calls['invalid_grant']} invalid_grant",
            file=out,
        )
        for result, count in sorted(outcomes.items()):
            if result != "ok":
                print(f"error:    {result} x{count}", file=out)
        ok = errors == 0 and calls["invalid_grant"] == 0 and abs(calls["ok"] - expected) <= 1
        print("result:   " + ("OK" if ok else "FAILED"), file=out)
        return 0 if ok else 1


def _sync(store: object) -> CredentialStore:
    if not isinstance(store, CredentialStore):  # pragma: no cover - file stores are sync
        raise TypeError("the demo needs a synchronous store")
    return store
