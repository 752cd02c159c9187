"""Processes whose rescue journal is unusable, or whose provider answers half a refresh."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from credkeeper import KeyRing, Provider, TokenManager, open_store
from credkeeper.testing import FakeProvider, Fault

KEY = "user-hardened"


def _worker(url: str, token_url: str, journal: str, results: multiprocessing.Queue[str]) -> None:
    """Ask for the due credential once, with no key ring, and report the outcome."""
    try:
        with TokenManager(
            open_store(url), Provider.claude_code(token_url=token_url), journal=journal
        ) as manager:
            manager.get(KEY)
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(f"{type(exc).__name__}: {exc}")


def _run_workers(url: str, token_url: str, journal: Path, count: int) -> list[str]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [
        context.Process(target=_worker, args=(url, token_url, str(journal), results))
        for _ in range(count)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
    return outcomes


def _manager(url: str, fake: FakeProvider, journal: Path) -> TokenManager:
    return TokenManager(open_store(url), fake.provider(), journal=journal)


def _log_in(url: str, fake: FakeProvider, journal: Path) -> None:
    """Store a login whose access token is already due."""
    with _manager(url, fake, journal) as setup:
        setup.put(KEY, fake.issue(expires_in=0))


class TestUnusableJournal:
    def test_processes_with_a_refused_journal_key_still_store_the_new_tokens(
        self, tmp_path: Path
    ) -> None:
        """3 processes whose journal.key is group-readable: one refresh, all served, none lost."""
        url = f"file://{tmp_path / 'store' / 'credentials.json'}"
        journal = tmp_path / "journal"
        journal.mkdir(mode=0o700)
        (journal / "journal.key").write_text(KeyRing.generate().export())
        (journal / "journal.key").chmod(0o640)
        with FakeProvider(latency=0.2, revoke_family_on_reuse=True) as fake:
            _log_in(url, fake, journal)

            outcomes = _run_workers(url, fake.token_url, journal, 3)
            with _manager(url, fake, journal) as later:
                again = later.refresh(KEY)

            assert (["ok", "ok", "ok"], ("ok", "ok")) == (
                outcomes,
                tuple(call.outcome for call in fake.refresh_calls),
            )
            assert "current" == fake.refresh_token_state(again.refresh_token)


def _without_access_token(answer: dict[str, object]) -> dict[str, object]:
    return {name: value for name, value in answer.items() if name != "access_token"}


class TestHalfAnAnswer:
    def test_a_rotated_refresh_token_without_access_token_is_kept_for_the_next_process(
        self, tmp_path: Path
    ) -> None:
        """An answer missing its access token fails that call; the next process refreshes fine."""
        url = f"file://{tmp_path / 'store' / 'credentials.json'}"
        journal = tmp_path / "journal"
        with FakeProvider(revoke_family_on_reuse=True) as fake:
            _log_in(url, fake, journal)
            fake.fail_next(Fault.reshape(_without_access_token))

            first = _run_workers(url, fake.token_url, journal, 1)
            second = _run_workers(url, fake.token_url, journal, 1)
            with _manager(url, fake, journal) as later:
                held = later.get(KEY)

            assert first[0].startswith("ProviderError: ")
            assert "access_token" in first[0]
            assert (["ok"], ("fault:reshape", "ok")) == (
                second,
                tuple(call.outcome for call in fake.refresh_calls),
            )
            assert ("valid", "current") == (
                fake.access_token_state(held.access_token),
                fake.refresh_token_state(held.refresh_token),
            )
