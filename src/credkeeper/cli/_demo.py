"""The embedded demo: many workers calling the wrapper, short-lived tokens, one refresh per expiry.

Everything runs on this machine: a ``FakeProvider`` on loopback with rotating single-use refresh
tokens and reuse detection, a ``FakeWrapper`` that refuses any token the provider no longer
accepts, an encrypted ``FileStore`` in a temporary directory, and several managers sharing it,
so the refreshes really go through the store's compare-and-swap lease.
On a terminal the run shows a live progress bar; elsewhere (CI, a pipe) a plain line a second.
"""

from __future__ import annotations

import math
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn

from credkeeper._keyring import KeyRing
from credkeeper._manager import TokenManager
from credkeeper._registry import open_store
from credkeeper._store import CredentialStore
from credkeeper._wrapper import WrapperClient

if TYPE_CHECKING:
    from credkeeper.testing import FakeProvider

__all__ = ["DemoResult", "UnexpectedReply", "run_demo"]

# Tokens live 2 s and are refreshed 0.5 s before expiry, so a few seconds cross several expiries.
_LIFETIME = 2.0
_LEEWAY = 0.5
# Several managers, as several processes would have: they coordinate through the store only.
_MANAGERS = 4
_KEY = "demo-user"
# Each worker pauses between calls, so that 32 threads leave the GIL to the refresher.
_PAUSE = 0.01
_SAMPLE = 0.1

#: One worker's operation: use the credential stored under ``key`` once; raise on failure.
Call = Callable[[str], None]


_PROMPT = [{"role": "user", "content": "ping"}]


class UnexpectedReply(Exception):
    """The wrapper answered a demo call with something other than the expected reply."""


def build_call(client: WrapperClient) -> Call:
    """The one definition of what a demo worker does per call: a wrapper call as ``key``.

    The client takes fresh credentials from its manager and the fake wrapper checks them with
    the provider, so a stale or refused token shows up as a refusal in the wrapper's log.
    """

    def call(key: str) -> None:
        if client.messages.create(key, _PROMPT).text != "You said: ping":
            raise UnexpectedReply("the wrapper's reply was not the echo of the prompt")

    return call


@dataclass
class DemoResult:
    """What a demo run counted: calls and their failures, refreshes against expiries."""

    calls: int
    errors: Counter[str] = field(default_factory=Counter)
    refreshes: int = 0
    invalid_grants: int = 0
    expiries: int = 0
    refusals: int = 0

    @property
    def error_count(self) -> int:
        """How many calls failed, whatever the reason."""
        return sum(self.errors.values())

    @property
    def ok(self) -> bool:
        """No failed call, no token refused by the wrapper or the provider, and one refresh
        per expiry (give or take the one a run's last instant may or may not catch)."""
        return (
            self.error_count == 0
            and self.invalid_grants == 0
            and self.refusals == 0
            and abs(self.refreshes - self.expiries) <= 1
        )


class _Tally:
    """Call outcomes counted from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.calls = 0

    def add(self, outcome: str | None) -> None:
        with self._lock:
            self.calls += 1
            if outcome is not None:
                self.outcomes[outcome] += 1

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.calls, sum(self.outcomes.values())


def _stats(calls: int, refreshes: int, errors: int) -> str:
    error_style = "bold red" if errors else "bold"
    return (
        f"calls [bold]{calls:,}[/]  refreshes [bold]{refreshes}[/]  "
        f"errors [{error_style}]{errors}[/]"
    )


class _LiveDisplay:
    """A progress bar redrawn in place, for terminals."""

    def __init__(self, console: Console, seconds: float) -> None:
        self._progress = Progress(
            TextColumn("  [bold]running[/]"),
            BarColumn(),
            TextColumn("{task.completed:4.1f}/{task.total:g} s"),
            TextColumn("{task.fields[stats]}"),
            console=console,
        )
        self._task = self._progress.add_task("demo", total=seconds, stats=_stats(0, 0, 0))

    def __enter__(self) -> _LiveDisplay:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def update(self, elapsed: float, calls: int, refreshes: int, errors: int) -> None:
        self._progress.update(self._task, completed=elapsed, stats=_stats(calls, refreshes, errors))


class _PlainDisplay:
    """One plain line a second, for logs and pipes, where redrawing would only add noise."""

    def __init__(self, console: Console, seconds: float) -> None:
        self._console = console
        self._seconds = seconds
        self._next = 1.0
        self._finished = False

    def __enter__(self) -> _PlainDisplay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def update(self, elapsed: float, calls: int, refreshes: int, errors: int) -> None:
        final = elapsed >= self._seconds
        if self._finished or (not final and elapsed < self._next):
            return
        self._finished = final
        self._next = math.floor(elapsed) + 1.0
        progress = f"{elapsed:4.1f}/{self._seconds:g} s"
        self._console.print(f"  {progress}  {_stats(calls, refreshes, errors)}")


def run_demo(*, workers: int, seconds: float, console: Console | None = None) -> DemoResult:
    """Run ``workers`` threads for ``seconds`` against one credential; report on ``console``."""
    from credkeeper.testing import FakeProvider, FakeWrapper  # noqa: PLC0415 - test tooling, demo only

    console = console or Console(highlight=False, soft_wrap=True)
    with tempfile.TemporaryDirectory(prefix="credkeeper-demo-") as directory:
        root = Path(directory)
        url = (root / "credentials.json").as_uri()
        keyring = KeyRing.generate()
        with (
            FakeProvider(
                latency=0.05, access_token_lifetime=_LIFETIME, revoke_family_on_reuse=True
            ) as fake,
            FakeWrapper(fake) as wrapper,
        ):
            console.print(
                f"[bold]credkeeper demo[/]: {workers} workers on {_MANAGERS} managers for "
                f"{seconds:g} s, tokens living {_LIFETIME:g} s, refreshed {_LEEWAY:g} s early"
            )
            console.print(
                f"  store     {escape(url)} (tokens sealed with AES-256-GCM key "
                f"{escape(keyring.primary_id)})"
            )
            console.print(
                f"  provider  {escape(fake.token_url)} (rotating single-use refresh tokens)"
            )
            console.print(f"  wrapper   {escape(wrapper.url)} (refuses stale or revoked tokens)")
            managers = [
                TokenManager(
                    _sync(open_store(url)),
                    fake.provider(),
                    keyring=keyring,
                    leeway=_LEEWAY,
                    journal=root / "journal",
                )
                for _ in range(_MANAGERS)
            ]
            clients = [WrapperClient(manager, base_url=wrapper.url) for manager in managers]
            try:
                managers[0].put(_KEY, fake.issue(expires_in=_LIFETIME))
                calls = [build_call(client) for client in clients]
                tally = _drive(calls, workers=workers, seconds=seconds, console=console, fake=fake)
            finally:
                for client, manager in zip(clients, managers, strict=True):
                    client.close()
                    manager.close()
            outcomes = Counter(call.outcome for call in fake.refresh_calls)
            refusals = sum(call.outcome != "ok" for call in wrapper.calls)
    # The token enters the leeway every LIFETIME - LEEWAY seconds: one refresh each time.
    result = DemoResult(
        calls=tally.calls,
        errors=tally.outcomes,
        refreshes=outcomes["ok"],
        invalid_grants=outcomes["invalid_grant"],
        refusals=refusals,
        expiries=max(1, math.ceil(seconds / (_LIFETIME - _LEEWAY)) - 1),
    )
    _summarise(result, console)
    return result


def _drive(
    calls: list[Call], *, workers: int, seconds: float, console: Console, fake: FakeProvider
) -> _Tally:
    tally = _Tally()
    stop = threading.Event()
    start = time.monotonic()
    deadline = start + seconds

    def work(call: Call) -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                call(_KEY)
            except Exception as exc:  # noqa: BLE001 - counted and reported in the summary
                tally.add(type(exc).__name__)
            else:
                tally.add(None)
            time.sleep(_PAUSE)

    threads = [
        threading.Thread(target=work, args=(calls[n % len(calls)],), daemon=True)
        for n in range(workers)
    ]
    display = (
        _LiveDisplay(console, seconds) if console.is_terminal else _PlainDisplay(console, seconds)
    )
    with display:
        try:
            for thread in threads:
                thread.start()
            while any(thread.is_alive() for thread in threads):
                time.sleep(_SAMPLE)
                elapsed = min(time.monotonic() - start, seconds)
                display.update(elapsed, *_sample(tally, fake))
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        display.update(seconds, *_sample(tally, fake))
    return tally


def _sample(tally: _Tally, fake: FakeProvider) -> tuple[int, int, int]:
    calls, errors = tally.snapshot()
    return calls, fake.refresh_count, errors


def _count(number: int, singular: str, plural: str) -> str:
    return f"{number:,} {singular if number == 1 else plural}"


def _summarise(result: DemoResult, console: Console) -> None:
    errors = result.error_count
    console.print("[bold]summary[/]")
    console.print(
        f"  calls     {_count(result.calls, 'call', 'calls')}, "
        f"[{'red' if errors else 'green'}]{_count(errors, 'error', 'errors')}[/]"
    )
    console.print(
        f"  refresh   {_count(result.refreshes, 'provider refresh', 'provider refreshes')} "
        f"for {_count(result.expiries, 'expiry', 'expiries')}, "
        f"[{'red' if result.invalid_grants else 'green'}]{result.invalid_grants} invalid_grant[/]"
    )
    console.print(
        f"  wrapper   [{'red' if result.refusals else 'green'}]"
        f"{_count(result.refusals, 'token refused', 'tokens refused')}[/]"
    )
    for outcome, count in sorted(result.errors.items()):
        console.print(f"  [red]error[/]     {escape(outcome)} x{count}")
    verdict = "[bold green]OK[/]" if result.ok else "[bold red]FAILED[/]"
    console.print(f"  result    {verdict}")


def _sync(store: object) -> CredentialStore:
    if not isinstance(store, CredentialStore):  # pragma: no cover - file stores are sync
        raise TypeError("the demo needs a synchronous store")
    return store
